"""Input-pipeline throughput, and what the pipeline costs the training step it feeds.

    python benchmarks/data_pipeline.py throughput --config vit-s16-gpu --workers 1 2
    python benchmarks/data_pipeline.py throughput --config baseline-cpu --workers 1 2 --source jpeg
    python benchmarks/data_pipeline.py fit --config baseline-cpu --workers 1

``throughput``: images/s of ``build_pipeline(config, source, workers=N).stream()`` after each
worker's first batch (start-up excluded). ``--engine`` compares the same batches made by
other loaders: ``threads`` (a ``keras.utils.PyDataset`` with N Keras enqueuer threads, the
route Keras 3.15 reorders) and ``tf.data`` (``map`` of a ``py_function`` with
``num_parallel_calls=N``). Sources: in-memory uint8 photos (``--source array``:
blocky random 320x400 images, no decoding) or real JPEG files of ImageNet-like size
(``--source jpeg``: 500x375, quality 90, written to a temporary folder that is removed
afterwards). Timing starts after every worker's first two batches (start-up and full
buffers excluded). ``per_worker`` is images/s divided by the worker count; ``scaling`` is the
images/s relative to the first worker count given.

``fit``: the median step time of ``model.fit`` (second epoch, after compilation) on the
pipeline with ``--workers`` processes, against ``model.fit`` on the same batches made
beforehand (no augmentation while training), back to back in one process.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from train_step import CONFIGS  # noqa: E402


def config_of(name, **overrides):
    from ibot_keras import PretrainConfig

    settings = {k: v for k, v in CONFIGS[name].items() if k not in ("policy", "steps_per_epoch", "start_epoch")}
    settings.update(overrides)
    return PretrainConfig(**settings)


def photos(count, seed=0, size=(320, 400)):
    """Blocky random uint8 ``(count, H, W, 3)`` "photos" (not white noise)."""
    h, w = size
    base = np.random.default_rng(seed).integers(0, 255, (count, h // 8, w // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)


def write_jpegs(root, count, seed=0):
    """``count`` 500x375 JPEG files (smooth colour fields plus noise, ~60-120 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        base = rng.integers(0, 255, (375 // 25 + 1, 500 // 25 + 1, 3)).astype(np.float32)
        field = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((500, 375), Image.BICUBIC), np.float32)
        image = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, f"{i:05d}.jpg"), quality=90)


def make_source(kind, count, root):
    from ibot_keras.data import ArraySource, ImageFolderSource

    if kind == "array":
        return ArraySource(photos(count))
    write_jpegs(root, count)
    return ImageFolderSource(root)


def batches(pipeline, engine, workers):
    """An iterator over the pipeline's batches, made by ``engine``."""
    if engine == "grain":
        return pipeline.stream()
    if engine == "threads":

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return pipeline.total_steps

            def __getitem__(self, step):
                return (pipeline.batch(step),)

        from keras.src.trainers.data_adapters import get_data_adapter

        adapter = get_data_adapter(Batches(workers=workers, use_multiprocessing=False), shuffle=False)
        adapter.on_epoch_begin()
        return iter(adapter.get_numpy_iterator())
    import tensorflow as tf

    keys = sorted(pipeline.batch(0))

    def make(step):
        batch = pipeline.batch(int(step))
        return [batch[k] for k in keys]

    spec = pipeline.batch(0)
    dataset = tf.data.Dataset.range(pipeline.total_steps).map(
        lambda step: tf.py_function(make, [step], [tf.as_dtype(spec[k].dtype) for k in keys]),
        num_parallel_calls=workers, deterministic=True,
    ).prefetch(workers)
    return iter(dataset.as_numpy_iterator())


def throughput(args):
    from ibot_keras.data import build_pipeline

    results = []
    config = config_of(args.config, epochs=1, warmup_teacher_temp_epochs=1, warmup_epochs=1)
    most = max(max(args.workers), 1)
    with tempfile.TemporaryDirectory() as root:
        # Enough images for the start-up, the buffers and the timed batches of the most workers.
        source = make_source(args.source, config.batch_size * (args.batches_per_worker + 4) * most, root)
        for workers in args.workers:
            timed = args.batches_per_worker * max(workers, 1)
            pipeline = build_pipeline(config, source, workers=workers if args.engine == "grain" else 0)
            stream = batches(pipeline, args.engine, workers)
            # Start-up and filled buffers excluded: every worker's first two batches.
            for _ in range(2 * max(workers, 1)):
                next(stream)
            start = time.perf_counter()
            for _ in range(timed):
                next(stream)
            elapsed = time.perf_counter() - start
            getattr(stream, "close", lambda: None)()
            images_per_s = config.batch_size * timed / elapsed
            results.append({
                "config": args.config, "engine": args.engine, "source": args.source, "workers": workers,
                "batch_size": config.batch_size,
                "timed_batches": timed, "images_per_s": round(images_per_s, 1),
                "per_worker": round(images_per_s / max(workers, 1), 1),
                "scaling": round(images_per_s / results[0]["images_per_s"], 2) if results else 1.0,
            })
            print(json.dumps(results[-1]), flush=True)
    return results


class StepTimes(keras.callbacks.Callback):
    """Wall time of every training step, per epoch."""

    def __init__(self):
        super().__init__()
        self.times = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # the step is done
        now = time.perf_counter()
        self.times.setdefault(self.epoch, []).append(now - self.last)
        self.last = now


def fit_overhead(args):
    import ibot_keras
    from ibot_keras.data import build_pipeline

    keras.config.set_dtype_policy(CONFIGS[args.config]["policy"])
    config = config_of(args.config, epochs=2, warmup_teacher_temp_epochs=1, warmup_epochs=1)
    with tempfile.TemporaryDirectory() as root:
        source = make_source(args.source, config.batch_size * args.steps, root)
        pipeline = build_pipeline(config, source, workers=args.workers[0])
        cached = [pipeline.batch(step) for step in range(len(pipeline))]
        rows = {}
        for mode in ("batches made beforehand", f"pipeline, {args.workers[0]} worker(s)"):
            model = ibot_keras.build_pretrainer(config, steps_per_epoch=len(pipeline))
            timer = StepTimes()
            if mode.startswith("pipeline"):
                model.fit(pipeline, epochs=2, callbacks=[timer], verbose=0)
            else:
                model.fit(((cached[i % len(cached)],) for i in range(2 * len(cached))), epochs=2,
                          steps_per_epoch=len(cached), callbacks=[timer], verbose=0)
            rows[mode] = statistics.median(timer.times[1])
        base, piped = rows.values()
        result = {
            "config": args.config, "source": args.source, "backend": keras.backend.backend(),
            "steps": len(pipeline), "s_per_step_made_beforehand": round(base, 3),
            "s_per_step_pipeline": round(piped, 3), "workers": args.workers[0],
            "slowdown": round(piped / base - 1, 3),
        }
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "fit"])
    parser.add_argument("--config", default="baseline-cpu", choices=sorted(CONFIGS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--source", default="array", choices=["array", "jpeg"])
    parser.add_argument("--engine", default="grain", choices=["grain", "threads", "tf.data"],
                        help="throughput: who makes the batches")
    parser.add_argument("--batches_per_worker", type=int, default=4, help="throughput: timed batches per worker")
    parser.add_argument("--steps", type=int, default=8, help="fit: steps per epoch")
    args = parser.parse_args()
    throughput(args) if args.mode == "throughput" else fit_overhead(args)


if __name__ == "__main__":
    main()
