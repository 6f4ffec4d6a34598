"""iBOT pretraining with the official recipe, on any Keras backend.

    KERAS_BACKEND=jax python examples/pretrain.py                 # embedded digits, offline
    KERAS_BACKEND=torch python examples/pretrain.py --data_path /data/imagenet/train \\
        --arch vit_small --patch_size 16 --global_crop_size 224 --local_crop_size 96 ...

Flags are the official ``main_ibot.py`` names (every ``PretrainConfig`` field is a flag;
``--batch_size_per_gpu`` is accepted as the per-device batch; ``--num_workers`` augmentation
processes). Re-running the same command with the same ``--output_dir`` resumes exactly where
the last checkpoint left off (every epoch, and every ``--saveckp_steps`` steps if given).

Which settings a run starts from (flags given always win; the line ``settings: ...`` says what
was chosen): ``--data_path DIR`` of small data (up to 200k images of at most 96 px) gets the
small-data recipe (``ibot_keras.recipes.small_data``: model, head, views, Sinkhorn-Knopp
centering, schedule lengths for the folder's size), a larger folder the official defaults,
``--official_defaults`` always the official ones. Warm-ups you do not give are fitted to
``--epochs``, so ``--epochs 4`` works alone. Without ``--data_path`` the defaults are sized
for the embedded scikit-learn digits (1,797 real 8x8 images) so a run finishes in minutes on
two CPU cores, and three of them depart from the official recipe because digits need it
(benchmarks/RESULTS.md): views without flip, colour jitter or solarisation and with a blur radius
scaled to the 16-px crops, a constant [CLS] teacher temperature of 0.02, and DINOv2's KoLeo
term. The official defaults apply when you pass ``--official_defaults``.
At the end the teacher's k-NN accuracy is printed next to the same network at
initialisation and raw pixels: of the [CLS] token (the official feature) and, for small
grids, of the patch tokens (``ibot_keras.eval.BackboneFeatures``). For the small-data recipe
without ``--epochs``, a measured step sets fewer epochs where they would train longer than
``--time_budget_minutes`` (default 10; the line ``time budget: ...`` says what it chose).

Data parallel (``--distribute``; ``--batch_size`` is the global batch, ``--batch_size_per_gpu``
is multiplied by the device count; every number as on one device with the whole batch):

    KERAS_BACKEND=jax python examples/pretrain.py --distribute           # all local devices
    KERAS_DISTRIBUTION_JOB_ADDRESSES=host0:1234,host1:1234 KERAS_DISTRIBUTION_NUM_PROCESSES=2 \
        KERAS_DISTRIBUTION_PROCESS_ID=<0|1> KERAS_BACKEND=jax python examples/pretrain.py --distribute
    KERAS_BACKEND=tensorflow python examples/pretrain.py --distribute    # MirroredStrategy, local GPUs
    KERAS_BACKEND=torch torchrun --nproc_per_node=2 examples/pretrain.py --distribute  # gloo / NCCL

Only the first process (rank 0) writes logs, checkpoints and the saved teacher.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time

import keras
import numpy as np

import ibot_keras
from ibot_keras.cli import add_config_arguments, config_from_args, fit_to_time_budget, source_from_args
from ibot_keras.data import build_pipeline
from ibot_keras.eval import eval_views, extract_features, knn_classify
from ibot_keras.resume import TrainingCheckpoint, model_step, restore_training_state


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--saveckp_steps", type=int, default=0, help="also checkpoint every N training steps "
                   "(0: per epoch only); a restarted run continues from the last one with the same batches")
    p.add_argument("--distribute", action="store_true", help="data parallel: JAX DataParallel (multi-host with "
                   "KERAS_DISTRIBUTION_* set), TF MirroredStrategy, torch DDP ranks (launch with torchrun)")
    p.add_argument("--verbose", type=int, default=1)
    return p


# Patch-token features are reported where they stay small (N x D values per image).
MAX_PATCH_TOKEN_FEATURES = 16384


def knn_report(backbone, source, size, seed=0):
    """k-NN (k=20, T=0.07) top-1 on a fixed 70/30 split of a labelled source, ``{feature: top1}``:
    ``"cls"`` (the official feature) and, where ``N * D <= MAX_PATCH_TOKEN_FEATURES``,
    ``"patch_tokens"`` (``ibot_keras.eval.BackboneFeatures``); ``backbone=None``: ``"pixels"``,
    the flattened evaluation views. ``None`` for an unlabelled source."""
    if getattr(source, "labels", None) is None:
        return None
    order = np.random.default_rng(seed).permutation(len(source))
    cut = int(0.7 * len(order))
    views = eval_views(source, size)
    labels = source.labels
    num_classes = int(labels.max()) + 1
    if backbone is None:
        flat = views.reshape(len(views), -1)
        features = {"pixels": flat / np.linalg.norm(flat, axis=1, keepdims=True)}
    else:
        features = {"cls": extract_features(backbone, views)}
        if (size // backbone.patch_size) ** 2 * backbone.embed_dim <= MAX_PATCH_TOKEN_FEATURES:
            features["patch_tokens"] = extract_features(backbone, views, features="patch_tokens")
    train, test = order[:cut], order[cut:]
    return {name: knn_classify(f[train], labels[train], f[test], labels[test], num_classes, k=20)[0]
            for name, f in features.items()}


def knn_table(teacher, at_init, pixels):
    """``knn_report``'s figures as a small table: a row per feature, teacher against init, and
    each feature's margin over the raw pixels."""
    names = {"cls": "[CLS] (the official feature)", "patch_tokens": "patch tokens"}
    rows = ["k-NN top-1 (k=20, 70/30 split of the labelled images), %:",
            f"  {'feature':<30}{'teacher':>9}{'at init':>9}{'teacher - pixels':>18}"]
    for key, name in names.items():
        if key in teacher:
            init = f"{at_init[key]:.2f}" if key in at_init else "-"
            rows.append(f"  {name:<30}{teacher[key]:>9.2f}{init:>9}{teacher[key] - pixels:>+18.2f}")
    rows.append(f"  {'raw pixels':<30}{pixels:>9.2f}")
    return "\n".join(rows)


