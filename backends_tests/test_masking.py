"""BlockMasking against the official ImageFolderMask (masking_case.npz)."""

import numpy as np
import pytest
from conftest import load_fixture

from ibot_keras import BlockMasking

M = load_fixture("masking_case")


def official_item_order(masking, items):
    """Masks in the official __getitem__ order: crops [224, 224, 96, 96] per item."""
    globals_, locals_ = [], []
    for _ in range(items):
        globals_.append([masking(14, 14), masking(14, 14)])
        locals_.append([masking(6, 6), masking(6, 6)])
    return np.array(globals_), np.array(locals_)


@pytest.mark.parametrize(
    "key,ratio,var",
    [("r03", 0.3, 0.0), ("readme", [0.0, 0.3], [0.0, 0.2])],
)
def test_reproduces_official_masks_bit_for_bit(key, ratio, var):
    # Same random stream (Python's algorithm, seed 0) consumed in the same order.
    globals_, locals_ = official_item_order(BlockMasking(ratio, var, seed=0), 8)
    np.testing.assert_array_equal(globals_, M[f"exact_block_{key}_global"])
    np.testing.assert_array_equal(locals_, M[f"exact_block_{key}_local"])


def counts(masking, n, rows=14, cols=14):
    return np.array([[masking(rows, cols).sum(), masking(rows, cols).sum()] for _ in range(n)])


def test_block_statistics_ratio_03():
    ours = counts(BlockMasking(0.3, seed=123), 2000)
    official = M["stats_block_r03_global_counts"]
    # Mean 57.27 of 196 officially; 4000 official vs 4000 own draws, count std ~2.3.
    assert abs(ours.mean() - official.mean()) < 0.3
    assert ours.min() >= 45 and ours.max() == official.max() == 58
    local = counts(BlockMasking(0.3, seed=5), 2000, 6, 6)
    assert abs(local.mean() - M["stats_block_r03_local_counts"].mean()) < 0.1
    assert local.max() <= 10


def test_block_statistics_readme_ratios():
    ours = counts(BlockMasking([0.0, 0.3], [0.0, 0.2], seed=7), 4000)
    official = M["stats_block_readme_global_counts"]
    # A crop is empty with p = 1/2 (ratio 0 picked), an image has both empty with p = 1/4.
    # Both samples must sit within 4 binomial standard deviations of those rates.
    for sample in (ours, official):
        empty, both_empty = (sample == 0).mean(), (sample == 0).all(1).mean()
        assert abs(empty - 0.5) < 4 * np.sqrt(0.25 / sample.size)
        assert abs(both_empty - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(sample))
    assert abs(ours[ours > 0].mean() - official[official > 0].mean()) < 1.5


def test_block_statistics_with_ratio_variance():
    ours = counts(BlockMasking(0.3, 0.2, seed=9), 2000)
    official = M["stats_block_r03v02_global_counts"]
    assert abs(ours.mean() - official.mean()) < 1.5
    assert ours.min() >= 10 and ours.max() <= 98


def test_patch_frequency_is_spatially_like_official():
    masking = BlockMasking(0.3, seed=11)
    freq = np.mean([masking(14, 14) for _ in range(4000)], axis=0)
    official = M["stats_block_r03_global_patch_freq"]
    # Centre cells are masked more often than corners, in the same pattern.
    assert np.corrcoef(freq.ravel(), official.ravel())[0, 1] > 0.9


def test_rand_shape_masks_exactly_int_ratio():
    ours = counts(BlockMasking(0.3, pred_shape="rand", seed=0), 100)
    assert (ours == 58).all() and (M["stats_rand_r03_global_counts"] == 58).all()


def test_pred_start_epoch():
    masking = BlockMasking(0.3, pred_start_epoch=50, seed=0)
    masking.set_epoch(10)
    assert masking.batch(8, 2, 14, 14).sum() == int(M["pred_start_epoch50_at_epoch10_total_masked"])
    masking.set_epoch(50)
    assert masking.batch(8, 2, 14, 14).sum() > 0


def test_state_round_trip_continues_the_stream():
    masking = BlockMasking([0.0, 0.3], [0.0, 0.2], seed=3)
    masking.batch(4, 2, 14, 14)
    state = masking.get_state()
    expected = masking.batch(4, 2, 14, 14)
    other = BlockMasking([0.0, 0.3], [0.0, 0.2], seed=99)
    other.set_state(state)
    np.testing.assert_array_equal(other.batch(4, 2, 14, 14), expected)


def test_batch_shape():
    masks = BlockMasking(0.3, seed=0).batch(3, 2, 7, 5)
    assert masks.shape == (3, 2, 7, 5) and masks.dtype == bool


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(pred_ratio=[0.1, 0.3], pred_ratio_var=[0.0]), "2 entries but pred_ratio_var has 1"),
        (dict(pred_ratio=0.1, pred_ratio_var=0.2), "0 <= r - v"),
        (dict(pred_shape="grid"), "pred_shape must be"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockMasking(**kwargs)
