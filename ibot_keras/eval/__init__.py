"""Evaluation of frozen features."""

from ibot_keras.eval.attention import attention_grid, cls_attention_maps, save_attention_grid
from ibot_keras.eval.features import FEATURES, BackboneFeatures, CLSFeatures, eval_views, extract_features
from ibot_keras.eval.finetune import (
    ViTClassifier,
    build_finetune_model,
    finetune_optimizer,
    layer_ids,
    layerwise_lr_scales,
    no_weight_decay_paths,
)
from ibot_keras.eval.knn import knn_classify
from ibot_keras.eval.linear import (
    LinearProbeResult,
    MultiBlockFeatures,
    MultiHeadLinear,
    extract_multiblock_features,
    linear_probe,
    official_lr_grid,
    train_linear_heads,
)
from ibot_keras.eval.monitor import KNNMonitor
from ibot_keras.eval.scaled_optimizers import LayerwiseAdamW, PerVariableLearningRateMixin, ProbeSGD

__all__ = [
    "BackboneFeatures",
    "CLSFeatures",
    "FEATURES",
    "KNNMonitor",
    "LayerwiseAdamW",
    "LinearProbeResult",
    "MultiBlockFeatures",
    "MultiHeadLinear",
    "PerVariableLearningRateMixin",
    "ProbeSGD",
    "ViTClassifier",
    "attention_grid",
    "build_finetune_model",
    "cls_attention_maps",
    "eval_views",
    "extract_features",
    "extract_multiblock_features",
    "finetune_optimizer",
    "knn_classify",
    "layer_ids",
    "layerwise_lr_scales",
    "linear_probe",
    "no_weight_decay_paths",
    "official_lr_grid",
    "save_attention_grid",
    "train_linear_heads",
]