@contextlib.contextmanager
def undistributed():
    """Evaluation runs whole on each process: lift JAX's DataParallel (it would shard
    ``predict``'s last, partial batch over the devices)."""
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def main(argv=None):
    args = parser().parse_args(argv)
    if args.distribute:
        parallel = ibot_keras.backend_specific.data_parallel()
    else:
        parallel = ibot_keras.backend_specific.DataParallelSetup(contextlib.nullcontext(), 0, 1, 1)
    with parallel.scope:
        return train(args, parallel)


def train(args, parallel):
    chief = parallel.shard_index == 0  # the process that writes files
    source = source_from_args(args)
    config = config_from_args(args, parallel.num_replicas, report=print if chief and args.verbose else None,
                              source=source)
    if not chief:
        args.verbose = 0
    if config.batch_size % parallel.num_replicas:
        raise ValueError(f"batch_size={config.batch_size} does not split over {parallel.num_replicas} devices.")
    config_path = os.path.join(config.output_dir, "config.json")
    previous = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f)
    if parallel.num_replicas == 1:  # every process of a distributed run would have to agree
        config = fit_to_time_budget(args, config, source, previous_epochs=(previous or {}).get("epochs"),
                                    report=print if args.verbose else None)
    os.makedirs(config.output_dir, exist_ok=True)
    if chief and previous is not None:
        # Settings newer than the saved file are not compared: their old value is unknown.
        changed = sorted(k for k, v in config.to_dict().items() if k in previous and json.loads(json.dumps(v)) != previous[k])
        if changed:
            print(f"warning: {config.output_dir} was started with other settings ({', '.join(changed)}); "
                  "resuming with the new ones is refused if any of them shapes the schedules.", file=sys.stderr)
    if chief:
        print(f"backend: {keras.backend.backend()}, data parallel over {parallel.num_replicas} device(s), "
              f"output: {config.output_dir}")

    pipeline = build_pipeline(
        config, source, num_shards=parallel.num_shards, shard_index=parallel.shard_index,
        # Keras 3.15.1 cannot reduce a bool batch across tf.distribute replicas.
        mask_dtype="uint8" if keras.backend.backend() == "tensorflow" and parallel.num_replicas > 1 else "bool",
    )
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=len(pipeline))
    # Re-running the same command with the same --output_dir resumes where it stopped (a
    # checkpoint written with other schedule settings is refused, naming them).
    restore_training_state(model, config.output_dir)
    resumed_step = model_step(model)
    if chief:  # after the restore: a refused resume leaves the run's settings as they were
        config.save(config_path)
        with open(os.path.join(config.output_dir, "args.txt"), "w") as f:
            f.write("\n".join(f"{k}: {v}" for k, v in sorted(config.to_dict().items())) + "\n")
    init_path = os.path.join(config.output_dir, "knn_at_init.json")
    if resumed_step == 0:
        with undistributed():
            at_init = knn_report(model.teacher_backbone, source, config.global_crop_size)
        if chief:
            with open(init_path, "w") as f:
                json.dump({"knn_top1": at_init}, f)
    else:
        if chief:
            left = (f"continuing with {pipeline.describe_position(resumed_step)}"
                    if resumed_step < config.epochs * len(pipeline) else f"all {config.epochs} epochs are done")
            print(f"Resumed the run in {config.output_dir} from its checkpoint at step {resumed_step}; {left}")
        with open(init_path) as f:
            at_init = json.load(f)["knn_top1"]
        if at_init is not None and not isinstance(at_init, dict):  # written before patch tokens were reported
            at_init = {"cls": at_init}

    callbacks = [ibot_keras.callbacks.TeacherStateMonitor(), ibot_keras.callbacks.CollapseMonitor()]
    if chief:
        callbacks += [
            keras.callbacks.CSVLogger(os.path.join(config.output_dir, "log.csv"), append=resumed_step > 0),
            TrainingCheckpoint(config.output_dir, keep_freq=config.saveckp_freq, save_steps=args.saveckp_steps),
        ]
    if chief and all(importlib.util.find_spec(m) for m in ("tensorflow", "tensorboard")):  # the writer needs both
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(config.output_dir, "tensorboard")))
    start = time.time()
    model.fit(pipeline, epochs=config.epochs, callbacks=callbacks, verbose=args.verbose)
    train_time = time.time() - start
    if chief:
        model.teacher_backbone.save(os.path.join(config.output_dir, "teacher_backbone.keras"))
        model.teacher_backbone.save_weights(os.path.join(config.output_dir, "teacher_backbone.weights.h5"))

    with undistributed():
        teacher = knn_report(model.teacher_backbone, source, config.global_crop_size)
    summary = {"backend": keras.backend.backend(), "train_seconds": round(train_time, 1)}
    if pipeline.replaced_images:
        summary["unreadable_images"] = pipeline.replaced_images
    skipped = int(keras.ops.convert_to_numpy(model.skipped_steps))
    if skipped:
        summary["skipped_nonfinite_steps"] = skipped
    if teacher is not None:
        pixels = knn_report(None, source, config.global_crop_size)["pixels"]
        summary.update(knn_top1_teacher=round(teacher["cls"], 2), knn_top1_random_init=round(at_init["cls"], 2))
        if "patch_tokens" in teacher:
            summary.update(knn_top1_teacher_patch_tokens=round(teacher["patch_tokens"], 2))
            if "patch_tokens" in at_init:
                summary.update(knn_top1_random_init_patch_tokens=round(at_init["patch_tokens"], 2))
        summary.update(knn_top1_pixels=round(pixels, 2))
        if chief:
            print(knn_table(teacher, at_init, pixels))
    if chief:
        with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
