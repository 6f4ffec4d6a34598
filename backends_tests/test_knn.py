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
