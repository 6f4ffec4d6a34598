"""The training input pipeline: batches as a pure function of (seed, epoch, position), made in
worker processes by grain, fed to ``IBOT.fit``.

Batch ``step`` of the run (``epoch = step // steps_per_epoch``, ``position = step %
steps_per_epoch``) holds the images at ``position * batch_size ...`` of the epoch's permutation
(``numpy`` seeded by ``(seed, epoch)``), each augmented and masked from a generator seeded by
``(seed, epoch, index in the epoch's order)``. Nothing else enters, so the number of workers,
the number of data-parallel shards, a restart from a checkpoint or the backend cannot change a
batch. grain (``mp_prefetch``) runs the augmentation in worker processes and hands the batches
back in order; the workers import NumPy, Pillow and grain (with what grain imports), not Keras
or a backend: this module, the augmentation, the masking and the sources travel to them by
value.

This module imports no Keras and no backend; grain is imported when a pipeline is built.
"""

import sys
import warnings

import numpy as np
from PIL import Image

from ibot_keras.data.augment import MultiCropAugmentation
from ibot_keras.data.sources import ArraySource, ImageFolderSource, UnreadableImageError
from ibot_keras.masking import BlockMasking

# What reading an image can raise for a bad file: truncated or corrupt data, an unknown
# format, a decompression bomb, a file that disappeared.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# Extra seed word of the per-batch generator of stratified mask ratios (a 4-word seed, apart
# from the 3-word per-image seeds (seed, epoch, position)).
_STRATA_STREAM = 0x5354524154


def _grain():
    try:
        import grain
    except ImportError as error:
        raise ImportError(
            "The training pipeline needs grain (Python >= 3.11): pip install 'grain>=0.2.18,<0.3' "
            "(it comes with pip install ibot-keras)."
        ) from error
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # grain reads absl flags; a script that did not parse them (not an absl app) would get
        # UnparsedFlagAccessError. Their defaults are what we want.
        flags.FLAGS.mark_as_parsed()
    return grain


_SHIPPED = set()  # modules registered with cloudpickle by value, once per process


def _ship_by_value():
    """Let worker processes unpickle the pipeline without importing ``ibot_keras`` (whose
    ``__init__`` imports Keras and the backend: 1.4-4 s and 0.3-0.7 GB per worker)."""
    import cloudpickle

    for name in ("ibot_keras.data.pipeline", "ibot_keras.data.augment", "ibot_keras.data.sources", "ibot_keras.masking"):
        if name not in _SHIPPED:
            cloudpickle.register_pickle_by_value(sys.modules[name])
            _SHIPPED.add(name)


def describe(source, index):
    """How a warning names image ``index`` of ``source``: its path when it has one."""
    paths = getattr(source, "paths", None)
    return str(paths[index]) if paths is not None else f"image {index} of {type(source).__name__}"


