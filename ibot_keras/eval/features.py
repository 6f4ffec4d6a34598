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


FEATURES = ("cls", "patch_tokens", "cls+patch_tokens")


def _unit(x, axis=-1):
    norm = ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True))
    return x / ops.maximum(norm, 1e-12)


class BackboneFeatures(keras.Model):
    """``(B, H, W, 3) -> (B, F)`` frozen features from a backbone's final-norm tokens.

    ``features``:

    - ``"cls"`` (default; the official k-NN and ``eval_knn.py`` feature): the [CLS] token,
      ``F = D``.
    - ``"patch_tokens"`` (a departure): every patch token L2-normalised, in grid order,
      concatenated and scaled by ``1 / sqrt(N)``, ``F = N * D``: the cosine of two images is
      the mean over grid positions of their tokens' cosines. It keeps where things are, which
      [CLS] pools away; on small, centred images (``benchmarks/RESULTS.md``) it is the
      feature of a small-data teacher that beats raw pixels in k-NN. Needs equal-sized images.
    - ``"cls+patch_tokens"``: both, each with weight 1/2 in the cosine, ``F = (N + 1) * D``.

    ``normalize=True``: rows have unit L2 norm (for ``"cls"`` the [CLS] token itself is
    normalised; the other two are unit by construction, up to all-zero tokens).
    """

    def __init__(self, backbone, features="cls", normalize=True, **kwargs):
        super().__init__(**kwargs)
        if features not in FEATURES:
            raise ValueError(f"features={features!r}: choose one of {', '.join(FEATURES)}.")
        self.backbone = backbone
        self.features = features
        self.normalize = normalize

    def call(self, images):
        tokens = self.backbone(images, training=False)  # (B, 1 + N, D)
        cls = tokens[:, 0]
        if self.features == "cls":
            return _unit(cls) if self.normalize else cls
        num_patches = tokens.shape[1] - 1
        patches = _unit(tokens[:, 1:]) / float(np.sqrt(num_patches))
        patches = ops.reshape(patches, (-1, num_patches * tokens.shape[2]))
        if self.features == "patch_tokens":
            return patches
        half = float(np.sqrt(0.5))
        return ops.concatenate([_unit(cls) * half, patches * half], axis=-1)


class CLSFeatures(BackboneFeatures):
    """``BackboneFeatures(backbone, "cls", normalize)``: the name before ``features`` existed."""

    def __init__(self, backbone, normalize=True, **kwargs):
        kwargs.pop("features", None)
        super().__init__(backbone, "cls", normalize, **kwargs)


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


def extract_features(backbone, images, batch_size=128, features="cls"):
    """L2-normalised features of ``images`` ``(N, H, W, 3)`` as a NumPy ``(N, F)`` array:
    the [CLS] token by default (``F = D``), or another ``BackboneFeatures`` choice."""
    return BackboneFeatures(backbone, features).predict(images, batch_size=batch_size, verbose=0)
