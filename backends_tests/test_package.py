"""The package front door: public API, and no backend imported that the user did not pick."""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import BACKEND

import ibot_keras

INSTALLED = [b for b in ("jax", "torch", "tensorflow") if importlib.util.find_spec(b) is not None]


def test_public_api():
    for name in ibot_keras.__all__:
        assert getattr(ibot_keras, name) is not None
    assert ibot_keras.checkpoint.load_official and ibot_keras.checkpoint.export_official


@pytest.mark.parametrize("backend", INSTALLED)
def test_importing_ibot_keras_imports_no_other_backend(backend):
    # Keras itself may import an installed JAX; ibot_keras must add no other backend.
    code = (
        "import sys, keras\n"
        "before = set(sys.modules)\n"
        "import ibot_keras, ibot_keras.convert, ibot_keras.keras_hub_export, ibot_keras.eval\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        f"others = sorted(new & {{'jax', 'torch', 'tensorflow'}} - {{'{backend}'}})\n"
        "assert not others, others\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_only_the_selected_backend_is_needed():
    # In the per-backend tox envs only this backend is installed at all.
    if os.environ.get("IBOT_KERAS_SINGLE_BACKEND_ENV"):
        assert INSTALLED == [BACKEND]
    else:
        pytest.skip("not a single-backend environment")


@pytest.mark.skipif(
    BACKEND == "tensorflow" or "tensorflow" not in INSTALLED, reason="needs TensorFlow installed and another backend"
)
def test_seeding_a_pretrainer_does_not_import_tensorflow():
    # keras.utils.set_random_seed imports an installed TensorFlow to seed it (~400 MB RSS).
    code = (
        "import sys\n"
        "from ibot_keras import PretrainConfig, build_pretrainer\n"
        "config = PretrainConfig(patch_size=4, embed_dim=8, depth=1, num_heads=2, image_size=8, global_crop_size=8,\n"
        "    local_crop_size=8, local_crops_number=0, out_dim=8, patch_out_dim=8, head_hidden_dim=8,\n"
        "    head_bottleneck_dim=4, epochs=1, warmup_teacher_temp_epochs=0, warmup_epochs=0)\n"
        "build_pretrainer(config, steps_per_epoch=1)\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
