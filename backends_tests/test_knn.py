"""k-NN against an independent NumPy implementation of the official voting."""

import numpy as np
import pytest

from ibot_keras.eval import knn_classify


def numpy_knn(train, train_labels, test, test_labels, num_classes, k, t=0.07):
    top1 = top5 = 0
    for feature, label in zip(test, test_labels):
        sim = train @ feature
        nearest = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for index in nearest:
            votes[train_labels[index]] += np.exp(sim[index] / t)
        ranked = np.argsort(-votes, kind="stable")
        top1 += ranked[0] == label
        top5 += label in ranked[: min(5, k)]
    return 100 * top1 / len(test), 100 * top5 / len(test)


def normalized(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 10, 20, 60])
def test_matches_numpy_reference(k):
    rng = np.random.default_rng(k)
    train, test = normalized(rng.standard_normal((200, 16))), normalized(rng.standard_normal((57, 16)))
    train_labels, test_labels = rng.integers(0, 7, 200), rng.integers(0, 7, 57)
    ours = knn_classify(train, train_labels, test, test_labels, 7, k=k, chunk_size=10)
    assert ours == pytest.approx(numpy_knn(train, train_labels, test, test_labels, 7, k))
    assert knn_classify(train, train_labels, test, test_labels, 7, k=k, chunk_size=1000) == ours


def test_well_separated_clusters_and_shuffled_labels():
    rng = np.random.default_rng(0)
    centers = normalized(rng.standard_normal((5, 32)))
    labels = rng.integers(0, 5, 600)
    features = normalized(centers[labels] + 0.05 * rng.standard_normal((600, 32)))
    top1, top5 = knn_classify(features[:400], labels[:400], features[400:], labels[400:], 5, k=20)
    assert top1 == 100.0 and top5 == 100.0
    shuffled = rng.permutation(labels)
    top1, _ = knn_classify(features[:400], shuffled[:400], features[400:], shuffled[400:], 5, k=20)
    assert top1 < 35  # chance is 20%


def test_ties_and_k_larger_than_a_class():
    # Duplicated training points tie in similarity (all copies share a label, so which copy
    # is picked does not matter); classes of 3 samples with k = 7 force votes across classes;
    # two classes with equal votes rank by class index in both implementations.
    rng = np.random.default_rng(3)
    base = normalized(rng.standard_normal((6, 8)))
    train = np.concatenate([base, base, base])  # 18 points, each direction 3 times
    train_labels = np.tile(np.arange(6), 3)
    test = normalized(base[[0, 2, 4]] + 0.01)
    test_labels = np.array([0, 2, 4])
    for k in (3, 7, 18):
        ours = knn_classify(train, train_labels, test, test_labels, 6, k=k, chunk_size=2)
        assert ours == pytest.approx(numpy_knn(train, train_labels, test, test_labels, 6, k))
    equal = np.array([[1.0, 0.0], [0.0, 1.0]])
    query = normalized(np.array([[1.0, 1.0]]))
    assert knn_classify(equal, [1, 0], query, [0], 2, k=2) == (100.0, 100.0)  # tie -> class 0


def test_knn_monitor_adds_logs():
    from ibot_keras import build_pretrainer
    from ibot_keras.eval import KNNMonitor, extract_features
    from test_model import tiny_batch, tiny_config

    model = build_pretrainer(tiny_config(), steps_per_epoch=1)
    rng = np.random.default_rng(0)
    views = rng.standard_normal((40, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, 3, 40)
    monitor = KNNMonitor(views[:30], labels[:30], views[30:], labels[30:], every=2, k=5)
    history = model.fit(tiny_batch(), batch_size=2, epochs=2, verbose=0, callbacks=[monitor])
    assert "knn_top1" in history.history and len(history.history["knn_top1"]) == 1  # epoch 2 only
    features = extract_features(model.teacher_backbone, views)
    expected = knn_classify(features[:30], labels[:30], features[30:], labels[30:], 3, k=5)
    assert history.history["knn_top1"][0] == pytest.approx(expected[0])


@pytest.mark.parametrize("num_registers", [0, 2])
def test_backbone_features_against_numpy(num_registers):
    """Each choice rebuilt in NumPy from the backbone's tokens; the patch-token cosine is the
    mean over grid positions of the per-position cosines (its documented meaning)."""
    from ibot_keras.eval import BackboneFeatures, KNNMonitor, extract_features
    from ibot_keras.models.vit import VisionTransformer

    vit = VisionTransformer(patch_size=4, embed_dim=8, depth=1, num_heads=2, image_size=12, seed=1,
                            num_registers=num_registers)
    images = np.random.default_rng(0).standard_normal((5, 12, 12, 3)).astype("float32")
    tokens = np.asarray(vit.predict(images, verbose=0), np.float64)  # (5, 1 + 9, 8): registers dropped
    assert tokens.shape == (5, 10, 8)
    cls, patches = normalized(tokens[:, 0]), tokens[:, 1:] / np.linalg.norm(tokens[:, 1:], axis=-1, keepdims=True)
    position_cosines = np.einsum("ipd,jpd->ijp", patches, patches).mean(axis=-1)  # (5, 5)

    ours = {name: extract_features(vit, images, batch_size=2, features=name)
            for name in ("cls", "patch_tokens", "cls+patch_tokens")}
    np.testing.assert_allclose(ours["cls"], cls, atol=1e-5)  # float32 normalisation of float32 tokens
    assert ours["patch_tokens"].shape == (5, 9 * 8)
    np.testing.assert_allclose(ours["patch_tokens"] @ ours["patch_tokens"].T, position_cosines, atol=1e-5)
    np.testing.assert_allclose(ours["patch_tokens"].reshape(5, 9, 8), patches / 3.0, atol=1e-5)
    both = ours["cls+patch_tokens"]
    np.testing.assert_allclose(both @ both.T, 0.5 * (cls @ cls.T) + 0.5 * position_cosines, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="choose one of cls, patch_tokens"):
        BackboneFeatures(vit, "mean")
    with pytest.raises(ValueError, match="KNNMonitor features='avg'"):
        KNNMonitor(images, [0] * 5, images, [0] * 5, features="avg")
