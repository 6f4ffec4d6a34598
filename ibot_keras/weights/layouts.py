"""Official iBOT tensor layouts and key names, and the official position-table resize.

Official layouts differ from Keras ones: a Linear weight is ``(out, in)`` (Keras kernels are
``(in, out)``), the patch-embedding Conv2d weight is ``(D, C, p, p)`` (Keras ``(p, p, C, D)``),
weight-norm ``weight_g`` is ``(K, 1)`` (here ``(1, K)``). Names keep the official dots:
``backbone.blocks.0.attn.qkv.weight``, ``head.last_layer.weight_v`` and so on.
"""

import keras
import numpy as np

from ibot_keras.layers.position_embedding import interpolate_position_embedding

_TO_OFFICIAL = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
}
_FROM_OFFICIAL = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
}


def to_official_layout(array, layout):
    return np.ascontiguousarray(_TO_OFFICIAL[layout](np.asarray(array)))


def from_official_layout(array, layout):
    return np.ascontiguousarray(_FROM_OFFICIAL[layout](np.asarray(array)))


def to_numpy(value):
    """A NumPy array of ``value`` (a torch tensor, an array or a number)."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def strip_prefixes(state, prefixes=("module.",)):
    """Drop leading ``module.`` (DDP) and similar prefixes from every key."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def resize_position_table(table, grid_rows, grid_cols):
    """A ``(1, 1 + g*g, D)`` NumPy table resized to ``grid_rows x grid_cols`` patches with the
    official bicubic scale-factor mapping (``interpolate_position_embedding``: what the official
    ViT does at forward time for another image size); NumPy float32 out."""
    table = np.asarray(table, dtype=np.float32)
    resized = interpolate_position_embedding(table, grid_rows, grid_cols)
    return np.asarray(keras.ops.convert_to_numpy(resized), dtype=np.float32)
