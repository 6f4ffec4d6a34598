"""Mixed precision: ``mixed_bfloat16`` and ``mixed_float16`` (automatic loss scaling) training.

One tiny model per policy trains 30 steps through ``fit`` (1 step, then 29, one compiled
step); a float32 twin with the same initial weights gives the reference first-step losses.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from test_model import stacked, tiny_batch, tiny_config

from ibot_keras import build_pretrainer

STEPS = 30
STEPS_PER_EPOCH = 15
POLICIES = ("mixed_bfloat16", "mixed_float16")
# First-step losses against float32, absolute: 32 units of roundoff u of the policy's compute
# dtype (2**-8 = 3.9e-3 for bfloat16's 8-bit significand, 2**-11 = 4.9e-4 for float16's 11
# bits). The logits, softmaxes and the loss are float32; the rounding comes from the backbone
# and head MLP, leaves a few u of absolute error on the logits (the bottleneck is normalised
# in float32 and the prototype columns have norm 1, so |logit| <= 1), and the log-softmax at
# student temperature 0.1 multiplies it by 10. Observed on the three backends: up to 0.019
# (bfloat16, ~5u) and 0.005 (float16, ~10u). float32 alone matches the official code to 1e-5.
ATOL = {"mixed_bfloat16": 32 * 2.0**-8, "mixed_float16": 32 * 2.0**-11}
# float16's loss scale starts at Keras' default 2**15 and halves on every skipped step.
INITIAL_SCALE = 2.0**15


@pytest.fixture(autouse=True)
def _float32_policy_after_each_test():
    yield
    keras.config.set_dtype_policy("float32")


def _config():
    # momentum_teacher 0.9999: the EMA step 1 - m = 1e-4, which float16/bfloat16 arithmetic
    # would round away. lr 1.0 (scaled 1/128, no warmup) so that the student moves at step 1.
    return tiny_config(drop_path=0.0, momentum_teacher=0.9999, lr=1.0, warmup_epochs=0)


def _batches():
    return [tiny_batch(seed=seed) for seed in range(STEPS)]


def _state(model):
    return {
        "center": to_numpy(model.ibot_loss.center),
        "patch_center": to_numpy(model.ibot_loss.patch_center),
        "teacher": {n: to_numpy(v) for n, v, _ in model.teacher_weights()},
        "student": {n: to_numpy(v) for n, v, _ in model.student_weights()},
        "step": int(to_numpy(model.step)),
        "iterations": int(to_numpy(model.optimizer.iterations)),
    }


def _scale(model):
    return float(to_numpy(model.optimizer.dynamic_scale))


@pytest.fixture(scope="module")
def reference():
    """Float32 initial weights and first-step losses (``evaluate`` moves no state; an eager
    forward would take ~20 s on JAX)."""
    keras.config.set_dtype_policy("float32")
    model = build_pretrainer(_config(), steps_per_epoch=STEPS_PER_EPOCH)
    losses = model.evaluate(_batches()[0], batch_size=2, verbose=0, return_dict=True)
    return model.get_weights(), {key: losses[key] for key in ("loss", "cls", "patch")}


@pytest.fixture(scope="module", params=POLICIES)
def run(request, reference):
    """A model built under the policy, trained 1 step then 29 more, with states recorded."""
    policy = request.param
    keras.config.set_dtype_policy(policy)
    try:
        model = build_pretrainer(_config(), steps_per_epoch=STEPS_PER_EPOCH)
    finally:
        keras.config.set_dtype_policy("float32")
    model.set_weights(reference[0])
    data = _batches()
    out = {"policy": policy, "model": model, "before": _state(model)}
    if policy == "mixed_float16":
        out["scale_before"] = model.optimizer.initial_scale  # built by fit
    first = model.fit(data[0], batch_size=2, epochs=1, shuffle=False, verbose=0).history
    out["first"] = {key: first[key][0] for key in ("loss", "cls", "patch")}
    out["after_first"] = _state(model)
    if policy == "mixed_float16":
        out["scale_after_first"] = _scale(model)
    rest = model.fit(stacked(*data[1:]), batch_size=2, epochs=1, shuffle=False, verbose=0).history
    out["rest"] = {key: rest[key][0] for key in ("loss", "cls", "patch")}
    out["final"] = _state(model)
    return out


def test_components_compute_in_the_policy_and_keep_float32_state(run):
    model, policy = run["model"], run["policy"]
    assert model.dtype_policy.name == policy
    assert model.student_backbone.dtype_policy.name == policy
    assert model.student_head.last_layer.compute_dtype == "float32"  # prototype logits
    assert model.ibot_loss.compute_dtype == "float32"
    for variable in [model.ibot_loss.center, model.ibot_loss.patch_center] + model.teacher_backbone.weights:
        assert keras.backend.standardize_dtype(variable.dtype) == "float32", variable.path
    assert type(model.optimizer).__name__ == (
        "LossScaleOptimizer" if policy == "mixed_float16" else "IBOTAdamW"
    )
    # Traced only (an eager forward would take ~20 s on JAX).
    specs = {k: keras.KerasTensor(v.shape, dtype=v.dtype) for k, v in tiny_batch().items()}
    outputs = model.compute_output_spec(specs, training=True)
    for key in ("student_cls", "student_patch", "teacher_cls", "teacher_patch", "student_local_cls"):
        assert keras.backend.standardize_dtype(outputs[key].dtype) == "float32", key


def test_first_step_losses_match_float32_within_the_policy_tolerance(run, reference):
    expected = reference[1]
    for key in ("loss", "cls", "patch"):
        assert run["first"][key] == pytest.approx(expected[key], abs=ATOL[run["policy"]]), key


def test_thirty_steps_stay_finite(run):
    final = run["final"]
    assert final["step"] == final["iterations"] == STEPS
    assert all(np.isfinite(v) for v in list(run["first"].values()) + list(run["rest"].values()))
    for name in ("center", "patch_center"):
        assert np.all(np.isfinite(final[name])) and np.any(final[name] != 0), name
    for part in ("teacher", "student"):
        for name, value in final[part].items():
            assert np.all(np.isfinite(value)), f"{part}.{name}"
            if part == "student" and "last_layer" not in name:
                assert not np.array_equal(value, run["before"][part][name]), f"{name} never trained"


def test_bfloat16_ema_step_of_1e4_is_applied_in_float32(run):
    if run["policy"] != "mixed_bfloat16":
        pytest.skip("float16's first step is skipped (see the next test)")
    before, after = run["before"], run["after_first"]
    one_minus_m = float(to_numpy(run["model"].momentum_schedule.one_minus(0)))
    assert one_minus_m == pytest.approx(1e-4)
    moved = 0
    for name, teacher in after["teacher"].items():
        m, student = np.float32(1 - one_minus_m), after["student"][name]
        expected = before["teacher"][name] * m + student * np.float32(one_minus_m)
        # float32 rounding only; a bfloat16 EMA would be off by ~4e-3 relative (or not move).
        np.testing.assert_allclose(teacher, expected, rtol=1e-6, atol=1e-9, err_msg=name)
        moved += not np.array_equal(teacher, before["teacher"][name])
    assert moved > len(after["teacher"]) // 2


def test_float16_skipped_step_moves_neither_centers_nor_teacher(run):
    if run["policy"] != "mixed_float16":
        pytest.skip("only float16 uses loss scaling")
    before, after = run["before"], run["after_first"]
    # Precondition: at the default scale 2**15 this tiny head's float16 gradients overflow
    # (its bottleneck bias gradient is ~7e3 in float32; float16 ends at 65504), while the
    # loss itself is finite: without the guard the centers would move (they do in the loss).
    assert run["scale_before"] == INITIAL_SCALE
    assert run["scale_after_first"] == INITIAL_SCALE / 2, "step 1 was not skipped"
    assert np.isfinite(run["first"]["loss"])
    np.testing.assert_array_equal(after["center"], before["center"])
    np.testing.assert_array_equal(after["patch_center"], before["patch_center"])
    for part in ("teacher", "student"):
        for name, value in after[part].items():
            np.testing.assert_array_equal(value, before[part][name], err_msg=f"{part}.{name}")
    # The iteration still counts (the official `it`: lr/wd/freeze schedules) ...
    assert after["step"] == after["iterations"] == 1
    # ... but the per-parameter Adam step counts only count applied steps.
    model = run["model"]
    skipped = int(round(np.log2(INITIAL_SCALE / _scale(model))))
    assert 1 <= skipped < STEPS
    inner = model.optimizer.inner_optimizer
    for name, var, _ in model.student_weights():
        if "last_layer" not in name:
            assert int(to_numpy(inner.slots(var)[2])) == STEPS - skipped, name


def test_use_fp16_builds_under_mixed_float16_and_restores_the_global_policy():
    model = build_pretrainer(tiny_config(use_fp16=True, drop_path=0.0), steps_per_epoch=1)
    assert keras.config.dtype_policy().name == "float32"
    assert model.dtype_policy.name == "mixed_float16"
    assert model.student_backbone.compute_dtype == "float16"
    assert model.student_backbone.variable_dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(tiny_batch(), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # use_fp16=False leaves a policy the user set alone.
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = build_pretrainer(tiny_config(), steps_per_epoch=1)
    assert model.student_backbone.compute_dtype == "bfloat16"
