"""Positional-embedding interpolation exactly as the official iBOT/DINO ViT does it.

The official code resizes the stored ``g x g`` grid with PyTorch's bicubic kernel (A = -0.75,
``align_corners=False``, border-clamped taps) called with a *scale factor*
``(n + 0.1) / g`` rather than a target size, so a source coordinate is
``(dst + 0.5) * g / (n + 0.1) - 0.5``. Stock resize functions (``keras.ops.image.resize``,
``jax.image.resize``, ``tf.image.resize``) use the size-based mapping and a = -0.5 and differ
by up to ~0.12, so the resize is expressed here as a fixed interpolation matrix per target
grid, computed in float64 (plain Python, cached, so that torch.compile folds it to a constant)
at trace time and applied with one einsum.
"""

import functools
import math

import numpy as np
from keras import ops

_CUBIC_A = -0.75


def _cubic_near(x):
    # |x| <= 1 branch of the cubic convolution kernel.
    a = _CUBIC_A
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0


def _cubic_far(x):
    # 1 < |x| < 2 branch.
    a = _CUBIC_A
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a


@functools.lru_cache(maxsize=64)
def _bicubic_rows(in_size, out_size, scale_factor):
    # Pure Python on constants (no NumPy state): torch.compile's tracer folds it to a constant.
    rows = []
    scale = 1.0 / scale_factor
    for dst in range(out_size):
        src = scale * (dst + 0.5) - 0.5
        base = math.floor(src)
        t = src - base
        weights = (_cubic_far(t + 1.0), _cubic_near(t), _cubic_near(1.0 - t), _cubic_far(2.0 - t))
        row = [0.0] * in_size
        for offset, weight in zip((-1, 0, 1, 2), weights):
            row[min(max(base + offset, 0), in_size - 1)] += weight
        rows.append(tuple(row))
    return tuple(rows)


def bicubic_matrix(in_size, out_size, scale_factor):
    """``(out_size, in_size)`` float64 matrix of PyTorch bicubic weights for a scale factor."""
    return np.array(_bicubic_rows(in_size, out_size, scale_factor), dtype=np.float64)


def official_interpolation_matrices(grid_size, out_rows, out_cols):
    """Row and column matrices for resizing a ``grid_size``-square table to ``out_rows x out_cols``."""
    rows = bicubic_matrix(grid_size, out_rows, (out_rows + 0.1) / grid_size)
    cols = bicubic_matrix(grid_size, out_cols, (out_cols + 0.1) / grid_size)
    return rows, cols


def interpolate_position_embedding(pos_embed, out_rows, out_cols):
    """Resize a ``(1, 1 + g*g, D)`` table to ``(1, 1 + out_rows*out_cols, D)`` the official way.

    The CLS position is kept as is. When the target grid equals the stored square grid the
    table is returned unchanged, as in the official code.
    """
    num_patches = pos_embed.shape[1] - 1
    grid_size = int(round(num_patches**0.5))
    if grid_size * grid_size != num_patches:
        raise ValueError(
            f"The stored position table has {num_patches} patch positions, which is not a "
            "square grid."
        )
    if out_rows == grid_size and out_cols == grid_size:
        return pos_embed
    rows, cols = official_interpolation_matrices(grid_size, out_rows, out_cols)
    dim = pos_embed.shape[-1]
    grid = ops.reshape(pos_embed[:, 1:], (grid_size, grid_size, dim))
    rows = ops.convert_to_tensor(rows.astype("float32"), dtype=grid.dtype)
    cols = ops.convert_to_tensor(cols.astype("float32"), dtype=grid.dtype)
    resized = ops.einsum("ia,abd,jb->ijd", rows, grid, cols)
    resized = ops.reshape(resized, (1, out_rows * out_cols, dim))
    return ops.concatenate([pos_embed[:, :1], resized], axis=1)
