"""Bad settings are refused at construction, naming the field, the value and what is allowed."""

import dataclasses
import json
import math
import pathlib
import re
import warnings

import numpy as np
import pytest

from ibot_keras import IBOTHead, PretrainConfig, VisionTransformer

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _clear_session():
    """Overrides conftest's per-test ``clear_session`` (a garbage collection each, ~0.4 s on
    torch): these checks raise before any backend state exists, or build only tiny layers."""
    yield

# (field, bad value, exception, message fragment)
BAD_FIELDS = [
    # temperatures: > 0 and finite
    ("teacher_temp", 0, ValueError, "PretrainConfig.teacher_temp=0.0 is out of range: must be > 0 (a temperature"),
    ("warmup_teacher_temp", -0.04, ValueError, "warmup_teacher_temp=-0.04 is out of range: must be > 0"),
    ("teacher_patch_temp", INF, ValueError, "teacher_patch_temp=inf is not allowed: must be a finite number"),
    ("warmup_teacher_patch_temp", NAN, ValueError, "warmup_teacher_patch_temp=nan is not allowed"),
    # learning rate, weight decay, clipping
    ("lr", NAN, ValueError, "PretrainConfig.lr=nan is not allowed: must be a finite number"),
    ("lr", -1e-3, ValueError, "lr=-0.001 is out of range: must be >= 0"),
    ("min_lr", -1e-6, ValueError, "min_lr=-1e-06 is out of range: must be >= 0"),
    ("weight_decay", -0.1, ValueError, "weight_decay=-0.1 is out of range: must be >= 0"),
    ("weight_decay_end", -0.4, ValueError, "weight_decay_end=-0.4 is out of range: must be >= 0"),
    ("clip_grad", -3.0, ValueError, "clip_grad=-3.0 is out of range: must be >= 0 (0 turns clipping off)"),
    ("momentum_teacher", 1.5, ValueError, "momentum_teacher=1.5 is out of range: must be in [0, 1]"),
    ("momentum_teacher", -0.5, ValueError, "momentum_teacher=-0.5 is out of range: must be in [0, 1]"),
    # schedules in epochs
    ("warmup_epochs", -1, ValueError, "warmup_epochs=-1 is out of range: must be >= 0"),
    ("warmup_teacher_temp_epochs", -1, ValueError, "warmup_teacher_temp_epochs=-1 is out of range: must be >= 0"),
    ("pred_start_epoch", -1, ValueError, "pred_start_epoch=-1 is out of range: must be >= 0"),
    ("freeze_last_layer", -1, ValueError, "freeze_last_layer=-1 is out of range: must be >= 0"),
    ("epochs", 0, ValueError, "epochs=0 is out of range: must be >= 1"),
    ("batch_size", 0, ValueError, "batch_size=0 is out of range: must be >= 1"),
    ("saveckp_freq", -1, ValueError, "saveckp_freq=-1 is out of range: must be >= 0"),
    # loss weights
    ("lambda1", -1.0, ValueError, "lambda1=-1.0 is out of range: must be >= 0 (a loss weight)"),
    ("lambda2", -0.5, ValueError, "lambda2=-0.5 is out of range: must be >= 0"),
    ("koleo_loss_weight", -1.0, ValueError, "koleo_loss_weight=-1.0 is out of range: must be >= 0"),
    # masking
    ("pred_ratio", 1.0, ValueError, "pred_ratio=1.0 is out of range: must be in [0, 1)"),
    ("pred_ratio", -0.1, ValueError, "pred_ratio=-0.1 is out of range"),
    ("pred_ratio", (0.0, 1.2), ValueError, "pred_ratio=(0.0, 1.2) is out of range: must be in [0, 1)"),
    ("pred_ratio", NAN, ValueError, "pred_ratio=nan is not allowed"),
    ("pred_ratio", (), ValueError, "pred_ratio=() is empty"),
    ("pred_ratio_var", -0.1, ValueError, "pred_ratio_var=-0.1 is out of range"),
    ("pred_shape", "blok", ValueError, "pred_shape='blok' is not supported: must be one of ('block', 'rand')"),
    # crops
    ("global_crops_scale", (0.0, 1.0), ValueError, "global_crops_scale=(0.0, 1.0) is out of range: must be (low, high) with 0 < low <= high <= 1"),
    ("global_crops_scale", (0.5, 0.4), ValueError, "global_crops_scale=(0.5, 0.4) is out of range"),
    ("global_crops_scale", (0.1, 1.5), ValueError, "global_crops_scale=(0.1, 1.5) is out of range"),
    ("local_crops_scale", (0.05,), ValueError, "local_crops_scale=(0.05,) is out of range"),
    ("local_crops_scale", (0.05, INF), ValueError, "local_crops_scale=inf is not allowed"),
    ("global_crops_number", 0, ValueError, "global_crops_number=0 is out of range: must be >= 1"),
    ("local_crops_number", -1, ValueError, "local_crops_number=-1 is out of range: must be >= 0"),
    ("flip_p", NAN, ValueError, "flip_p=nan is not allowed"),
    ("blur_radius", (0.1, INF), ValueError, "blur_radius=inf is not allowed"),
    # model sizes: None means "from arch"; 0 or negative is an error
    ("depth", 0, ValueError, "depth=0 is out of range: must be >= 1 (None takes the value from arch)"),
    ("embed_dim", 0, ValueError, "embed_dim=0 is out of range: must be >= 1"),
    ("num_heads", 0, ValueError, "num_heads=0 is out of range: must be >= 1"),
    ("depth", -2, ValueError, "depth=-2 is out of range"),
    ("embed_dim", 100, ValueError, "embed_dim=100 is not divisible by num_heads=6"),
    ("num_heads", 5, ValueError, "embed_dim=384 is not divisible by num_heads=5"),
    ("patch_size", 0, ValueError, "patch_size=0 is out of range: must be >= 1"),
    ("image_size", 0, ValueError, "image_size=0 is out of range: must be >= 1"),
    ("global_crop_size", 8, ValueError, "global_crop_size=8 is not a multiple of patch_size=16"),
    ("local_crop_size", 0, ValueError, "local_crop_size=0 is out of range"),
    ("drop_path", 1.0, ValueError, "drop_path=1.0 is out of range: must be in [0, 1)"),
    ("drop_path", -0.1, ValueError, "drop_path=-0.1 is out of range"),
    # head
    ("out_dim", 0, ValueError, "out_dim=0 is out of range: must be >= 1"),
    ("patch_out_dim", 0, ValueError, "patch_out_dim=0 is out of range: must be >= 1"),
    ("head_hidden_dim", 0, ValueError, "head_hidden_dim=0 is out of range"),
    ("head_bottleneck_dim", 0, ValueError, "head_bottleneck_dim=0 is out of range"),
    ("head_nlayers", 0, ValueError, "head_nlayers=0 is out of range: must be >= 1"),
    ("norm_in_head", "bn", ValueError, "norm_in_head='bn' is not supported: must be one of (None, 'ln')"),
    ("act_in_head", "tanh", ValueError, "act_in_head='tanh' is not supported: must be one of ('gelu', 'relu')"),
    # misc
    ("seed", -1, ValueError, "seed=-1 is out of range: must be in [0, 4294967295]"),
    ("seed", 2**32, ValueError, "seed=4294967296 is out of range"),
    ("num_workers", -1, ValueError, "num_workers=-1 is out of range: must be >= 0"),
    # types: strict booleans, a bool is not an int, whole floats only
    ("shared_head", "False", TypeError, "shared_head='False' (str) is not allowed: must be a bool"),
    ("norm_last_layer", 1, TypeError, "norm_last_layer=1 (int) is not allowed: must be a bool"),
    ("use_fp16", None, TypeError, "use_fp16=None (NoneType) is not allowed: must be a bool"),
    ("epochs", True, TypeError, "epochs=True (bool) is not allowed: must be an integer"),
    ("epochs", 3.5, ValueError, "epochs=3.5 is not a whole number"),
    ("epochs", "10", TypeError, "epochs='10' (str) is not allowed: must be an integer"),
    ("seed", 1.5, ValueError, "seed=1.5 is not a whole number"),
    ("lr", True, TypeError, "lr=True (bool) is not allowed: must be a finite number"),
    ("lr", "5e-4", TypeError, "lr='5e-4' (str) is not allowed"),
    ("embed_dim", 384.5, ValueError, "embed_dim=384.5 is not a whole number"),
    ("arch", 5, TypeError, "arch=5 (int) is not allowed: must be a string"),
    ("arch", "swin_tiny", ValueError, "arch='swin_tiny' is not supported"),
    ("output_dir", 3, TypeError, "output_dir=3 (int) is not allowed: must be a string"),
    ("global_crops_scale", "0.14 1", TypeError, "global_crops_scale='0.14 1' (str) is not allowed: must be a (low, high) pair"),
]


