"""benchmarks/side_by_side.py's summary over rounds, on hand-made rows (no step runs)."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parent.parent / "benchmarks" / "side_by_side.py"
_spec = importlib.util.spec_from_file_location("ibot_benchmark_side_by_side", _PATH)
side_by_side = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(side_by_side)


def test_each_ratio_is_to_its_own_rounds_official_step_and_the_summary_takes_medians():
    official = [{"images_per_s": 2.0, "peak_rss_mb": 1000.0}, {"images_per_s": 4.0, "peak_rss_mb": 1100.0}]
    ours = [{"images_per_s": 3.0, "peak_rss_mb": 900.0}, {"images_per_s": 5.0, "peak_rss_mb": 1210.0}]
    rows = []
    for i in range(2):
        rows.append(side_by_side.timed_row("official (PyTorch)", "float32", official[i], official[i], i))
        rows.append(side_by_side.timed_row("ibot_keras jax", "float32", ours[i], official[i], i))
    assert rows[1]["vs_official"] == pytest.approx(1.5) and rows[3]["vs_official"] == pytest.approx(1.25)
    official_row, ours_row = side_by_side.summarise(rows)
    assert official_row["name"] == "official (PyTorch)" and official_row["vs_official_per_round"] == [1.0, 1.0]
    assert ours_row["rounds"] == 2
    assert ours_row["images_per_s"] == pytest.approx(4.0)  # median of 3 and 5
    assert ours_row["vs_official"] == pytest.approx(1.375)  # median of 1.5 and 1.25, not 4 / 3
    assert ours_row["vs_official_per_round"] == pytest.approx([1.5, 1.25])
    assert ours_row["peak_rss_mb"] == 1210.0  # the highest
    assert ours_row["rss_vs_official"] == pytest.approx((0.9 + 1.1) / 2)


def test_without_the_official_step_there_are_no_ratios():
    rows = [side_by_side.timed_row("ibot_keras torch", "float32", {"images_per_s": 3.0, "peak_rss_mb": 900.0}, None, 0)]
    (row,) = side_by_side.summarise(rows)
    assert row["vs_official"] is None and row["rss_vs_official"] is None and row["vs_official_per_round"] == []
