"""A small deterministic training run on a 2-worker ``Pipeline`` that checkpoints every epoch
and every ``SAVE_STEPS`` steps and resumes from its output folder: ``python resume_run.py
OUT_DIR``. It prints ``BATCH <epoch> <batch> <loss> <cls> <patch>`` after every step. With
``HANG_AT=<step>`` (global, 1-based: after that many steps) it prints READY and hangs, to be
killed by the test."""

import os
import sys
import time

import keras
import numpy as np

import ibot_keras
from ibot_keras.data import ArraySource, build_pipeline
from ibot_keras.resume import TrainingCheckpoint, restore_training_state

EPOCHS = 3


class Probe(keras.callbacks.Callback):
    """Per-step logs, and the hang; reads the model only through the logs (no state sync)."""

    def __init__(self, steps, hang_at):
        super().__init__()
        self.steps, self.hang_at = steps, hang_at

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        print("BATCH", self.epoch, batch, repr(logs["loss"]), repr(logs["cls"]), repr(logs["patch"]), flush=True)
        if self.hang_at and self.epoch * self.steps + batch + 1 == self.hang_at:
            print("READY", flush=True)
            time.sleep(600)


def main(out):
    os.makedirs(out, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 255, (24, 24, 24, 3), dtype=np.uint8)
    config = ibot_keras.PretrainConfig(
        arch="vit_tiny", patch_size=8, depth=2, embed_dim=32, num_heads=2, image_size=16,
        global_crop_size=16, local_crop_size=8, out_dim=64, patch_out_dim=64, head_hidden_dim=32,
        head_bottleneck_dim=16, shared_head=True, local_crops_number=2, pred_ratio=(0.0, 0.3),
        pred_ratio_var=(0.0, 0.2), batch_size=6, epochs=EPOCHS, warmup_teacher_temp_epochs=1,
        warmup_epochs=1, lr=0.05, drop_path=float(os.environ.get("DP", "0.2")), seed=1,
    )
    pipeline = build_pipeline(config, ArraySource(images), workers=int(os.environ.get("WORKERS", "2")))
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=len(pipeline))
    initial_epoch = restore_training_state(model, out)
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(out, "log.csv"), append=True),
        TrainingCheckpoint(out, save_steps=int(os.environ.get("SAVE_STEPS", "0"))),
        Probe(len(pipeline), int(os.environ.get("HANG_AT", "0"))),
    ]
    model.fit(pipeline, epochs=EPOCHS, callbacks=callbacks, verbose=0)
    print("DONE", initial_epoch, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
