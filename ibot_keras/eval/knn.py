"""Weighted k-NN classification of frozen features (the official ``eval_knn.py`` protocol)."""

import numpy as np
from keras import ops


def knn_classify(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes,
    k=20,
    temperature=0.07,
    chunk_size=256,
):
    """Top-1 and top-5 accuracy (%) of a cosine-similarity k-NN vote.

    Features must already be L2-normalised (rows), so a dot product is the cosine
    similarity. Each of the ``k`` most similar training samples votes for its label with
    weight ``exp(sim / temperature)``; classes are ranked by summed weight. Test samples are
    processed ``chunk_size`` at a time, so memory is ``chunk_size x N_train``, never N x N.
    Runs in ``keras.ops`` on the selected backend.
    """
    train_features = ops.convert_to_tensor(train_features, "float32")
    train_labels = ops.convert_to_tensor(np.asarray(train_labels, np.int32))
    test_features = np.asarray(test_features, np.float32)
    test_labels = np.asarray(test_labels)
    k = min(int(k), int(train_features.shape[0]))
    top1 = top5 = 0
    for start in range(0, len(test_features), chunk_size):
        chunk = ops.convert_to_tensor(test_features[start : start + chunk_size])
        similarity = ops.matmul(chunk, ops.transpose(train_features))
        top_sim, top_idx = ops.top_k(similarity, k=k, sorted=True)
        neighbour_labels = ops.take(train_labels, top_idx)  # (chunk, k)
        weights = ops.exp(top_sim / temperature)
        votes = ops.sum(ops.one_hot(neighbour_labels, num_classes) * weights[..., None], axis=1)
        ranked = np.argsort(-ops.convert_to_numpy(votes), axis=1, kind="stable")
        truth = test_labels[start : start + chunk_size, None]
        top1 += int((ranked[:, :1] == truth).sum())
        top5 += int((ranked[:, : min(5, k)] == truth).any(axis=1).sum())
    total = len(test_features)
    return 100.0 * top1 / total, 100.0 * top5 / total
