"""Linear probe of a frozen backbone: the official ``eval_linear_multi.py`` recipe.

Features (extracted once, frozen teacher backbone, no L2 normalisation, no BatchNorm):
the final-norm [CLS] token of each of the last ``n_last_blocks`` blocks, concatenated
(ViT-S: 4 blocks), optionally followed by the mean of the last block's patch tokens (ViT-B/L:
``n_last_blocks=1, avgpool_patchtokens=True``).

Classifier: one linear layer per learning rate, weights N(0, 0.01), bias 0, all trained in the
same pass over the features on the summed cross-entropy (the heads share no parameters, so
each head sees exactly its own loss's gradient). SGD, momentum 0.9 (PyTorch form), weight
decay 0, every lr multiplied by ``batch_size / 256``, cosine annealing to 0 stepped once per
epoch (``CosineAnnealingLR(T_max=epochs)``). The official grid is ``{1..9} x 10^{-4..0}``.

Deviations, on purpose: features are computed once from deterministic views (the official
run draws RandomResizedCrop + flip every epoch), and every head starts from the same N(0, 0.01)
draw (the official code draws each head separately), so a learning rate's result does not
depend on which other learning rates are in the grid. Accuracy is reported after the last
epoch (the official script keeps the maximum over periodic validations).
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from ibot_keras.eval.features import BackboneWrapper
from ibot_keras.eval.scaled_optimizers import ProbeSGD


def official_lr_grid():
    """The 45 base learning rates of ``eval_linear_multi.py``: ``{1..9} x 10^k, k = -4..0``."""
    return [round(multiplier * 10.0**exponent, 10) for exponent in range(-4, 1) for multiplier in range(1, 10)]


@keras.saving.register_keras_serializable(package="ibot_keras")
class MultiBlockFeatures(BackboneWrapper):
    """``(B, H, W, C) -> (B, n_last_blocks * D [+ D])`` linear-probe features of a ViT.

    Each of the last ``n_last_blocks`` blocks' output goes through the backbone's final
    LayerNorm (the official ``get_intermediate_layers``) and its [CLS] token is kept; the
    tokens are concatenated from the earliest block to the last. With
    ``avgpool_patchtokens`` the mean of the last block's normalised patch tokens is appended.
    Inference mode (no drop path); the backbone is not modified.
    """

    def __init__(self, backbone, n_last_blocks=4, avgpool_patchtokens=False, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= int(n_last_blocks) <= backbone.depth:
            raise ValueError(f"n_last_blocks={n_last_blocks} must be in [1, depth={backbone.depth}].")
        self.backbone = backbone
        self.n_last_blocks = int(n_last_blocks)
        self.avgpool_patchtokens = bool(avgpool_patchtokens)

    @property
    def feature_dim(self):
        return (self.n_last_blocks + int(self.avgpool_patchtokens)) * self.backbone.embed_dim

    def call(self, images):
        x = self.backbone.prepare_tokens(images)
        first_kept = self.backbone.depth - self.n_last_blocks
        outputs = []
        for index, block in enumerate(self.backbone.blocks):
            x = block(x, training=False)
            if index >= first_kept:
                outputs.append(self.backbone.norm(x))
        features = [tokens[:, 0] for tokens in outputs]
        if self.avgpool_patchtokens:
            features.append(ops.mean(self.backbone.drop_registers(outputs[-1])[:, 1:], axis=1))
        return ops.concatenate(features, axis=-1)

    def compute_output_shape(self, images_shape):
        return (images_shape[0], self.feature_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            n_last_blocks=self.n_last_blocks,
            avgpool_patchtokens=self.avgpool_patchtokens,
        )
        return config


def extract_multiblock_features(
    backbone, images, n_last_blocks=4, avgpool_patchtokens=False, batch_size=256, verbose=1
):
    """``MultiBlockFeatures`` of ``images`` ``(N, H, W, C)`` as a NumPy ``(N, F)`` float32
    array, ``batch_size`` images at a time (one compiled function), with a progress bar."""
    extractor = MultiBlockFeatures(backbone, n_last_blocks, avgpool_patchtokens)
    images = np.asarray(images, np.float32)
    features = np.empty((len(images), extractor.feature_dim), np.float32)
    progress = keras.utils.Progbar(len(images), verbose=verbose, unit_name="image") if verbose else None
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        features[start : start + len(chunk)] = ops.convert_to_numpy(extractor.predict_on_batch(chunk))
        if progress:
            progress.update(start + len(chunk))
    return features


@keras.saving.register_keras_serializable(package="ibot_keras")
class MultiHeadLinear(keras.layers.Layer):
    """``num_heads`` independent linear classifiers on the same input:
    ``(B, F) -> (B, num_heads, num_classes)``, ``logits[:, h] = x @ kernel[h] + bias[h]``.

    Kernel ``(num_heads, F, num_classes)``, bias ``(num_heads, num_classes)``. Init as the
    official ``LinearClassifier``: weights N(0, ``init_std``), bias 0; with
    ``same_init_for_all_heads`` every head starts from one shared draw.
    """

    def __init__(self, num_heads, num_classes, init_std=0.01, same_init_for_all_heads=True, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.num_classes = int(num_classes)
        self.init_std = float(init_std)
        self.same_init_for_all_heads = bool(same_init_for_all_heads)
        self.seed = seed

    def build(self, input_shape):
        feature_dim = int(input_shape[-1])
        normal = keras.initializers.RandomNormal(stddev=self.init_std, seed=self.seed)

        def kernel_init(shape, dtype=None):
            if not self.same_init_for_all_heads:
                return normal(shape, dtype=dtype)
            return ops.tile(normal(shape[1:], dtype=dtype)[None], (shape[0], 1, 1))  # a real copy per head

        self.kernel = self.add_weight(
            name="kernel", shape=(self.num_heads, feature_dim, self.num_classes), initializer=kernel_init
        )
        self.bias = self.add_weight(name="bias", shape=(self.num_heads, self.num_classes), initializer="zeros")

    def call(self, features):
        features = ops.cast(features, self.kernel.dtype)
        return ops.einsum("bf,hfc->bhc", features, self.kernel) + self.bias[None]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_heads, self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            num_classes=self.num_classes,
            init_std=self.init_std,
            same_init_for_all_heads=self.same_init_for_all_heads,
            seed=self.seed,
        )
        return config


@keras.saving.register_keras_serializable(package="ibot_keras")
def summed_head_cross_entropy(labels, logits):
    """Per-sample ``sum_h CE(labels, logits[:, h])``: ``(B,)`` labels, ``(B, heads, C)``
    logits -> ``(B,)``. Keras's batch mean then gives ``sum_h mean_b CE``, the official
    multi-head loss: head ``h``'s gradient is exactly that of its own mean loss."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    picked = ops.take_along_axis(log_probs, labels[:, None, None], axis=-1)  # (B, heads, 1)
    return -ops.sum(picked[..., 0], axis=-1)


