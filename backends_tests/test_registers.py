"""VisionTransformer(num_registers=n): DINOv2-style register tokens, off by default."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from ibot_keras import VisionTransformer
from ibot_keras.eval.attention import cls_attention_maps
from ibot_keras.weights import backbone_from_official, export_official, load_official

SIZES = dict(patch_size=4, embed_dim=16, depth=2, num_heads=2, image_size=16, use_mask_token=True)
N = 16  # patches of a 16x16 image with patch 4
ATOL = 1e-5  # float32, same operations in a different token order


def images_and_masks(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, 16, 16, 3)).astype("float32")
    masks = rng.random((batch, 4, 4)) < 0.3
    return images, masks


def twin(vit, **changes):
    """A model with ``vit``'s settings (and ``changes``) sharing every official-named weight."""
    config = {key: value for key, value in vit.get_config().items() if key not in ("name", "trainable", "dtype")}
    other = VisionTransformer(**(config | changes))
    source = {name: variable for name, variable, _ in vit.official_weights()}
    for name, variable, _ in other.official_weights():
        if name in source:
            variable.assign(to_numpy(source[name]))
    return other


def test_zero_registers_is_exactly_todays_model():
    keras.utils.set_random_seed(3)
    today = VisionTransformer(**SIZES, seed=1, name="vit")
    keras.utils.set_random_seed(3)
    zero = VisionTransformer(**SIZES, seed=1, name="vit", num_registers=0)
    assert [v.path for v in zero.variables] == [v.path for v in today.variables]
    for ours, theirs in zip(zero.variables, today.variables):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs), err_msg=ours.path)
    assert [n for n, _, _ in zero.official_weights()] == [n for n, _, _ in today.official_weights()]
    assert zero.register_tokens is None
    images, masks = images_and_masks()
    np.testing.assert_array_equal(to_numpy(zero(images, masks=masks)), to_numpy(today(images, masks=masks)))
    np.testing.assert_array_equal(to_numpy(zero.get_last_selfattention(images)),
                                  to_numpy(today.get_last_selfattention(images)))


def test_token_layout_and_outputs_against_numpy():
    keras.utils.set_random_seed(0)
    vit = VisionTransformer(**SIZES, num_registers=2)
    plain = twin(vit, num_registers=0)  # validated against the official ViT in test_vit.py
    images, masks = images_and_masks()
    registers = to_numpy(vit.register_tokens)
    assert registers.shape == (1, 2, 16) and 0.005 < registers.std() < 0.05  # initialised like cls_token
    # Reference layout: [CLS] + pos, then the registers (no position), then patches + pos.
    base = to_numpy(plain.prepare_tokens(images, masks))
    expected = np.concatenate([base[:, :1], np.repeat(registers, 2, axis=0), base[:, 1:]], axis=1)
    tokens = to_numpy(vit.prepare_tokens(images, masks))
    assert tokens.shape == (2, 1 + 2 + N, 16)
    np.testing.assert_allclose(tokens, expected, atol=ATOL)
    # Outputs: the blocks run on all 1 + 2 + N tokens, then the registers are dropped.
    x = expected
    for block in vit.blocks:
        x = to_numpy(block(x))
    x = to_numpy(vit.norm(x))
    out = to_numpy(vit(images, masks=masks))
    assert out.shape == (2, 1 + N, 16) and vit.compute_output_shape((2, 16, 16, 3)) == (2, 1 + N, 16)
    np.testing.assert_allclose(out, np.concatenate([x[:, :1], x[:, 3:]], axis=1), atol=ATOL)
    # The registers take part in attention: without them (or with others) [CLS] changes.
    assert np.abs(out[:, 0] - to_numpy(plain(images, masks=masks))[:, 0]).max() > 1e-3
    vit.register_tokens.assign(registers + np.random.default_rng(1).normal(size=registers.shape).astype('float32'))
    assert np.abs(out[:, 0] - to_numpy(vit(images, masks=masks))[:, 0]).max() > 1e-3


def test_last_selfattention_keeps_cls_and_patch_rows_and_columns():
    keras.utils.set_random_seed(1)
    vit = VisionTransformer(**SIZES, num_registers=3)
    images, _ = images_and_masks()
    full = to_numpy(vit.get_last_selfattention(images, include_registers=True))
    assert full.shape == (2, 2, 1 + 3 + N, 1 + 3 + N)
    np.testing.assert_allclose(full.sum(-1), 1.0, rtol=1e-5)
    keep = [0] + list(range(4, 4 + N))
    attention = to_numpy(vit.get_last_selfattention(images))
    np.testing.assert_array_equal(attention, full[:, :, keep][:, :, :, keep])
    assert (full[:, :, 0, 1:4] > 0).all()  # [CLS] attends to the registers too
    maps = cls_attention_maps(vit, images)  # the eval code reads [CLS] -> patches
    assert maps.shape == (2, 2, 16, 16)
    np.testing.assert_array_equal(maps[:, :, ::4, ::4], full[:, :, 0, 4:].reshape(2, 2, 4, 4))


def test_config_round_trip(tmp_path):
    vit = VisionTransformer(**SIZES, num_registers=2)
    assert vit.get_config()["num_registers"] == 2
    clone = VisionTransformer.from_config(vit.get_config())
    assert clone.num_registers == 2 and tuple(clone.register_tokens.shape) == (1, 2, 16)
    clone.set_weights(vit.get_weights())
    images, masks = images_and_masks()
    np.testing.assert_array_equal(to_numpy(clone(images, masks=masks)), to_numpy(vit(images, masks=masks)))
    path = tmp_path / "vit.keras"
    vit.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(images, masks=masks)), to_numpy(vit(images, masks=masks)))
    with pytest.raises(ValueError, match="num_registers=-1"):
        VisionTransformer(**SIZES, num_registers=-1)


def test_official_weights_with_and_without_registers():
    keras.utils.set_random_seed(2)
    vit = VisionTransformer(**SIZES, num_registers=2)
    names = [name for name, _, _ in vit.official_weights()]
    assert names[:4] == ["cls_token", "pos_embed", "register_tokens", "masked_embed"]
    state = export_official(vit)
    # A register checkpoint round-trips, and backbone_from_official reads the register count.
    rebuilt = backbone_from_official(state, num_heads=2)
    assert rebuilt.num_registers == 2
    images, masks = images_and_masks()
    np.testing.assert_array_equal(to_numpy(rebuilt(images, masks=masks)), to_numpy(vit(images, masks=masks)))
    # ... but does not silently load into a register-free model.
    with pytest.raises(ValueError, match="has 2 register tokens.*num_registers=2"):
        load_official(VisionTransformer(**SIZES), state)
    # An official (register-free) checkpoint: refused unless strict=False, which keeps the
    # registers at their initial values and loads the rest.
    official = {k: v for k, v in state.items() if k != "register_tokens"}
    target = VisionTransformer(**SIZES, num_registers=2)
    before = to_numpy(target.register_tokens)
    with pytest.raises(ValueError, match="no register tokens.*num_registers=0.*strict=False"):
        load_official(target, official)
    with pytest.warns(UserWarning, match="register_tokens"):
        report = load_official(target, official, strict=False)
    assert report.missing == ["register_tokens"]
    np.testing.assert_array_equal(to_numpy(target.register_tokens), before)
    np.testing.assert_array_equal(to_numpy(target.blocks[1].mlp.fc2.kernel), to_numpy(vit.blocks[1].mlp.fc2.kernel))
    assert backbone_from_official(official, num_heads=2).num_registers == 0
