"""Test-split k-NN of the teacher during training: how fast a setting learns, in one process.

    KERAS_BACKEND=jax python benchmarks/learning_curve.py --dataset shapes --every 3
    KERAS_BACKEND=jax python benchmarks/learning_curve.py --dataset shapes --set patch_size=4 local_crop_size=12

Starts from the small-data recipe for the dataset's training split (``recipes.small_data``,
28-px crops), then ``--set field=value`` (``PretrainConfig`` fields; values as JSON, else text).
Every ``--every`` epochs (and at the end) prints the epoch, seconds since the start, k-NN
top-1 (k=20, T=0.07) of the teacher's features from the training split onto the test split
(``benchmarks/learning.py``'s protocol; ``--features``: the [CLS] token and the patch tokens
by default, ``ibot_keras.eval.BackboneFeatures``), and the epoch's ``cls``, ``patch``,
``teacher_entropy`` and ``prototype_usage``. The datasets are written once by
``benchmarks/datasets.py``. The k-NN evaluations count in the seconds.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402

import datasets  # noqa: E402
import ibot_keras  # noqa: E402
from ibot_keras.data import ImageFolderSource, build_pipeline  # noqa: E402
from ibot_keras.eval import eval_views, extract_features, knn_classify  # noqa: E402
from ibot_keras.recipes import small_data  # noqa: E402


def _value(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes", choices=datasets.DATASETS)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="PretrainConfig overrides")
    p.add_argument("--every", type=int, default=3, help="evaluate every N epochs")
    p.add_argument("--features", nargs="+", default=["cls", "patch_tokens"], help="BackboneFeatures choices to score")
    p.add_argument("--cache_dir", default=datasets.default_root())
    args = p.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k: _value(v) for k, v in overrides.items()}
    paths = datasets.prepare(args.dataset, args.cache_dir, 10000, 2000, 0)
    train, test = ImageFolderSource(paths["train"]), ImageFolderSource(paths["test"])
    values = small_data(len(train), 28, epochs=overrides.get("epochs"), global_crop_size=overrides.get("global_crop_size", 28),
                        local_crop_size=overrides.get("local_crop_size"))
    config = ibot_keras.PretrainConfig(**{**values, **overrides})
    train_views, test_views = eval_views(train, 28), eval_views(test, 28)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1

    def knn(backbone):
        return ", ".join(
            f"{name} " + format(knn_classify(extract_features(backbone, train_views, features=name), train.labels,
                                             extract_features(backbone, test_views, features=name), test.labels,
                                             num_classes, k=20)[0], ".2f")
            for name in args.features)

    pipeline = build_pipeline(config, train)
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=len(pipeline))
    start = time.time()
    print(f"{args.dataset} {keras.backend.backend()} {json.dumps(overrides)}: patch {config.patch_size}, "
          f"{config.local_crops_number} local crops of {config.local_crop_size} px, {config.epochs} epochs; "
          f"k-NN at init: {knn(model.teacher_backbone)}", flush=True)

    class Curve(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if (epoch + 1) % args.every == 0 or epoch + 1 == config.epochs:
                print(f"epoch {epoch + 1} {time.time() - start:.0f} s: k-NN {knn(model.teacher_backbone)}; "
                      f"cls {logs['cls']:.3f}, patch {logs['patch']:.3f}, teacher_entropy "
                      f"{logs['teacher_entropy']:.2f}, prototype_usage {logs['prototype_usage']:.3f}", flush=True)

    model.fit(pipeline, epochs=config.epochs, callbacks=[Curve()], verbose=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
