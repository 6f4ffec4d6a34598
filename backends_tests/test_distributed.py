"""Data parallel training equals one device on the same global batch, on each backend.

JAX: ``keras.distribution.DataParallel`` over 8 emulated CPU devices; TensorFlow:
``MirroredStrategy`` over 2 logical CPUs; PyTorch: 2 gloo DDP ranks (``torchrun``'s
environment variables). Each configuration runs ``distributed_run.py`` in fresh processes
(the devices must be set up before the backend starts), which trains a reference on one
device with the whole batch of 8 and then the data-parallel run: 4 steps over 2 epochs,
from the same initial weights (torch rank 1 even starts from other weights: the library
broadcasts rank 0's).

Tolerances: float32 with the batch reductions split over devices in another order.
Losses, logs and centers 1e-5 (the acceptance bound; observed <= 1e-6); Adam's moments
1e-4 of each tensor's largest value (observed <= 1.1e-6; gradients that scale with the
replica count are off by 100%, which the weights would hide: Adam's step is nearly
invariant to a gradient scale); weights 1e-5 (observed <= 6e-6), except the key part of
the fused qkv bias, whose exact gradient is zero, so float32 noise normalised by Adam moves
it by up to lr per step (see ``conftest.assert_weights_close``).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKEND, assert_weights_close

HERE = pathlib.Path(__file__).parent
LR_PEAK = 5e-3 * 8 / 256  # distributed_run.config(): lr x global batch / 256


def _env(**extra):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _check(process, stderr):
    assert process.returncode == 0, f"{BACKEND} run failed:\n{stderr[-6000:]}"


def _run(out, **env):
    result = subprocess.run(
        [sys.executable, str(HERE / "distributed_run.py"), BACKEND, str(out)],
        env=_env(**env), capture_output=True, text=True, timeout=600,
    )
    _check(result, result.stderr)
    return dict(np.load(out))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_torch_ranks(out, world=2):
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "distributed_run.py"), "torch", str(out)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))
    try:
        errors = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errors):
        _check(p, err)
    ranks = [dict(np.load(out))] + [
        dict(np.load(str(out).replace(".npz", f".rank{r}.npz"))) for r in range(1, world)
    ]
    return ranks


def split(arrays):
    single = {k[len("single/"):]: v for k, v in arrays.items() if k.startswith("single/")}
    distributed = {k[len("distributed/"):]: v for k, v in arrays.items() if k.startswith("distributed/")}
    return single, distributed


def assert_same_training(single, distributed, replicas):
    assert int(distributed["num_replicas"]) == replicas  # really distributed
    spread = float(distributed["replica_spread"])
    assert spread == 0.0, f"the per-device copies of the model differ by up to {spread}"
    assert set(single) == set(distributed)
    for key in single:
        if key.startswith(("step:", "epoch:")):
            np.testing.assert_allclose(distributed[key], single[key], rtol=0, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(distributed["center"], single["center"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(distributed["patch_center"], single["patch_center"], rtol=0, atol=1e-5)
    for key in single:
        if key.startswith(("momentum:", "velocity:")):
            scale = float(np.max(np.abs(single[key])))
            np.testing.assert_allclose(distributed[key], single[key], rtol=0, atol=1e-4 * scale, err_msg=key)
        elif key.startswith(("student:", "teacher:")):
            assert_weights_close(key, distributed[key], single[key], atol=1e-5, key_bias_atol=6 * LR_PEAK)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX DataParallel test")
def test_jax_data_parallel_on_8_devices_equals_one_device(tmp_path):
    arrays = _run(tmp_path / "jax.npz", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert_same_training(*split(arrays), replicas=8)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow MirroredStrategy test")
def test_tensorflow_mirrored_strategy_on_2_devices_equals_one_device(tmp_path):
    arrays = _run(tmp_path / "tf.npz")
    assert_same_training(*split(arrays), replicas=2)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch DDP test")
def test_torch_ddp_with_2_gloo_ranks_equals_one_device(tmp_path):
    rank0, rank1 = _run_torch_ranks(tmp_path / "torch.npz")
    single, distributed = split(rank0)
    assert_same_training(single, distributed, replicas=2)
    # Rank 1 logged and holds exactly what rank 0 does.
    _, other = split(rank1)
    assert set(other) == set(distributed)
    for key in distributed:
        np.testing.assert_array_equal(other[key], distributed[key], err_msg=key)


def test_loader_shards_together_are_the_global_batches():
    from ibot_keras import BlockMasking
    from ibot_keras.data import ArraySource, MultiCropAugmentation, MultiCropLoader

    images = np.random.default_rng(0).integers(0, 256, (12, 20, 20, 3), dtype=np.uint8)

    def loader(**kwargs):
        augmentation = MultiCropAugmentation(2, 2, global_crop_size=16, local_crop_size=8)
        return MultiCropLoader(ArraySource(images), augmentation, BlockMasking([0, 0.3], [0, 0.2]), 4, 6, seed=1, **kwargs)

    whole = loader()
    shards = [loader(num_shards=3, shard_index=i, mask_dtype="uint8") for i in range(3)]
    for epoch in (0, 1):
        for part in [whole] + shards:
            part.set_epoch(epoch)
        for index in range(len(whole)):
            (expected,) = whole[index]
            pieces = [shard[index][0] for shard in shards]
            assert all(len(p["masks"]) == 2 and p["masks"].dtype == np.uint8 for p in pieces)
            for key in expected:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in pieces]).astype(expected[key].dtype), expected[key], err_msg=key)
    with pytest.raises(ValueError, match="num_shards"):
        loader(num_shards=4)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow MirroredStrategy test")
def test_pipeline_under_mirrored_strategy_feeds_the_one_device_batches():
    """Keras reads the first batches again under MirroredStrategy (a generator would lose one);
    a Pipeline gives the same steps as on one device."""
    result = subprocess.run(
        [sys.executable, str(HERE / "mirrored_pipeline_run.py")], env=_env(), capture_output=True, text=True,
        timeout=600,
    )
    _check(result, result.stderr)
    logs = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert len(logs["single"]) == len(logs["mirrored"]) == 6  # 3 steps x 2 epochs
    # Same batches; float32 cross-replica reductions sum in another order (as above: 1e-5).
    np.testing.assert_allclose(logs["mirrored"], logs["single"], rtol=0, atol=1e-5)
