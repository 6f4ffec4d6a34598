"""The training pipeline: the batches that reach the train step are the same whatever the
number of workers or shards, every batch once per epoch; unreadable images are replaced."""

import io
import warnings

import keras
import numpy as np
import pytest
from keras import ops
from PIL import Image
from pipeline_probe import IdentityViews, id_images

import ibot_keras
from ibot_keras import BlockMasking, resume
from ibot_keras.data import (ArraySource, ImageFolderSource, MultiCropAugmentation, MultiCropLoader, Pipeline,
                             build_pipeline)

BATCH, IMAGES, EPOCHS = 4, 22, 3  # 5 batches per epoch, 2 images dropped each epoch


class ProbeModel(keras.Model):
    """Records the image ids of the batch each train step receives (``seen``)."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.dense = keras.layers.Dense(1)
        self.step = self.add_weight(name="step", shape=(), dtype="int32", initializer="zeros", trainable=False)
        self.seen = self.add_weight(name="seen", shape=(BATCH,), initializer="zeros", trainable=False)

    def call(self, inputs, training=False):
        return self.dense(inputs["global_crops"][:, 0, 0, 0, :])

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        self.seen.assign(x["global_crops"][:, 0, 0, 0, 0])
        self.step.assign(self.step + 1)
        return ops.mean(y_pred**2)

    def fit(self, pipeline, **kwargs):
        return resume.fit_pipeline(self, pipeline, super().fit, **kwargs)


class Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append((self.epoch, batch, tuple(int(v) for v in ops.convert_to_numpy(self.model.seen))))


def consumed(pipeline):
    model = ProbeModel(len(pipeline))
    model.compile(optimizer="sgd")
    record = Record()
    model.fit(pipeline, epochs=EPOCHS, callbacks=[record], verbose=0)
    return record.rows


def probe_pipeline(workers, source=None, **kwargs):
    source = ArraySource(id_images(IMAGES)) if source is None else source
    return Pipeline(source, IdentityViews(), BlockMasking([0.0, 0.3], [0.0, 0.2]), 2, BATCH, EPOCHS,
                    seed=5, workers=workers, **kwargs)


def test_train_step_sees_every_batch_once_per_epoch_in_order_with_any_worker_count():
    reference = probe_pipeline(0)
    expected = [
        (e, b, tuple(int(i) for i in reference.order(e)[b * BATCH : (b + 1) * BATCH]))
        for e in range(EPOCHS) for b in range(len(reference))
    ]
    one_worker = consumed(probe_pipeline(1))
    assert one_worker == expected
    for workers in (2, 4):
        assert consumed(probe_pipeline(workers)) == one_worker, workers
    for e in range(EPOCHS):  # each image at most once per epoch (one batch per position)
        ids = [i for epoch, _, batch in one_worker if epoch == e for i in batch]
        assert len(ids) == len(set(ids)) == len(reference) * BATCH
    assert len({row[2] for row in one_worker if row[0] == 0} & {row[2] for row in one_worker if row[0] == 1}) == 0


def test_two_shards_concatenate_to_the_unsharded_batch():
    images = np.random.default_rng(0).integers(0, 255, (16, 20, 20, 3), dtype=np.uint8)
    aug = MultiCropAugmentation(2, 1, global_crop_size=8, local_crop_size=4)
    make = lambda **kw: Pipeline(ArraySource(images), aug, BlockMasking([0, 0.3], [0, 0.2]), 4, 8, 2, seed=3, **kw)
    whole, shards = make(), [make(num_shards=2, shard_index=i) for i in range(2)]
    for step in (0, 3):  # epochs 0 and 1
        full, parts = whole.batch(step), [s.batch(step) for s in shards]
        for key in ("global_crops", "local_crops", "masks"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key], err_msg=key)


def test_pipeline_batches_are_the_one_worker_loader_batches():
    images = np.random.default_rng(1).integers(0, 255, (12, 20, 20, 3), dtype=np.uint8)
    aug = MultiCropAugmentation(2, 2, global_crop_size=8, local_crop_size=4)
    pipeline = Pipeline(ArraySource(images), aug, BlockMasking([0, 0.3], [0, 0.2]), 4, 4, 3, seed=2)
    loader = MultiCropLoader(ArraySource(images), aug, BlockMasking([0, 0.3], [0, 0.2]), 4, 4, seed=2)
    loader.set_epoch(2)
    (theirs,) = loader[1]
    ours = pipeline.batch(2 * len(pipeline) + 1)
    for key in ("global_crops", "local_crops", "masks"):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_loader_with_several_workers_refuses_and_names_the_fix():
    images = np.zeros((8, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="build_pipeline"):
        MultiCropLoader(ArraySource(images), MultiCropAugmentation(global_crop_size=8), BlockMasking(), 4, 4, workers=2)


def write_folder(root, count, bad=()):
    """PNG image ``i`` filled with ``i``; the ``bad`` ones truncated JPEGs of noise (they pass
    Pillow's ``verify``, so only reading them fails)."""
    for i in range(count):
        buffer = io.BytesIO()
        if i in bad:
            noise = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(noise).save(buffer, "JPEG")
            (root / f"{i:03d}.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        else:
            Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(buffer, "PNG")
            (root / f"{i:03d}.png").write_bytes(buffer.getvalue())


def test_unreadable_image_mid_epoch_is_replaced_counted_and_named(tmp_path):
    write_folder(tmp_path, IMAGES, bad=(7,))
    source = ImageFolderSource(str(tmp_path))  # the truncated JPEG passes the up-front check
    assert len(source) == IMAGES
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = consumed(probe_pipeline(2, source))
    messages = [str(w.message) for w in caught if "Could not read" in str(w.message)]
    assert len(messages) == 1 and "007.jpg" in messages[0] and "008.png" in messages[0], messages
    # Every epoch that reaches image 7 gets image 8 in its place, on every run.
    ids = [i for _, _, batch in rows for i in batch]
    assert 7 not in ids and 8 in ids
    assert rows == consumed(probe_pipeline(1, source))


def test_unreadable_source_fails_before_training_naming_the_path(tmp_path):
    write_folder(tmp_path, 5, bad=range(5))
    with pytest.raises(ValueError, match="000.jpg"):
        probe_pipeline(0, ImageFolderSource(str(tmp_path)))


def test_build_pipeline_uses_the_config():
    config = ibot_keras.PretrainConfig(
        patch_size=4, image_size=16, global_crop_size=16, local_crop_size=8, local_crops_number=3,
        batch_size=4, epochs=2, warmup_teacher_temp_epochs=1, warmup_epochs=1, flip_p=0.0,
        color_jitter_p=0.25, pred_ratio=0.2, seed=7, num_workers=3,
    )
    images = np.random.default_rng(2).integers(0, 255, (9, 20, 20, 3), dtype=np.uint8)
    pipeline = build_pipeline(config, ArraySource(images))
    assert (len(pipeline), pipeline.total_steps, pipeline.workers) == (2, 4, 3)
    assert (pipeline.maker.augmentation.flip_p, pipeline.maker.augmentation.color_jitter_p) == (0.0, 0.25)
    assert pipeline.maker.masking.pred_ratio == 0.2 and pipeline.maker.seed == 7
    batch = pipeline.batch(3)
    assert batch["global_crops"].shape == (4, 2, 16, 16, 3)
    assert batch["local_crops"].shape == (4, 3, 8, 8, 3)
    assert batch["masks"].shape == (4, 2, 4, 4) and batch["masks"].dtype == bool
    model = ibot_keras.build_pretrainer(ibot_keras.PretrainConfig(arch="vit_tiny", patch_size=4, image_size=16,
        global_crop_size=16, local_crop_size=8, batch_size=4, epochs=2, warmup_teacher_temp_epochs=1,
        warmup_epochs=1), steps_per_epoch=3)
    with pytest.raises(ValueError, match="steps_per_epoch=len"):
        model.fit(pipeline, epochs=2)