class BatchMaker:
    """Makes the batches of an image source; runs in the worker processes.

    ``maker(step)`` is batch ``step`` of the run (this shard's part of it); ``make(epoch,
    start, stop)`` the batch of positions ``start .. stop - 1`` of the epoch's order. A file
    that cannot be read is replaced by the next readable image of the source (index + 1,
    + 2, ...; the same replacement on every run); ``"replaced"`` in the returned dict lists
    ``(index, replacement, error)`` for ``report_replaced``.

    With a ``stratified`` masking, the global crops of the batch holding positions
    ``b * batch_size ...`` share one ``batch_ratios`` draw from a generator seeded by
    ``(seed, epoch, b)`` (``mask_ratios``): a batch's masks still depend only on (seed, epoch,
    position), whatever the workers or shards.
    """

    def __init__(self, source, augmentation, masking, patch_size, batch_size, seed=0, shuffle=True,
                 num_shards=1, shard_index=0, mask_dtype="bool", max_replacements=16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        if num_shards < 1 or not 0 <= shard_index < num_shards or batch_size % num_shards:
            raise ValueError(
                f"batch_size={batch_size} must split into num_shards={num_shards} equal parts and "
                f"0 <= shard_index < num_shards (got shard_index={shard_index})."
            )
        self.grid = augmentation.global_crop_size // int(patch_size)
        if self.grid * int(patch_size) != augmentation.global_crop_size:
            raise ValueError(
                f"global_crop_size={augmentation.global_crop_size} is not a multiple of patch_size={patch_size}."
            )
        self.source, self.augmentation, self.masking = source, augmentation, masking
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.num_shards, self.shard_index = int(num_shards), int(shard_index)
        self.mask_dtype, self.max_replacements = mask_dtype, int(max_replacements)
        self.steps_per_epoch = len(source) // self.batch_size

    def order(self, epoch):
        """The image order of ``epoch``: a permutation of the source indices."""
        if not self.shuffle:
            return np.arange(len(self.source))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

    def read(self, index, replaced):
        """Image ``index``, or the next readable one (recorded in ``replaced``)."""
        size = len(self.source)
        first_error = None
        for attempt in range(min(self.max_replacements, size - 1) + 1):
            candidate = (index + attempt) % size
            try:
                image = self.source[candidate]
            except READ_ERRORS as error:
                if first_error is None:  # the warning names the file: UnreadableImageError's reason only
                    unreadable = isinstance(error, UnreadableImageError)
                    first_error = error.reason if unreadable else f"{type(error).__name__}: {error}"
                continue
            if attempt:
                replaced.append((index, candidate, first_error))
            return image
        raise OSError(
            f"Could not read {describe(self.source, index)} ({first_error}) nor any of the next "
            f"{attempt} images of the source; check the files."
        )

    def mask_ratios(self, epoch, position, num_crops):
        """``(num_crops,)`` stratified mask ratios of the image at ``position``: its slice of
        the ``batch_size * num_crops`` ratios of its batch (``BlockMasking.batch_ratios``)."""
        batch_index, slot = divmod(int(position), self.batch_size)
        rng = np.random.default_rng([self.seed, epoch, batch_index, _STRATA_STREAM])
        ratios = self.masking.batch_ratios(self.batch_size * num_crops, rng)
        return ratios[slot * num_crops : (slot + 1) * num_crops]

    def sample(self, epoch, position, order=None, replaced=None):
        """Crops and masks of the image at ``position`` of the epoch's order."""
        order = self.order(epoch) if order is None else order
        rng = np.random.default_rng([self.seed, epoch, position])
        image = self.read(int(order[position]), [] if replaced is None else replaced)
        globals_, locals_ = self.augmentation(image, rng)
        ratios = self.mask_ratios(epoch, position, len(globals_)) if self.masking.stratified else None
        masks = self.masking.image_masks(len(globals_), self.grid, self.grid, rng, epoch, ratios)
        return globals_, locals_, masks

    def make(self, epoch, start, stop):
        """The batch of positions ``start .. stop - 1`` of ``epoch``'s order."""
        order = self.order(epoch)
        replaced = []
        samples = [self.sample(epoch, p, order, replaced) for p in range(start, stop)]
        batch = {
            "global_crops": np.stack([np.stack(g) for g, _, _ in samples]),
            "masks": np.stack([m for _, _, m in samples]).astype(self.mask_dtype, copy=False),
        }
        if self.augmentation.local_crops_number:
            batch["local_crops"] = np.stack([np.stack(l) for _, l, _ in samples])
        batch["replaced"] = replaced
        return batch

    def __call__(self, step):
        epoch, position = divmod(int(step), self.steps_per_epoch)
        part = self.batch_size // self.num_shards
        start = position * self.batch_size + self.shard_index * part
        return self.make(epoch, start, start + part)


def report_replaced(batch, source, seen):
    """Pop ``"replaced"`` from a ``BatchMaker`` batch, count each file in ``seen`` (``{name:
    times}``) and warn the first time a file is met. Returns the batch."""
    for index, replacement, error in batch.pop("replaced"):
        name = describe(source, index)
        first = name not in seen
        seen[name] = seen.get(name, 0) + 1
        if first:
            warnings.warn(
                f"Could not read {name} ({error}); it is replaced by {describe(source, replacement)} "
                f"(the same replacement on every run). {len(seen)} unreadable image(s) so far.",
                stacklevel=1,
            )
    return batch


class Pipeline:
    """The batches of a whole training run, for ``IBOT.fit`` (build it with ``build_pipeline``).

    ``model.fit(pipeline, epochs=...)`` trains on batch ``model.step``, ``model.step + 1``, ...:
    a model restored from a checkpoint taken mid-epoch continues with the very batches an
    uninterrupted run would have used (``ibot_keras.resume``).

    Args:
        source: ``ArraySource``, ``ImageFolderSource``, ``IterableSource`` or anything with
            ``len`` and ``[]`` returning images (uint8 arrays or PIL images).
        augmentation: a ``MultiCropAugmentation``.
        masking: a ``BlockMasking`` (its settings; its own random stream is not used).
        patch_size: to size the mask grids.
        batch_size: the global batch (the last partial batch of an epoch is dropped, as
            officially).
        epochs: length of the run.
        seed, shuffle: the per-epoch permutations.
        workers: augmentation processes (0: in the training process).
        num_shards, shard_index: data-parallel processes; each gets its contiguous
            ``batch_size / num_shards`` part of every global batch, so the shards together are
            exactly the one-process batches.
        mask_dtype: dtype of the masks (``"uint8"`` under TensorFlow's ``MirroredStrategy``).
        buffer: batches each worker prepares ahead.

    ``batch(step)`` makes one batch in this process; ``dataset(start, stop)`` is the
    ``grain.IterDataset`` of batches ``start .. stop - 1``; ``stream(start, stop)`` yields
    them as ``(batch,)`` for Keras. Unreadable images met while training are replaced (see
    ``BatchMaker``), counted in ``replaced_images`` (``{name: times}``) and named in one
    warning each.
    """

    def __init__(self, source, augmentation, masking, patch_size, batch_size, epochs, seed=0, shuffle=True,
                 workers=0, num_shards=1, shard_index=0, mask_dtype="bool", buffer=2):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {epochs}.")
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0: augment in the training process); got {workers}.")
        if len(source) < batch_size:
            raise ValueError(f"The dataset has {len(source)} images, fewer than one batch of {batch_size}.")
        if type(source) is not ArraySource and isinstance(source, ArraySource):
            source = ArraySource(source.images, source.labels)  # e.g. IterableSource: light to ship
        self.maker = BatchMaker(source, augmentation, masking, patch_size, batch_size, seed, shuffle,
                                num_shards, shard_index, mask_dtype)
        self.source = source
        self.batch_size = self.maker.batch_size
        self.epochs = int(epochs)
        self.steps_per_epoch = self.maker.steps_per_epoch
        self.workers = int(workers)
        self.buffer = int(buffer)
        self.replaced_images = {}
        self._check_readable()

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch

    def __len__(self):
        return self.steps_per_epoch

    def order(self, epoch):
        """The image order of ``epoch`` (source indices)."""
        return self.maker.order(epoch)

    def _check_readable(self):
        """Fail before training, naming the file, when the source's first images cannot be read."""
        replaced = []
        for index in range(min(len(self.source), 3)):
            try:
                self.maker.read(index, replaced)
            except OSError as error:
                raise ValueError(f"The image source cannot be read: {error}") from None

    def _report(self, batch):
        return report_replaced(batch, self.source, self.replaced_images)

    def batch(self, step):
        """Batch ``step`` of the run, made in this process."""
        return self._report(self.maker(step))

    def dataset(self, start=0, stop=None):
        """The ``grain.IterDataset`` of batches ``start .. stop - 1`` (default: to the end of
        the run), made by ``workers`` processes, in order."""
        grain = _grain()
        stop = self.total_steps if stop is None else int(stop)
        if not 0 <= start <= stop:
            raise ValueError(f"Need 0 <= start <= stop; got {start} and {stop}.")
        # One batch at a time per process (grain's default is 16 threads with 500 elements of
        # read-ahead each: with whole batches as elements that is gigabytes per worker). The
        # parallelism is the worker processes.
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        dataset = grain.MapDataset.range(int(start), stop).map(self.maker).to_iter_dataset(read)
        if self.workers:
            _ship_by_value()
            options = grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=self.buffer)
            dataset = dataset.mp_prefetch(options)
        return dataset.map(self._report)

    def stream(self, start=0, stop=None):
        """Yield ``(batch,)`` for batches ``start .. stop - 1`` (what ``IBOT.fit`` feeds Keras);
        the worker processes stop when the stream ends or is closed."""
        iterator = iter(self.dataset(start, stop))
        try:
            for batch in iterator:
                yield (batch,)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def describe_position(self, step):
        epoch, position = divmod(int(step), self.steps_per_epoch)
        return f"epoch {epoch + 1}, batch {position + 1}/{self.steps_per_epoch}"