def cosine_epoch_factor(epoch, epochs):
    """``CosineAnnealingLR(T_max=epochs, eta_min=0)`` multiplier of epoch ``epoch`` (0-based)."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@dataclasses.dataclass
class LinearProbeResult:
    """Accuracies in %, one entry per learning rate, in the order of ``base_learning_rates``.

    ``learning_rates`` are the rates actually used (base x batch_size / 256). A head whose
    weights became non-finite has accuracy NaN and is never the best.
    """

    base_learning_rates: list
    learning_rates: list
    top1: list
    top5: list
    best_base_lr: float
    best_top1: float
    best_top5: float
    classifier: keras.Model
    train_loss: list  # summed-over-heads training loss, one per epoch

    def table(self):
        """``[(base_lr, lr, top1, top5)]`` sorted by top-1, best first."""
        rows = zip(self.base_learning_rates, self.learning_rates, self.top1, self.top5)
        return sorted(rows, key=lambda row: -np.nan_to_num(row[2], nan=-1.0))


def build_probe_classifier(feature_dim, num_classes, learning_rates, momentum=0.9, seed=0):
    """A compiled ``(B, F) -> (B, len(learning_rates), C)`` model whose head ``h`` trains
    with ``learning_rates[h]`` (times the optimizer's ``learning_rate``, the cosine factor)."""
    rates = np.asarray(learning_rates, np.float32)
    heads = MultiHeadLinear(len(rates), num_classes, seed=seed, name="linear_heads")
    classifier = keras.Sequential([keras.Input((feature_dim,)), heads], name="linear_probe")
    optimizer = ProbeSGD(
        learning_rate=1.0,
        momentum=momentum,
        lr_scales={heads.kernel.path: rates[:, None, None], heads.bias.path: rates[:, None]},
    )
    classifier.compile(optimizer=optimizer, loss=summed_head_cross_entropy)
    return classifier


def head_accuracies(classifier, features, labels, batch_size=1024):
    """Top-1 and top-5 accuracy (%) of every head: two ``(heads,)`` arrays; NaN for heads
    with non-finite logits."""
    labels = np.asarray(labels).reshape(-1)
    top1 = top5 = 0
    finite = None
    for start in range(0, len(features), batch_size):
        logits = ops.convert_to_numpy(classifier.predict_on_batch(features[start : start + batch_size]))
        truth = labels[start : start + batch_size, None, None]
        ok = np.isfinite(logits).all(axis=(0, 2))
        finite = ok if finite is None else finite & ok
        k = min(5, logits.shape[-1])
        ranked = np.argsort(-np.nan_to_num(logits, nan=-np.inf), axis=-1, kind="stable")[..., :k]
        top1 = top1 + (ranked[..., :1] == truth).any(axis=-1).sum(axis=0)
        top5 = top5 + (ranked == truth).any(axis=-1).sum(axis=0)
    top1 = 100.0 * top1 / len(features)
    top5 = 100.0 * top5 / len(features)
    return np.where(finite, top1, np.nan), np.where(finite, top5, np.nan)


def train_linear_heads(
    train_features,
    train_labels,
    val_features,
    val_labels,
    num_classes=None,
    base_learning_rates=None,
    epochs=100,
    batch_size=128,
    momentum=0.9,
    reference_batch_size=256,
    seed=0,
    verbose=1,
):
    """Train one linear classifier per learning rate on fixed features; see the module doc.

    Args:
        train_features, val_features: ``(N, F)`` float arrays. train_labels, val_labels:
            ``(N,)`` integer labels.
        base_learning_rates: default ``official_lr_grid()``; each is multiplied by
            ``batch_size / reference_batch_size`` (the official ``lr * batch / 256``).
        seed: the head init and the per-epoch shuffling (``np.random.default_rng(seed)``,
            one ``permutation`` per epoch; the last batch of an epoch may be smaller).

    Returns: ``LinearProbeResult``.
    """
    train_features = np.asarray(train_features, np.float32)
    val_features = np.asarray(val_features, np.float32)
    train_labels = np.asarray(train_labels).astype(np.int32).reshape(-1)
    val_labels = np.asarray(val_labels).astype(np.int32).reshape(-1)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    base = list(official_lr_grid() if base_learning_rates is None else base_learning_rates)
    rates = [float(lr) * batch_size / reference_batch_size for lr in base]
    classifier = build_probe_classifier(train_features.shape[1], num_classes, rates, momentum, seed)
    optimizer = classifier.optimizer

    rng = np.random.default_rng(seed)
    progress = None
    if verbose:
        progress = keras.utils.Progbar(epochs, verbose=verbose, unit_name="epoch", stateful_metrics=["loss_sum_over_heads"])
    losses = []
    for epoch in range(epochs):
        optimizer.learning_rate = cosine_epoch_factor(epoch, epochs)
        order = rng.permutation(len(train_features))
        total, batches = 0.0, 0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = classifier.train_on_batch(train_features[index], train_labels[index])
            total, batches = total + float(np.asarray(loss)), batches + 1
        losses.append(total / batches)
        if progress:
            progress.update(epoch + 1, [("loss_sum_over_heads", losses[-1])])

    top1, top5 = head_accuracies(classifier, val_features, val_labels)
    best = int(np.nanargmax(top1)) if np.isfinite(top1).any() else 0
    return LinearProbeResult(
        base_learning_rates=base,
        learning_rates=rates,
        top1=[float(v) for v in top1],
        top5=[float(v) for v in top5],
        best_base_lr=base[best],
        best_top1=float(top1[best]),
        best_top5=float(top5[best]),
        classifier=classifier,
        train_loss=losses,
    )


def linear_probe(
    backbone,
    train_images,
    train_labels,
    val_images,
    val_labels,
    n_last_blocks=4,
    avgpool_patchtokens=False,
    feature_batch_size=256,
    verbose=1,
    **train_kwargs,
):
    """Official linear probe of a frozen ViT: features once, then ``train_linear_heads``.

    ``train_images`` / ``val_images``: normalised ``(N, H, W, C)`` float32 views (see
    ``ibot_keras.eval.eval_views``). ViT-S recipe: ``n_last_blocks=4``; ViT-B/L:
    ``n_last_blocks=1, avgpool_patchtokens=True``. ``train_kwargs`` go to
    ``train_linear_heads`` (``base_learning_rates``, ``epochs``, ``batch_size``, ...).
    Returns a ``LinearProbeResult``.
    """
    def features(images):
        return extract_multiblock_features(
            backbone, images, n_last_blocks, avgpool_patchtokens, feature_batch_size, verbose
        )

    return train_linear_heads(
        features(train_images), train_labels, features(val_images), val_labels, verbose=verbose, **train_kwargs
    )
