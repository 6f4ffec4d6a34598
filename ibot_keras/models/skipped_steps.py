"""Skipped training steps (a non-finite loss or gradients, a float16 overflow): whether the
optimizer applied a step, and undoing the rest of one it skipped. Runs inside the compiled
step (``IBOT.after_optimizer_step``)."""

from keras import ops


def computed_once(flag):
    """The bool tensor ``flag``, in a form that XLA computes once instead of copying it into
    each consumer.

    XLA fuses cheap producers into every consumer. The step's skip flag (an ``and`` over one
    ``isfinite`` per gradient) reaches every variable update: each of those ~800 fusions
    carried its own copy of the ~160-gradient chain, 390k of the baseline-cpu step's 473k HLO
    instructions and ~0.7 GB of compiled code (JAX; figures in benchmarks/RESULTS.md). Routed
    through an exact ``sqrt`` (1 -> 1, 4 -> 2), which XLA does not copy into consumers, it is
    computed in one fusion (``lax.optimization_barrier`` does not help: XLA:CPU removes it
    before fusing). Elsewhere (TensorFlow's graph, PyTorch) it costs three scalar ops.
    """
    return ops.sqrt(ops.where(flag, 1.0, 4.0)) < 1.5


def optimizer_applied(optimizer, iterations_before):
    """Whether ``optimizer`` applied the step it just ran (a bool scalar tensor).

    False when a ``LossScaleOptimizer`` skipped it (``iterations`` did not advance from
    ``iterations_before``) or ``IBOTAdamW`` skipped non-finite gradients (its ``update_skipped``)."""
    applied = ops.not_equal(ops.convert_to_tensor(optimizer.iterations), iterations_before)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    skipped = getattr(inner, "update_skipped", None)
    if skipped is not None:
        applied = ops.logical_and(applied, ops.equal(ops.convert_to_tensor(skipped), 0))
    return applied


def keep_or_restore(keep, variables, before):
    """Each variable keeps its value where ``keep`` (a bool scalar tensor), else gets ``before``."""
    for variable, value in zip(variables, before):
        variable.assign(ops.where(keep, ops.convert_to_tensor(variable), value))


def all_finite(variables):
    """Whether every value of every variable is finite (a bool scalar tensor)."""
    return ops.all(ops.stack([ops.all(ops.isfinite(ops.cast(ops.convert_to_tensor(v), "float32")))
                              for v in variables]))


def skip_counts(applied, skipped_steps, consecutive_skips):
    """The skip counters after this step: ``(skipped in total, skipped in a row)`` int32."""
    missed = ops.cast(ops.logical_not(applied), "int32")
    return (ops.convert_to_tensor(skipped_steps) + missed,
            (ops.convert_to_tensor(consecutive_skips) + 1) * missed)
