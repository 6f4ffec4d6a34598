"""The small-data recipe, warm-ups fitted to the run length and epochs fitted to a time budget
(pure Python, but for one measured step of a small model)."""

import argparse
import dataclasses

import numpy as np
import pytest
from PIL import Image

from ibot_keras import PretrainConfig
from ibot_keras.cli import add_config_arguments, config_from_args, fit_to_time_budget
from ibot_keras.recipes import derive_warmups, epochs_for_budget, small_data


@pytest.mark.parametrize(
    "image_size, patch, local",
    # patch: the grid closest to 4 x 4 (6 x 6 above 48 px; 64: 8 x 8 and 4 x 4 tie -> the larger
    # patch); local crop: half the global crop rounded to whole patches (96: 3 patches of 16)
    [(28, 7, 14), (32, 8, 16), (8, 2, 4), (64, 16, 32), (96, 16, 48), (29, 7, 14)],
)
def test_small_data_crops_fit_whole_patches(image_size, patch, local):
    values = small_data(10_000, image_size)
    config = PretrainConfig(**values)  # a valid config
    assert (config.patch_size, config.local_crop_size, config.local_crops_number) == (patch, local, 4)
    assert config.global_crop_size == image_size // patch * patch
    assert config.centering == "sinkhorn_knopp"


def test_given_crop_sizes_choose_the_patch_and_the_local_crops():
    # 28 = 4 x 7: a 4 x 4 grid; 12 px is not a whole number of 7-px patches -> no local crops,
    # and the cheaper steps buy a longer run (220k images seen instead of 150k)
    values = small_data(10_000, 28, global_crop_size=28, local_crop_size=12)
    assert (values["patch_size"], values["local_crops_number"], values["epochs"]) == (7, 0, 22)
    PretrainConfig(**values)  # valid: the unused local size is not checked
    values = small_data(10_000, 28, global_crop_size=28, local_crop_size=14)
    assert (values["patch_size"], values["local_crop_size"], values["local_crops_number"]) == (7, 14, 4)
    assert small_data(10_000, 36, global_crop_size=36)["patch_size"] == 9  # 36 = 4 x 9
    with pytest.raises(ValueError, match="local_crop_size=12 is not a multiple of patch_size=7"):
        PretrainConfig(**{**values, "local_crop_size": 12})  # with local crops the size must fit


def test_small_data_epochs_and_warmups_follow_the_run():
    assert small_data(10_000, 28)["epochs"] == 15  # ceil(150k / 10k)
    assert small_data(100_000, 28)["epochs"] == 5  # at least 5
    short = small_data(10_000, 28, epochs=4)
    assert (short["epochs"], short["warmup_epochs"], short["warmup_teacher_temp_epochs"]) == (4, 1, 1)
    config = PretrainConfig.small_data(10_000, 28, epochs=4, batch_size=32)
    assert (config.epochs, config.warmup_teacher_temp_epochs, config.batch_size, config.patch_size) == (4, 1, 32, 7)


def test_derive_warmups():
    official = dict(epochs=4, warmup_epochs=10, warmup_teacher_temp_epochs=30)
    assert derive_warmups(official, given=()) == dict(epochs=4, warmup_epochs=0, warmup_teacher_temp_epochs=1)
    long_enough = dict(epochs=50, warmup_epochs=10, warmup_teacher_temp_epochs=30)
    assert derive_warmups(long_enough, given=()) == long_enough  # official values kept where they fit
    assert derive_warmups(official, given=("warmup_epochs",))["warmup_epochs"] == 10  # a given value stays
    scaled = derive_warmups(dict(epochs=60, warmup_epochs=2, warmup_teacher_temp_epochs=5), (), base_epochs=30)
    assert (scaled["warmup_epochs"], scaled["warmup_teacher_temp_epochs"]) == (4, 10)


