"""Weights in and out: checkpoint files, official/timm layouts, .keras, the convert command.

Float tolerances: outputs compared with the official fixtures use the fixture README's 1e-5
for float32 across frameworks; a round trip through a file is exact (bit-identical arrays).
"""

import argparse
import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import load_fixture, official_state, to_numpy
from trajectory import STEPS_PER_EPOCH, T, batches, build_fixture_model, fit_fixture, fixture_config

from ibot_keras import build_pretrainer, checkpoint, state_files
from ibot_keras.models.vit import VisionTransformer

V = load_fixture("ibot_vit_case")
VIT_STATE = official_state(V, "vit_param__")
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed (tested in the torch and parity envs)")
FORMATS = [".npz", pytest.param(".safetensors", marks=pytest.mark.skipif(not HAS_SAFETENSORS, reason="no safetensors")),
           pytest.param(".pth", marks=needs_torch)]


def nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def fixture_vit(**kwargs):
    return checkpoint.backbone_from_official(VIT_STATE, num_heads=2, **kwargs)


def assert_vit_matches_official(vit):
    x, masks = nhwc(V["x_global"][0]), V["mask_global"][0]
    np.testing.assert_allclose(to_numpy(vit(x, masks=masks)), V["vit_out_global0_masked"], atol=1e-5)
    np.testing.assert_allclose(to_numpy(vit(x)), V["vit_out_global0_nomask"], atol=1e-5)
    np.testing.assert_allclose(to_numpy(vit(nhwc(V["x_local"][0]))), V["vit_out_local0"], atol=1e-5)
    np.testing.assert_allclose(to_numpy(vit(nhwc(V["x_rect"]))), V["vit_out_rect"], atol=1e-5)


# -- official files ---------------------------------------------------------------------------
@needs_torch
def test_official_vit_state_in_a_real_pth_reproduces_official_outputs(tmp_path):
    import torch

    path = tmp_path / "dino_style_backbone.pth"
    torch.save({key: torch.from_numpy(value) for key, value in VIT_STATE.items()}, path)
    vit = checkpoint.backbone_from_official(path, num_heads=2)
    assert (vit.embed_dim, vit.depth, vit.patch_size, vit.image_size, vit.use_mask_token) == (16, 2, 4, 16, True)
    assert_vit_matches_official(vit)


@needs_torch
def test_official_training_checkpoint_pth_loads_into_ibot(tmp_path):
    import torch

    def tensors(prefix, add=""):
        return {add + key: torch.from_numpy(value) for key, value in official_state(T, prefix).items()}

    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": tensors("student__", add="module."),  # DDP-wrapped student, as official saves it
            "teacher": tensors("teacher__"),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "epoch": 3,
            "args": argparse.Namespace(arch="vit_tiny", out_dim=64),  # official keeps its args here
            "ibot_loss": {"center": torch.zeros(1, 64), "center2": torch.ones(1, 1, 64)},
        },
        path,
    )
    model = build_pretrainer(fixture_config(), steps_per_epoch=2, seed=11)
    report = checkpoint.load_official(model, path)
    assert report.epoch == 3 and not report.missing and not report.unexpected
    np.testing.assert_array_equal(to_numpy(model.ibot_loss.patch_center), 1.0)
    exported = checkpoint.export_official(model)
    for part in ("student", "teacher"):
        for name, value in exported[part].items():
            np.testing.assert_array_equal(value, T[f"{part}__" + name.replace(".", "__")], err_msg=name)
    out = model(batches()[0], training=False)
    for key in ("teacher_cls", "student_cls"):
        ours = np.swapaxes(to_numpy(out[key]), 0, 1).reshape(-1, to_numpy(out[key]).shape[-1])
        np.testing.assert_allclose(ours, T[f"step0_{key}"], atol=1e-5, err_msg=key)
    # The teacher backbone of the same file, as the official evaluations read it.
    vit = checkpoint.backbone_from_official(path, num_heads=3)
    assert not vit.use_mask_token
    np.testing.assert_array_equal(to_numpy(vit.norm.gamma), T["teacher__backbone__norm__weight"])


def test_reading_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    path = tmp_path / "weights.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ImportError, match=r"pip install torch.*\.npz or \.safetensors"):
        state_files.read_state(path)


