"""What a run directory holds: our checkpoint file names, ``checkpoint.json`` (the pointer to
the latest checkpoint) and the schedule settings it records, read and checked. Nothing here
writes; ``ibot_keras.resume`` writes and restores checkpoints.

Only files named like ours (``checkpoint-0003.weights.h5``, ``checkpoint-step00000009.weights.h5``,
kept copies ``checkpoint0003.weights.h5``) directly inside the directory count.
"""

import json
import os
import re

import keras
import numpy as np

POINTER = "checkpoint.json"

# The only files of a run directory that are ever read or deleted: the rolling checkpoint
# (what the pointer may name) and the kept copies. ASCII digits only, no path separators.
ROLLING_NAME = re.compile(r"checkpoint-(?:(?P<epochs>[0-9]{4,})|step(?P<step>[0-9]{8,}))\.weights\.h5")
KEPT_NAME = re.compile(r"checkpoint(?P<epochs>[0-9]{4,})\.weights\.h5")
CHECKPOINT_NAMES = "checkpoint-<epochs:04d>.weights.h5 or checkpoint-step<step:08d>.weights.h5"


class CorruptPointerError(ValueError):
    """``checkpoint.json`` is unreadable or lacks its entries (a fallback is possible)."""


def model_step(model):
    """The model's global step counter as a Python int (one host read)."""
    return int(keras.ops.convert_to_numpy(model.step))


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_files(directory, steps_per_epoch):
    """The checkpoint files of ours in ``directory``, newest first, as ``[(step, name)]``.

    Only regular files (no links) named like ours count; an epoch-boundary name counts
    ``epochs * steps_per_epoch`` steps, and at equal steps the rolling file comes before its
    kept copy.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = ROLLING_NAME.fullmatch(name) or KEPT_NAME.fullmatch(name)
        path = os.path.join(directory, name)
        if match is None or os.path.islink(path) or not os.path.isfile(path):
            continue
        step = match.groupdict().get("step")
        step = int(step) if step else int(match["epochs"]) * int(steps_per_epoch)
        found.append((step, match.re is ROLLING_NAME, name))
    return [(step, name) for step, _, name in sorted(found, reverse=True)]


def name_epochs(name):
    """The completed epochs an epoch-boundary file name of ours says (``checkpoint-0003...`` or
    the kept copy ``checkpoint0003...``: 3); None for a mid-epoch name or any other name."""
    match = ROLLING_NAME.fullmatch(name) or KEPT_NAME.fullmatch(name)
    if match is None or match.groupdict().get("step"):
        return None
    return int(match["epochs"])


def describe_checkpoint(name, step):
    """How messages name checkpoint file ``name`` taken at ``step``."""
    epochs = name_epochs(name)
    return f"{name}, at step {step}" if epochs is None else f"{name}, after epoch {epochs}"


def first_non_finite(model):
    """The path of the first model or optimizer variable holding a NaN or inf, else None."""
    variables = list(model.weights)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    for variable in variables:
        if keras.backend.is_float_dtype(variable.dtype):
            if not np.isfinite(np.asarray(keras.ops.convert_to_numpy(variable))).all():
                return variable.path
    return None


def _schedule_object(value):
    """A schedule as ``{"class": name, **config}``, a number as a float, else None."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return {"class": type(value).__name__, **value.get_config()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def schedule_settings(model):
    """The settings that shape the training schedules, as a flat ``{name: JSON value}``.

    ``epochs``, ``steps_per_epoch``, the teacher momentum, the teacher temperature schedules
    (``ibot_loss``), the optimizer's learning-rate schedule (a constant rate is a variable of
    the checkpoint itself), weight decay (``weight_decay_value`` of ``IBOTAdamW``) and
    ``freeze_steps``. Settings a model lacks are left out.
    """
    settings = {"epochs": getattr(model, "epochs", None), "steps_per_epoch": int(model.steps_per_epoch),
                "momentum_teacher": getattr(model, "momentum_teacher", None)}
    loss = getattr(model, "ibot_loss", None)
    for key in ("warmup_teacher_temp", "teacher_temp", "warmup_teacher_patch_temp", "teacher_patch_temp",
                "warmup_teacher_temp_epochs", "mim_start_epoch"):
        settings[f"ibot_loss.{key}"] = getattr(loss, key, None)
    optimizer = model.optimizer
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # under a LossScaleOptimizer
    if optimizer is not None:
        schedule = getattr(optimizer, "learning_rate_schedule", None)
        if schedule is not None:
            settings["optimizer.learning_rate"] = _schedule_object(schedule)
        else:
            learning_rate = optimizer.get_config().get("learning_rate")
            if isinstance(learning_rate, dict):  # a serialized schedule
                settings["optimizer.learning_rate"] = {"class": learning_rate.get("class_name"),
                                                       **learning_rate.get("config", {})}
        decay = getattr(optimizer, "weight_decay_value", getattr(optimizer, "weight_decay", None))
        settings["optimizer.weight_decay"] = _schedule_object(decay)
        settings["optimizer.freeze_steps"] = getattr(optimizer, "freeze_steps", None)
    flat = {}

    def flatten(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}.{key}", item)
        elif value is not None:
            flat[prefix] = value

    for key, value in settings.items():
        flatten(key, value)
    return json.loads(json.dumps(flat, default=repr))  # as it reads back from the pointer