@pytest.mark.parametrize("field,value,error,fragment", BAD_FIELDS, ids=lambda v: repr(v)[:30])
def test_bad_field_is_refused_by_name(field, value, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        PretrainConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(pred_ratio=0.2, pred_ratio_var=0.3), "pred_ratio=0.2 with pred_ratio_var=0.3: each ratio r"),
        (dict(pred_ratio=(0.0, 0.9), pred_ratio_var=(0.0, 0.2)), "got r=0.9, v=0.2"),
        (dict(pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.1, 0.2)), "pred_ratio_var=(0.0, 0.1, 0.2) has 3 entries"),
        (dict(global_crops_number=1, local_crops_number=0), "global_crops_number=1 with local_crops_number=0"),
        (dict(embed_dim=64, num_heads=3), "embed_dim=64 is not divisible by num_heads=3"),
        (dict(epochs=5, warmup_epochs=6, warmup_teacher_temp_epochs=0), "warmup_epochs=6 exceeds epochs=5"),
    ],
)
def test_settings_that_disagree_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        PretrainConfig(**kwargs)


def test_replace_validates_too():
    with pytest.raises(ValueError, match=re.escape("teacher_temp=0.0 is out of range")):
        dataclasses.replace(PretrainConfig(), teacher_temp=0.0)


