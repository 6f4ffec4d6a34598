"""Official iBOT schedules: per-iteration cosine (lr, weight decay, teacher momentum) and
per-epoch teacher temperatures.

Two forms of each schedule:
- NumPy float64 arrays built exactly like the official ``utils.cosine_scheduler`` and the
  ``iBOTLoss`` temperature tables (for inspection, plots and tests);
- in-graph evaluation from a step counter (``CosineSchedule``), used inside the compiled
  training step so that no table of ``epochs * iters`` values is baked into the graph.
"""

import math

import keras
import numpy as np
from keras import ops


def cosine_scheduler(
    base_value,
    final_value,
    epochs,
    niter_per_ep,
    warmup_epochs=0,
    start_warmup_value=0.0,
):
    """The official per-iteration schedule, as a float64 array of ``epochs * niter_per_ep``.

    Linear warmup from ``start_warmup_value`` to ``base_value`` over ``warmup_epochs``
    (endpoint included, so the peak appears twice at the boundary), then a half cosine from
    ``base_value`` towards ``final_value`` that never reaches ``final_value``.
    """
    warmup_iters = int(warmup_epochs * niter_per_ep)
    total = int(epochs * niter_per_ep)
    if warmup_iters > total:
        raise ValueError(
            f"warmup_epochs={warmup_epochs} is longer than epochs={epochs}."
        )
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * steps / len(steps))
    )
    return np.concatenate((warmup, cosine))


def teacher_temperature_schedule(
    warmup_temp, final_temp, warmup_epochs, epochs, start_epoch=0
):
    """Per-epoch teacher temperatures (float64, length ``epochs``), as in ``iBOTLoss``.

    ``start_epoch`` epochs held at ``warmup_temp`` (the patch schedule uses
    ``mim_start_epoch`` here), then ``linspace(warmup_temp, final_temp, warmup_epochs)``
    (the final value is reached at epoch ``start_epoch + warmup_epochs - 1``), then
    ``final_temp``.
    """
    if epochs < warmup_epochs + start_epoch:
        raise ValueError(
            f"epochs={epochs} must be at least warmup_teacher_temp_epochs "
            f"({warmup_epochs}) + mim_start_epoch ({start_epoch})."
        )
    return np.concatenate(
        (
            np.ones(start_epoch) * warmup_temp,
            np.linspace(warmup_temp, final_temp, warmup_epochs),
            np.ones(epochs - warmup_epochs - start_epoch) * final_temp,
        )
    )


@keras.saving.register_keras_serializable(package="ibot_keras")
class CosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``cosine_scheduler`` evaluated in-graph at an integer step (float32).

    Steps past the end hold the last value (the official code would index out of range).
    ``one_minus=True`` returns ``1 - value`` computed without cancellation, which keeps the
    teacher EMA step ``1 - m`` (about 1e-4) accurate in float32.
    """

    def __init__(
        self,
        base_value,
        final_value,
        epochs,
        steps_per_epoch,
        warmup_epochs=0,
        start_warmup_value=0.0,
    ):
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = int(warmup_epochs)
        self.start_warmup_value = float(start_warmup_value)
        self.warmup_steps = self.warmup_epochs * self.steps_per_epoch
        self.total_steps = self.epochs * self.steps_per_epoch
        if self.steps_per_epoch < 1 or self.epochs < 1:
            raise ValueError(
                f"epochs ({epochs}) and steps_per_epoch ({steps_per_epoch}) must be >= 1."
            )
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_epochs={warmup_epochs} is longer than epochs={epochs}."
            )

    def numpy(self):
        """The whole schedule as the official float64 array."""
        return cosine_scheduler(
            self.base_value,
            self.final_value,
            self.epochs,
            self.steps_per_epoch,
            self.warmup_epochs,
            self.start_warmup_value,
        )

    def _evaluate(self, step, one_minus):
        step = ops.minimum(ops.cast(step, "int32"), self.total_steps - 1)
        step_f = ops.cast(step, "float32")
        cosine_len = self.total_steps - self.warmup_steps
        # Cosine part: final + 0.5 (base - final)(1 + cos(pi i / T)).
        if cosine_len > 0:
            i = ops.maximum(step_f - self.warmup_steps, 0.0)
            # 0.5 (1 + cos t) as cos^2(t / 2): no float32 cancellation where cos t is near -1.
            half = ops.square(ops.cos((0.5 * math.pi / cosine_len) * i))
            if one_minus:
                cos_value = (1.0 - self.final_value) + (
                    self.final_value - self.base_value
                ) * half
            else:
                cos_value = self.final_value + (
                    self.base_value - self.final_value
                ) * half
        else:
            cos_value = ops.zeros((), "float32")
        if self.warmup_steps == 0:
            return cos_value
        start = self.start_warmup_value
        if self.warmup_steps == 1:
            warm_value = ops.convert_to_tensor(
                (1.0 - start) if one_minus else start, "float32"
            )
        else:
            frac = step_f / (self.warmup_steps - 1)
            if one_minus:
                warm_value = (1.0 - start) - (self.base_value - start) * frac
            else:
                warm_value = start + (self.base_value - start) * frac
        return ops.where(step < self.warmup_steps, warm_value, cos_value)

    def __call__(self, step):
        return self._evaluate(step, one_minus=False)

    def one_minus(self, step):
        """``1 - schedule(step)`` without float32 cancellation."""
        return self._evaluate(step, one_minus=True)

    def get_config(self):
        return {
            "base_value": self.base_value,
            "final_value": self.final_value,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_epochs": self.warmup_epochs,
            "start_warmup_value": self.start_warmup_value,
        }
