"""VisionTransformer against the official ViT (ibot_vit_case.npz)."""

import keras
import numpy as np
import pytest
from conftest import load_fixture, official_state, to_numpy, value_and_grad

import ibot_keras
from ibot_keras import IBOTHead, VisionTransformer
from ibot_keras.checkpoint import load_state
from ibot_keras.layers import DropPath, LayerNormalization, interpolate_position_embedding

V = load_fixture("ibot_vit_case")
ATOL = 1e-5  # float32 ViT outputs vs the official float32 ones (fixture README)


def nhwc(x):
    return np.moveaxis(x, -3, -1)


def make_vit(use_mask_token=True):
    vit = VisionTransformer(
        patch_size=4, embed_dim=16, depth=2, num_heads=2, image_size=16, use_mask_token=use_mask_token
    )
    state = official_state(V, "vit_param__")
    if not use_mask_token:
        state.pop("masked_embed")
    load_state(vit.official_weights(), state)
    return vit


def test_masked_forward_and_tokens():
    vit = make_vit()
    images, masks = nhwc(V["x_global"][0]), V["mask_global"][0]
    np.testing.assert_allclose(to_numpy(vit(images, masks=masks)), V["vit_out_global0_masked"], atol=ATOL)
    np.testing.assert_allclose(
        to_numpy(vit.prepare_tokens(images, masks)), V["vit_tokens_global0_masked"], atol=ATOL
    )
    np.testing.assert_allclose(
        to_numpy(vit(images, masks=np.zeros_like(masks))), V["vit_out_global0_nomask"], atol=ATOL
    )
    np.testing.assert_allclose(to_numpy(vit(images))[:, 0], V["vit_out_global0_cls_only"], atol=ATOL)


def test_masks_may_be_flat():
    vit = make_vit()
    images, masks = nhwc(V["x_global"][0]), V["mask_global"][0]
    np.testing.assert_allclose(
        to_numpy(vit(images, masks=masks.reshape(2, 16))), V["vit_out_global0_masked"], atol=ATOL
    )


def test_interpolated_position_embedding_for_local_and_rectangular_crops():
    vit = make_vit(use_mask_token=False)
    np.testing.assert_allclose(to_numpy(vit(nhwc(V["x_local"][0]))), V["vit_out_local0"], atol=ATOL)
    np.testing.assert_allclose(to_numpy(vit(nhwc(V["x_rect"]))), V["vit_out_rect"], atol=ATOL)


@pytest.mark.parametrize("size,rows,cols", [("8x8", 2, 2), ("12x8", 3, 2), ("24x24", 6, 6)])
def test_official_bicubic_interpolation(size, rows, cols):
    table = V["vit_param__pos_embed"]
    ours = to_numpy(interpolate_position_embedding(keras.ops.convert_to_tensor(table), rows, cols))
    # The fixture interpolates a table of zeros in the CLS slot; compare the patch part.
    np.testing.assert_allclose(ours[:, 1:], V[f"pos_embed_interp_{size}"][:, 1:], atol=1e-6)


def test_stock_resize_would_be_wrong():
    # Why the custom bicubic exists: the size-based resize differs from the official output.
    table = V["vit_param__pos_embed"][0, 1:].reshape(4, 4, 16)
    stock = to_numpy(keras.ops.image.resize(table[None], (2, 2), interpolation="bicubic"))
    official = V["pos_embed_interp_8x8"][0, 1:].reshape(2, 2, 16)
    assert np.abs(stock[0] - official).max() > 1e-2


