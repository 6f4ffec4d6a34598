"""A 2-worker ``Pipeline`` fed to ``fit`` on one device and under ``tf.distribute.MirroredStrategy``
over 2 logical CPUs (they must be set up before TensorFlow runs, hence a process of its own).
Prints one JSON line: the per-step ``(loss, cls, patch)`` logs of both runs."""

import json

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import contextlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import ibot_keras  # noqa: E402
from ibot_keras.data import ArraySource, build_pipeline  # noqa: E402


class Log(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append([float(logs[k]) for k in ("loss", "cls", "patch")])


def run(scope):
    # drop_path=0: stochastic depth draws per device, so it cannot match a one-device run.
    config = ibot_keras.PretrainConfig(
        arch="vit_tiny", patch_size=4, embed_dim=16, depth=1, num_heads=2, image_size=16,
        global_crop_size=16, local_crop_size=8, out_dim=32, patch_out_dim=32, shared_head=True,
        head_hidden_dim=16, head_bottleneck_dim=8, warmup_teacher_temp_epochs=1, epochs=2, batch_size=8,
        lr=5e-3, warmup_epochs=1, local_crops_number=2, drop_path=0.0, pred_ratio=(0.0, 0.3),
        pred_ratio_var=(0.0, 0.2), seed=3,
    )
    images = np.random.default_rng(0).integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    with scope:
        # uint8 masks: Keras 3.15.1 reduces the first batch across replicas, which fails on bool.
        pipeline = build_pipeline(config, ArraySource(images), workers=2, mask_dtype="uint8")
        model = ibot_keras.build_pretrainer(config, steps_per_epoch=len(pipeline))
        log = Log()
        model.fit(pipeline, epochs=2, callbacks=[log], verbose=0)
    return log.rows


if __name__ == "__main__":
    single = run(contextlib.nullcontext())
    mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope())
    print(json.dumps({"single": single, "mirrored": mirrored}))
