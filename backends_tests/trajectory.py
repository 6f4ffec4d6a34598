"""Helpers to run the official trajectory_A fixture through `IBOT.fit` (shared by tests)."""

import keras
import numpy as np
from conftest import load_fixture, official_state

from ibot_keras import PretrainConfig, build_pretrainer, checkpoint

T = load_fixture("trajectory_A")
STEPS_PER_EPOCH = int(T["cfg_iters"])


def fixture_config():
    """A PretrainConfig equal to the fixture's settings (read from its cfg_* keys)."""
    c = {k[4:]: T[k] for k in T.files if k.startswith("cfg_")}
    return PretrainConfig(
        arch="vit_tiny",
        patch_size=int(c["patch_size"]),
        embed_dim=int(c["embed_dim"]),
        depth=int(c["depth"]),
        num_heads=int(c["num_heads"]),
        image_size=int(c["img_size"]),
        global_crop_size=int(c["global_size"]),
        local_crop_size=int(c["local_size"]),
        out_dim=int(c["out_dim"]),
        patch_out_dim=int(c["patch_out_dim"]),
        shared_head=bool(c["shared_head"]),
        shared_head_teacher=bool(c["shared_head_teacher"]),
        norm_last_layer=bool(c["norm_last_layer"]),
        head_nlayers=int(c["nlayers"]),
        head_hidden_dim=int(c["hidden_dim"]),
        head_bottleneck_dim=int(c["bottleneck_dim"]),
        warmup_teacher_temp=float(c["warmup_teacher_temp"]),
        teacher_temp=float(c["teacher_temp"]),
        warmup_teacher_patch_temp=float(c["warmup_teacher_patch_temp"]),
        teacher_patch_temp=float(c["teacher_patch_temp"]),
        warmup_teacher_temp_epochs=int(c["warmup_teacher_temp_epochs"]),
        epochs=int(c["epochs"]),
        batch_size=int(c["bs"]),
        lambda1=float(c["lambda1"]),
        lambda2=float(c["lambda2"]),
        pred_start_epoch=int(c["pred_start_epoch"]),
        lr=float(c["lr"]),
        min_lr=float(c["min_lr"]),
        warmup_epochs=int(c["warmup_epochs"]),
        weight_decay=float(c["weight_decay"]),
        weight_decay_end=float(c["weight_decay_end"]),
        momentum_teacher=float(c["momentum_teacher"]),
        clip_grad=float(c["clip_grad"]),
        freeze_last_layer=int(c["freeze_last_layer"]),
        pred_ratio=tuple(c["pred_ratio"]),
        pred_ratio_var=tuple(c["pred_ratio_var"]),
        pred_shape=str(c["pred_shape"]),
        local_crops_number=int(c["nl"]),
        drop_path=0.0,
        seed=int(c["seed"]),
    )


def batches():
    """The fixture's 6 batches as IBOT batch dicts (batch-first, channels-last)."""
    globals_ = T["global_crops"].transpose(0, 2, 1, 4, 5, 3)  # step, image, crop, H, W, C
    locals_ = T["local_crops"].transpose(0, 2, 1, 4, 5, 3)
    masks = T["masks"].transpose(0, 2, 1, 3, 4)  # step, image, crop, h, w
    return [
        {"global_crops": globals_[i], "local_crops": locals_[i], "masks": masks[i]}
        for i in range(len(globals_))
    ]


def build_fixture_model():
    model = build_pretrainer(fixture_config(), steps_per_epoch=STEPS_PER_EPOCH)
    checkpoint.load_official(
        model, {"student": official_state(T, "student__"), "teacher": official_state(T, "teacher__")}
    )
    return model


class StepRecorder(keras.callbacks.Callback):
    """Per-step losses (undoing Keras' running means) and centers after each step."""

    def __init__(self):
        super().__init__()
        self.logs, self.centers, self.patch_centers = [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._previous, self._seen = {}, 0

    def on_train_batch_end(self, batch, logs=None):
        step = {}
        for key, mean in logs.items():
            if key in ("loss", "cls", "patch"):
                # running mean over the epoch -> this step's value
                step[key] = (batch + 1) * mean - batch * self._previous.get(key, 0.0)
            else:
                step[key] = mean
        self._previous = {k: v for k, v in logs.items()}
        self.logs.append(step)
        self.centers.append(keras.ops.convert_to_numpy(self.model.ibot_loss.center))
        self.patch_centers.append(keras.ops.convert_to_numpy(self.model.ibot_loss.patch_center))

    def series(self, key):
        return np.array([step[key] for step in self.logs])


def fit_fixture(model, epochs, initial_epoch=0, recorder=None):
    data = batches()[initial_epoch * STEPS_PER_EPOCH : epochs * STEPS_PER_EPOCH]

    def generate():
        for batch in data:
            yield (batch,)

    recorder = recorder or StepRecorder()
    model.fit(
        generate(),
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=STEPS_PER_EPOCH,
        verbose=0,
        callbacks=[recorder],
    )
    return recorder
