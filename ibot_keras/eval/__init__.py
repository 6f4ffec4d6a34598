"""Evaluation of frozen features."""

from ibot_keras.eval.attention import attention_grid, cls_attention_maps, save_attention_grid
from ibot_keras.eval.features import CLSFeatures, eval_views, extract_features
from ibot_keras.eval.knn import knn_classify
from ibot_keras.eval.monitor import KNNMonitor

__all__ = [
    "CLSFeatures",
    "KNNMonitor",
    "attention_grid",
    "cls_attention_maps",
    "save_attention_grid", "eval_views", "extract_features", "knn_classify"]
