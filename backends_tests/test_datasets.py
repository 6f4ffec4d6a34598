"""benchmarks/datasets.py: the learning benchmark's datasets are deterministic, per-index, and
written in the layout ``ImageFolderSource`` reads."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from ibot_keras.data import ImageFolderSource

_PATH = pathlib.Path(__file__).parent.parent / "benchmarks" / "datasets.py"
_spec = importlib.util.spec_from_file_location("ibot_benchmark_datasets", _PATH)
datasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(datasets)


@pytest.mark.parametrize("name", ["shapes", "glyphs", "silhouettes"])
def test_procedural_images_are_deterministic_per_index(name):
    images, labels = datasets.procedural_arrays(name, "train", 12, seed=3)
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    again, _ = datasets.procedural_arrays(name, "train", 12, seed=3)
    np.testing.assert_array_equal(images, again)
    # Image i does not depend on how many are made; the seed and the split change it.
    fewer, _ = datasets.procedural_arrays(name, "train", 5, seed=3)
    np.testing.assert_array_equal(images[:5], fewer)
    for other in (datasets.procedural_arrays(name, "train", 5, seed=4)[0], datasets.procedural_arrays(name, "test", 5, seed=3)[0]):
        assert all(not np.array_equal(a, b) for a, b in zip(images[:5], other))
    assert images.std(axis=(1, 2)).min() > 5  # not blank


def test_prepare_writes_an_image_folder_once(tmp_path):
    done = datasets.prepare("shapes", str(tmp_path), num_train=20, num_test=10, seed=1, verbose=False)
    assert done["train"] == os.path.join(tmp_path, "shapes-train20-test10-seed1", "train")
    expected = {split: datasets.procedural_arrays("shapes", split, n, seed=1) for split, n in (("train", 20), ("test", 10))}
    for split, (images, labels) in expected.items():
        source = ImageFolderSource(done[split])
        assert source.classes == datasets.class_names("shapes") and len(source) == len(images)
        # Files are read back in sorted order (class folder, then index): match them by content.
        read = np.stack([np.asarray(source[i])[..., 0] for i in range(len(source))])
        order = np.lexsort((np.arange(len(labels)), labels))
        np.testing.assert_array_equal(read, images[order])
        np.testing.assert_array_equal(source.labels, labels[order])
    marker = os.path.join(done["train"], "0_circle", "000000.png")
    stamp = os.stat(marker).st_mtime_ns
    again = datasets.prepare("shapes", str(tmp_path), num_train=20, num_test=10, seed=1, verbose=False)
    assert again["meta"]["train_images"] == 20 and os.stat(marker).st_mtime_ns == stamp  # reused


def test_digits_split_is_stratified():
    pytest.importorskip("sklearn")
    split = datasets.digits_arrays()
    (train_x, train_y), (test_x, test_y) = split["train"], split["test"]
    assert train_x.shape == (1257, 28, 28) and test_x.shape == (540, 28, 28)
    counts = np.bincount(test_y, minlength=10) / np.bincount(np.concatenate([train_y, test_y]), minlength=10)
    np.testing.assert_allclose(counts, 0.3, atol=0.01)
