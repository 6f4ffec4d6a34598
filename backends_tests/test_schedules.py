"""Schedules against the official `cosine_scheduler` and iBOTLoss temperature tables."""

import numpy as np
import pytest
from conftest import load_fixture, to_numpy

from ibot_keras import schedules
from ibot_keras.losses import IBOTLoss

S = load_fixture("schedules")


def test_cosine_scheduler_matches_official_exactly():
    # Same float64 formula as the official code: equality, not closeness.
    np.testing.assert_array_equal(
        schedules.cosine_scheduler(5e-4, 1e-6, 10, 7, warmup_epochs=2), S["lr"]
    )
    np.testing.assert_array_equal(schedules.cosine_scheduler(0.04, 0.4, 10, 7), S["wd"])
    np.testing.assert_array_equal(schedules.cosine_scheduler(0.996, 1, 10, 7), S["momentum"])
    np.testing.assert_array_equal(
        schedules.cosine_scheduler(5e-4 * 1024 / 256, 1e-6, 10, 7, warmup_epochs=2),
        S["lr_scaled_bs1024"],
    )
    np.testing.assert_array_equal(
        schedules.cosine_scheduler(0.001, 1e-5, 5, 4, warmup_epochs=1, start_warmup_value=1e-4),
        S["lr_warmup_start_nonzero"],
    )


def test_peak_lr_appears_twice_and_final_is_never_reached():
    lr = S["lr"]
    assert lr[13] == lr[14] == 5e-4
    assert lr[-1] > 1e-6


@pytest.mark.parametrize(
    "key,args",
    [
        ("lr", (5e-4, 1e-6, 10, 7, 2, 0.0)),
        ("wd", (0.04, 0.4, 10, 7, 0, 0.0)),
        ("momentum", (0.996, 1.0, 10, 7, 0, 0.0)),
        ("lr_warmup_start_nonzero", (0.001, 1e-5, 5, 4, 1, 1e-4)),
    ],
)
def test_in_graph_schedule_matches_official_in_float32(key, args):
    schedule = schedules.CosineSchedule(*args)
    steps = np.arange(len(S[key]))
    values = np.array([to_numpy(schedule(int(s))) for s in steps], dtype=np.float64)
    # Evaluated in float32 in the compiled step: relative error of a few float32 ulps.
    np.testing.assert_allclose(values, S[key], rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(schedule.numpy(), S[key])


def test_one_minus_momentum_is_accurate():
    schedule = schedules.CosineSchedule(0.996, 1.0, 10, 7)
    official = 1.0 - S["momentum"]
    ours = np.array([to_numpy(schedule.one_minus(s)) for s in range(70)], dtype=np.float64)
    # 1 - m is about 1e-4..1e-8: computed directly it keeps float32 *relative* precision,
    # which 1 - float32(m) would not (absolute error 6e-8 on values near 1e-6).
    np.testing.assert_allclose(ours, official, rtol=2e-5, atol=1e-10)


def test_schedule_holds_last_value_past_the_end():
    schedule = schedules.CosineSchedule(5e-4, 1e-6, 10, 7, 2)
    assert to_numpy(schedule(1000)) == pytest.approx(S["lr"][-1], rel=1e-6)


@pytest.mark.parametrize(
    "prefix,warmup,final,warm2,final2,wt,epochs,mim",
    [
        ("vits_800ep", 0.04, 0.07, 0.04, 0.07, 30, 800, 0),
        ("swin_300ep_mim50", 0.04, 0.07, 0.04, 0.07, 30, 300, 50),
        ("small", 0.04, 0.07, 0.05, 0.09, 3, 10, 2),
    ],
)
def test_teacher_temperature_schedules(prefix, warmup, final, warm2, final2, wt, epochs, mim):
    loss = IBOTLoss(8, 8, 2, 0, warmup, final, warm2, final2, wt, epochs, mim_start_epoch=mim)
    np.testing.assert_array_equal(loss.teacher_temp_schedule, S[f"temp_{prefix}"])
    np.testing.assert_array_equal(loss.teacher_patch_temp_schedule, S[f"temp2_{prefix}"])
    for epoch in (0, 1, wt - 1, wt, epochs - 1):
        temp, patch_temp = loss.temperatures(epoch)
        assert to_numpy(temp) == pytest.approx(S[f"temp_{prefix}"][epoch], rel=1e-7)
        assert to_numpy(patch_temp) == pytest.approx(S[f"temp2_{prefix}"][epoch], rel=1e-7)


def test_temperature_schedule_too_short_is_a_clear_error():
    with pytest.raises(ValueError, match="epochs=40 must be at least"):
        IBOTLoss(8, 8, 2, 0, 0.04, 0.07, 0.04, 0.07, 30, 40, mim_start_epoch=20)
