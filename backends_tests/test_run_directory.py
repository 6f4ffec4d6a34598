"""The run directory is the run's alone: only our checkpoint files in it are read or deleted,
a fresh run does not replace another run's checkpoints, a corrupt pointer or checkpoint falls
back with a warning, the schedule settings must match to resume, and a non-finite state is
never written. No training: the step counter is set and the save/restore paths are called."""

import json
import os

import numpy as np
import pytest
from conftest import to_numpy

from ibot_keras import PretrainConfig, build_pretrainer, resume
from ibot_keras.resume import TrainingCheckpoint, restore_training_state, save_training_state

STEPS = 3  # per epoch


def config(**overrides):
    values = dict(
        arch="vit_tiny", patch_size=8, embed_dim=16, depth=1, num_heads=2, image_size=16, global_crop_size=16,
        local_crop_size=8, out_dim=16, patch_out_dim=16, shared_head=True, head_hidden_dim=16,
        head_bottleneck_dim=8, warmup_teacher_temp_epochs=1, epochs=2, warmup_epochs=1, batch_size=2,
        local_crops_number=2,
    )
    values.update(overrides)
    return PretrainConfig(**values)


def build(**overrides):
    model = build_pretrainer(config(**overrides), steps_per_epoch=STEPS)
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def other():
    """Another run's model (other lr and teacher momentum), at step 0."""
    return build(lr=1e-3, momentum_teacher=0.99)


def files(directory):
    return sorted(os.listdir(directory))


def save_at(model, directory, step, **kwargs):
    model.step.assign(step)
    return save_training_state(model, directory, **kwargs)


def write_pointer(directory, **entries):
    (directory / "checkpoint.json").write_text(json.dumps(entries))


def kept_and_mid_epoch(model, directory):
    """checkpoint0001 (kept, step 3) and checkpoint-step00000004 (the pointer's)."""
    save_at(model, directory, 3, keep=True)
    save_at(model, directory, 4)
    assert files(directory) == ["checkpoint-step00000004.weights.h5", "checkpoint.json", "checkpoint0001.weights.h5"]


# -- only our files, inside the directory ------------------------------------------------------
@pytest.mark.parametrize("weights", [
    "../outside.weights.h5", "/tmp/checkpoint-0001.weights.h5", "sub/checkpoint-0001.weights.h5",
    "checkpoint-0001.weights.h5/../../x", "config.json", "checkpoint-\u0660\u0660\u0660\u0661.weights.h5", 7,
])
def test_pointer_naming_anything_but_our_checkpoint_is_refused_on_restore(model, tmp_path, weights):
    run = tmp_path / "run"
    run.mkdir()
    write_pointer(run, weights=weights, step=3, epoch=1)
    model.step.assign(0)
    with pytest.raises(ValueError, match="is not a checkpoint file of ours"):
        restore_training_state(model, run)
    assert int(to_numpy(model.step)) == 0


@pytest.mark.parametrize("weights", ["../victim.weights.h5", "log.csv"])
def test_save_never_deletes_a_file_the_pointer_names_that_is_not_ours(model, tmp_path, weights):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "victim.weights.h5").write_bytes(b"another run")
    (run / "log.csv").write_text("epoch,loss\n")
    write_pointer(run, weights=weights, step=2, epoch=0)
    with pytest.warns(UserWarning, match="neither read nor deleted.*no earlier checkpoint file is deleted"):
        save_at(model, run, 3)
    assert (tmp_path / "victim.weights.h5").read_bytes() == b"another run"
    assert files(run) == ["checkpoint-0001.weights.h5", "checkpoint.json", "log.csv"]
    assert json.loads((run / "checkpoint.json").read_text())["weights"] == "checkpoint-0001.weights.h5"


