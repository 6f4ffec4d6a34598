"""``examples/pretrain.py`` end to end on a tiny image folder: it trains, writes its run
directory, reports the k-NN table, and a second call with the same ``--output_dir`` resumes."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import pretrain  # noqa: E402

TINY = ["--image_size", "16", "--global_crop_size", "16", "--local_crop_size", "8", "--patch_size", "8",
        "--local_crops_number", "1", "--embed_dim", "16", "--depth", "1", "--num_heads", "2",
        "--out_dim", "32", "--patch_out_dim", "32", "--head_hidden_dim", "16", "--head_bottleneck_dim", "8",
        "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--verbose", "0"]


def _folder(path):
    """Two classes of 12 grey 16-px images: dark and bright noise."""
    rng = np.random.default_rng(0)
    for label, low in (("dark", 0), ("bright", 128)):
        (path / label).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(low, low + 128, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(path / label / f"{i}.png")


def test_pretrain_example_trains_reports_and_resumes(tmp_path, capsys):
    _folder(tmp_path / "data")
    run = tmp_path / "run"
    argv = ["--data_path", str(tmp_path / "data"), "--output_dir", str(run)] + TINY
    summary = pretrain.main(argv)
    printed = capsys.readouterr().out
    for name in ("config.json", "log.csv", "knn_at_init.json", "summary.json", "teacher_backbone.keras"):
        assert (run / name).exists(), name
    with open(run / "summary.json") as f:
        assert json.load(f) == summary
    assert summary["backend"] == pretrain.keras.backend.backend()
    # 2 x 2 patch tokens of 16 values: small enough to be reported beside [CLS]
    rows = {line[:32].strip(): line[32:].split() for line in printed.splitlines() if line.startswith("  ")}
    assert rows["[CLS] (the official feature)"][:2] == [f"{summary['knn_top1_teacher']:.2f}",
                                                       f"{summary['knn_top1_random_init']:.2f}"]
    assert rows["patch tokens"][0] == f"{summary['knn_top1_teacher_patch_tokens']:.2f}"
    assert rows["raw pixels"] == [f"{summary['knn_top1_pixels']:.2f}"]
    # mean brightness separates the classes: the pixels' k-NN is exact on the 8 held-out images
    assert summary["knn_top1_pixels"] == 100.0
    # the printed margin and the summary are each rounded to two decimals
    assert float(rows["patch tokens"][2]) == pytest.approx(summary["knn_top1_teacher_patch_tokens"] - 100.0, abs=0.011)

    again = pretrain.main(argv)  # the same run directory: nothing left to train
    assert "all 1 epochs are done" in capsys.readouterr().out
    assert again["knn_top1_teacher"] == summary["knn_top1_teacher"]
