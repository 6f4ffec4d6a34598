"""Linear probe: the official multi-lr recipe against independent references."""

import math

import numpy as np
import pytest

from ibot_keras import VisionTransformer
from ibot_keras.eval import (
    MultiBlockFeatures,
    MultiHeadLinear,
    extract_multiblock_features,
    linear_probe,
    official_lr_grid,
    train_linear_heads,
)
from conftest import to_numpy


def clusters(num_classes=5, per_class=60, dim=24, spread=0.3, seed=0):
    """Gaussian blobs around unit-norm centres; pairwise centre distance ~1.4 >> spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    features = centres[labels] + spread / math.sqrt(dim) * rng.standard_normal((len(labels), dim))
    return features.astype("float32"), labels


def test_official_grid():
    grid = official_lr_grid()
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(9.0)
    assert grid[9] == pytest.approx(1e-3) and grid[17] == pytest.approx(9e-3)


def test_separable_clusters_near_perfect_and_shuffled_labels_at_chance():
    features, labels = clusters()
    result = train_linear_heads(
        features[:200], labels[:200], features[200:], labels[200:],
        base_learning_rates=[0.01, 0.1, 1.0], epochs=15, batch_size=32, verbose=0,
    )
    assert result.best_top1 == 100.0 and result.best_top5 == 100.0
    assert result.train_loss[-1] < result.train_loss[0]
    # Shuffled labels: nothing to learn; 5 classes -> chance 20%. 100 val samples: the
    # binomial std is 4%, the best of 3 heads sits ~1 std above, so 40% is > 4 std away.
    shuffled = np.random.default_rng(1).permutation(labels)
    result = train_linear_heads(
        features[:200], shuffled[:200], features[200:], shuffled[200:],
        base_learning_rates=[0.01, 0.1, 1.0], epochs=15, batch_size=32, verbose=0,
    )
    assert result.best_top1 < 40.0


def test_lrs_trained_together_equal_each_alone():
    """Each head must see only its own loss, lr and momentum: the grid run has to reproduce
    a run of every lr on its own (same init draw, same shuffling)."""
    features, labels = clusters(spread=1.5, seed=2)  # overlapping: accuracies differ per lr
    rates = [0.003, 0.05, 0.8]
    kwargs = dict(epochs=4, batch_size=48, seed=3, verbose=0)
    together = train_linear_heads(features[:200], labels[:200], features[200:], labels[200:], base_learning_rates=rates, **kwargs)
    kernel_all, bias_all = (to_numpy(w) for w in together.classifier.layers[-1].weights)
    for h, rate in enumerate(rates):
        alone = train_linear_heads(features[:200], labels[:200], features[200:], labels[200:], base_learning_rates=[rate], **kwargs)
        kernel, bias = (to_numpy(w) for w in alone.classifier.layers[-1].weights)
        # Same arithmetic up to float32 summation order in the batched matmul (~1e-7
        # relative per step over 20 steps); a wrong head coupling moves weights by >1e-2.
        np.testing.assert_allclose(kernel_all[h], kernel[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bias_all[h], bias[0], rtol=1e-4, atol=1e-5)
        assert together.top1[h] == alone.top1[0]
    assert len(set(together.top1)) > 1  # the lrs did lead to different classifiers


def numpy_official_probe(features, labels, rates, epochs, batch_size, seed, init):
    """Independent NumPy version of the official loop: PyTorch SGD momentum 0.9,
    ``CosineAnnealingLR`` per epoch, ``lr * batch / 256``, mean cross-entropy."""
    kernel, bias = init.copy(), np.zeros(init.shape[1])
    buf_k, buf_b = np.zeros_like(kernel), np.zeros_like(bias)
    rng = np.random.default_rng(seed)
    base = rates * batch_size / 256
    for epoch in range(epochs):
        lr = base * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        order = rng.permutation(len(features))
        for start in range(0, len(order), batch_size):
            x, y = features[order[start : start + batch_size]], labels[order[start : start + batch_size]]
            logits = x @ kernel + bias
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(y)), y] -= 1
            grad_k, grad_b = x.T @ p / len(y), p.mean(0)
            buf_k, buf_b = 0.9 * buf_k + grad_k, 0.9 * buf_b + grad_b
            kernel, bias = kernel - lr * buf_k, bias - lr * buf_b
    return kernel, bias


def test_matches_numpy_reference_of_the_official_recipe():
    features, labels = clusters(spread=1.0, seed=4)
    features, labels = features[:100].astype("float64"), labels[:100]
    result = train_linear_heads(
        features, labels, features, labels, base_learning_rates=[0.5], epochs=3, batch_size=16, seed=5, verbose=0
    )
    layer = result.classifier.layers[-1]
    # A fresh layer with the same seed gives the init draw; then the same run in NumPy.
    fresh = MultiHeadLinear(1, 5, seed=5)
    fresh.build((None, features.shape[1]))
    init = to_numpy(fresh.kernel)[0]
    assert np.std(init) == pytest.approx(0.01, rel=0.2)
    kernel, bias = numpy_official_probe(features, labels, 0.5, 3, 16, 5, init.astype("float64"))
    # float32 vs float64 over 21 steps; the weights move by ~0.1, errors ~1e-6.
    np.testing.assert_allclose(to_numpy(layer.kernel)[0], kernel, atol=2e-5)
    np.testing.assert_allclose(to_numpy(layer.bias)[0], bias, atol=2e-5)


def test_multiblock_features_match_backbone():
    vit = VisionTransformer(patch_size=4, embed_dim=16, depth=3, num_heads=2, image_size=8, seed=0)
    images = np.random.default_rng(0).standard_normal((5, 8, 8, 3)).astype("float32")
    tokens = to_numpy(vit(images))
    last_cls = tokens[:, 0]
    # Independent: run the blocks by hand and apply the final norm to block 1 (of 0, 1, 2).
    x = vit.prepare_tokens(images)
    x = vit.blocks[1](vit.blocks[0](x))
    middle = to_numpy(vit.norm(x))

    features = to_numpy(MultiBlockFeatures(vit, n_last_blocks=2)(images))
    assert features.shape == (5, 32)
    np.testing.assert_allclose(features[:, :16], middle[:, 0], atol=1e-5)
    np.testing.assert_allclose(features[:, 16:], last_cls, atol=1e-5)

    pooled = extract_multiblock_features(vit, images, n_last_blocks=1, avgpool_patchtokens=True, batch_size=5, verbose=0)
    assert pooled.shape == (5, 32)
    np.testing.assert_allclose(pooled[:, :16], last_cls, atol=1e-5)
    np.testing.assert_allclose(pooled[:, 16:], tokens[:, 1:].mean(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="n_last_blocks"):
        MultiBlockFeatures(vit, n_last_blocks=4)


def test_linear_probe_end_to_end_on_a_random_vit():
    """A random ViT as the frozen feature extractor of three very different image patterns."""
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((3, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 3, 120)
    images = patterns[labels] + 0.3 * rng.standard_normal((120, 8, 8, 3)).astype("float32")
    vit = VisionTransformer(patch_size=4, embed_dim=16, depth=4, num_heads=2, image_size=8, seed=0)
    result = linear_probe(
        vit, images[:80], labels[:80], images[80:], labels[80:],
        base_learning_rates=[0.1, 1.0], epochs=10, batch_size=16, feature_batch_size=40, verbose=0,
    )
    assert result.classifier.layers[-1].kernel.shape == (2, 64, 3)  # 4 blocks x 16
    assert result.best_top1 >= 95.0
    assert result.table()[0][2] == result.best_top1