# (overrides, field, stored value): valid edge values that must be accepted as given.
EDGE_VALUES = [
    (dict(lambda2=0), "lambda2", 0.0),
    (dict(lambda1=0.0), "lambda1", 0.0),
    (dict(local_crops_number=0), "local_crops_number", 0),
    (dict(warmup_epochs=0), "warmup_epochs", 0),
    (dict(warmup_teacher_temp_epochs=0), "warmup_teacher_temp_epochs", 0),
    (dict(momentum_teacher=1.0), "momentum_teacher", 1.0),
    (dict(momentum_teacher=0), "momentum_teacher", 0.0),
    (dict(pred_ratio=0), "pred_ratio", 0.0),
    (dict(pred_ratio=[0.3]), "pred_ratio", 0.3),
    (dict(pred_ratio=np.array([0.0, 0.3]), pred_ratio_var=[0.0, 0.2]), "pred_ratio", (0.0, 0.3)),
    (dict(clip_grad=0), "clip_grad", 0.0),
    (dict(drop_path=0), "drop_path", 0.0),
    (dict(freeze_last_layer=0), "freeze_last_layer", 0),
    (dict(saveckp_freq=0), "saveckp_freq", 0),
    (dict(num_workers=0), "num_workers", 0),
    (dict(lr=0.0, min_lr=0.0), "lr", 0.0),
    (dict(epochs=100.0), "epochs", 100),
    (dict(seed=np.int64(3)), "seed", 3),
    (dict(lr=np.float32(0.5)), "lr", 0.5),
    (dict(shared_head=np.bool_(True)), "shared_head", True),
    (dict(global_crops_scale=[0.14, 1]), "global_crops_scale", (0.14, 1.0)),
    (dict(local_crops_scale=(0.4, 0.4)), "local_crops_scale", (0.4, 0.4)),
    (dict(global_crops_number=1, local_crops_number=2), "global_crops_number", 1),
    (dict(global_crops_number=3), "global_crops_number", 3),
    (dict(output_dir=pathlib.Path("runs") / "a"), "output_dir", str(pathlib.Path("runs") / "a")),
    (dict(norm_in_head="ln", act_in_head="relu"), "norm_in_head", "ln"),
    (dict(pred_shape="rand"), "pred_shape", "rand"),
]


@pytest.mark.parametrize("overrides,field,stored", EDGE_VALUES, ids=lambda v: repr(v)[:30])
def test_valid_edge_values_are_accepted(overrides, field, stored):
    value = getattr(PretrainConfig(**overrides), field)
    assert value == stored and type(value) is type(stored)


def test_none_sizes_come_from_arch_and_overrides_are_kept():
    assert PretrainConfig(arch="vit_base").model_dims == (768, 12, 12)
    assert PretrainConfig(arch="vit_base", depth=2, embed_dim=64, num_heads=4).model_dims == (64, 2, 4)


