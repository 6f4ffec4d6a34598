"""Last-block [CLS] attention maps per head, as pictures (the DINO/iBOT visualisation)."""

import numpy as np
from keras import ops
from PIL import Image

# A perceptual dark-to-bright colour ramp (black -> purple -> orange -> yellow), 5 stops.
_RAMP = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


def colorize(values):
    """Map ``(H, W)`` values to uint8 RGB with a dark-to-bright ramp (min-max normalised)."""
    values = np.asarray(values, np.float64)
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    position = scaled * (len(_RAMP) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return np.round(_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def cls_attention_maps(backbone, images, masks=None):
    """``(B, heads, H, W)``: how much the [CLS] token of the last block attends to each patch,
    upsampled to the image by repeating each patch (nearest, as the official script)."""
    images = np.asarray(images, np.float32)
    attention = ops.convert_to_numpy(backbone.get_last_selfattention(images, masks))
    p = backbone.patch_size
    rows, cols = images.shape[1] // p, images.shape[2] // p
    maps = attention[:, :, 0, 1:].reshape(attention.shape[0], attention.shape[1], rows, cols)
    return np.repeat(np.repeat(maps, p, axis=2), p, axis=3)


def attention_grid(image, maps, scale=1):
    """One row: the image, then one heat map per head. ``image`` uint8 ``(H, W, 3)``,
    ``maps`` ``(heads, H, W)``; returns uint8 ``(H*scale, W*scale*(1 + heads), 3)``."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    tiles = [image.astype(np.uint8)] + [colorize(m) for m in maps]
    row = np.concatenate(tiles, axis=1)
    if scale != 1:
        row = np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)
    return row


def save_attention_grid(path, backbone, image, normalized_image, scale=1):
    """Write ``attention_grid`` of one image to ``path`` (PNG). ``normalized_image`` is the
    model input ``(H, W, 3)`` float32; ``image`` the uint8 picture shown beside the maps."""
    maps = cls_attention_maps(backbone, normalized_image[None])[0]
    grid = attention_grid(image, maps, scale)
    Image.fromarray(grid).save(path)
    return grid
