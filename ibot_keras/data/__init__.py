"""Data: the official multi-crop recipe, image sources and the batch loader."""

from ibot_keras.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation
from ibot_keras.data.loader import MultiCropLoader
from ibot_keras.data.sources import ArraySource, ImageFolderSource, IterableSource, load_digits

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArraySource",
    "ImageFolderSource",
    "IterableSource",
    "MultiCropAugmentation",
    "MultiCropLoader",
    "load_digits",
]
