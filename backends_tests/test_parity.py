"""Cross-backend parity: the same weights and batches give the same training run on JAX,
PyTorch and TensorFlow. Needs all three backends (tox env ``parity``); skipped otherwise.
Each backend also matches the official trajectory in its own env (test_trajectory.py).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_weights_close

BACKENDS = ("jax", "torch", "tensorflow")
BATCH = 4  # parity_run.BATCH
HERE = pathlib.Path(__file__).parent
missing = [b for b in BACKENDS if importlib.util.find_spec(b) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"parity needs all backends; missing {missing}")


def run_backend(backend, out):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(HERE / "parity_run.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{backend} failed:\n{result.stderr[-4000:]}"
    return dict(np.load(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    return {b: run_backend(b, folder / f"{b}.npz") for b in BACKENDS}


@pytest.mark.parametrize("other", ["torch", "tensorflow"])
def test_training_runs_agree_across_backends(runs, other):
    reference, result = runs["jax"], runs[other]
    assert set(reference) == set(result)
    # float32 across frameworks, the same budget as the port-vs-official checks:
    # losses 1e-5, centers 1e-6, teacher features 5e-6, student 2e-6, teacher 1e-6.
    for key in ("loss", "cls", "patch"):
        np.testing.assert_allclose(result[key], reference[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(result["center"], reference["center"], atol=1e-6)
    np.testing.assert_allclose(result["patch_center"], reference["patch_center"], atol=1e-6)
    np.testing.assert_allclose(result["teacher_cls_feat"], reference["teacher_cls_feat"], atol=5e-6)
    lr_peak = 5e-4 * BATCH / 256
    for key in reference:
        if ":" in key:
            atol = 2e-6 if key.startswith("student") else 1e-6
            assert_weights_close(key, result[key], reference[key], atol, key_bias_atol=6 * lr_peak)
