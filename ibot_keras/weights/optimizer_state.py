"""The official AdamW state (``optimizer.state_dict()`` of ``torch.optim.AdamW`` on
``get_params_groups(student)``) to and from an ``IBOTAdamW``."""

import keras
import numpy as np

from ibot_keras.weights.layouts import from_official_layout, to_numpy, to_official_layout


def official_param_groups(model):
    """The student tensors in the order of the official optimizer, ``[(name, variable, layout)]``.

    ``utils.get_params_groups(student)`` walks ``named_parameters()``, skips frozen tensors
    and puts biases and 1-D tensors into group 1 (no weight decay), the rest into group 0;
    ``optimizer.state_dict()`` numbers the tensors group 0 first. Position ``i`` here is
    parameter id ``i`` there.
    """
    decayed, plain = _official_groups(model)
    return decayed + plain


def _official_groups(model):
    """``(group 0, group 1)`` of ``official_param_groups``."""
    trainable = [(n, v, l) for n, v, l in model.student_weights() if v.trainable]

    def decayed(entry):
        name, variable, _ = entry
        return not name.endswith(".bias") and len(variable.shape) > 1  # ndim is the same in any layout

    return [w for w in trainable if decayed(w)], [w for w in trainable if not decayed(w)]


def _adamw(model):
    from ibot_keras.optimizers import IBOTAdamW

    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # LossScaleOptimizer
    if not isinstance(optimizer, IBOTAdamW):
        raise ValueError("The model has no IBOTAdamW optimizer: compile it (build_pretrainer does) first.")
    if not optimizer.built:
        model.optimizer.build(model.trainable_variables)
    return optimizer


def export_official_optimizer(model):
    """The model's ``IBOTAdamW`` state as the official ``optimizer.state_dict()`` of
    ``torch.optim.AdamW(get_params_groups(student))``: ``{"state": {id: {"step", "exp_avg",
    "exp_avg_sq"}}, "param_groups": [...]}`` with NumPy arrays in the official layouts.
    Tensors never stepped have no ``state`` entry, as in PyTorch."""
    optimizer = _adamw(model)
    decayed_group, plain_group = _official_groups(model)
    groups, decayed = decayed_group + plain_group, len(decayed_group)
    state = {}
    for index, (_, variable, layout) in enumerate(groups):
        momentum, velocity, step_count = optimizer.slots(variable)
        count = float(keras.ops.convert_to_numpy(step_count))
        if count > 0:
            state[index] = {
                "step": np.asarray(count, np.float32),  # a 0-d tensor in torch >= 1.12
                "exp_avg": to_official_layout(keras.ops.convert_to_numpy(momentum), layout),
                "exp_avg_sq": to_official_layout(keras.ops.convert_to_numpy(velocity), layout),
            }
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    wd = float(keras.ops.convert_to_numpy(optimizer.current_weight_decay()))
    common = dict(betas=(optimizer.beta_1, optimizer.beta_2), eps=optimizer.epsilon, amsgrad=False,
                  maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
    return {
        "state": state,
        "param_groups": [
            dict(common, lr=lr, weight_decay=wd, params=list(range(decayed))),
            dict(common, lr=lr, weight_decay=0.0, params=list(range(decayed, len(groups)))),
        ],
    }


def load_official_optimizer(model, optimizer_state, epoch=None):
    """Assign an official AdamW ``optimizer.state_dict()`` (see ``export_official_optimizer``)
    to the model's ``IBOTAdamW``: ``exp_avg`` -> momentum, ``exp_avg_sq`` -> velocity, ``step``
    -> the tensor's own step count; tensors without a ``state`` entry start from zero.

    ``epoch`` (completed epochs, what official checkpoints store) also sets the step counters
    (``optimizer.iterations`` and ``model.step``) to ``epoch * steps_per_epoch``, so the
    schedules continue where the official run stopped; pass ``initial_epoch=epoch`` to ``fit``.
    The lr and weight decay in ``param_groups`` are not read: they come from the schedules.
    Raises ``ValueError`` when the groups do not match this model (listing the differences).
    """
    optimizer = _adamw(model)
    decayed_group, plain_group = _official_groups(model)
    groups, decayed = decayed_group + plain_group, len(decayed_group)
    param_groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    if not isinstance(param_groups, (list, tuple)) or len(param_groups) != 2:
        raise ValueError(
            "Expected the official AdamW state_dict with 2 param_groups (get_params_groups: "
            f"decayed, then biases and 1-D tensors); got {type(optimizer_state).__name__} with "
            f"{len(param_groups) if isinstance(param_groups, (list, tuple)) else 'no'} param_groups."
        )
    ids = [list(int(i) for i in np.asarray(group["params"]).reshape(-1)) for group in param_groups]
    if [len(i) for i in ids] != [decayed, len(groups) - decayed]:
        raise ValueError(
            f"The optimizer state has {len(ids[0])} + {len(ids[1])} tensors in its two groups; this "
            f"model's student has {decayed} + {len(groups) - decayed} trainable tensors. Is it the same "
            "architecture, with the same norm_last_layer?"
        )
    state = optimizer_state.get("state", {})
    state = {int(key): value for key, value in state.items()}
    updates, mismatched = [], []
    for (name, variable, layout), param_id in zip(groups, ids[0] + ids[1]):
        entry = state.get(param_id)
        slots = optimizer.slots(variable)
        if entry is None:
            zeros = np.zeros(variable.shape, "float32")
            updates.append((slots, zeros, zeros, 0.0))
            continue
        m = from_official_layout(to_numpy(entry["exp_avg"]), layout)
        v = from_official_layout(to_numpy(entry["exp_avg_sq"]), layout)
        if tuple(m.shape) != tuple(variable.shape) or tuple(v.shape) != tuple(variable.shape):
            expected = to_official_layout(np.zeros(variable.shape), layout).shape
            mismatched.append(f"{name}: checkpoint {tuple(to_numpy(entry['exp_avg']).shape)}, expected {tuple(expected)}")
            continue
        updates.append((slots, m, v, float(to_numpy(entry["step"]))))
    if mismatched:
        raise ValueError("The optimizer state does not match the model. Shape mismatches: " + "; ".join(mismatched))
    for (momentum, velocity, step_count), m, v, count in updates:
        momentum.assign(m.astype("float32"))
        velocity.assign(v.astype("float32"))
        step_count.assign(count)
    if epoch is not None:
        step = int(epoch) * model.steps_per_epoch
        optimizer.iterations.assign(step)
        model.step.assign(step)