# -- a fresh run does not take over another run's directory --------------------------------------
@pytest.mark.parametrize("step, latest", [
    (4, r"checkpoint-step00000004\.weights\.h5, at step 4"),
    (0, r"checkpoint-0001\.weights\.h5, at step 0 after 1 epochs"),  # saved with epoch=0, untrained
    (None, r"checkpoint0001\.weights\.h5, after epoch 1"),  # a kept copy, no pointer
])
def test_fresh_model_refuses_a_directory_holding_checkpoints(model, other, tmp_path, step, latest):
    if step is None:
        save_at(model, tmp_path, 3, keep=True)
        os.remove(tmp_path / "checkpoint.json")
        os.remove(tmp_path / "checkpoint-0001.weights.h5")
    else:
        save_at(model, tmp_path, step, epoch=0)
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    callback = TrainingCheckpoint(str(tmp_path))
    callback.set_model(other)
    with pytest.raises(ValueError, match=rf"latest: {latest}.*at step 0.*restore_training_state\(model, .*overwrite=True"):
        callback.on_train_begin()
    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == before


def test_model_restored_from_the_directory_resumes_there(model, tmp_path):
    save_at(model, tmp_path, 4)
    model.step.assign(0)
    assert restore_training_state(model, tmp_path) == 1
    callback = TrainingCheckpoint(str(tmp_path))
    callback.set_model(model)
    callback.on_train_begin()  # no error
    assert files(tmp_path) == ["checkpoint-step00000004.weights.h5", "checkpoint.json"]


def test_overwrite_deletes_only_our_checkpoint_files(model, other, tmp_path):
    save_at(model, tmp_path, 3, keep=True)
    for name in ("log.csv", "checkpoint-0001.weights.h5.bak", "checkpoint-1.weights.h5", "notes.txt"):
        (tmp_path / name).write_text("theirs")
    callback = TrainingCheckpoint(str(tmp_path), overwrite=True)
    callback.set_model(other)
    with pytest.warns(UserWarning, match="overwrite=True: deleted the previous run's"):
        callback.on_train_begin()
    assert files(tmp_path) == ["checkpoint-0001.weights.h5.bak", "checkpoint-1.weights.h5", "log.csv", "notes.txt"]
    with pytest.raises(TypeError, match=r"overwrite=\.\.\.\) must be True or False; got 'yes'"):
        TrainingCheckpoint(str(tmp_path), overwrite="yes")


# -- corrupt pointer or checkpoint: fall back ------------------------------------------------------
@pytest.mark.parametrize("content", ["", "{", "[]", "{}", '{"weights": "checkpoint-step00000004.weights.h5"}'])
def test_corrupt_pointer_falls_back_to_the_newest_readable_checkpoint(model, tmp_path, content):
    kept_and_mid_epoch(model, tmp_path)
    (tmp_path / "checkpoint.json").write_text(content)
    model.step.assign(0)
    with pytest.warns(UserWarning, match=r"checkpoint\.json is (unreadable|not a checkpoint pointer).*"
                                         r"checkpoint-step00000004\.weights\.h5, at step 4"):
        assert restore_training_state(model, tmp_path) == 1  # in epoch 1 (0-based)
    assert int(to_numpy(model.step)) == 4
    assert resume.resumed_mid_epoch(model)


def test_unreadable_checkpoint_falls_back_to_the_previous_one(model, tmp_path):
    kept_and_mid_epoch(model, tmp_path)
    (tmp_path / "checkpoint-step00000004.weights.h5").write_bytes(b"not hdf5")
    model.step.assign(0)
    with pytest.warns(UserWarning, match=r"checkpoint-step00000004\.weights\.h5, which checkpoint\.json names, is "
                                         r"unreadable.*\(checkpoint0001\.weights\.h5, after epoch 1\)"):
        assert restore_training_state(model, tmp_path) == 1
    assert int(to_numpy(model.step)) == 3


def test_nothing_readable_to_fall_back_to_is_a_clear_error(model, tmp_path):
    (tmp_path / "checkpoint.json").write_text("{")
    with pytest.raises(ValueError, match=r"checkpoint\.json is unreadable.*holds no checkpoint file"):
        restore_training_state(model, tmp_path)
    (tmp_path / "checkpoint-0002.weights.h5").write_bytes(b"")
    write_pointer(tmp_path, weights="checkpoint-0002.weights.h5", step=6, epoch=2)
    with pytest.raises(ValueError, match=r"no other checkpoint file in .* is readable \(there is none\)"):
        restore_training_state(model, tmp_path)


