"""Checkpoints survive SIGKILL and resume bit-for-bit at any step on every backend, with
worker processes feeding the data."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent


def run(out, **env):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **{k: str(v) for k, v in env.items()})
    return subprocess.Popen(
        [sys.executable, str(HERE / "resume_run.py"), str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def batch_rows(text):
    """``{(epoch, batch): (loss, cls, patch)}`` of the BATCH lines (epoch running means)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("BATCH"):
            _, epoch, batch, *values = line.split()
            rows[int(epoch), int(batch)] = tuple(float(v) for v in values)
    return rows


def epoch_rows(out):
    with open(out / "log.csv") as f:
        return {int(row["epoch"]): row for row in csv.DictReader(f)}


def finish(process):
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    return out


def test_sigkill_at_any_step_then_resume_equals_uninterrupted(tmp_path):
    """Killed after step 10 of 12 (epoch 3 of 3, 4 steps per epoch), with 2 worker processes:
    from the step-9 checkpoint (mid-epoch), and from the epoch-2 checkpoint (a boundary). The
    uninterrupted reference augments in the training process (0 workers)."""
    straight = tmp_path / "straight"
    cases = {"mid_epoch": dict(SAVE_STEPS=3), "boundary": dict(SAVE_STEPS=0)}
    reference = run(straight, WORKERS=0)
    victims = {name: run(tmp_path / name, WORKERS=2, HANG_AT=10, **env) for name, env in cases.items()}
    for name, victim in victims.items():
        line = ""
        while line.strip() != "READY":
            line = victim.stdout.readline()
            assert line, victim.stderr.read()[-3000:]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    expected_step = {"mid_epoch": 9, "boundary": 8}
    for name in cases:
        pointer = json.loads((tmp_path / name / "checkpoint.json").read_text())
        assert pointer["step"] == expected_step[name], pointer
        assert not any(p.name.startswith(".tmp") for p in (tmp_path / name).iterdir() if p.suffix == ".h5")
    resumed = {name: run(tmp_path / name, WORKERS=2, **env) for name, env in cases.items()}
    theirs = batch_rows(finish(reference))
    assert len(theirs) == 12
    for name, process in resumed.items():
        out = finish(process)
        assert "DONE 2" in out  # restored into epoch 2 (0-based)
        ours = batch_rows(out)
        first = (2, expected_step[name] % 4)
        assert min(ours) == first and len(ours) == 12 - expected_step[name], sorted(ours)
        for key, values in ours.items():
            # The same computation on the same restored state and batches: equal up to
            # summation noise (in practice bit-equal).
            np.testing.assert_allclose(values, theirs[key], rtol=0, atol=1e-6, err_msg=f"{name} {key}")
        ours, expected = epoch_rows(tmp_path / name), epoch_rows(straight)
        assert sorted(ours) == sorted(expected) == [0, 1, 2]
        for epoch in ours:  # the resumed epoch's row too: its running sums were restored
            for key in ("loss", "cls", "patch"):
                assert float(ours[epoch][key]) == pytest.approx(float(expected[epoch][key]), abs=1e-6), (name, epoch, key)
        assert json.loads((tmp_path / name / "checkpoint.json").read_text())["epoch"] == 3


def test_interrupted_write_keeps_the_last_good_checkpoint(tmp_path):
    from trajectory import build_fixture_model

    from ibot_keras.resume import restore_training_state, save_training_state

    model = build_fixture_model()
    save_training_state(model, tmp_path, epoch=0)
    # A crash while writing epoch 1 leaves only a temporary file behind.
    (tmp_path / ".tmp-checkpoint-0002.weights.h5").write_bytes(b"partial")
    model.ibot_loss.center.assign(np.ones((1, 64), "float32"))
    assert restore_training_state(model, tmp_path) == 1
    np.testing.assert_array_equal(np.asarray(model.ibot_loss.center), 0.0)
