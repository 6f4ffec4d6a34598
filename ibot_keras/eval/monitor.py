"""k-NN accuracy of the teacher during ``fit``."""

import keras
import numpy as np

from ibot_keras.eval.features import FEATURES, BackboneFeatures, CLSFeatures  # noqa: F401 (its old import path)
from ibot_keras.eval.knn import knn_classify


class KNNMonitor(keras.callbacks.Callback):
    """Every ``every`` epochs, k-NN top-1/top-5 of the teacher's features ([CLS] by default) on a labelled
    split, added to the epoch logs as ``knn_top1`` / ``knn_top5`` (progress bar, CSV,
    TensorBoard). Other epochs do no work.

    Args:
        train_images, train_labels, val_images, val_labels: evaluation views, already
            normalised ``(N, H, W, 3)`` float32 (see ``ibot_keras.eval.eval_views``), and
            integer labels. ``max_train`` / ``max_val`` take a fixed random subset to keep
            it cheap.
        k, temperature: the official protocol's voting (k=20, T=0.07).
        features: ``BackboneFeatures``' choice (default ``"cls"``, the official one).
    """

    def __init__(
        self,
        train_images,
        train_labels,
        val_images,
        val_labels,
        every=1,
        k=20,
        temperature=0.07,
        batch_size=256,
        max_train=None,
        max_val=None,
        seed=0,
        features="cls",
    ):
        super().__init__()
        rng = np.random.default_rng(seed)

        def subset(images, labels, limit):
            labels = np.asarray(labels)
            if limit is not None and limit < len(labels):
                keep = np.sort(rng.choice(len(labels), limit, replace=False))
                return images[keep], labels[keep]
            return images, labels

        self.train_images, self.train_labels = subset(train_images, train_labels, max_train)
        self.val_images, self.val_labels = subset(val_images, val_labels, max_val)
        self.num_classes = int(max(self.train_labels.max(), self.val_labels.max())) + 1
        self.every = int(every)
        self.k = int(k)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        if features not in FEATURES:
            raise ValueError(f"KNNMonitor features={features!r}: choose one of {', '.join(FEATURES)}.")
        self.features = features
        self._features = None

    def evaluate(self):
        """``(top1, top5)`` of the current teacher."""
        if self._features is None:  # built once, so its predict function compiles once
            self._features = BackboneFeatures(self.model.teacher_backbone, self.features)
        train = self._features.predict(self.train_images, batch_size=self.batch_size, verbose=0)
        val = self._features.predict(self.val_images, batch_size=self.batch_size, verbose=0)
        return knn_classify(
            train, self.train_labels, val, self.val_labels, self.num_classes, self.k, self.temperature
        )

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        logs["knn_top1"], logs["knn_top5"] = self.evaluate()