def test_unknown_suffix_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown checkpoint format"):
        state_files.read_state(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        state_files.read_state(tmp_path / "absent.npz")


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", FORMATS)
def test_backbone_round_trip_through_files_is_lossless(tmp_path, suffix):
    vit = fixture_vit()
    path = checkpoint.save_official(vit, tmp_path / f"backbone{suffix}")
    back = state_files.read_state(path)
    assert set(back) == set(VIT_STATE)
    for key, value in VIT_STATE.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    again = checkpoint.backbone_from_official(path, num_heads=2)
    for ours, theirs in zip(vit.weights, again.weights):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    x = nhwc(V["x_global"][0])
    np.testing.assert_array_equal(to_numpy(vit(x)), to_numpy(again(x)))


@pytest.mark.parametrize("suffix", FORMATS)
def test_training_state_round_trip_through_files_is_lossless(tmp_path, suffix):
    model = build_fixture_model()
    model.ibot_loss.center.assign(np.linspace(-1, 1, 64, dtype="float32")[None])
    path = state_files.write_state(checkpoint.export_official(model) | {"epoch": 4}, tmp_path / f"ckpt{suffix}")
    other = build_pretrainer(fixture_config(), steps_per_epoch=2, seed=5)
    assert checkpoint.load_official(other, path).epoch == 4
    for ours, theirs in zip(model.weights, other.weights):
        if "seed_generator" not in ours.path and "iteration" not in ours.path:
            np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs), err_msg=ours.path)


def test_keras_format_round_trip_continues_training_identically(tmp_path):
    model = build_fixture_model()
    fit_fixture(model, epochs=1)
    model.save(tmp_path / "ibot.keras")
    loaded = keras.saving.load_model(tmp_path / "ibot.keras")
    assert int(to_numpy(loaded.optimizer.iterations)) == int(to_numpy(model.optimizer.iterations)) == 2
    assert int(to_numpy(loaded.step)) == 2
    ours, theirs = model(batches()[2]), loaded(batches()[2])
    for key in ours:
        np.testing.assert_array_equal(to_numpy(ours[key]), to_numpy(theirs[key]), err_msg=key)
    # The same next epoch from both: optimizer moments, schedules, freeze state all restored.
    continued = fit_fixture(model, epochs=2, initial_epoch=1)
    reloaded = fit_fixture(loaded, epochs=2, initial_epoch=1)
    np.testing.assert_array_equal(continued.series("loss"), reloaded.series("loss"))
    np.testing.assert_array_equal(to_numpy(model.ibot_loss.center), to_numpy(loaded.ibot_loss.center))


# -- the official optimizer state ---------------------------------------------------------------
def test_official_param_groups_follow_get_params_groups():
    model = build_fixture_model()
    names = [str(n) for n in T["param_names_student"]]  # the official named_parameters() order
    # utils.get_params_groups: biases and 1-D tensors (official shapes) form group 1, listed after group 0.
    plain = [n for n in names if n.endswith(".bias") or T["student__" + n.replace(".", "__")].ndim == 1]
    decayed = [n for n in names if n not in plain]
    assert [n for n, _, _ in checkpoint.official_param_groups(model)] == decayed + plain


@pytest.fixture(scope="module")
def after_first_epoch():
    """The fixture model after the official trajectory's first epoch (2 steps). Read-only."""
    model = build_fixture_model()
    fit_fixture(model, epochs=1)
    return model


def test_official_optimizer_state_continues_the_official_trajectory(after_first_epoch):
    model = after_first_epoch
    state = checkpoint.export_official(model, optimizer=True, epoch=1)
    groups = checkpoint.official_param_groups(model)
    # The last layer was frozen in epoch 0 (official freeze_last_layer=1): no AdamW state yet,
    # exactly as PyTorch keeps none for a parameter that never had a gradient.
    frozen = {i for i, (name, _, _) in enumerate(groups) if "last_layer" in name}
    assert frozen and not frozen & set(state["optimizer"]["state"])
    assert {float(e["step"]) for e in state["optimizer"]["state"].values()} == {float(STEPS_PER_EPOCH)}
    # Through the official format into a fresh model (another init), then epochs 2-3.
    resumed = build_pretrainer(fixture_config(), steps_per_epoch=STEPS_PER_EPOCH, seed=5)
    report = checkpoint.load_official(resumed, state, optimizer=True)
    assert report.epoch == 1
    assert int(to_numpy(resumed.optimizer.iterations)) == int(to_numpy(resumed.step)) == STEPS_PER_EPOCH
    losses = fit_fixture(resumed, epochs=int(T["cfg_epochs"]), initial_epoch=1).series("loss")
    # The official run's steps 3-6 and final weights (fixture tolerances: 1e-5 loss, 2e-6 weights).
    np.testing.assert_allclose(losses, T["loss"][STEPS_PER_EPOCH:], atol=1e-5)
    exported = checkpoint.export_official(resumed)
    for part in ("student", "teacher"):
        for name, value in exported[part].items():
            np.testing.assert_allclose(value, T[f"final_{part}__" + name.replace(".", "__")], atol=2e-6, err_msg=name)
    # This can fail: the same resume with the Adam moments dropped (state["optimizer"]["state"]
    # = {}) misses the official final student by 3.3e-5, 16x the tolerance (JAX, 2026-11-27).


