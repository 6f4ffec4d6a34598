"""IBOTLoss against the official iBOTLoss golden vectors (ibot_loss_case1.npz)."""

import keras
import numpy as np
import pytest
from conftest import load_fixture, to_numpy, value_and_grad

from ibot_keras import IBOTLoss

L = load_fixture("ibot_loss_case1")
B, NG, NL, N, K = 4, 2, 2, 16, 32
# float32 port of a float32 reference: rtol 1e-5 / atol 1e-6 (fixture README).
RTOL, ATOL = 1e-5, 1e-6


def batch_first(crop_major, crops):
    """Official crop-major rows ``(crops*B, ...)`` -> ``(B, crops, ...)``."""
    x = crop_major.reshape((crops, B) + crop_major.shape[1:])
    return np.swapaxes(x, 0, 1)


def crop_major(batch_first_array):
    x = np.swapaxes(batch_first_array, 0, 1)
    return x.reshape((-1,) + x.shape[2:])


INPUTS = dict(
    student_cls=batch_first(L["in_student_cls"], NG),
    student_patch=batch_first(L["in_student_patch"], NG),
    teacher_cls=batch_first(L["in_teacher_cls"], NG),
    teacher_patch=batch_first(L["in_teacher_patch"], NG),
    student_local_cls=batch_first(L["in_student_local_cls"], NL),
    masks=np.swapaxes(L["in_masks"], 0, 1).reshape(B, NG, N),
)


def make_loss():
    return IBOTLoss(K, K, NG, NL, 0.04, 0.07, 0.04, 0.07, 30, 100)


def run_case(loss, case):
    loss.center.assign(L[f"{case}_center_in"])
    loss.patch_center.assign(L[f"{case}_center2_in"])
    epoch = int(L[f"{case}_epoch"])
    out = loss(**INPUTS, epoch=epoch)
    for key, ref in (("cls", "loss_cls"), ("patch", "loss_patch"), ("loss", "loss_total")):
        np.testing.assert_allclose(to_numpy(out[key]), L[f"{case}_{ref}"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(to_numpy(loss.center), L[f"{case}_center_out"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        to_numpy(loss.patch_center), L[f"{case}_center2_out"], rtol=RTOL, atol=ATOL
    )


def test_case_a_zero_centers():
    run_case(make_loss(), "a")


def test_case_b_then_c_state_carries_between_calls():
    loss = make_loss()
    run_case(loss, "b")
    # c is a second call on the same object: its input centers are b's outputs.
    np.testing.assert_allclose(to_numpy(loss.center), L["c_center_in"], rtol=RTOL, atol=ATOL)
    out = loss(**INPUTS, epoch=int(L["c_epoch"]))
    np.testing.assert_allclose(to_numpy(out["loss"]), L["c_loss_total"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(to_numpy(loss.center), L["c_center_out"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(to_numpy(loss.patch_center), L["c_center2_out"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_gradients_wrt_student_logits(case):
    loss = make_loss()
    loss.center.assign(L[f"{case}_center_in"])
    loss.patch_center.assign(L[f"{case}_center2_in"])
    epoch = int(L[f"{case}_epoch"])

    def total(student_cls, student_patch, student_local_cls):
        out = loss(
            student_cls,
            student_patch,
            INPUTS["teacher_cls"],
            INPUTS["teacher_patch"],
            student_local_cls,
            INPUTS["masks"],
            epoch=epoch,
            update_center=False,
        )
        return out["loss"]

    value, grads = value_and_grad(
        total, INPUTS["student_cls"], INPUTS["student_patch"], INPUTS["student_local_cls"]
    )
    np.testing.assert_allclose(value, L[f"{case}_loss_total"], rtol=RTOL, atol=ATOL)
    for grad, key, crops in zip(grads, ("student_cls", "student_patch", "student_local_cls"), (NG, NG, NL)):
        np.testing.assert_allclose(crop_major(grad), L[f"{case}_grad_{key}"], rtol=RTOL, atol=ATOL)
    # update_center=False leaves the centers alone.
    np.testing.assert_array_equal(to_numpy(loss.center), L[f"{case}_center_in"])


def test_float64_reference_agrees_within_float32_noise():
    loss = make_loss()
    out = loss(**INPUTS, epoch=3)
    # The official float64 run is the rounding-noise reference: float32 is within ~1e-6.
    np.testing.assert_allclose(to_numpy(out["loss"]), L["a_f64_loss_total"], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(loss.center), L["a_f64_center_out"], atol=1e-6)


def test_masks_as_grids_are_accepted():
    loss = make_loss()
    inputs = dict(INPUTS, masks=INPUTS["masks"].reshape(B, NG, 4, 4))
    out = loss(**inputs, epoch=3)
    np.testing.assert_allclose(to_numpy(out["loss"]), L["a_loss_total"], rtol=RTOL)


def test_fully_unmasked_batch_has_zero_patch_loss():
    loss = make_loss()
    inputs = dict(INPUTS, masks=np.zeros((B, NG, N), bool))
    out = loss(**inputs, epoch=3)
    assert to_numpy(out["patch"]) == 0.0
    assert to_numpy(out["cls"]) == pytest.approx(float(L["a_loss_cls"]), rel=RTOL)


def test_no_local_crops():
    loss = IBOTLoss(K, K, NG, 0, 0.04, 0.07, 0.04, 0.07, 30, 100)
    inputs = dict(INPUTS, student_local_cls=None)
    out = loss(**inputs, epoch=3)
    # With nl = 0 only the two cross-view pairs remain; recompute them independently.
    t = INPUTS["teacher_cls"] / L["a_temp"]
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    s = INPUTS["student_cls"] / 0.1
    logp = s - s.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    pairs = [-(p[:, 0] * logp[:, 1]).sum(-1).mean(), -(p[:, 1] * logp[:, 0]).sum(-1).mean()]
    assert to_numpy(out["cls"]) == pytest.approx(sum(pairs) / 2, rel=1e-5)
    assert to_numpy(out["patch"]) == pytest.approx(float(L["a_loss_patch"]), rel=RTOL)


def test_non_finite_teacher_leaves_centers_unchanged():
    loss = make_loss()
    bad = INPUTS["teacher_cls"].copy()
    bad[0, 0, 0] = np.nan
    loss(**dict(INPUTS, teacher_cls=bad), epoch=3)
    np.testing.assert_array_equal(to_numpy(loss.center), np.zeros((1, K), np.float32))


@pytest.mark.parametrize(
    "key,shape,message",
    [
        ("student_cls", (B, 3, K), r"student_cls must have shape \(B, 2, 32\)"),
        ("teacher_patch", (B, NG, N, 7), r"teacher_patch must have shape"),
        ("masks", (B, NG, 9), r"masks must have shape \(B, 2, 16\)"),
        ("student_local_cls", (B, 1, K), r"student_local_cls must have shape \(B, 2, 32\)"),
    ],
)
def test_bad_shapes_raise_value_error(key, shape, message):
    inputs = dict(INPUTS)
    inputs[key] = np.zeros(shape, bool if key == "masks" else np.float32)
    with pytest.raises(ValueError, match=message):
        make_loss()(**inputs, epoch=0)


def test_serialization_round_trip():
    loss = IBOTLoss(K, 24, 2, 4, 0.04, 0.07, 0.05, 0.08, 5, 20, lambda2=0.5, mim_start_epoch=3)
    clone = IBOTLoss.from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    np.testing.assert_array_equal(clone.teacher_patch_temp_schedule, loss.teacher_patch_temp_schedule)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, IBOTLoss) and restored.patch_out_dim == 24
