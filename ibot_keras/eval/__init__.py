"""Evaluation of frozen features."""

from ibot_keras.eval.features import CLSFeatures, eval_views, extract_features
from ibot_keras.eval.knn import knn_classify

__all__ = ["CLSFeatures", "eval_views", "extract_features", "knn_classify"]
