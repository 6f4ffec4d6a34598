"""Trajectory A: six official training steps reproduced by `IBOT.fit` on every backend.

Tolerances are the fixture README's float32 ones; its sensitivity table shows each
deliberate deviation (no weight decay, one global Adam counter, zeroed instead of absent
last-layer gradients, global-norm clipping, EMA per epoch, ...) exceeds them.
"""

import numpy as np
import pytest
from conftest import to_numpy
from trajectory import STEPS_PER_EPOCH, T, batches, build_fixture_model, fit_fixture

from ibot_keras import checkpoint


def assert_final_state(model, recorder):
    np.testing.assert_allclose(recorder.series("loss"), T["loss"], atol=1e-5)
    np.testing.assert_allclose(recorder.series("cls"), T["loss_cls"], atol=1e-5)
    np.testing.assert_allclose(recorder.series("patch"), T["loss_patch"], atol=1e-5)
    np.testing.assert_allclose(np.array(recorder.centers), T["center"], atol=1e-6)
    np.testing.assert_allclose(np.array(recorder.patch_centers), T["center2"], atol=1e-6)
    exported = checkpoint.export_official(model)
    for part, atol in (("student", 2e-6), ("teacher", 1e-6)):
        for name, value in exported[part].items():
            expected = T[f"final_{part}__" + name.replace(".", "__")]
            np.testing.assert_allclose(value, expected, atol=atol, err_msg=f"{part}.{name}")
    features = model.teacher_backbone(batches()[0]["global_crops"][:, 0], training=False)[:, 0]
    np.testing.assert_allclose(to_numpy(features), T["final_teacher_cls_feat"], atol=5e-6)


@pytest.fixture(scope="module")
def trained():
    model = build_fixture_model()
    recorder = fit_fixture(model, epochs=int(T["cfg_epochs"]))
    return model, recorder


def test_every_step_and_the_final_state_match_official(trained):
    assert_final_state(*trained)


def test_logged_schedules_are_the_official_per_step_values(trained):
    _, recorder = trained
    np.testing.assert_allclose(recorder.series("lr"), T["lr"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(recorder.series("wd"), T["wd"], rtol=1e-6)
    np.testing.assert_allclose(recorder.series("teacher_temp"), T["teacher_temp"], rtol=1e-6)
    np.testing.assert_allclose(recorder.series("teacher_momentum"), T["momentum"], rtol=1e-7)


def test_per_parameter_adam_step_counts(trained):
    model, _ = trained
    optimizer = model.optimizer
    ours = {name: to_numpy(optimizer.slots(var)[2]) for name, var, _ in model.student_weights()}
    expected = dict(zip(T["adam_step_count_names"], T["adam_step_count"]))
    assert ours == pytest.approx(expected)
    assert int(to_numpy(model.step)) == int(to_numpy(optimizer.iterations)) == 6


def test_step0_loss_inputs():
    model = build_fixture_model()
    out = model(batches()[0], training=False)

    def crop_major(x):
        x = to_numpy(x)
        return np.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])

    for key in ("teacher_cls", "teacher_patch", "student_cls", "student_patch", "student_local_cls"):
        np.testing.assert_allclose(crop_major(out[key]), T[f"step0_{key}"], atol=1e-5, err_msg=key)


def test_two_fit_calls_equal_one():
    # Continuing with a second fit() must neither repeat nor skip a teacher update.
    model = build_fixture_model()
    recorder = fit_fixture(model, epochs=2)
    fit_fixture(model, epochs=3, initial_epoch=2, recorder=recorder)
    assert len(recorder.logs) == 3 * STEPS_PER_EPOCH
    assert_final_state(model, recorder)
