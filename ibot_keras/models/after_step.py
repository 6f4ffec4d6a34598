"""The end of the training step, after the optimizer (``IBOT.after_optimizer_step``): undo
what a skipped step changed, the teacher EMA, the skip counters and ``step += 1``. Runs
inside the compiled step."""

from keras import ops

from ibot_keras.models.ema import ema_update
from ibot_keras.models.skipped_steps import all_finite, computed_once, keep_or_restore, skip_counts


def restorable_metric_variables(model):
    """Metric variables of ``model`` (an ``IBOT``) that a skipped step leaves as they were: all
    but those of the skip counters' trackers."""
    excluded = {id(v) for tracker in (model.skipped_tracker, model.consecutive_tracker) for v in tracker.variables}
    return [v for v in model.metrics_variables if id(v) not in excluded]


def snapshot_variables(model):
    """Variables whose pre-step values ``finish_step`` needs: the optimizer's iteration count,
    both loss centers and ``restorable_metric_variables``."""
    return [model.optimizer.iterations, model.ibot_loss.center, model.ibot_loss.patch_center,
            *restorable_metric_variables(model)]


def finish_step(model, snapshot):
    """Teacher EMA with this step's momentum, then ``model.step += 1``; returns the step's logs.

    ``snapshot``: the pre-step values of ``snapshot_variables(model)``. On a skipped step
    (``model.step_applied`` False: non-finite loss or gradients, or a float16 overflow) the
    centers and metrics get their pre-step values back, the teacher does not move and the skip
    counters advance. As in the official code the iteration still counts for the lr/wd/freeze
    schedules (the official ``it``), while the per-parameter Adam step counts do not advance:
    Keras' loss-scale optimizer leaves ``iterations`` behind on a skipped step, so catch it up.
    (Deviation: the official fp16 loop skips only the AdamW step and still moves the centers
    and the teacher.) Variables are float32 and no autocast scope is active here, so the EMA
    (``1 - m`` down to 1e-4) runs in float32 under any dtype policy.
    """
    step = ops.convert_to_tensor(model.step)
    iterations_before, center_before, patch_center_before, *metrics_before = snapshot
    applied = computed_once(model.step_applied(iterations_before))
    model.optimizer.iterations.assign(iterations_before + ops.ones_like(iterations_before))
    keep_or_restore(applied, (model.ibot_loss.center, model.ibot_loss.patch_center),
                    (center_before, patch_center_before))
    # A skipped step whose logged values are not finite is left out of the epoch's metrics
    # (a float16 overflow skip, with a finite loss, is still logged).
    metric_variables = restorable_metric_variables(model)
    keep = computed_once(ops.logical_or(applied, all_finite(metric_variables)))
    keep_or_restore(keep, metric_variables, metrics_before)
    ema_update(model.ema_pairs(), model.teacher_momentum_one_minus(step), applied)
    skipped, consecutive = skip_counts(applied, model.skipped_steps, model.consecutive_skips)
    model.skipped_steps.assign(skipped)
    model.consecutive_skips.assign(consecutive)
    model.skipped_tracker.update_state(skipped)
    model.consecutive_tracker.update_state(consecutive)
    model.step.assign(step + 1)
    return model.get_metrics_result()
