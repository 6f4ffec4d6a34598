"""Multi-crop augmentation and the batch loader: the recipe, not just shapes."""

import warnings

import numpy as np
import pytest
from PIL import Image

from ibot_keras import BlockMasking
from ibot_keras.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArraySource,
    ImageFolderSource,
    IterableSource,
    MultiCropAugmentation,
    MultiCropLoader,
)
from ibot_keras.data.augment import random_resized_crop_box


def photo(seed=0, size=64):
    """A colourful test image with structure (gradients + noise), uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x * y], -1) * 200 + rng.integers(0, 55, (size, size, 3))
    return base.astype(np.uint8)


def decision_rates(augmentation, n=1500):
    logs, rng, image = [], np.random.default_rng(0), photo()
    for _ in range(n):
        augmentation(image, rng, logs=logs)
    per_crop = augmentation.global_crops_number + augmentation.local_crops_number
    crops = [logs[i::per_crop] for i in range(per_crop)]
    return [{k: np.mean([k in log for log in crop]) for k in ("flip", "jitter", "grayscale", "blur", "solarize")} for crop in crops]


def test_decision_probabilities_follow_the_official_recipe():
    aug = MultiCropAugmentation(2, 1, global_crop_size=16, local_crop_size=8)
    first, second, local = decision_rates(aug)
    tol = 4 * np.sqrt(0.25 / 1500)  # 4 binomial standard deviations at worst (p = 0.5)
    expected = [
        dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=1.0, solarize=0.0),
        dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=0.1, solarize=0.2),
        dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=0.5, solarize=0.0),
    ]
    for rates, want in zip((first, second, local), expected):
        for key, p in want.items():
            assert abs(rates[key] - p) <= tol, (key, rates[key], p)


def test_view_knobs_set_the_rates():
    aug = MultiCropAugmentation(
        2, 1, global_crop_size=16, local_crop_size=8, flip_p=0.0, color_jitter_p=0.3, grayscale_p=1.0, solarize_p=0.6
    )
    first, second, local = decision_rates(aug)
    tol = 4 * np.sqrt(0.25 / 1500)
    for rates in (first, second, local):
        assert rates["flip"] == 0.0 and rates["grayscale"] == 1.0
        assert abs(rates["jitter"] - 0.3) <= tol
    # Solarisation stays off on the first global crop and on local crops, as in the recipe.
    assert first["solarize"] == 0.0 and local["solarize"] == 0.0 and abs(second["solarize"] - 0.6) <= tol
    # Blur probabilities are the recipe's, whatever the knobs.
    assert first["blur"] == 1.0 and abs(second["blur"] - 0.1) <= tol and abs(local["blur"] - 0.5) <= tol


def test_blur_radius_range_is_used():
    image = Image.fromarray(photo(size=16))
    aug = MultiCropAugmentation(1, 0, global_crop_size=16, blur_radius=(0.0, 0.0), color_jitter_p=0.0, flip_p=0.0, grayscale_p=0.0)
    sharp = MultiCropAugmentation(1, 0, global_crop_size=16, color_jitter_p=0.0, flip_p=0.0, grayscale_p=0.0)
    plain = sharp.crop(image, 16, (1.0, 1.0), 0.0, 0.0, np.random.default_rng(0))
    zero_radius = aug.crop(image, 16, (1.0, 1.0), 1.0, 0.0, np.random.default_rng(0))
    blurred = sharp.crop(image, 16, (1.0, 1.0), 1.0, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(zero_radius, plain, atol=1e-6)  # radius 0 leaves the crop unchanged
    assert np.abs(blurred - plain).mean() > 0.05  # the official radius U(0.1, 2) visibly blurs 16 px


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(flip_p=1.5), "flip_p"), (dict(solarize_p=-0.1), "solarize_p"), (dict(blur_radius=(2.0, 1.0)), "blur_radius")],
)
def test_bad_view_knobs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCropAugmentation(2, 0, **kwargs)


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.4)])
def test_crop_area_fraction_within_scale(scale):
    rng = np.random.default_rng(1)
    fractions = []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_box(224, 224, scale, rng)
        assert 0 <= top <= 224 - h and 0 <= left <= 224 - w
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 or (h, w) == (224, 224)
        fractions.append(h * w / 224**2)
    fractions = np.array(fractions)
    # Rounding of h and w moves the area by a few pixels at most.
    assert fractions.min() >= scale[0] * 0.97 and fractions.max() <= scale[1] * 1.03 + 1e-9
    # ...and the draws span the range (large boxes with extreme aspect are rejected and
    # redrawn, as in torchvision, so the mean sits below the middle of the range).
    assert fractions.min() < scale[0] * 1.2 and fractions.max() > scale[1] * 0.9


def test_outputs_are_normalised_and_sized():
    aug = MultiCropAugmentation(2, 3, global_crop_size=32, local_crop_size=16)
    globals_, locals_ = aug(photo(), np.random.default_rng(0))
    assert [g.shape for g in globals_] == [(32, 32, 3)] * 2
    assert [l.shape for l in locals_] == [(16, 16, 3)] * 3
    assert all(g.dtype == np.float32 for g in globals_ + locals_)
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for crop in globals_ + locals_:
        assert (crop >= lo - 1e-5).all() and (crop <= hi + 1e-5).all()


def test_individual_operations():
    aug = MultiCropAugmentation(1, 0, global_crop_size=64)
    image = Image.fromarray(photo())
    for seed in range(40):
        log = []
        crop = aug.crop(image, 64, (1.0, 1.0), 0.0, 0.0, np.random.default_rng(seed), log)
        if "grayscale" in log:
            assert np.allclose(crop * IMAGENET_STD + IMAGENET_MEAN, (crop * IMAGENET_STD + IMAGENET_MEAN)[..., :1], atol=1e-5)
    # Solarisation inverts every value at or above 128.
    rng = np.random.default_rng(0)
    flat = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    aug.color_jitter_p = aug.flip_p = aug.grayscale_p = 0.0
    crop = aug.crop(flat, 8, (1.0, 1.0), 0.0, 1.0, rng)
    np.testing.assert_allclose(crop * IMAGENET_STD + IMAGENET_MEAN, 55 / 255, atol=1e-6)


def test_same_seed_same_batches_and_epochs_differ():
    images = np.stack([photo(i, 24) for i in range(12)])
    def loader(seed):
        aug = MultiCropAugmentation(2, 2, global_crop_size=16, local_crop_size=8)
        return MultiCropLoader(ArraySource(images), aug, BlockMasking([0, 0.3], [0, 0.2]), 4, 4, seed=seed)
    a, b, c = loader(0), loader(0), loader(1)
    batch_a, batch_b, batch_c = a[1][0], b[1][0], c[1][0]
    for key in batch_a:
        np.testing.assert_array_equal(batch_a[key], batch_b[key])
    assert not np.array_equal(batch_a["global_crops"], batch_c["global_crops"])
    assert batch_a["global_crops"].shape == (4, 2, 16, 16, 3)
    assert batch_a["local_crops"].shape == (4, 2, 8, 8, 3)
    assert batch_a["masks"].shape == (4, 2, 4, 4) and batch_a["masks"].dtype == bool
    a.set_epoch(1)
    assert not np.array_equal(a[1][0]["global_crops"], batch_a["global_crops"])


def test_batches_do_not_depend_on_the_order_workers_fetch_them():
    images = np.stack([photo(i, 24) for i in range(8)])
    aug = MultiCropAugmentation(2, 0, global_crop_size=16)
    loader = MultiCropLoader(ArraySource(images), aug, BlockMasking(0.3), 4, 4, seed=3)
    later_first = loader[1][0]["global_crops"]
    loader[0]
    np.testing.assert_array_equal(loader[1][0]["global_crops"], later_first)


def test_mask_statistics_in_batches():
    images = np.zeros((400, 8, 8), np.uint8)
    aug = MultiCropAugmentation(2, 0, global_crop_size=56)
    loader = MultiCropLoader(ArraySource(images), aug, BlockMasking([0.0, 0.3], [0.0, 0.2]), 4, 100, seed=0)
    masks = np.concatenate([loader[i][0]["masks"] for i in range(len(loader))])
    counts = masks.reshape(800, -1).sum(1)  # 14x14 grids
    assert abs((counts == 0).mean() - 0.5) < 4 * np.sqrt(0.25 / 800)
    assert 50 <= counts[counts > 0].mean() <= 64  # official: 57.3 given a non-empty mask


def test_folder_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(photo(1, 20)).save(tmp_path / "a" / "x.png")
    Image.fromarray(photo(2, 20)[..., 0], "L").save(tmp_path / "b" / "gray.jpg")
    Image.fromarray(np.dstack([photo(3, 20), np.full((20, 20), 128, np.uint8)]), "RGBA").save(tmp_path / "b" / "rgba.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = ImageFolderSource(str(tmp_path))
    assert any("Skipped 1 unreadable" in str(w.message) for w in caught)
    assert len(source) == 3 and list(source.labels) == [0, 1, 1]
    assert all(source[i].mode == "RGB" for i in range(3))


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        ImageFolderSource(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="No readable images"):
        ImageFolderSource(str(tmp_path))


ITERABLE_RNG = np.random.default_rng(0)
ITERABLE_IMAGES = ITERABLE_RNG.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
ITERABLE_LABELS = ITERABLE_RNG.integers(0, 5, 10)


def assert_source_holds(source, images, labels):
    assert len(source) == len(images)
    np.testing.assert_array_equal(np.stack([source[i] for i in range(len(source))]), images)
    np.testing.assert_array_equal(source.labels, labels)


def test_iterable_sources_pydataset_and_generator():
    """A PyDataset of (x, y) batches and a generator of float dicts give the same uint8 images
    and labels as the arrays they came from; a capped grey generator feeds the loader."""
    import keras

    images, labels = ITERABLE_IMAGES, ITERABLE_LABELS

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return images[4 * i : 4 * i + 4], labels[4 * i : 4 * i + 4]

    def dicts():
        for image, label in zip(images, labels):
            yield {"image": image.astype("float32") / 255.0, "label": label}

    assert_source_holds(IterableSource(Batches(), verbose=0), images, labels)
    assert_source_holds(IterableSource(dicts(), verbose=0), images, labels)
    grey = IterableSource((image[..., 0] for image in images), max_images=4, verbose=0)
    assert len(grey) == 4 and grey.labels is None and grey[3].shape == (12, 12)
    loader = MultiCropLoader(grey, MultiCropAugmentation(2, 1, global_crop_size=16, local_crop_size=8),
                             BlockMasking((0.0, 0.3), (0.0, 0.2)), 4, batch_size=2)
    assert loader[0][0]["global_crops"].shape == (2, 2, 16, 16, 3)


def test_iterable_source_tf_data():
    """A batched tf.data.Dataset of (image, label) (only where TensorFlow is installed)."""
    tf = pytest.importorskip("tensorflow")
    dataset = tf.data.Dataset.from_tensor_slices((ITERABLE_IMAGES, ITERABLE_LABELS)).batch(3)
    assert_source_holds(IterableSource(dataset, verbose=0), ITERABLE_IMAGES, ITERABLE_LABELS)


def test_iterable_source_errors():
    with pytest.raises(ValueError, match="yielded no images"):
        IterableSource([], verbose=0)
    with pytest.raises(ValueError, match="no 'image' key"):
        IterableSource([{"pixels": np.zeros((4, 4), np.uint8)}], verbose=0)
    with pytest.raises(ValueError, match="0..255"):
        IterableSource([np.full((4, 4), 300, np.int32)], verbose=0)
    with pytest.raises(ValueError, match="labels and others do not"):
        IterableSource([(np.zeros((4, 4), np.uint8), 1), np.zeros((4, 4), np.uint8)], verbose=0)


def test_small_images_are_upscaled():
    aug = MultiCropAugmentation(1, 1, global_crop_size=32, local_crop_size=16)
    globals_, locals_ = aug(np.zeros((8, 8), np.uint8), np.random.default_rng(0))
    assert globals_[0].shape == (32, 32, 3) and locals_[0].shape == (16, 16, 3)


def test_loader_feeds_fit_end_to_end():
    """The README's API flow at toy size: images -> loader -> build_pretrainer -> fit."""
    import ibot_keras

    images = np.random.default_rng(0).integers(0, 255, (16, 40, 40, 3), dtype=np.uint8)
    config = ibot_keras.PretrainConfig(
        arch="vit_tiny", patch_size=8, depth=1, embed_dim=32, num_heads=2, image_size=32,
        global_crop_size=32, local_crop_size=16, out_dim=64, patch_out_dim=64, head_hidden_dim=32,
        head_bottleneck_dim=16, shared_head=True, local_crops_number=3, pred_ratio=(0.0, 0.3),
        pred_ratio_var=(0.0, 0.2), batch_size=8, epochs=2, warmup_teacher_temp_epochs=1, warmup_epochs=1,
    )
    loader = MultiCropLoader(
        ArraySource(images),
        MultiCropAugmentation(2, 3, config.global_crops_scale, config.local_crops_scale, 32, 16),
        BlockMasking(config.pred_ratio, config.pred_ratio_var),
        config.patch_size,
        config.batch_size,
    )
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=len(loader))
    history = model.fit(loader, epochs=config.epochs, verbose=0)
    assert len(history.history["loss"]) == 2 and np.all(np.isfinite(history.history["loss"]))
    assert history.history["masked_dropped"] == [0.0, 0.0]
    assert loader.epoch == 1  # fit set the epoch of each epoch (new crops and masks)
    model.fit(loader, epochs=4, initial_epoch=3, verbose=0)
    assert loader.epoch == 3
