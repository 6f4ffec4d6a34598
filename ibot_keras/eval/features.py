"""Frozen-backbone features."""

import keras
import numpy as np
from keras import ops

from ibot_keras.data.augment import IMAGENET_MEAN, IMAGENET_STD, to_pil
from PIL import Image


class BackboneWrapper(keras.Model):
    """Base for models built around a ``backbone`` layer: (de)serialises it with the config."""

    def get_config(self):
        config = super().get_config()
        config["backbone"] = keras.saving.serialize_keras_object(self.backbone)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


class CLSFeatures(keras.Model):
    """``(B, H, W, 3) -> (B, D)`` final-norm CLS token of a backbone (official k-NN feature)."""

    def __init__(self, backbone, normalize=True, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.normalize = normalize

    def call(self, images):
        features = self.backbone(images, training=False)[:, 0]
        if self.normalize:
            norm = ops.sqrt(ops.sum(ops.square(features), axis=-1, keepdims=True))
            features = features / ops.maximum(norm, 1e-12)
        return features


def eval_views(source, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Deterministic evaluation views: each image resized (bicubic) to ``size x size`` and
    normalised, ``(N, size, size, 3)`` float32 (for images near ``size``; the official
    Resize(256)/CenterCrop(224) is meant for ImageNet-sized photos)."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    views = np.empty((len(source), size, size, 3), np.float32)
    for i in range(len(source)):
        image = to_pil(source[i]).resize((size, size), Image.BICUBIC)
        views[i] = (np.asarray(image, np.float32) / 255.0 - mean) / std
    return views


def extract_features(backbone, images, batch_size=128):
    """L2-normalised CLS features of ``images`` ``(N, H, W, 3)`` as a NumPy ``(N, D)`` array."""
    return CLSFeatures(backbone).predict(images, batch_size=batch_size, verbose=0)