def test_optimizer_state_that_does_not_fit_is_a_clear_error(after_first_epoch):
    model = after_first_epoch
    state = checkpoint.export_official_optimizer(model)
    state["param_groups"][1]["params"] = state["param_groups"][1]["params"][:-1]
    with pytest.raises(ValueError, match="trainable tensors"):
        checkpoint.load_official_optimizer(model, state)
    state = checkpoint.export_official_optimizer(model)
    first = next(iter(state["state"]))
    state["state"][first]["exp_avg"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="Shape mismatches"):
        checkpoint.load_official_optimizer(model, state)
    with pytest.raises(ValueError, match="no 'optimizer' state"):
        checkpoint.load_official(model, checkpoint.export_official(model), optimizer=True)
    with pytest.raises(ValueError, match=".pth"):
        checkpoint.save_official(model, "x.npz", optimizer=True)


@needs_torch
def test_exported_optimizer_state_loads_into_torch_adamw(tmp_path, after_first_epoch):
    import torch

    model = after_first_epoch
    path = checkpoint.save_official(model, tmp_path / "checkpoint.pth", optimizer=True, epoch=1)
    saved = torch.load(path, weights_only=True)  # what official restart_from_checkpoint reads
    names = [name for name, _, _ in checkpoint.official_param_groups(model)]
    params = [torch.nn.Parameter(saved["student"][name].clone()) for name in names]
    split = len(saved["optimizer"]["param_groups"][0]["params"])
    adamw = torch.optim.AdamW([{"params": params[:split]}, {"params": params[split:], "weight_decay": 0.0}])
    adamw.load_state_dict(saved["optimizer"])
    ours = checkpoint.export_official_optimizer(model)["state"]
    for index, param in enumerate(params):
        if index not in ours:
            assert param not in adamw.state
            continue
        np.testing.assert_array_equal(adamw.state[param]["exp_avg"].numpy(), ours[index]["exp_avg"], err_msg=names[index])
        np.testing.assert_array_equal(adamw.state[param]["exp_avg_sq"].numpy(), ours[index]["exp_avg_sq"])
        assert float(adamw.state[param]["step"]) == STEPS_PER_EPOCH
    for param in params:
        param.grad = torch.ones_like(param)
    adamw.step()  # shapes and dtypes are what torch expects
    assert saved["epoch"] == 1


# -- position table at another resolution ------------------------------------------------------
def test_loading_into_another_image_size_interpolates_like_official():
    vit24 = fixture_vit(image_size=24)
    report = checkpoint.load_official(vit24, VIT_STATE)
    assert report.interpolated == ["pos_embed"]
    # The official forward-time interpolation of the 16-px table for a 24-px image (fixture).
    np.testing.assert_allclose(to_numpy(vit24.pos_embed), V["pos_embed_interp_24x24"], atol=1e-6)
    images = np.random.default_rng(0).normal(size=(2, 24, 24, 3)).astype("float32")
    # The 16-px model interpolates the same table at run time: both give the same features.
    np.testing.assert_allclose(to_numpy(vit24(images)), to_numpy(fixture_vit()(images)), atol=1e-5)


# -- mismatches are reported, never silently dropped ----------------------------------------
def timm_style_state():
    state = dict(VIT_STATE)
    state.pop("masked_embed")
    return state | {"head.weight": np.zeros((10, 16), "float32"), "head.bias": np.zeros(10, "float32")}


def test_unexpected_keys_are_errors_unless_non_strict():
    vit = VisionTransformer(patch_size=4, embed_dim=16, depth=2, num_heads=2, image_size=16)
    with pytest.raises(ValueError, match=r"Unexpected keys \(2\): head.bias, head.weight") as info:
        checkpoint.load_official(vit, timm_style_state())
    assert "strict=False" in str(info.value)
    with pytest.warns(UserWarning, match="2 unexpected keys"):
        report = checkpoint.load_official(vit, timm_style_state(), strict=False)
    assert report.unexpected == ["head.bias", "head.weight"] and report.missing == []
    np.testing.assert_array_equal(to_numpy(vit.norm.gamma), VIT_STATE["norm.weight"])


def test_wrong_shapes_fail_even_when_non_strict():
    vit = VisionTransformer(patch_size=4, embed_dim=16, depth=2, num_heads=2, image_size=16, use_mask_token=True)
    state = dict(VIT_STATE) | {"blocks.0.mlp.fc1.weight": np.zeros((32, 16), "float32")}
    state.pop("norm.bias")
    with pytest.raises(ValueError) as info:
        checkpoint.load_official(vit, state, strict=False)
    text = str(info.value)
    assert "blocks.0.mlp.fc1.weight: checkpoint (32, 16), expected (64, 16)" in text
    assert "Missing keys (1): norm.bias" in text


