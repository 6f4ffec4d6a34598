"""PretrainConfig: official names and defaults, official argument dumps."""

import json

import pytest

from ibot_keras import PretrainConfig

# main_ibot.py defaults as documented in the spec (section e, "Command-line defaults").
OFFICIAL_DEFAULTS = dict(
    arch="vit_small", patch_size=16, out_dim=8192, patch_out_dim=8192, shared_head=False,
    shared_head_teacher=True, norm_last_layer=True, momentum_teacher=0.996, norm_in_head=None,
    act_in_head="gelu", use_masked_im_modeling=True, pred_ratio=0.3, pred_ratio_var=0.0,
    pred_shape="block", pred_start_epoch=0, lambda1=1.0, lambda2=1.0, warmup_teacher_temp=0.04,
    teacher_temp=0.04, warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07,
    warmup_teacher_temp_epochs=30, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0,
    epochs=100, freeze_last_layer=1, lr=5e-4, warmup_epochs=10, min_lr=1e-6, optimizer="adamw",
    drop_path=0.1, global_crops_number=2, global_crops_scale=(0.14, 1.0), local_crops_number=0,
    local_crops_scale=(0.05, 0.4), saveckp_freq=40, seed=0,
)

README_VITS = dict(
    arch="vit_small", teacher_temp=0.07, warmup_teacher_temp_epochs=30, norm_last_layer=False,
    epochs=800, batch_size_per_gpu=64, shared_head=True, out_dim=8192, local_crops_number=10,
    global_crops_scale=[0.25, 1.0], local_crops_scale=[0.05, 0.25], pred_ratio=[0.0, 0.3],
    pred_ratio_var=[0.0, 0.2], world_size=16, dist_url="env://", local_rank=0,
)


def test_official_defaults():
    config = PretrainConfig()
    for name, value in OFFICIAL_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.batch_size == 128  # official batch_size_per_gpu on one GPU
    assert config.model_dims == (384, 12, 6)
    assert config.loss_patch_out_dim == 8192  # shared_head_teacher=True forces out_dim


def check_readme_vits(config):
    assert config.batch_size == 1024  # 64 per GPU x 16 GPUs
    assert config.scaled_lr == pytest.approx(2e-3)  # 5e-4 * 1024 / 256
    assert config.pred_ratio == (0.0, 0.3) and config.pred_ratio_var == (0.0, 0.2)
    assert config.global_crops_scale == (0.25, 1.0) and config.local_crops_number == 10
    assert config.norm_last_layer is False and config.shared_head is True
    assert config.max_masked_patches == 98  # floor(0.5 * 196)


def test_from_key_value_lines(tmp_path):
    path = tmp_path / "args.txt"
    path.write_text("\n".join(f"{k}: {v}" for k, v in sorted(README_VITS.items())))
    check_readme_vits(PretrainConfig.from_official_args(path))


def test_from_namespace_repr(tmp_path):
    path = tmp_path / "args.txt"
    path.write_text("Namespace(" + ", ".join(f"{k}={v!r}" for k, v in README_VITS.items()) + ")")
    check_readme_vits(PretrainConfig.from_official_args(path))


def test_from_json_and_round_trip(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps(README_VITS))
    config = PretrainConfig.from_official_args(path)
    check_readme_vits(config)
    config.save(tmp_path / "saved.json")
    assert PretrainConfig.from_official_args(tmp_path / "saved.json") == config


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(arch="swin_tiny"), "arch='swin_tiny' is not supported"),
        (dict(optimizer="lars"), "optimizer='lars' is not implemented"),
        (dict(shared_head=False, patch_out_dim=4096), "issue #4"),
        (dict(global_crop_size=100), "global_crop_size=100 is not a multiple of patch_size=16"),
        (dict(epochs=20), "epochs=20 must be at least warmup_teacher_temp_epochs"),
        (dict(solarize_p=1.2), "solarize_p must be a probability"),
        (dict(blur_radius=(1.0,)), "blur_radius must be"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**kwargs)


def test_deit_alias_and_booleans_from_strings():
    config = PretrainConfig.from_dict({"arch": "deit_small", "norm_last_layer": "False", "epochs": "40"})
    assert config.arch == "vit_small" and config.norm_last_layer is False and config.epochs == 40


def test_view_knobs_default_to_the_official_recipe_and_reach_the_pipeline():
    import argparse

    from ibot_keras.cli import add_config_arguments, config_from_args
    from ibot_keras.data import augmentation_from_config

    config = PretrainConfig()
    # DataAugmentationiBOT: flip 0.5, jitter 0.8, grayscale 0.2, solarize 0.2, blur sigma (0.1, 2).
    assert (config.flip_p, config.color_jitter_p, config.grayscale_p, config.solarize_p) == (0.5, 0.8, 0.2, 0.2)
    assert config.blur_radius == (0.1, 2.0)
    changed = PretrainConfig(flip_p=0.0, color_jitter_p=0.1, grayscale_p=0.3, solarize_p=0.4, blur_radius=[0.0, 0.5])
    aug = augmentation_from_config(changed)
    assert (aug.flip_p, aug.color_jitter_p, aug.grayscale_p, aug.solarize_p, aug.blur_radius) == (0.0, 0.1, 0.3, 0.4, (0.0, 0.5))
    assert aug.crop_recipe(1) == (0.1, 0.4) and aug.crop_recipe(0) == (1.0, 0.0)
    args = add_config_arguments(argparse.ArgumentParser()).parse_args(["--blur_radius", "0", "0.5", "--flip_p", "0"])
    assert config_from_args(args, 1).blur_radius == (0.0, 0.5) and config_from_args(args, 1).flip_p == 0.0
