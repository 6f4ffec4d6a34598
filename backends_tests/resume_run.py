"""A small deterministic training run that checkpoints every epoch and resumes from its
output folder: ``python resume_run.py OUT_DIR``. With ``HANG_AT=<epoch>`` it prints READY and
hangs in that epoch's second batch, to be killed by the test."""

import os
import sys
import time

import keras
import numpy as np

import ibot_keras
from ibot_keras.data import ArraySource, MultiCropAugmentation, MultiCropLoader
from ibot_keras.resume import TrainingCheckpoint, restore_training_state

EPOCHS = 3


class HangAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 1:
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
    loader = MultiCropLoader(
        ArraySource(images),
        MultiCropAugmentation(2, 2, config.global_crops_scale, config.local_crops_scale, 16, 8),
        ibot_keras.BlockMasking(config.pred_ratio, config.pred_ratio_var),
        config.patch_size,
        config.batch_size,
        seed=config.seed,
    )
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=len(loader))
    initial_epoch = restore_training_state(model, out)
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(out, "log.csv"), append=True),
        TrainingCheckpoint(out),
    ]
    if os.environ.get("HANG_AT"):
        callbacks.append(HangAt(int(os.environ["HANG_AT"])))
    epochs = int(os.environ.get("STOP_AFTER", EPOCHS))
    if os.environ.get("BATCH_LOG"):
        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: print("BATCH", batch, logs["loss"], logs["cls"], flush=True)))
    model.fit(loader, epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=0)
    print("DONE", initial_epoch, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
