"""Data: the official multi-crop recipe, image sources and the training pipeline."""

from ibot_keras.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation
from ibot_keras.data.loader import MultiCropLoader
from ibot_keras.data.pipeline import Pipeline, augmentation_from_config, build_pipeline, masking_from_config
from ibot_keras.data.sources import ArraySource, ImageFolderSource, IterableSource, load_digits

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArraySource",
    "ImageFolderSource",
    "IterableSource",
    "MultiCropAugmentation",
    "MultiCropLoader",
    "Pipeline",
    "augmentation_from_config",
    "build_pipeline",
    "load_digits",
    "masking_from_config",
]
