"""The small-data recipe and warm-ups fitted to the run length (pure Python; no training)."""

import argparse

import numpy as np
import pytest
from PIL import Image

from ibot_keras import PretrainConfig
from ibot_keras.cli import add_config_arguments, config_from_args
from ibot_keras.recipes import derive_warmups, small_data


@pytest.mark.parametrize(
    "image_size, patch, local",
    # local crop: 0.43 * size rounded to whole patches (32: 13.8 -> 12; 64: 27.5 -> 24; 96: 41.3 -> 48)
    [(28, 4, 12), (32, 4, 12), (8, 4, 4), (64, 8, 24), (96, 16, 48)],
)
def test_small_data_crops_fit_whole_patches(image_size, patch, local):
    values = small_data(10_000, image_size)
    config = PretrainConfig(**values)  # a valid config
    assert (config.patch_size, config.local_crop_size) == (patch, local)
    assert config.global_crop_size == image_size // patch * patch
    assert config.centering == "sinkhorn_knopp"


def test_small_data_epochs_and_warmups_follow_the_run():
    assert small_data(10_000, 28)["epochs"] == 15  # ceil(150k / 10k)
    assert small_data(100_000, 28)["epochs"] == 5  # at least 5
    short = small_data(10_000, 28, epochs=4)
    assert (short["epochs"], short["warmup_epochs"], short["warmup_teacher_temp_epochs"]) == (4, 1, 1)
    config = PretrainConfig.small_data(10_000, 28, epochs=4, batch_size=32)
    assert (config.epochs, config.warmup_teacher_temp_epochs, config.batch_size, config.patch_size) == (4, 1, 32, 4)


def test_derive_warmups():
    official = dict(epochs=4, warmup_epochs=10, warmup_teacher_temp_epochs=30)
    assert derive_warmups(official, given=()) == dict(epochs=4, warmup_epochs=0, warmup_teacher_temp_epochs=1)
    long_enough = dict(epochs=50, warmup_epochs=10, warmup_teacher_temp_epochs=30)
    assert derive_warmups(long_enough, given=()) == long_enough  # official values kept where they fit
    assert derive_warmups(official, given=("warmup_epochs",))["warmup_epochs"] == 10  # a given value stays
    scaled = derive_warmups(dict(epochs=60, warmup_epochs=2, warmup_teacher_temp_epochs=5), (), base_epochs=30)
    assert (scaled["warmup_epochs"], scaled["warmup_teacher_temp_epochs"]) == (4, 10)


def _args(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_a_small_image_folder_gets_the_recipe_and_a_short_run_needs_no_warmup_flags(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    lines = []
    config = config_from_args(_args(["--data_path", str(tmp_path), "--epochs", "4"]), report=lines.append)
    assert (config.global_crop_size, config.local_crop_size, config.epochs) == (28, 12, 4)
    assert config.centering == "sinkhorn_knopp" and config.warmup_teacher_temp_epochs == 1
    assert len(lines) == 1 and "small-data recipe for 10 images of 28 px" in lines[0]
    official = config_from_args(_args(["--data_path", str(tmp_path), "--official_defaults", "--epochs", "4"]))
    assert (official.centering, official.warmup_epochs, official.warmup_teacher_temp_epochs) == ("ema", 0, 1)
    from ibot_keras.data import ImageFolderSource

    opened = ImageFolderSource(str(tmp_path / "a"))  # 5 images: the folder given is not listed again
    lines = []
    config_from_args(_args(["--data_path", str(tmp_path)]), report=lines.append, source=opened)
    assert "recipe for 5 images" in lines[0]
