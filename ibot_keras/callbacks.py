"""Keras callbacks to see and steer the iBOT teacher: EMA momentum, centers, temperatures.

They act **between epochs**: they set model variables that the compiled training step reads
every step (the per-step arithmetic itself stays inside the step). A callback that touched
variables every batch would force a full state sync on JAX and slow training several times.
"""

import warnings

import keras
import numpy as np
from keras import ops


def _set(variable, value):
    variable.assign(np.asarray(-1.0 if value is None else value, np.float32))


def _current_step(model):
    return ops.convert_to_tensor(model.step)


class _EpochScheduler(keras.callbacks.Callback):
    def __init__(self, schedule, verbose=0):
        super().__init__()
        self.schedule = schedule
        self.verbose = verbose


class TeacherTemperatureScheduler(_EpochScheduler):
    """Set the teacher temperatures per epoch, like ``keras.callbacks.LearningRateScheduler``.

    ``schedule(epoch, (temp, patch_temp))`` receives the official values for that epoch and
    returns a float (both terms), a ``(temp, patch_temp)`` pair, or ``None`` to keep the
    official schedule. The chosen values show in the logs as ``teacher_temp``.

    Example: a sharper teacher for a small dataset::

        TeacherTemperatureScheduler(lambda epoch, temps: 0.02 if epoch < 10 else None)
    """

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        official = model.ibot_loss.temperatures(epoch)
        official = tuple(float(ops.convert_to_numpy(t)) for t in official)
        value = self.schedule(epoch, official)
        if value is not None and not isinstance(value, (tuple, list)):
            value = (value, value)
        for variable, temp in zip(
            (model.teacher_temp_override, model.teacher_patch_temp_override),
            (None, None) if value is None else value,
        ):
            if temp is not None and temp <= 0:
                raise ValueError(f"Teacher temperatures must be positive; got {temp}.")
            _set(variable, temp)
        if self.verbose:
            print(f"\nEpoch {epoch + 1}: teacher temperatures {value if value else official}.")

    def on_train_end(self, logs=None):
        _set(self.model.teacher_temp_override, None)
        _set(self.model.teacher_patch_temp_override, None)


class TeacherMomentumScheduler(_EpochScheduler):
    """Set the teacher EMA momentum per epoch: ``schedule(epoch, official_momentum)`` returns
    a momentum in ``[0, 1]`` for the whole epoch, or ``None`` for the official per-iteration
    cosine schedule (``official_momentum`` is its value at the first step of the epoch).
    ``1.0`` freezes the teacher."""

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        official = 1.0 - float(ops.convert_to_numpy(model.momentum_schedule.one_minus(_current_step(model))))
        value = self.schedule(epoch, official)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"Teacher momentum must be in [0, 1]; got {value}.")
        _set(model.momentum_override, value)
        if self.verbose:
            print(f"\nEpoch {epoch + 1}: teacher momentum {official if value is None else value}.")

    def on_train_end(self, logs=None):
        _set(self.model.momentum_override, None)