def augmentation_from_config(config):
    """The config's multi-crop recipe: crop numbers, scales and sizes, and the view knobs."""
    return MultiCropAugmentation(
        config.global_crops_number, config.local_crops_number, config.global_crops_scale,
        config.local_crops_scale, config.global_crop_size, config.local_crop_size,
        blur_radius=config.blur_radius, flip_p=config.flip_p, color_jitter_p=config.color_jitter_p,
        grayscale_p=config.grayscale_p, solarize_p=config.solarize_p,
    )


def masking_from_config(config, stratified=None):
    """The config's ``BlockMasking`` (``pred_ratio``, ``pred_ratio_var``, ``pred_shape``,
    ``pred_start_epoch``; ``stratified``: default the config's ``pred_ratio_stratified``, off
    when it has none)."""
    if stratified is None:
        stratified = config.pred_ratio_stratified
    return BlockMasking(config.pred_ratio, config.pred_ratio_var, config.pred_shape,
                        pred_start_epoch=config.pred_start_epoch, stratified=stratified)


def build_pipeline(config, source, workers=None, num_shards=1, shard_index=0, mask_dtype="bool",
                   pred_ratio_stratified=None, **kwargs):
    """The ``Pipeline`` of a ``PretrainConfig``: its crops, views, masks, batch size, epochs
    and seed, with ``workers`` augmentation processes (default ``config.num_workers``).
    ``pred_ratio_stratified``: stratify the mask ratios across each batch (``BlockMasking``'s
    ``stratified``; default: the config's, see ``masking_from_config``).

    ``source`` may also be a folder path (an ``ImageFolderSource``). ``num_shards`` /
    ``shard_index``: this process's part of every global batch under data parallelism.
    Other keyword arguments go to ``Pipeline``.
    """
    if isinstance(source, str):
        source = ImageFolderSource(source)
    workers = config.num_workers if workers is None else workers
    masking = masking_from_config(config, pred_ratio_stratified)
    return Pipeline(
        source, augmentation_from_config(config), masking, config.patch_size,
        config.batch_size, config.epochs, seed=config.seed, workers=workers, num_shards=num_shards,
        shard_index=shard_index, mask_dtype=mask_dtype, **kwargs,
    )