# -- the settings that shape the schedules ---------------------------------------------------------
def test_pointer_records_the_schedule_settings(model, tmp_path):
    save_at(model, tmp_path, 3)
    saved = json.loads((tmp_path / "checkpoint.json").read_text())["schedule"]
    c = config()
    expected = {
        "epochs": 2, "steps_per_epoch": STEPS, "momentum_teacher": c.momentum_teacher,
        "optimizer.learning_rate.base_value": c.lr * c.batch_size / 256,
        "optimizer.learning_rate.final_value": c.min_lr, "optimizer.learning_rate.warmup_epochs": 1,
        "optimizer.weight_decay.base_value": c.weight_decay, "optimizer.weight_decay.final_value": c.weight_decay_end,
        "optimizer.freeze_steps": c.freeze_last_layer * STEPS, "ibot_loss.teacher_temp": c.teacher_temp,
        "ibot_loss.warmup_teacher_temp": c.warmup_teacher_temp, "ibot_loss.teacher_patch_temp": c.teacher_patch_temp,
        "ibot_loss.warmup_teacher_temp_epochs": 1,
    }
    assert {key: saved[key] for key in expected} == pytest.approx(expected, rel=1e-12)


def test_resume_with_other_schedule_settings_is_refused_by_name(model, other, tmp_path):
    save_at(model, tmp_path, 4)
    c = config()
    lr, theirs = c.lr * c.batch_size / 256, 1e-3 * c.batch_size / 256
    with pytest.raises(ValueError, match=(
        rf"momentum_teacher: checkpoint 0\.996, model 0\.99;.*optimizer\.learning_rate\.base_value: "
        rf"checkpoint {lr!r}, model {theirs!r}.*another output directory"
    )):
        restore_training_state(other, tmp_path)
    assert int(to_numpy(other.step)) == 0  # nothing loaded
    pointer = json.loads((tmp_path / "checkpoint.json").read_text())
    del pointer["schedule"]  # a pointer written before the settings were recorded: no check
    write_pointer(tmp_path, **pointer)
    assert restore_training_state(other, tmp_path) == 1
    assert int(to_numpy(other.step)) == 4


# -- durability --------------------------------------------------------------------------------
def test_every_rename_is_followed_by_a_directory_fsync(model, tmp_path, monkeypatch):
    events = []
    replace, fsync_directory = os.replace, resume.fsync_directory
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))), replace(a, b)))
    monkeypatch.setattr(resume, "fsync_directory", lambda d: (events.append(("fsync", str(d))), fsync_directory(d)))
    save_at(model, tmp_path, 3, keep=True)
    renames = [i for i, event in enumerate(events) if event[0] == "replace"]
    assert [events[i][1] for i in renames] == ["checkpoint-0001.weights.h5", "checkpoint.json", "checkpoint0001.weights.h5"]
    assert all(events[i + 1] == ("fsync", str(tmp_path)) for i in renames), events


@pytest.mark.parametrize("where", ["student weight", "optimizer slot"])
def test_non_finite_state_is_never_written_and_every_file_is_kept(model, tmp_path, where):
    save_at(model, tmp_path, 3)
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    if where == "student weight":
        variable = model.student_backbone.weights[0]
    else:
        variable = next(v for v in model.optimizer.variables if "momentum" in v.path)
    good = to_numpy(variable)
    bad = good.copy()
    bad.flat[0] = np.nan if where == "student weight" else np.inf
    variable.assign(bad)
    try:
        match = rf"Checkpoint skipped at step 6 \(epoch 2\): {variable.path} is not finite"
        with pytest.warns(UserWarning, match=match):
            assert save_at(model, tmp_path, 6) is None
        callback = TrainingCheckpoint(str(tmp_path))  # the callback's epoch-end save, too
        callback.set_model(model)
        model.step.assign(3)
        callback.on_train_begin()
        model.step.assign(6)
        with pytest.warns(UserWarning, match=match):
            callback.on_epoch_end(1)
    finally:
        variable.assign(good)
    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == before
