"""iBOT pretraining with the official recipe, on any Keras backend.

    KERAS_BACKEND=jax python examples/pretrain.py                 # embedded digits, offline
    KERAS_BACKEND=torch python examples/pretrain.py --data_path /data/imagenet/train \\
        --arch vit_small --patch_size 16 --global_crop_size 224 --local_crop_size 96 ...

Flags are the official ``main_ibot.py`` names (every ``PretrainConfig`` field is a flag;
``--batch_size_per_gpu`` is accepted as the per-device batch). The defaults below are sized
for the embedded scikit-learn digits (1,797 real 8x8 images) so a run finishes in minutes on
two CPU cores, and three of them depart from the official recipe because digits need it (README,
"Measured figures"): views without flip, colour jitter or solarisation and with a blur radius
scaled to the 16-px crops, a constant [CLS] teacher temperature of 0.02, and DINOv2's KoLeo
term. The official defaults apply when you pass ``--official_defaults``.
At the end the teacher's k-NN accuracy is printed next to the same network at
initialisation.

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
import dataclasses
import importlib.util
import json
import os
import sys
import time
import typing

import keras
import numpy as np

import ibot_keras
from ibot_keras import BlockMasking, PretrainConfig
from ibot_keras.data import ArraySource, ImageFolderSource, MultiCropAugmentation, MultiCropLoader, load_digits
from ibot_keras.eval import eval_views, extract_features, knn_classify
from ibot_keras.resume import TrainingCheckpoint, restore_training_state

# Small-data defaults for the embedded digits (official values are PretrainConfig's).
DIGITS_DEFAULTS = dict(
    arch="vit_tiny", patch_size=4, embed_dim=128, depth=4, num_heads=4, image_size=16,
    global_crop_size=16, local_crop_size=8, local_crops_number=0, out_dim=512, patch_out_dim=512,
    shared_head=True, norm_last_layer=True, head_hidden_dim=256, head_bottleneck_dim=64,
    batch_size=32, epochs=30, lr=2e-3, warmup_epochs=2, min_lr=1e-5, momentum_teacher=0.996,
    # A sharper, constant [CLS] teacher temperature (official 0.04 -> 0.07): with 0.04-0.07 the
    # CLS target goes uniform here and `cls` sits at ln(out_dim) (README, "Measured figures").
    warmup_teacher_temp=0.02, teacher_temp=0.02, warmup_teacher_temp_epochs=5, drop_path=0.0,
    global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4), pred_ratio=(0.0, 0.3),
    pred_ratio_var=(0.0, 0.2), saveckp_freq=10, output_dir="runs/digits", num_workers=2,
    # Views for digits, not the official recipe: a mirrored, inverted (solarised) or recoloured
    # digit is another glyph, and a 2-px blur erases a 16-px one (official 0.1-2 px x ~16/224).
    flip_p=0.0, color_jitter_p=0.0, solarize_p=0.0, blur_radius=(0.0075, 0.15),
    koleo_loss_weight=1.0,  # not iBOT: DINOv2's KoLeo; +22 k-NN points here (README, "Measured figures")
)


def str2bool(value):
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(PretrainConfig):
        kind = field.type
        args = typing.get_args(kind)
        if kind is bool:
            p.add_argument(f"--{field.name}", type=str2bool, metavar="BOOL")
        elif typing.get_origin(kind) is tuple or (args and any(typing.get_origin(a) is tuple for a in args)):
            p.add_argument(f"--{field.name}", type=float, nargs="+")
        elif args:  # Optional[...]
            inner = [a for a in args if a is not type(None)][0]
            p.add_argument(f"--{field.name}", type=inner if inner in (int, float) else str)
        else:
            p.add_argument(f"--{field.name}", type=kind)
    p.add_argument("--batch_size_per_gpu", type=int, help="official name; times the device count")
    p.add_argument("--distribute", action="store_true", help="data parallel: JAX DataParallel (multi-host with "
                   "KERAS_DISTRIBUTION_* set), TF MirroredStrategy, torch DDP ranks (launch with torchrun)")
    p.add_argument("--dataset", default="digits", help="digits (embedded, default), or a keras.datasets name (cifar10, cifar100, mnist, fashion_mnist; downloads)")
    p.add_argument("--official_defaults", action="store_true", help="start from the official defaults, not the digits ones")
    p.add_argument("--verbose", type=int, default=1)
    return p


def make_config(args, num_replicas=1):
    values = {} if args.official_defaults else dict(DIGITS_DEFAULTS)
    for field in dataclasses.fields(PretrainConfig):
        value = getattr(args, field.name)
        if value is not None:
            values[field.name] = value
    if args.batch_size_per_gpu:
        values["batch_size"] = args.batch_size_per_gpu * num_replicas
    return PretrainConfig(**values)


def load_source(args):
    if args.data_path:
        return ImageFolderSource(args.data_path)
    if args.dataset == "digits":
        images, labels = load_digits()
        return ArraySource(images, labels)
    loader = getattr(keras.datasets, args.dataset, None)
    if loader is None:
        raise ValueError(f"Unknown --dataset {args.dataset!r}.")
    (images, labels), _ = loader.load_data()
    return ArraySource(images, labels.reshape(-1))


def make_augmentation(config):
    """The config's multi-crop recipe: crop numbers, scales and sizes, and the view knobs
    (official rates unless changed)."""
    return MultiCropAugmentation(
        config.global_crops_number, config.local_crops_number, config.global_crops_scale,
        config.local_crops_scale, config.global_crop_size, config.local_crop_size,
        blur_radius=config.blur_radius, flip_p=config.flip_p, jitter_p=config.color_jitter_p,
        grayscale_p=config.grayscale_p, solarize_p=config.solarize_p,
    )


def knn_report(backbone, source, size, seed=0):
    """k-NN (k=20, T=0.07) top-1 of CLS features on a fixed 70/30 split of a labelled source
    (``backbone=None``: raw pixels of the evaluation views)."""
    if getattr(source, "labels", None) is None:
        return None
    order = np.random.default_rng(seed).permutation(len(source))
    cut = int(0.7 * len(order))
    views = eval_views(source, size)
    if backbone is None:
        features = views.reshape(len(views), -1)
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
    else:
        features = extract_features(backbone, views)
    labels = source.labels
    num_classes = int(labels.max()) + 1
    top1, _ = knn_classify(features[order[:cut]], labels[order[:cut]], features[order[cut:]], labels[order[cut:]], num_classes, k=20)
    return top1


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
    config = make_config(args, parallel.num_replicas)
    chief = parallel.shard_index == 0  # the process that writes files
    if not chief:
        args.verbose = 0
    if config.batch_size % parallel.num_replicas:
        raise ValueError(f"batch_size={config.batch_size} does not split over {parallel.num_replicas} devices.")
    os.makedirs(config.output_dir, exist_ok=True)
    config_path = os.path.join(config.output_dir, "config.json")
    if chief and os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f)
        # Settings newer than the saved file are not compared: their old value is unknown.
        changed = sorted(k for k, v in config.to_dict().items() if k in previous and json.loads(json.dumps(v)) != previous[k])
        if changed:
            print(f"warning: {config.output_dir} was started with other settings ({', '.join(changed)}); "
                  "resuming with the new ones changes the schedules.", file=sys.stderr)
    if chief:
        config.save(config_path)
        with open(os.path.join(config.output_dir, "args.txt"), "w") as f:
            f.write("\n".join(f"{k}: {v}" for k, v in sorted(config.to_dict().items())) + "\n")
        print(f"backend: {keras.backend.backend()}, data parallel over {parallel.num_replicas} device(s), "
              f"output: {config.output_dir}")

    source = load_source(args)
    augmentation = make_augmentation(config)
    masking = BlockMasking(config.pred_ratio, config.pred_ratio_var, config.pred_shape, pred_start_epoch=config.pred_start_epoch)
    loader = MultiCropLoader(
        source, augmentation, masking, config.patch_size, config.batch_size, seed=config.seed,
        workers=config.num_workers, use_multiprocessing=False,
        num_shards=parallel.num_shards, shard_index=parallel.shard_index,
        # Keras 3.15.1 cannot reduce a bool batch across tf.distribute replicas.
        mask_dtype="uint8" if keras.backend.backend() == "tensorflow" and parallel.num_replicas > 1 else "bool",
    )
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=len(loader))
    # Re-running the same command with the same --output_dir resumes where it stopped.
    initial_epoch = restore_training_state(model, config.output_dir)
    init_path = os.path.join(config.output_dir, "knn_at_init.json")
    if initial_epoch == 0:
        with undistributed():
            random_top1 = knn_report(model.teacher_backbone, source, config.global_crop_size)
        if chief:
            with open(init_path, "w") as f:
                json.dump({"knn_top1": random_top1}, f)
    else:
        if chief:
            print(f"Resuming after epoch {initial_epoch} from {config.output_dir}")
        with open(init_path) as f:
            random_top1 = json.load(f)["knn_top1"]

    callbacks = [ibot_keras.callbacks.TeacherStateMonitor(), ibot_keras.callbacks.CollapseMonitor()]
    if chief:
        callbacks += [
            keras.callbacks.CSVLogger(os.path.join(config.output_dir, "log.csv"), append=initial_epoch > 0),
            TrainingCheckpoint(config.output_dir, keep_freq=config.saveckp_freq),
        ]
    if chief and all(importlib.util.find_spec(m) for m in ("tensorflow", "tensorboard")):  # the writer needs both
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(config.output_dir, "tensorboard")))
    start = time.time()
    model.fit(loader, epochs=config.epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=args.verbose)
    train_time = time.time() - start
    if chief:
        model.teacher_backbone.save(os.path.join(config.output_dir, "teacher_backbone.keras"))
        model.teacher_backbone.save_weights(os.path.join(config.output_dir, "teacher_backbone.weights.h5"))

    with undistributed():
        top1 = knn_report(model.teacher_backbone, source, config.global_crop_size)
    summary = {"backend": keras.backend.backend(), "train_seconds": round(train_time, 1)}
    if top1 is not None:
        pixels_top1 = knn_report(None, source, config.global_crop_size)
        summary.update(
            knn_top1_teacher=round(top1, 2),
            knn_top1_random_init=round(random_top1, 2),
            knn_top1_pixels=round(pixels_top1, 2),
        )
        if chief:
            print(
                f"k-NN top-1 (k=20): teacher {top1:.2f}%, same network at init {random_top1:.2f}%, "
                f"raw pixels {pixels_top1:.2f}%"
            )
    if chief:
        with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
