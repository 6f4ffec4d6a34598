"""What the training step logs beside the losses: collapse statistics of the teacher's [CLS]
distributions, and the optimizer's scheduled values."""

import keras
from keras import ops

from ibot_keras import backend_specific


def collapse_statistics(teacher_cls, center, temperature):
    """Statistics (nats) of the teacher distributions ``softmax((teacher_cls - center) / temperature)``.

    ``teacher_cls``: logits ``(..., K)`` (any leading shape; every row is one crop), ``center``
    ``(1, K)`` or ``(K,)``, ``temperature`` a positive scalar. Returns a dict of float32 scalars:

    - ``teacher_entropy``: mean entropy of a teacher output. Near ``log(K)``: uniform collapse
      (every image gets the same flat distribution).
    - ``teacher_batch_entropy``: entropy of the batch-mean teacher output. Near 0: one
      prototype wins for every image (the other collapse).
    - ``prototype_usage``: fraction of prototypes that are the argmax of at least one row.

    Under data parallelism the two batch statistics are over the global batch (identical on
    every replica) and ``teacher_entropy`` is this replica's mean.
    """
    logits = (ops.cast(teacher_cls, "float32") - ops.convert_to_tensor(center)) / temperature
    logits = ops.reshape(logits, (-1, logits.shape[-1]))
    log_p = ops.log_softmax(logits, axis=-1)
    p = ops.exp(log_p)
    entropy = -ops.mean(ops.sum(p * log_p, axis=-1))
    mean_p = backend_specific.cross_replica_mean(ops.mean(p, axis=0))
    batch_entropy = -ops.sum(mean_p * ops.log(ops.maximum(mean_p, 1e-30)))
    winners = ops.max(ops.one_hot(ops.argmax(logits, axis=-1), logits.shape[-1]), axis=0)
    winners = ops.cast(backend_specific.cross_replica_mean(winners) > 0, "float32")
    return {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
            "prototype_usage": ops.mean(winners)}


def _schedule_value(schedule, step):
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) or callable(schedule):
        return ops.cast(schedule(step), "float32")
    return ops.cast(schedule, "float32")


def optimizer_values(optimizer, step):
    """``(learning rate, weight decay)`` of ``optimizer`` (or the one a ``LossScaleOptimizer``
    wraps) at ``step``, float32 scalars; weight decay is None when it has none. Reads a
    schedule (``IBOTAdamW.learning_rate_schedule`` / ``weight_decay_value``) at ``step``."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    schedule = getattr(inner, "learning_rate_schedule", None)
    lr = _schedule_value(inner.learning_rate if schedule is None else schedule, step)
    wd = getattr(inner, "weight_decay_value", getattr(inner, "weight_decay", None))
    return lr, None if wd is None else _schedule_value(wd, step)