def _image_folder(path, per_class, size):
    """Two class folders ``a``, ``b`` of ``per_class`` random grey ``size``-px PNGs each."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (path / label).mkdir()
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path / label / f"{i}.png")


def _args(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_a_small_image_folder_gets_the_recipe_and_a_short_run_needs_no_warmup_flags(tmp_path):
    _image_folder(tmp_path, 5, 28)
    lines = []
    config = config_from_args(_args(["--data_path", str(tmp_path), "--epochs", "4"]), report=lines.append)
    assert (config.global_crop_size, config.local_crop_size, config.epochs) == (28, 14, 4)
    assert config.centering == "sinkhorn_knopp" and config.warmup_teacher_temp_epochs == 1
    assert len(lines) == 1 and "small-data recipe for 10 images of 28 px" in lines[0]
    lines = []
    sized = config_from_args(_args(["--data_path", str(tmp_path), "--global_crop_size", "28", "--local_crop_size", "12"]),
                             report=lines.append)
    assert (sized.patch_size, sized.local_crop_size, sized.local_crops_number) == (7, 12, 0)
    assert "no local crops: local_crop_size=12 is not a whole number of 7-px patches" in lines[0]
    official = config_from_args(_args(["--data_path", str(tmp_path), "--official_defaults", "--epochs", "4"]))
    assert (official.centering, official.warmup_epochs, official.warmup_teacher_temp_epochs) == ("ema", 0, 1)
    from ibot_keras.data import ImageFolderSource

    opened = ImageFolderSource(str(tmp_path / "a"))  # 5 images: the folder given is not listed again
    lines = []
    config_from_args(_args(["--data_path", str(tmp_path)]), report=lines.append, source=opened)
    assert "recipe for 5 images" in lines[0]


def test_epochs_for_budget():
    # 600 s at 0.3 s x 156 steps = 46.8 s an epoch: 12 whole epochs fit
    assert epochs_for_budget(22, 600, 0.3, 156) == 12
    assert epochs_for_budget(10, 600, 0.3, 156) == 10  # the run fits: unchanged
    assert epochs_for_budget(22, 10, 0.3, 156) == 2  # never below min_epochs ...
    assert epochs_for_budget(1, 10, 0.3, 156) == 1  # ... nor above the run
    with pytest.raises(ValueError, match="positive times"):
        epochs_for_budget(22, 600, 0.0, 156)


def test_time_budget_measures_a_step_and_shortens_only_the_recipe_without_epochs(tmp_path):
    _image_folder(tmp_path, 8, 16)
    from ibot_keras.data import ImageFolderSource

    source = ImageFolderSource(str(tmp_path))
    argv = ["--data_path", str(tmp_path), "--embed_dim", "16", "--depth", "1", "--num_heads", "2",
            "--out_dim", "32", "--patch_out_dim", "32", "--head_hidden_dim", "16", "--head_bottleneck_dim", "8"]
    args = _args(argv + ["--time_budget_minutes", "0.0001"])  # 6 ms: no run of the recipe's length fits
    config = config_from_args(args, source=source)
    assert config.epochs == 150_000 // 16 and config.warmup_teacher_temp_epochs > 1  # 150k images seen
    lines = []
    budgeted = fit_to_time_budget(args, config, source, report=lines.append)
    assert (budgeted.epochs, budgeted.warmup_epochs, budgeted.warmup_teacher_temp_epochs) == (2, 1, 1)
    assert dataclasses.replace(budgeted, epochs=config.epochs, warmup_epochs=config.warmup_epochs,
                               warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs) == config
    assert len(lines) == 1 and lines[0].startswith("time budget: a step takes ")
    assert f"training 2 epochs instead of {config.epochs}" in lines[0]
    # Resumed: the saved run's length, nothing measured; --epochs, a 0 budget or other
    # defaults: no change.
    lines = []
    assert fit_to_time_budget(args, config, source, previous_epochs=7, report=lines.append).epochs == 7
    assert "as the run being resumed chose" in lines[0]
    for other in (["--epochs", "30", "--time_budget_minutes", "0.0001"], ["--time_budget_minutes", "0"]):
        given = _args(argv + other)
        assert fit_to_time_budget(given, config_from_args(given, source=source), source, report=lines.append).epochs in (30, config.epochs)
    official = _args(argv + ["--official_defaults", "--time_budget_minutes", "0.0001"])
    assert fit_to_time_budget(official, config_from_args(official, source=source), source).epochs == 100
    assert len(lines) == 1