class CollapseMonitor(keras.callbacks.Callback):
    """Warns when the teacher looks collapsed, from the epoch means of the model's diagnostics
    (``ibot_keras.models.diagnostics.collapse_statistics``):

    - uniform collapse: ``teacher_entropy`` above ``uniform_fraction * log(out_dim)``;
    - single-prototype collapse: ``teacher_batch_entropy`` below
      ``single_fraction * log(out_dim)``.

    One warning when a collapse starts or changes kind (not one per epoch of the same state),
    and a summary at the end of training. ``collapsed_epochs`` lists every flagged epoch
    (0-based). Remedies users report for DINO-style training: a lower teacher temperature
    (sharpening), a longer ``freeze_last_layer``, a larger ``out_dim``, more data or longer
    training.
    """

    def __init__(self, uniform_fraction=0.97, single_fraction=0.05):
        super().__init__()
        self.uniform_fraction = uniform_fraction
        self.single_fraction = single_fraction
        self.collapsed_epochs = []
        self._kind = None
        self._kinds = {}

    def on_train_begin(self, logs=None):
        self._kind = None
        self._kinds = {}

    def on_epoch_end(self, epoch, logs=None):
        if not logs or "teacher_entropy" not in logs:
            return
        log_k = float(np.log(self.model.ibot_loss.out_dim))
        kind = None
        if logs["teacher_entropy"] > self.uniform_fraction * log_k:
            kind = "uniform"
        elif logs["teacher_batch_entropy"] < self.single_fraction * log_k:
            kind = "single-prototype"
        if kind:
            self.collapsed_epochs.append(epoch)
            self._kinds.setdefault(kind, []).append(epoch)
            if kind != self._kind:
                warnings.warn(
                    f"Epoch {epoch + 1}: the teacher looks collapsed ({kind}): teacher_entropy "
                    f"{logs['teacher_entropy']:.3f}, teacher_batch_entropy "
                    f"{logs['teacher_batch_entropy']:.3f}, log(out_dim) {log_k:.3f}. Try a lower "
                    "teacher temperature, a longer freeze_last_layer, a larger out_dim, or more "
                    "data. Further epochs in this state are summarised at the end of training.",
                    stacklevel=2,
                )
        self._kind = kind

    def on_train_end(self, logs=None):
        if not self._kinds:
            return
        parts = [f"{kind} in {len(epochs)} epoch(s) ({_epoch_ranges(epochs)})" for kind, epochs in self._kinds.items()]
        warnings.warn("The teacher looked collapsed: " + "; ".join(parts) + ".", stacklevel=2)


def _epoch_ranges(epochs):
    """1-based, compressed: ``[0, 1, 2, 5]`` -> ``"1-3, 6"``."""
    ranges, start = [], None
    for i, epoch in enumerate(epochs):
        if start is None:
            start = epoch
        if i + 1 == len(epochs) or epochs[i + 1] != epoch + 1:
            ranges.append(f"{start + 1}" if start == epoch else f"{start + 1}-{epoch + 1}")
            start = None
    return ", ".join(ranges)


class TeacherStateMonitor(keras.callbacks.Callback):
    """Adds the teacher's state to the epoch logs (progress bar, CSV, TensorBoard):

    - ``center_norm``, ``patch_center_norm``: L2 norms of the two centers;
    - ``teacher_student_gap``: relative distance ``||teacher - student|| / ||student||``
      over the EMA-paired parameters (0 means the teacher is a copy; it grows while the
      student moves faster than the EMA follows).
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        model = self.model
        logs["center_norm"] = float(np.linalg.norm(ops.convert_to_numpy(model.ibot_loss.center)))
        logs["patch_center_norm"] = float(
            np.linalg.norm(ops.convert_to_numpy(model.ibot_loss.patch_center))
        )
        diff = total = 0.0
        for student, teacher in model.ema_pairs():
            s, t = ops.convert_to_numpy(student), ops.convert_to_numpy(teacher)
            diff += float(np.sum((t - s) ** 2))
            total += float(np.sum(s**2))
        logs["teacher_student_gap"] = float(np.sqrt(diff / max(total, 1e-30)))


class NonFiniteTrainingError(RuntimeError):
    """Raised by ``NonFiniteStop`` when too many steps in a row were skipped."""


class NonFiniteStop(keras.callbacks.Callback):
    """Stop ``fit`` once ``max_consecutive`` steps in a row were skipped as non-finite.

    Reads the ``consecutive_skips`` log of ``IBOT`` (no extra host read; safe for Keras'
    asynchronous callback dispatch). ``IBOT.fit`` adds one when the model's
    ``max_consecutive_skips`` is above 0.
    """

    async_safe = True

    def __init__(self, max_consecutive):
        super().__init__()
        self.max_consecutive = int(max_consecutive)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        consecutive = (logs or {}).get("consecutive_skips")
        if consecutive is None or float(consecutive) < self.max_consecutive:
            return
        total = (logs or {}).get("skipped_steps", consecutive)
        raise NonFiniteTrainingError(
            f"Training stopped at epoch {self.epoch + 1}, batch {batch + 1}: the last "
            f"{int(float(consecutive))} steps had a non-finite loss or gradients and were skipped "
            f"({int(float(total))} skipped in this run). The weights are those of the last finite "
            "step. Look for NaN/inf pixels in the data, a too high lr, or a temperature near 0; "
            "to allow longer runs of skipped steps, raise max_consecutive_skips (0: never stop)."
        )