# -- from_dict / from_official_args ----------------------------------------------------------


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"shared_head": "Ture"}, "shared_head='Ture' is not a boolean: use true or false"),
        ({"use_fp16": "yes"}, "use_fp16='yes' is not a boolean"),
        ({"norm_last_layer": 2}, "norm_last_layer=2 (int) is not allowed: must be a bool"),
        ({"epochs": "ten"}, "epochs='ten' cannot be read as an integer"),
        ({"epochs": "3.5"}, "epochs=3.5 is not a whole number"),
        ({"lr": "fast"}, "lr='fast' cannot be read as a number"),
        ({"teacher_temp": "nan"}, "teacher_temp=nan is not allowed"),
        ({"global_crops_scale": "0.14 x"}, "global_crops_scale='x' cannot be read as a number"),
        ({"batch_size_per_gpu": "many"}, "batch_size_per_gpu='many' cannot be read as an integer"),
        ({"batch_size_per_gpu": 0}, "batch_size_per_gpu=0 must be an integer >= 1"),
        ({"batch_size_per_gpu": 64, "world_size": 2, "batch_size": 64}, "batch_size=64 disagrees with batch_size_per_gpu=64 x world_size=2"),
    ],
)
def test_from_dict_names_the_key_that_cannot_be_read(values, fragment):
    with pytest.raises((ValueError, TypeError), match=re.escape(fragment)):
        PretrainConfig.from_dict(values)


@pytest.mark.parametrize("text,expected", [("TRUE", True), ("false", False), (" True ", True), ("1", True), ("0", False), (0, False)])
def test_from_dict_reads_text_booleans(text, expected):
    assert PretrainConfig.from_dict({"shared_head": text}).shared_head is expected


def test_from_dict_reads_text_numbers_and_tuples():
    config = PretrainConfig.from_dict({"epochs": "40.0", "lr": "1e-3", "pred_ratio": "0 0.3", "pred_ratio_var": "[0, 0.2]",
                                       "global_crops_scale": "0.25,1", "embed_dim": "None", "norm_in_head": "none"})
    assert (config.epochs, config.lr, config.pred_ratio, config.pred_ratio_var) == (40, 1e-3, (0.0, 0.3), (0.0, 0.2))
    assert config.global_crops_scale == (0.25, 1.0) and config.embed_dim is None and config.norm_in_head is None


def test_unknown_and_misspelt_keys_warn_once_by_name():
    with pytest.warns(UserWarning) as record:
        config = PretrainConfig.from_dict({"shraed_head": True, "epoch": 5, "zzz": 1, "dist_url": "env://", "window_size": 7})
    assert len(record) == 1
    message = str(record[0].message)
    assert "'shraed_head' (did you mean 'shared_head'?)" in message
    assert "'epoch' (did you mean 'epochs'?)" in message and "'zzz'" in message
    official = message.split("official main_ibot.py argument(s) not implemented here:")[1]
    assert "dist_url='env://'" in official and "window_size=7" in official and "zzz" not in official
    assert config.shared_head is False and config.epochs == 100  # ignored, not applied


def test_strict_refuses_unknown_keys_but_not_official_ones():
    with pytest.raises(ValueError, match=re.escape("unknown setting(s) 'shraed_head' (did you mean 'shared_head'?)")):
        PretrainConfig.from_dict({"shraed_head": True}, strict=True)
    with pytest.warns(UserWarning, match=re.escape("local_rank=0 (torch.distributed)")):
        assert PretrainConfig.from_dict({"local_rank": 0, "epochs": 40}, strict=True).epochs == 40


