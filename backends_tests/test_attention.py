"""Attention maps: shapes, values and the PNG grid."""

import numpy as np
from PIL import Image

from ibot_keras import VisionTransformer
from ibot_keras.eval import cls_attention_maps, save_attention_grid


def test_attention_maps_and_png(tmp_path):
    vit = VisionTransformer(patch_size=8, embed_dim=32, depth=2, num_heads=4, image_size=32)
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    normalized = (picture / 255.0 - 0.5).astype("float32")
    maps = cls_attention_maps(vit, normalized[None])
    assert maps.shape == (1, 4, 32, 48)
    # Each patch's value repeats over its 8x8 cell; CLS attention to patches sums to < 1.
    cells = maps[0, :, ::8, ::8]
    np.testing.assert_array_equal(np.repeat(np.repeat(cells, 8, 1), 8, 2), maps[0])
    assert np.all(cells.sum(axis=(1, 2)) < 1.0) and np.all(cells > 0)
    path = tmp_path / "attention.png"
    save_attention_grid(path, vit, picture, normalized, scale=2)
    saved = np.asarray(Image.open(path))
    assert saved.shape == (64, 2 * 48 * 5, 3)
    np.testing.assert_array_equal(saved[:64, :96], np.repeat(np.repeat(picture, 2, 0), 2, 1))
    heat = saved[:, 96:]
    assert heat.std() > 0  # not a constant picture
