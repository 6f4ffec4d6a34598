"""The teacher's exponential moving average of the student."""

from keras import ops

from ibot_keras import backend_specific


def ema_update(pairs, one_minus_momentum, applied=None):
    """``teacher <- m * teacher + (1 - m) * student`` for every ``(student, teacher)`` variable
    pair (the official ``param_k.mul_(m).add_((1 - m) * param_q)``), in place.

    ``one_minus_momentum``: ``1 - m``, a float or a scalar tensor; given as ``1 - m`` because the
    cosine momentum schedule computes it directly (down to 1e-4, where ``1 - m`` taken from a
    float32 ``m`` would lose digits). ``applied``: a bool scalar tensor; where False, every
    teacher variable keeps its value (a skipped step). Variables are read without gradient.
    """
    if backend_specific.MULTI_TENSOR_EMA and pairs:
        backend_specific.multi_tensor_ema(pairs, one_minus_momentum, applied)
        return
    momentum = 1.0 - one_minus_momentum
    for student_var, teacher_var in pairs:
        student_value = ops.stop_gradient(ops.convert_to_tensor(student_var))
        teacher_value = ops.convert_to_tensor(teacher_var)
        new_value = teacher_value * momentum + student_value * one_minus_momentum
        teacher_var.assign(new_value if applied is None else ops.where(applied, new_value, teacher_value))


def pair_by_name(student_weights, teacher_weights):
    """``[(student variable, teacher variable)]`` for every name present in both
    ``[(name, variable, ...)]`` lists (the official EMA: every parameter name in both
    ``named_parameters()``), in the teacher's order. Raises ``ValueError`` naming a pair whose
    shapes differ."""
    student = {name: var for name, var, *_ in student_weights}
    pairs = []
    for name, teacher_var, *_ in teacher_weights:
        if name in student:
            if tuple(student[name].shape) != tuple(teacher_var.shape):
                raise ValueError(
                    f"Teacher and student shapes differ for {name}: "
                    f"{teacher_var.shape} vs {student[name].shape}."
                )
            pairs.append((student[name], teacher_var))
    return pairs


def copy_by_name(student_weights, teacher_weights):
    """Assign every teacher variable the student variable of the same name (the official
    ``teacher.load_state_dict(student.state_dict(), strict=False)``), in the teacher's order;
    ``[(name, variable, ...)]`` lists."""
    student = {name: var for name, var, *_ in student_weights}
    for name, teacher_var, *_ in teacher_weights:
        if name in student:
            # Through NumPy: a fresh buffer (JAX would otherwise alias, then donate it twice).
            teacher_var.assign(ops.convert_to_numpy(student[name]))
