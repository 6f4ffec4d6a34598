"""One run of the data-parallel scenario: ``python distributed_run.py MODE OUT.npz``.

Run by ``test_distributed.py`` in fresh processes, because the device setup must happen
before the backend starts (XLA_FLAGS before JAX is imported, logical CPUs before TensorFlow
runs, one process per torch rank). The process (torch: rank 0, before joining the process
group) first trains the reference: one device, the whole global batch (``single/*`` in the
output); then the same training data parallel (``distributed/*``), by ``MODE``:

- ``jax``: ``keras.distribution.DataParallel`` over 8 JAX devices (the test emulates 8 CPU
  devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``), 1 image each;
- ``tensorflow``: ``tf.distribute.MirroredStrategy`` over 2 logical CPU devices;
- ``torch``: one DDP rank of 2 (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the
  environment, as ``torchrun`` sets them; gloo), fed its half of each global batch. Rank ``r``
  builds its model with seed ``SEED + r``: rank 0's weights must be broadcast. Rank ``r > 0``
  writes ``OUT`` with ``.rank<r>.npz``.

Everything fed to the model is made with NumPy from fixed seeds. Recorded: the per-step and
epoch logs, both centers after every step, Adam's moments, the final student and teacher
weights and ``replica_spread``, the largest difference between the per-device copies of any
model variable after training (TF: mirrored components; torch: across ranks).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODE, OUT = sys.argv[1], sys.argv[2]
GLOBAL_BATCH, STEPS_PER_EPOCH, EPOCHS, SEED = 8, 2, 2, 11
# Keras 3.15.1 MEAN-reduces the first batch across replicas under tf.distribute, which fails
# on bool tensors: masks travel as uint8 there (the model casts them to bool).
MASK_DTYPE = "uint8" if MODE == "tensorflow" else "bool"

if MODE == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
from trajectory import StepRecorder  # noqa: E402

from ibot_keras import BlockMasking, PretrainConfig, build_pretrainer, checkpoint  # noqa: E402


def config():
    # drop_path=0: stochastic depth draws per device, so it cannot match a one-device run.
    return PretrainConfig(
        arch="vit_tiny", patch_size=4, embed_dim=16, depth=1, num_heads=2, image_size=16,
        global_crop_size=16, local_crop_size=8, out_dim=32, patch_out_dim=32, shared_head=True,
        norm_last_layer=False, head_hidden_dim=16, head_bottleneck_dim=8, warmup_teacher_temp=0.04,
        teacher_temp=0.07, warmup_teacher_temp_epochs=1, epochs=EPOCHS, batch_size=GLOBAL_BATCH,
        lr=5e-3, warmup_epochs=1, momentum_teacher=0.9, clip_grad=3.0, freeze_last_layer=1,
        local_crops_number=2, drop_path=0.0, pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2),
    )


def batches():
    rng = np.random.default_rng(7)
    masking = BlockMasking((0.0, 0.3), (0.0, 0.2), seed=3)
    out = []
    for _ in range(STEPS_PER_EPOCH):
        out.append(
            {
                "global_crops": rng.standard_normal((GLOBAL_BATCH, 2, 16, 16, 3)).astype(np.float32),
                "local_crops": rng.standard_normal((GLOBAL_BATCH, 2, 8, 8, 3)).astype(np.float32),
                "masks": masking.batch(GLOBAL_BATCH, 2, 4, 4).astype(MASK_DTYPE),
            }
        )
    return out


def spread(variables):
    """Largest difference between the per-device copies of any variable (TF/torch)."""
    worst = 0.0
    if MODE == "tensorflow":
        for v in variables:
            copies = [np.asarray(c) for c in getattr(v.value, "values", [v.value])]
            worst = max([worst] + [float(np.max(np.abs(c - copies[0]))) for c in copies])
    elif MODE == "torch":
        import torch
        import torch.distributed as dist

        for v in variables:
            value = v.value.detach().to(torch.float64)
            low, high = value.clone(), value.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            worst = max(worst, float((high - low).abs().max()))
    return worst


def num_replicas(model):
    """How many devices hold a copy of the model (checks that the run really is distributed)."""
    if MODE == "jax":
        return len(model.trainable_variables[0].value.sharding.device_set)
    if MODE == "tensorflow":
        return len(getattr(model.trainable_variables[0].value, "values", [None]))
    if MODE == "torch":
        import torch.distributed as dist

        return dist.get_world_size()
    return 1


LOGGED = (
    "loss", "cls", "patch", "kl", "teacher_entropy", "teacher_batch_entropy", "prototype_usage",
    "masked_dropped", "lr", "wd", "teacher_temp", "teacher_momentum",
)


def train(data, seed, distributed):
    """Build and fit the model; every number the test compares, as ``{name: array}``."""
    model = build_pretrainer(config(), steps_per_epoch=STEPS_PER_EPOCH, seed=seed)
    recorder = StepRecorder()
    # Arrays, not a generator: under tf.distribute Keras 3.15.1 takes the first batch for a
    # symbolic build, which a generator would lose. The same two batches every epoch.
    stacked = {key: np.concatenate([b[key] for b in data]) for key in data[0]}
    history = model.fit(
        stacked, batch_size=len(data[0]["masks"]), epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[recorder]
    )
    arrays = {
        "center": np.array(recorder.centers),
        "patch_center": np.array(recorder.patch_centers),
        "replica_spread": np.float64(spread(model.variables) if distributed else 0.0),
        "num_replicas": np.int64(num_replicas(model) if distributed else 1),
    }
    for key in LOGGED:
        arrays[f"step:{key}"] = recorder.series(key)  # per step (loss, cls, patch) or running
        arrays[f"epoch:{key}"] = np.array(history.history[key])  # the epoch logs
    # Adam's moments after training: unlike the weights (Adam's step is nearly invariant to a
    # gradient scale), they show gradients that scale with the replica count.
    optimizer = model.optimizer
    for name, variable, _ in model.student_weights():
        momentum, velocity, _ = optimizer.slots(variable)
        arrays[f"momentum:{name}"] = keras.ops.convert_to_numpy(momentum)
        arrays[f"velocity:{name}"] = keras.ops.convert_to_numpy(velocity)
    state = checkpoint.export_official(model)
    for part in ("student", "teacher"):
        for name, value in state[part].items():
            arrays[f"{part}:{name}"] = value
    return arrays


def main():
    data = batches()
    out = {}
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:  # the reference: one device, the whole global batch, before any distribution
        out.update({f"single/{k}": v for k, v in train(data, SEED, distributed=False).items()})
        keras.backend.clear_session()  # (outside any strategy scope: it resets TF's graph)
    seed = SEED
    if MODE == "jax":
        import jax

        assert jax.device_count() == 8, jax.devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        result = train(data, seed, distributed=True)
    elif MODE == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
        with strategy.scope():
            result = train(data, seed, distributed=True)
    elif MODE == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        world = dist.get_world_size()
        per_rank = GLOBAL_BATCH // world
        data = [{k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in b.items()} for b in data]
        seed = SEED + rank  # different initial weights per rank: rank 0's must win
        result = train(data, seed, distributed=True)
        dist.destroy_process_group()
    out.update({f"distributed/{k}": v for k, v in result.items()})
    np.savez(OUT.replace(".npz", f".rank{rank}.npz") if rank else OUT, **out)


if __name__ == "__main__":
    main()