def test_own_config_and_world_size_with_batch_size_per_gpu_read_silently(tmp_path):
    config = PretrainConfig(epochs=40, pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2), data_path="/data")
    config.save(tmp_path / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PretrainConfig.from_official_args(tmp_path / "config.json", strict=True) == config
        assert PretrainConfig.from_dict({"batch_size_per_gpu": 64, "world_size": 16}).batch_size == 1024


def test_official_dump_with_git_preamble(tmp_path):
    path = tmp_path / "args.txt"
    path.write_text(
        "git:\n  sha: 1a2b3c, status: clean, branch: main\n\n"
        "arch: vit_small\nbatch_size_per_gpu: 64\ndist_url: env://\ngpu: 0\nload_from: None\n"
        "local_rank: 0\nnorm_in_head: None\npred_ratio: [0.0, 0.3]\npred_ratio_var: [0.0, 0.2]\n"
        "rank: 0\nshared_head: True\nwindow_size: 7\nworld_size: 16\n"
    )
    with pytest.warns(UserWarning) as record:
        config = PretrainConfig.from_official_args(path, strict=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert "unknown" not in message and "sha" not in message and "git" not in message
    for name in ("dist_url", "gpu", "load_from", "local_rank", "rank", "window_size"):
        assert f"{name}=" in message, name
    assert config.batch_size == 1024 and config.shared_head is True and config.pred_ratio == (0.0, 0.3)


def test_official_dump_with_a_misspelt_boolean(tmp_path):
    path = tmp_path / "args.txt"
    path.write_text("arch: vit_small\nshared_head: Ture\n")
    with pytest.raises(ValueError, match=re.escape("shared_head='Ture' is not a boolean")):
        PretrainConfig.from_official_args(path)


def test_broken_json_names_the_file(tmp_path):
    path = tmp_path / "args.json"
    path.write_text('{"epochs": 10,')
    with pytest.raises(ValueError, match=re.escape(str(path))):
        PretrainConfig.from_official_args(path)


# -- components built directly ---------------------------------------------------------------

TINY_VIT = dict(patch_size=4, embed_dim=8, depth=1, num_heads=2, image_size=8)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (dict(patch_size=0), "VisionTransformer: patch_size=0 is not allowed: must be an integer >= 1"),
        (dict(embed_dim=0), "VisionTransformer: embed_dim=0 is not allowed"),
        (dict(depth=0), "VisionTransformer: depth=0 is not allowed"),
        (dict(num_heads=0), "VisionTransformer: num_heads=0 is not allowed"),
        (dict(image_size=0), "VisionTransformer: image_size=0 is not allowed"),
        (dict(in_channels=0), "VisionTransformer: in_channels=0 is not allowed"),
        (dict(depth=1.5), "VisionTransformer: depth=1.5 is not allowed"),
        (dict(depth=True), "VisionTransformer: depth=True is not allowed"),
        (dict(embed_dim=10, num_heads=3), "VisionTransformer: embed_dim=10 is not divisible by num_heads=3"),
        (dict(drop_path_rate=1.0), "VisionTransformer: drop_path_rate=1.0 is out of range: must be in [0, 1)"),
        (dict(drop_path_rate=NAN), "VisionTransformer: drop_path_rate=nan is out of range"),
        (dict(mlp_ratio=0.0), "VisionTransformer: mlp_ratio=0.0 is not allowed"),
        (dict(image_size=10), "image_size=10 is not a multiple of patch_size=4"),
    ],
)
def test_vision_transformer_refuses_bad_arguments(overrides, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        VisionTransformer(**{**TINY_VIT, **overrides})


TINY_HEAD = dict(out_dim=8, patch_out_dim=6, hidden_dim=8, bottleneck_dim=4, nlayers=2, shared_head=False)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (dict(out_dim=0), "IBOTHead: out_dim=0 is not allowed: must be an integer >= 1"),
        (dict(patch_out_dim=0), "IBOTHead: patch_out_dim=0 is not allowed"),
        (dict(hidden_dim=0), "IBOTHead: hidden_dim=0 is not allowed"),
        (dict(bottleneck_dim=0), "IBOTHead: bottleneck_dim=0 is not allowed"),
        (dict(nlayers=0), "IBOTHead: nlayers=0 is not allowed"),
        (dict(in_dim=0), "IBOTHead: in_dim=0 is not allowed"),
        (dict(out_dim=2.5), "IBOTHead: out_dim=2.5 is not allowed"),
        (dict(out_dim=math.inf), "IBOTHead: out_dim=inf is not allowed"),
    ],
)
def test_head_refuses_bad_arguments(overrides, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        IBOTHead(**{**TINY_HEAD, **overrides})


def test_checked_components_round_trip_through_get_config():
    # A whole float (e.g. from a JSON file written elsewhere) is read as an integer.
    vit = VisionTransformer(**{**TINY_VIT, "embed_dim": 8.0}, drop_path_rate=0.1, use_mask_token=True)
    assert vit.embed_dim == 8 and type(vit.embed_dim) is int
    copy = VisionTransformer.from_config(json.loads(json.dumps(vit.get_config())))
    assert copy.get_config() == vit.get_config() and copy.depth == 1
    head = IBOTHead(**TINY_HEAD)
    head_copy = IBOTHead.from_config(json.loads(json.dumps(head.get_config())))
    assert head_copy.get_config() == head.get_config() and head_copy.patch_out_dim == 6