def test_multicrop_wrapper_outputs():
    vit = make_vit()
    head = IBOTHead(20, patch_out_dim=20, shared_head=True, norm_last_layer=False, hidden_dim=32, bottleneck_dim=8, in_dim=16)
    load_state(head.official_weights(), official_state(V, "whead_param__"))
    globals_ = nhwc(V["x_global"]).reshape(4, 16, 16, 3)  # crop-major, as the official wrapper
    masks = V["mask_global"].reshape(4, 4, 4)
    cls, patch = head(vit(globals_, masks=masks))
    np.testing.assert_allclose(to_numpy(cls), V["wrap_student_global_cls"], atol=ATOL)
    np.testing.assert_allclose(to_numpy(patch), V["wrap_student_global_patch"], atol=ATOL)
    cls, patch = head(vit(globals_))
    np.testing.assert_allclose(to_numpy(cls), V["wrap_teacher_global_cls"], atol=ATOL)
    np.testing.assert_allclose(to_numpy(patch), V["wrap_teacher_global_patch"], atol=ATOL)
    local_cls = head(vit(nhwc(V["x_local"]).reshape(4, 8, 8, 3))[:, 0])
    np.testing.assert_allclose(to_numpy(local_cls), V["wrap_student_local_cls"], atol=ATOL)


@pytest.mark.parametrize(
    "factory,count",
    [
        (ibot_keras.vit_tiny, 5_524_416),
        (ibot_keras.vit_small, 21_665_664),
        (ibot_keras.vit_base, 85_798_656),
    ],
)
def test_official_sizes(factory, count):
    vit = factory(patch_size=16)
    assert sum(int(np.prod(v.shape)) for v in vit.weights) == count


def test_mask_token_and_init():
    keras.utils.set_random_seed(1)
    vit = VisionTransformer(patch_size=16, embed_dim=192, depth=1, num_heads=3, use_mask_token=True)
    np.testing.assert_array_equal(to_numpy(vit.masked_embed), 0.0)
    assert to_numpy(vit.pos_embed).std() == pytest.approx(0.02, rel=0.05)
    kernel = to_numpy(vit.blocks[0].attn.qkv.kernel)
    assert kernel.std() == pytest.approx(0.02, rel=0.05)
    bound = 1 / np.sqrt(3 * 16 * 16)
    patch = to_numpy(vit.patch_embed.kernel)
    assert np.abs(patch).max() <= bound and patch.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


def test_drop_path_is_per_sample():
    layer = DropPath(0.3, seed=3)
    x = np.ones((4000, 5, 2), np.float32)
    y = to_numpy(layer(x, training=True))
    per_sample = y.reshape(4000, -1)
    # Each sample is either dropped entirely or scaled by 1 / keep.
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.7).all(1))
    dropped = (per_sample == 0).all(1).mean()
    assert abs(dropped - 0.3) < 0.03  # 4000 Bernoulli(0.3) draws: std 0.007
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)


def test_drop_path_rates_rise_linearly():
    vit = VisionTransformer(patch_size=4, embed_dim=8, depth=5, num_heads=2, image_size=8, drop_path_rate=0.2)
    np.testing.assert_allclose([b.drop_path.rate for b in vit.blocks], np.linspace(0, 0.2, 5))


def test_last_selfattention():
    vit = make_vit()
    attn = to_numpy(vit.get_last_selfattention(nhwc(V["x_global"][0])))
    assert attn.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
    # Independent check: recompute the last block's attention from the block input in NumPy.
    x = to_numpy(vit.blocks[0](vit.prepare_tokens(nhwc(V["x_global"][0]))))
    blk = vit.blocks[1]
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mean) / np.sqrt(var + 1e-6) * to_numpy(blk.norm1.gamma) + to_numpy(blk.norm1.beta)
    qkv = h @ to_numpy(blk.attn.qkv.kernel) + to_numpy(blk.attn.qkv.bias)
    qkv = qkv.reshape(2, 17, 3, 2, 8).transpose(2, 0, 3, 1, 4)
    scores = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(8)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(attn, probs, atol=1e-5)


@pytest.mark.parametrize(
    "images,masks,message",
    [
        (np.zeros((2, 15, 16, 3)), None, "Crop size 15x16 is not a multiple of patch_size=4"),
        (np.zeros((2, 3, 16, 16)), None, "channels in the last axis"),
        (np.zeros((16, 16, 3)), None, "rank 3"),
        (np.zeros((2, 16, 16, 3)), np.zeros((2, 3, 3), bool), r"Masks must be \(batch, 4, 4\)"),
    ],
)
def test_bad_input_raises_value_error(images, masks, message):
    vit = make_vit()
    with pytest.raises(ValueError, match=message):
        vit(images.astype("float32"), masks=masks)


