"""Fine-tuning with layer-wise lr decay: the scales, and one optimizer step on a tiny ViT."""

import keras
import numpy as np
import pytest

from ibot_keras import VisionTransformer
from ibot_keras.eval import (
    build_finetune_model,
    finetune_optimizer,
    layerwise_lr_scales,
    no_weight_decay_paths,
)
from conftest import to_numpy

DEPTH, DECAY = 2, 0.5


def tiny_vit():
    return VisionTransformer(
        patch_size=4, embed_dim=16, depth=DEPTH, num_heads=2, image_size=8, use_mask_token=True, seed=0
    )


def expected_scale(path):
    """BEiT's rule written out by hand from the variable path, for depth 2 / decay 0.5:
    embeddings 0.5**3, block 0 0.5**2, block 1 0.5, final norm and head 1."""
    name = path.split("/", 1)[1] if "/" in path else path
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "masked_embed")):
        return 0.125
    if name.startswith("blocks_0/"):
        return 0.25
    if name.startswith("blocks_1/"):
        return 0.5
    assert name.startswith(("norm/", "head/")), path
    return 1.0


def test_layerwise_scales_match_the_formula():
    model = build_finetune_model(tiny_vit(), num_classes=3)
    scales = layerwise_lr_scales(model, DECAY)
    paths = [v.path for v in model.trainable_variables]
    assert sorted(scales) == sorted(paths) and len(set(paths)) == len(paths)
    for path, scale in scales.items():
        assert scale == expected_scale(path), path
    assert sorted(set(scales.values())) == [0.125, 0.25, 0.5, 1.0]
    # A bare ViT: same rule, no head; its mask token sits at layer 0.
    vit = tiny_vit()
    vit_scales = layerwise_lr_scales(vit, 0.75)
    assert vit_scales[vit.masked_embed.path] == pytest.approx(0.75**3)
    assert vit_scales[vit.blocks[1].mlp.fc2.kernel.path] == pytest.approx(0.75)
    # No decay on biases, norms, pos_embed, cls_token; decay on every matrix.
    skip = set(no_weight_decay_paths(model))
    assert model.backbone.pos_embed.path in skip and model.backbone.cls_token.path in skip
    assert model.backbone.blocks[0].norm1.gamma.path in skip and model.head.bias.path in skip
    assert model.head.kernel.path not in skip and model.backbone.patch_embed.kernel.path not in skip


def test_finetune_model_copies_the_backbone():
    vit = tiny_vit()
    model = build_finetune_model(vit, num_classes=3, drop_path_rate=0.1)
    images = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    assert model.backbone is not vit and model.backbone.masked_embed is None
    assert model.backbone.drop_path_rate == 0.1
    np.testing.assert_allclose(to_numpy(model.backbone(images)), to_numpy(vit(images)), atol=1e-6)
    logits = to_numpy(model(images))
    assert logits.shape == (2, 3) and np.abs(logits).max() < 1e-2  # head init scaled by 1e-3


def one_step(model, optimizer, images, labels):
    before = [to_numpy(v) for v in model.trainable_variables]
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(images, labels)
    after = [to_numpy(v) for v in model.trainable_variables]
    return before, [a - b for a, b in zip(after, before)]


def test_one_step_moves_each_layer_by_its_scale():
    """Same init, same batch: plain Adam vs layer-wise AdamW with weight decay. On the first
    Adam step the update is linear in lr, so each variable must move by ``scale x`` the plain
    step, plus exactly ``-lr * scale * wd * w`` where weight decay applies (AdamW decays
    before the Adam update, with the gradient taken at the old weights)."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 8, 8, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1])
    vit = tiny_vit()
    models = [build_finetune_model(vit, 3, head_init_scale=1.0, seed=7) for _ in range(2)]
    models[1].set_weights(models[0].get_weights())
    lr, wd = 1e-2, 0.5  # a large wd so that decay terms (>= 1e-2 * 0.125 * 0.5 * |w|) stand out
    _, plain = one_step(models[0], keras.optimizers.Adam(lr, epsilon=1e-8), images, labels)
    before, layerwise = one_step(models[1], finetune_optimizer(models[1], lr, DECAY, weight_decay=wd), images, labels)

    skip = set(no_weight_decay_paths(models[1]))
    assert len(skip) and len(skip) < len(models[1].trainable_variables)
    for i, variable in enumerate(models[1].trainable_variables):
        scale = expected_scale(variable.path)
        assert np.abs(plain[i]).max() > 1e-3, variable.path  # every variable really moved
        decay = 0.0 if variable.path in skip else lr * scale * wd
        # Steps are ~lr * scale >= 1.25e-3; float32 rounding of w (|w| <= ~3) is < 4e-7.
        # A missing lr scale errs by >= 6e-4, a missing wd scale by >= 1e-4 * |w| (w ~ 0.02+).
        expected = scale * plain[i] - decay * before[i]
        np.testing.assert_allclose(layerwise[i], expected, rtol=1e-3, atol=1e-6, err_msg=variable.path)


def test_optimizer_rejects_scales_for_other_variables():
    model = build_finetune_model(tiny_vit(), 3)
    other = build_finetune_model(tiny_vit(), 3)
    optimizer = finetune_optimizer(other, 1e-3, DECAY)
    with pytest.raises(ValueError, match="lr_scales"):
        optimizer.build(model.trainable_variables)