def test_wrapper_head_entries_are_reported_as_ignored():
    state = {"module.backbone." + key: value for key, value in VIT_STATE.items()}
    state["module.head.last_layer.weight_g"] = np.ones((8, 1), "float32")
    vit = fixture_vit()
    report = checkpoint.load_official(vit, {"teacher": state, "epoch": 2})
    assert report.ignored == ["head.last_layer.weight_g"] and report.epoch == 2


def test_unknown_width_needs_num_heads():
    with pytest.raises(ValueError, match="pass num_heads="):
        checkpoint.backbone_from_official(VIT_STATE)


# -- timm / official PyTorch ViT -----------------------------------------------------------------
def torch_reference_vit(width, depth, heads, patch, grid):
    """A minimal PyTorch ViT with timm's parameter names (timm needs torchvision, which does not
    install beside this torch), written from timm's documented architecture: pre-norm blocks,
    fused qkv, exact GELU, LayerNorm eps 1e-6, CLS token, learned absolute positions."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
            return self.proj((attention @ v).transpose(1, 2).reshape(b, n, width))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x):
            return self.fc2(nn.functional.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention()
            self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, width, patch, stride=patch)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.norm = nn.LayerNorm(width, eps=1e-6)

        def forward_features(self, images):
            x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    return ViT()


@needs_torch
def test_export_loads_strictly_into_a_timm_layout_torch_vit(tmp_path):
    import torch

    vit = VisionTransformer(patch_size=4, embed_dim=24, depth=2, num_heads=3, image_size=16, use_mask_token=True, seed=3)
    path = checkpoint.save_official(vit, tmp_path / "for_timm.pth", include_mask_token=False)
    reference = torch_reference_vit(24, 2, 3, 4, 4)
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype("float32")
    with torch.no_grad():
        theirs = reference.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(to_numpy(vit(images)), theirs, atol=1e-5)
    # And back: a timm state dict (with its classifier) loads into ours, the classifier reported.
    state = {k: v.numpy() for k, v in reference.state_dict().items()} | {"head.weight": np.zeros((5, 24), "float32")}
    back = VisionTransformer(patch_size=4, embed_dim=24, depth=2, num_heads=3, image_size=16)
    with pytest.warns(UserWarning):
        assert checkpoint.load_official(back, state, strict=False).unexpected == ["head.weight"]
    np.testing.assert_allclose(to_numpy(back(images)), theirs, atol=1e-5)


# -- keras-hub -------------------------------------------------------------------------------------
def test_keras_hub_export_has_identical_features():
    if not os.environ.get("IBOT_KERAS_REQUIRE_KERAS_HUB"):  # set in tox env kerashub: no skipping there
        pytest.importorskip("keras_hub", reason="keras-hub not installed (tested in tox env kerashub)")
    from ibot_keras.keras_hub_export import to_keras_hub

    vit = fixture_vit()
    hub = to_keras_hub(vit)
    x = nhwc(V["x_global"][0])
    np.testing.assert_allclose(to_numpy(hub(x)), V["vit_out_global0_nomask"], atol=1e-5)
    hub24 = to_keras_hub(vit, image_size=24)  # another fixed size: the table resized officially
    images = np.random.default_rng(0).normal(size=(2, 24, 24, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(hub24(images)), to_numpy(vit(images)), atol=1e-5)


# -- command line -----------------------------------------------------------------------------------
def test_convert_backbone_to_keras_and_back(tmp_path):
    from ibot_keras.convert import main

    source = state_files.write_state(VIT_STATE, tmp_path / "backbone.npz")
    assert main([str(source), str(tmp_path / "vit.keras"), "--num_heads", "2"]) == 0
    vit = keras.saving.load_model(tmp_path / "vit.keras")
    assert_vit_matches_official(vit)
    assert main([str(tmp_path / "vit.keras"), str(tmp_path / "again.npz")]) == 0
    again = state_files.read_state(tmp_path / "again.npz")
    for key, value in VIT_STATE.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_convert_command_reports_errors_without_a_traceback(tmp_path):
    source = state_files.write_state(VIT_STATE, tmp_path / "backbone.npz")
    done = subprocess.run(
        [sys.executable, "-m", "ibot_keras.convert", str(source), str(tmp_path / "vit.keras")],
        capture_output=True, text=True, timeout=300,
    )  # width 16 is no official size
    assert done.returncode == 2 and "pass num_heads=" in done.stderr and "Traceback" not in done.stderr