def test_masks_need_a_mask_token():
    vit = make_vit(use_mask_token=False)
    with pytest.raises(ValueError, match="use_mask_token=False"):
        vit(np.zeros((1, 16, 16, 3), "float32"), masks=np.zeros((1, 4, 4), bool))


def test_serialization_round_trip(tmp_path):
    vit = make_vit()
    images = nhwc(V["x_local"][0])
    clone = VisionTransformer.from_config(vit.get_config())
    clone.set_weights(vit.get_weights())
    np.testing.assert_array_equal(to_numpy(vit(images)), to_numpy(clone(images)))
    path = tmp_path / "vit.keras"
    vit.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(vit(images)), to_numpy(loaded(images)))
    # remat reaches every block and survives the round trip
    remat = VisionTransformer.from_config({**vit.get_config(), "remat": True})
    assert [VisionTransformer.from_config(remat.get_config()).blocks[i].remat for i in range(remat.depth)] == [True] * remat.depth


def _numpy_layer_norm(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def test_layer_norm_matches_numpy_and_keras_gradients():
    """``ibot_keras.layers.LayerNormalization`` (the backend's fastest form) = a float64 NumPy LayerNorm, and its input
    gradient = that of ``keras.layers.LayerNormalization`` (float32: 1e-5)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 7, 24)) * 4 + 2).astype("float32")
    gamma, beta = rng.standard_normal(24).astype("float32"), rng.standard_normal(24).astype("float32")
    ours, stock = LayerNormalization(epsilon=1e-6), keras.layers.LayerNormalization(epsilon=1e-6)
    for layer in (ours, stock):
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    np.testing.assert_allclose(to_numpy(keras.ops.stop_gradient(ours(x))), _numpy_layer_norm(x, gamma, beta, 1e-6), atol=1e-5)
    weights = rng.standard_normal(x.shape).astype("float32")  # a non-trivial upstream gradient
    _, (ours_grad,) = value_and_grad(lambda inp: keras.ops.sum(keras.ops.multiply(ours(inp), weights)), x)
    _, (stock_grad,) = value_and_grad(lambda inp: keras.ops.sum(keras.ops.multiply(stock(inp), weights)), x)
    np.testing.assert_allclose(ours_grad, stock_grad, atol=1e-5)
    assert np.abs(ours_grad).max() > 1e-2  # not trivially zero
    restored = LayerNormalization.from_config(ours.get_config())
    assert restored.epsilon == 1e-6


def test_files_saved_with_keras_layer_normalization_still_load(tmp_path, monkeypatch):
    """A ViT saved when its norms were ``keras.layers.LayerNormalization`` (before the fast
    form) loads into today's ViT with every weight (the saved paths derive from the class name)."""
    import ibot_keras.layers.transformer_block as block_module
    import ibot_keras.models.vit as vit_module

    images = np.random.default_rng(2).standard_normal((2, 16, 16, 3)).astype("float32")
    with monkeypatch.context() as patch:
        patch.setattr(vit_module, "LayerNormalization", keras.layers.LayerNormalization)
        patch.setattr(block_module, "LayerNormalization", keras.layers.LayerNormalization)
        old = make_vit()
        assert type(old.norm) is keras.layers.LayerNormalization
        old.norm.gamma.assign(np.linspace(0.5, 1.5, 16))  # not the initial value
        expected = to_numpy(old(images))
        old.save(tmp_path / "old.keras")
    restored = keras.saving.load_model(tmp_path / "old.keras")
    assert type(restored.norm) is LayerNormalization
    np.testing.assert_allclose(to_numpy(restored(images)), expected, atol=1e-5)


def test_layer_norm_keeps_the_compute_dtype_under_mixed_precision():
    layer = LayerNormalization(epsilon=1e-6, dtype="mixed_bfloat16")
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype("float32")
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    # bfloat16 keeps 8 significant bits (relative step 2**-8 = 0.004) on outputs up to ~3: 2e-2.
    np.testing.assert_allclose(to_numpy(keras.ops.stop_gradient(keras.ops.cast(out, "float32"))), _numpy_layer_norm(x, 1.0, 0.0, 1e-6), atol=2e-2)
