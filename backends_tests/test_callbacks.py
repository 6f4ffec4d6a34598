"""ibot_keras.callbacks: steer the teacher between epochs, see its state in the logs."""

import numpy as np
import pytest
from conftest import to_numpy
from test_model import stacked, tiny_batch, tiny_config

from ibot_keras import build_pretrainer
from ibot_keras.callbacks import TeacherMomentumScheduler, TeacherStateMonitor, TeacherTemperatureScheduler


def test_temperature_override_is_used_by_the_compiled_step():
    model = build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=1)
    batch = tiny_batch()
    out = model(batch, training=False)
    expected = model.ibot_loss(
        out["student_cls"], out["student_patch"], out["teacher_cls"], out["teacher_patch"],
        out["student_local_cls"], out["masks"], update_center=False, temperatures=(0.05, 0.09),
    )
    official = model.ibot_loss(
        out["student_cls"], out["student_patch"], out["teacher_cls"], out["teacher_patch"],
        out["student_local_cls"], out["masks"], epoch=0, update_center=False,
    )
    assert abs(float(to_numpy(expected["cls"])) - float(to_numpy(official["cls"]))) > 1e-3
    seen = []
    scheduler = TeacherTemperatureScheduler(lambda epoch, temps: seen.append(temps) or (0.05, 0.09))
    history = model.fit(batch, batch_size=2, epochs=1, verbose=0, callbacks=[scheduler])
    assert history.history["cls"][0] == pytest.approx(float(to_numpy(expected["cls"])), rel=1e-5)
    assert history.history["patch"][0] == pytest.approx(float(to_numpy(expected["patch"])), rel=1e-5)
    assert history.history["teacher_temp"][0] == pytest.approx(0.05)
    assert seen == [pytest.approx((0.04, 0.04))]  # the official epoch-0 values were offered
    assert float(to_numpy(model.teacher_temp_override)) == -1.0  # reset after training


def test_none_keeps_the_official_schedule():
    model = build_pretrainer(tiny_config(), steps_per_epoch=1)
    scheduler = TeacherTemperatureScheduler(lambda epoch, temps: 0.02 if epoch == 0 else None)
    history = model.fit(stacked(tiny_batch()), batch_size=2, epochs=2, verbose=0, callbacks=[scheduler])
    assert history.history["teacher_temp"] == pytest.approx([0.02, 0.04])  # official: 0.04 then 0.04


def test_momentum_override():
    model = build_pretrainer(tiny_config(drop_path=0.0, lr=1.0, freeze_last_layer=0), steps_per_epoch=1)
    teacher_before = {n: to_numpy(v) for n, v, _ in model.teacher_weights()}
    model.fit(tiny_batch(), batch_size=2, epochs=1, verbose=0, callbacks=[TeacherMomentumScheduler(lambda e, m: 0.25)])
    student = {n: to_numpy(v) for n, v, _ in model.student_weights()}
    for name, var, _ in model.teacher_weights():
        np.testing.assert_allclose(
            to_numpy(var), 0.25 * teacher_before[name] + 0.75 * student[name], rtol=1e-5, atol=1e-7
        )
    frozen = {n: to_numpy(v) for n, v, _ in model.teacher_weights()}
    model.fit(tiny_batch(seed=3), batch_size=2, epochs=1, verbose=0, callbacks=[TeacherMomentumScheduler(lambda e, m: 1.0)])
    for name, var, _ in model.teacher_weights():
        np.testing.assert_array_equal(to_numpy(var), frozen[name])
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        model.fit(tiny_batch(), batch_size=2, epochs=1, verbose=0, callbacks=[TeacherMomentumScheduler(lambda e, m: 1.5)])


def test_state_monitor_logs():
    model = build_pretrainer(tiny_config(lr=0.1, warmup_epochs=0), steps_per_epoch=1)
    history = model.fit(tiny_batch(), batch_size=2, epochs=1, verbose=0, callbacks=[TeacherStateMonitor()])
    logs = {k: v[0] for k, v in history.history.items()}
    assert logs["center_norm"] == pytest.approx(float(np.linalg.norm(to_numpy(model.ibot_loss.center))), rel=1e-6)
    assert logs["patch_center_norm"] > 0
    assert logs["teacher_student_gap"] > 0  # the student moved, the EMA lags behind


def test_collapse_diagnostics_and_warning():
    from ibot_keras.callbacks import CollapseMonitor

    model = build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=1)
    batch = tiny_batch()
    out = model(batch, training=False)
    # Independent NumPy computation of the diagnostics on the same teacher outputs.
    logits = to_numpy(out["teacher_cls"]).reshape(-1, 32) / 0.04  # centers are zero, epoch-0 temp
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1).mean()
    mean_p = p.mean(0)
    batch_entropy = -(mean_p * np.log(mean_p)).sum()
    usage = len(set(logits.argmax(-1))) / 32
    monitor = CollapseMonitor(uniform_fraction=0.0)  # flags every epoch: checks the wiring
    with pytest.warns(UserWarning) as caught:
        history = model.fit(batch, batch_size=2, epochs=1, verbose=0, callbacks=[monitor])
    messages = [str(w.message) for w in caught]
    assert sum("looks collapsed (uniform)" in m for m in messages) == 1
    assert any("looked collapsed: uniform in 1 epoch(s) (1)" in m for m in messages)
    logs = {k: v[0] for k, v in history.history.items()}
    assert logs["teacher_entropy"] == pytest.approx(entropy, rel=1e-4)
    assert logs["teacher_batch_entropy"] == pytest.approx(batch_entropy, rel=1e-4)
    assert logs["prototype_usage"] == pytest.approx(usage)
    assert logs["kl"] == pytest.approx(logs["cls"] - entropy, rel=1e-4, abs=1e-5)
    assert monitor.collapsed_epochs == [0]


def test_collapse_monitor_warns_once_per_state_and_summarises():
    from ibot_keras.callbacks import CollapseMonitor

    model = build_pretrainer(tiny_config(drop_path=0.0, epochs=3), steps_per_epoch=1)
    monitor = CollapseMonitor(uniform_fraction=0.0)  # every epoch reads as uniform collapse
    with pytest.warns(UserWarning) as caught:
        model.fit(tiny_batch(), batch_size=2, epochs=3, verbose=0, callbacks=[monitor])
    messages = [str(w.message) for w in caught]
    # One warning when the state starts (epoch 1), none for epochs 2-3, one summary at the end.
    assert [m.split(":")[0] for m in messages if "looks collapsed" in m] == ["Epoch 1"]
    assert any("uniform in 3 epoch(s) (1-3)" in m for m in messages)
    assert monitor.collapsed_epochs == [0, 1, 2]


def test_epoch_ranges():
    from ibot_keras.callbacks import _epoch_ranges

    assert _epoch_ranges([0, 1, 2, 5, 7, 8]) == "1-3, 6, 8-9"
    assert _epoch_ranges([4]) == "5"
