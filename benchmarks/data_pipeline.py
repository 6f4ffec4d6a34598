"""Data-pipeline throughput: batches/s of ``MultiCropLoader`` for a training config.

    python benchmarks/data_pipeline.py --config baseline-cpu --workers 2

Images are random-content uint8 photos of ``--image_size`` (default 320x400, ImageNet-like),
augmented with the official recipe on host threads, exactly as ``fit`` would consume them
(through Keras' PyDataset enqueuer). Compare with ``benchmarks/train_step.py`` on the same
config: the issue target is a pipeline at least 3x faster than the step.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from train_step import CONFIGS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="baseline-cpu", choices=sorted(CONFIGS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--image_size", type=int, nargs=2, default=(320, 400))
    args = parser.parse_args()

    import keras

    from ibot_keras import BlockMasking, PretrainConfig
    from ibot_keras.data import ArraySource, MultiCropAugmentation, MultiCropLoader

    settings = {k: v for k, v in CONFIGS[args.config].items() if k not in ("policy", "steps_per_epoch", "start_epoch")}
    config = PretrainConfig(**settings)
    rng = np.random.default_rng(0)
    h, w = args.image_size
    count = config.batch_size * (args.batches + 1)
    base = rng.integers(0, 255, (count, h // 8, w // 8, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)  # blocky "photos", not white noise
    loader = MultiCropLoader(
        ArraySource(images),
        MultiCropAugmentation(
            config.global_crops_number, config.local_crops_number, config.global_crops_scale,
            config.local_crops_scale, config.global_crop_size, config.local_crop_size,
        ),
        BlockMasking(config.pred_ratio, config.pred_ratio_var),
        config.patch_size,
        config.batch_size,
        workers=args.workers,
        use_multiprocessing=False,
    )
    from keras.src.trainers.data_adapters import get_data_adapter

    adapter = get_data_adapter(loader, shuffle=False)
    adapter.on_epoch_begin()
    iterator = iter(adapter.get_numpy_iterator())
    next(iterator)  # start-up
    start = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    median = (time.perf_counter() - start) / args.batches  # steady state, queue included
    adapter.on_epoch_end()
    print(json.dumps({
        "config": args.config, "workers": args.workers, "batch_size": config.batch_size,
        "s_per_batch": round(median, 4), "timed_batches": args.batches, "batches_per_s": round(1 / median, 2),
        "images_per_s": round(config.batch_size / median, 1), "keras": keras.__version__,
    }))


if __name__ == "__main__":
    main()
