"""Batches of multi-crop views and block masks for ``IBOT.fit`` (a ``keras.utils.PyDataset``,
one worker). ``ibot_keras.data.build_pipeline`` is the parallel, resumable-at-any-step route."""

import keras

from ibot_keras.data.pipeline import BatchMaker, report_replaced


class MultiCropLoader(keras.utils.PyDataset):
    """Yields ``({"global_crops", "local_crops", "masks"},)`` batches.

    Every image's crops and masks are drawn from a generator seeded by
    ``(seed, epoch, index in the epoch's order)``, so a batch depends only on those numbers
    (the same ones ``build_pipeline``'s ``Pipeline`` makes) and resuming at an epoch replays
    exactly. Keras 3.15's ``PyDataset`` enqueuer reorders, repeats and drops batches with
    ``workers > 1`` (some batches of an epoch are consumed in the next one), so this loader
    refuses ``workers > 1`` and ``use_multiprocessing``: use ``build_pipeline(config, source,
    workers=N)``, whose worker processes keep the order. The epoch is set by ``set_epoch(e)``, as the
    official loop calls ``dataset.set_epoch``; ``IBOT.fit`` does it for you (it adds
    ``epoch_callback()``, which sets it before Keras starts fetching each epoch's batches).

    Args:
        source: an ``ArraySource``, ``ImageFolderSource`` or anything with ``len`` and
            ``[]`` returning images (uint8 arrays or PIL images).
        augmentation: a ``MultiCropAugmentation``.
        masking: a ``BlockMasking`` (its settings are used; its random stream is not).
        patch_size: to size the mask grids.
        batch_size, shuffle, drop_last (official: True), seed.
        num_shards, shard_index: for data parallel processes (torch DDP ranks, JAX hosts):
            ``batch_size`` stays the global batch and each process gets its contiguous
            ``batch_size / num_shards`` part of every global batch, so the shards together
            are exactly the one-process batches.
        mask_dtype: dtype of the yielded masks (``"uint8"`` under TensorFlow's
            ``MirroredStrategy``: Keras 3.15.1 cannot reduce a bool batch across replicas;
            the model casts masks to bool).
    """

    def __init__(
        self,
        source,
        augmentation,
        masking,
        patch_size,
        batch_size,
        shuffle=True,
        drop_last=True,
        seed=0,
        epoch=0,
        num_shards=1,
        shard_index=0,
        mask_dtype="bool",
        **kwargs,
    ):
        if kwargs.get("workers", 1) > 1 or kwargs.get("use_multiprocessing"):
            raise ValueError(
                f"MultiCropLoader(workers={kwargs.get('workers', 1)}, use_multiprocessing="
                f"{kwargs.get('use_multiprocessing', False)}): Keras 3.15's PyDataset enqueuer reorders, "
                "repeats and drops batches with more than one worker. For parallel augmentation use "
                "ibot_keras.data.build_pipeline(config, source, workers=N) (worker processes, same "
                "batches as one worker), or keep workers=1."
            )
        super().__init__(**kwargs)
        if num_shards > 1 and not drop_last:
            raise ValueError("Sharding needs drop_last=True (every shard gets a full part).")
        if drop_last and len(source) < batch_size:
            raise ValueError(f"The dataset has {len(source)} images, fewer than one batch of {batch_size}.")
        self.maker = BatchMaker(source, augmentation, masking, patch_size, batch_size, seed, shuffle,
                                num_shards, shard_index, mask_dtype)
        self.source = source
        self.augmentation = augmentation
        self.masking = masking
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.epoch = int(epoch)
        self.replaced_images = {}

    def __len__(self):
        n = len(self.source)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self.masking.set_epoch(self.epoch)

    def epoch_callback(self):
        """A Keras callback that calls ``set_epoch`` at the start of every ``fit`` epoch."""
        return _SetLoaderEpoch(self)

    def order(self, epoch=None):
        """The image order of an epoch."""
        return self.maker.order(self.epoch if epoch is None else epoch)

    def sample(self, position, epoch=None):
        """Crops and masks of the image at ``position`` in the epoch's order."""
        return self.maker.sample(self.epoch if epoch is None else epoch, position)

    def __getitem__(self, batch_index):
        if self.maker.num_shards > 1:
            batch = self.maker(self.epoch * self.maker.steps_per_epoch + batch_index)
        else:
            start = batch_index * self.batch_size
            batch = self.maker.make(self.epoch, start, min(start + self.batch_size, len(self.source)))
        return (report_replaced(batch, self.source, self.replaced_images),)


class _SetLoaderEpoch(keras.callbacks.Callback):
    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def on_epoch_begin(self, epoch, logs=None):
        self.loader.set_epoch(epoch)
