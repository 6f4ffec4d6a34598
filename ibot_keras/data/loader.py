"""Batches of multi-crop views and block masks for ``IBOT.fit`` (a ``keras.utils.PyDataset``,
one worker). ``ibot_keras.data.build_pipeline`` is the parallel, resumable-at-any-step route."""

import keras
import numpy as np

from ibot_keras.masking import BlockMasking


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
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1.")
        if num_shards < 1 or not 0 <= shard_index < num_shards or batch_size % num_shards:
            raise ValueError(
                f"batch_size={batch_size} must split into num_shards={num_shards} equal parts and "
                f"0 <= shard_index < num_shards (got shard_index={shard_index})."
            )
        if num_shards > 1 and not drop_last:
            raise ValueError("Sharding needs drop_last=True (every shard gets a full part).")
        if drop_last and len(source) < batch_size:
            raise ValueError(f"The dataset has {len(source)} images, fewer than one batch of {batch_size}.")
        self.source = source
        self.augmentation = augmentation
        self.masking = masking
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.num_shards = int(num_shards)
        self.shard_index = int(shard_index)
        self.mask_dtype = mask_dtype
        grid = augmentation.global_crop_size // self.patch_size
        if grid * self.patch_size != augmentation.global_crop_size:
            raise ValueError(
                f"global_crop_size={augmentation.global_crop_size} is not a multiple of patch_size={patch_size}."
            )
        self.grid = grid

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
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(len(self.source))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

    def sample(self, position, epoch=None):
        """Crops and masks of the image at ``position`` in the epoch's order."""
        epoch = self.epoch if epoch is None else epoch
        index = int(self.order(epoch)[position])
        rng = np.random.default_rng([self.seed, epoch, position])
        globals_, locals_ = self.augmentation(self.source[index], rng)
        masks = self.masking.image_masks(len(globals_), self.grid, self.grid, rng, epoch)
        return globals_, locals_, masks

    def __getitem__(self, batch_index):
        epoch = self.epoch
        start = batch_index * self.batch_size
        stop = min(start + self.batch_size, len(self.source))
        if self.num_shards > 1:
            part = self.batch_size // self.num_shards
            start += self.shard_index * part
            stop = start + part
        samples = [self.sample(p, epoch) for p in range(start, stop)]
        batch = {
            "global_crops": np.stack([np.stack(g) for g, _, _ in samples]),
            "masks": np.stack([m for _, _, m in samples]).astype(self.mask_dtype, copy=False),
        }
        if self.augmentation.local_crops_number:
            batch["local_crops"] = np.stack([np.stack(l) for _, l, _ in samples])
        return (batch,)


class _SetLoaderEpoch(keras.callbacks.Callback):
    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def on_epoch_begin(self, epoch, logs=None):
        self.loader.set_epoch(epoch)
