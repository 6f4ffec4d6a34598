"""What the iBOT training step logs beside the loss: the loss terms, the schedules' current
values and the collapse diagnostics, recorded in an ``IBOT``'s metric trackers (called from
``IBOT.compute_loss``, inside the compiled step).

Under data parallelism the inputs are this replica's values; ``backend_specific.metric_value``
makes the logs global-batch values on every backend."""

from ibot_keras import backend_specific
from ibot_keras.models.diagnostics import collapse_statistics, optimizer_values


def log_collapse_statistics(model, teacher_cls, temperature):
    """Log ``collapse_statistics`` of the teacher CLS logits ``(B, ng, K)`` with the loss's
    center (call before the loss updates it); returns this replica's mean teacher entropy.

    Healthy training keeps ``teacher_entropy`` well below ``log(out_dim)`` and
    ``teacher_batch_entropy`` well above 0 (see ``ibot_keras.models.diagnostics``)."""
    stats = collapse_statistics(teacher_cls, model.ibot_loss.center, temperature)
    model.teacher_entropy_tracker.update_state(backend_specific.metric_value(stats["teacher_entropy"]))
    model.teacher_batch_entropy_tracker.update_state(stats["teacher_batch_entropy"])
    model.prototype_usage_tracker.update_state(stats["prototype_usage"])
    return stats["teacher_entropy"]


def log_loss_terms(model, y_pred, losses, step, teacher_temp, teacher_entropy):
    """Log the loss terms ``losses`` (``IBOTLoss`` output: ``"cls"``, ``"patch"``), the
    masked patches beyond the cap, ``kl``, the teacher temperature and momentum, and the
    optimizer's lr and weight decay at ``step``.

    ``kl``: KL(teacher || student) averaged over the loss's CLS view pairs (CE minus the
    teacher entropy from ``log_collapse_statistics``), what is left to learn."""
    metric = backend_specific.metric_value
    if "masked_dropped" in y_pred:
        model.masked_dropped_tracker.update_state(metric(y_pred["masked_dropped"], "sum"))
    if model.ibot_loss.lambda1:
        model.kl_tracker.update_state(metric(losses["cls"] / model.ibot_loss.lambda1 - teacher_entropy))
    model.cls_tracker.update_state(metric(losses["cls"]))
    model.patch_tracker.update_state(metric(losses["patch"]))
    model.teacher_temp_tracker.update_state(teacher_temp)
    model.momentum_tracker.update_state(1.0 - model.teacher_momentum_one_minus(step))
    if model.optimizer is not None:
        lr, wd = optimizer_values(model.optimizer, step)
        model.lr_tracker.update_state(lr)
        if wd is not None:
            model.wd_tracker.update_state(wd)