def check_settings(pointer, model, directory):
    """Refuse (``ValueError``, naming each setting) a model whose ``steps_per_epoch`` or
    ``schedule_settings`` differ from those ``pointer`` recorded."""
    saved = pointer.get("steps_per_epoch")
    if saved is not None and int(saved) != int(model.steps_per_epoch):
        raise ValueError(
            f"The checkpoint in {directory} was written with steps_per_epoch={saved}, the model has "
            f"{model.steps_per_epoch}: the schedules would restart. Use the same data and batch size, or "
            "another output directory."
        )
    saved = pointer.get("schedule")
    if not isinstance(saved, dict):
        return  # a pointer from before the settings were recorded
    current = schedule_settings(model)
    differing = [
        f"{key}: checkpoint {saved[key]!r}, model {current[key]!r}" if key in current
        else f"{key}: checkpoint {saved[key]!r}, model has none"
        for key in sorted(saved) if current.get(key, ...) != saved[key]
    ]
    if differing:
        raise ValueError(
            f"The checkpoint in {directory} was written with other schedule settings ({'; '.join(differing)}): "
            "resuming would change the schedules mid-run. Build the model with the settings of that run, or "
            "train into another output directory."
        )


def read_pointer(directory):
    """``checkpoint.json`` of ``directory`` as a dict, None when there is none.

    Raises ``ValueError`` when it is unreadable or lacks ``weights``/``step``/``epoch``, and
    when ``weights`` is not the name of one of our checkpoint files in the directory itself.
    """
    path = os.path.join(directory, POINTER)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            pointer = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptPointerError(f"{path} is unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(pointer, dict) or "weights" not in pointer or not all(
        _is_count(pointer.get(key)) for key in ("step", "epoch")
    ):
        shown = sorted(pointer) if isinstance(pointer, dict) else type(pointer).__name__
        raise CorruptPointerError(
            f"{path} is not a checkpoint pointer (it needs 'weights', and 'step' and 'epoch' as counts; got {shown})"
        )
    weights = pointer["weights"]
    if not (isinstance(weights, str) and ROLLING_NAME.fullmatch(weights)):
        raise ValueError(
            f"{path} names weights={weights!r}, which is not a checkpoint file of ours ({CHECKPOINT_NAMES}, in "
            f"{directory} itself); that file is neither read nor deleted. Point it at a checkpoint file of "
            f"{directory}, or delete {POINTER} to restore the newest checkpoint file there."
        )
    return pointer
