"""``PretrainConfig``'s checks: the range of every field (``RULES``), the type normalisation of
a value (``normalise``) and the reading of text values (``coerce``). Each raises a
``TypeError``/``ValueError`` naming ``PretrainConfig.<field>``, the value and what is allowed."""

import ast
import math
import numbers
import os
import re
import typing
from typing import Callable, NamedTuple, Tuple, Union

import numpy as np

from ibot_keras.losses import CENTERINGS, PATCH_NORMALIZATIONS
from ibot_keras.models.head import SUPPORTED_ACTIVATIONS, SUPPORTED_NORMS

_TRUE = ("true", "1", "on")  # the official bool_flag's words, any case
_FALSE = ("false", "0", "off")


class Rule(NamedTuple):
    """A range check: ``test(value)`` is True when allowed; ``allowed`` says what is."""

    test: Callable
    allowed: str
    problem: str = "is out of range"


def _why(why):
    return f" ({why})" if why else ""


def _at_least(low, why=None):
    return Rule(lambda v: v >= low, f">= {low}{_why(why)}")


def _above(low, why=None):
    return Rule(lambda v: v > low, f"> {low}{_why(why)}")


def _within(low, high, open_high=False, why=None):
    if open_high:
        return Rule(lambda v: low <= v < high, f"in [{low}, {high}){_why(why)}")
    return Rule(lambda v: low <= v <= high, f"in [{low}, {high}]{_why(why)}")


def _one_of(choices):
    return Rule(lambda v: v in choices, f"one of {choices}", "is not supported")


def _fractions(why):
    """A number in [0, 1), or a tuple of them."""
    entries = lambda v: v if isinstance(v, tuple) else (v,)  # noqa: E731
    return Rule(lambda v: all(0 <= x < 1 for x in entries(v)), f"in [0, 1) ({why}; for a tuple, every entry)")


_TEMPERATURE = _above(0, "a temperature divides the logits")
_LOSS_WEIGHT = _at_least(0, "a loss weight")
_MASK_RATIO = _fractions("a fraction of the patches")
_CROP_SCALE = Rule(
    lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
    "(low, high) with 0 < low <= high <= 1 (fractions of the image area)",
)
_FROM_ARCH = _at_least(1, "None takes the value from arch")

# Range of every field with one. Types come from the annotations (``normalise``); ``arch``,
# ``optimizer``, the view rates and ``blur_radius`` have their own checks in ``PretrainConfig.validate``.
RULES = {
    "patch_size": _at_least(1),
    "out_dim": _at_least(1),
    "patch_out_dim": _at_least(1),
    "momentum_teacher": _within(0, 1, why="the teacher is m * teacher + (1 - m) * student"),
    "norm_in_head": _one_of(SUPPORTED_NORMS),
    "act_in_head": _one_of(SUPPORTED_ACTIVATIONS),
    "pred_ratio": _MASK_RATIO,
    "pred_ratio_var": _MASK_RATIO,
    "pred_shape": _one_of(("block", "rand")),
    "pred_start_epoch": _at_least(0),
    "lambda1": _LOSS_WEIGHT,
    "lambda2": _LOSS_WEIGHT,
    "koleo_loss_weight": _LOSS_WEIGHT,
    "centering": _one_of(CENTERINGS),
    "patch_normalization": _one_of(PATCH_NORMALIZATIONS),
    "num_registers": _at_least(0),
    "warmup_teacher_temp": _TEMPERATURE,
    "teacher_temp": _TEMPERATURE,
    "warmup_teacher_patch_temp": _TEMPERATURE,
    "teacher_patch_temp": _TEMPERATURE,
    "warmup_teacher_temp_epochs": _at_least(0),
    "weight_decay": _at_least(0),
    "weight_decay_end": _at_least(0),
    "clip_grad": _at_least(0, "0 turns clipping off"),
    "batch_size": _at_least(1),
    "epochs": _at_least(1),
    "freeze_last_layer": _at_least(0, "epochs"),
    "lr": _at_least(0),
    "warmup_epochs": _at_least(0),
    "min_lr": _at_least(0),
    "drop_path": _within(0, 1, open_high=True, why="a stochastic-depth drop rate"),
    "global_crops_number": _at_least(1),
    "global_crops_scale": _CROP_SCALE,
    "local_crops_number": _at_least(0),
    "local_crops_scale": _CROP_SCALE,
    "saveckp_freq": _at_least(0, "0 keeps only the latest checkpoint"),
    "seed": _within(0, 2**32 - 1, why="a NumPy seed"),
    "num_workers": _at_least(0),
    "max_consecutive_skips": _at_least(0, "0 never stops"),
    "embed_dim": _FROM_ARCH,
    "depth": _FROM_ARCH,
    "num_heads": _FROM_ARCH,
    "head_hidden_dim": _at_least(1),
    "head_bottleneck_dim": _at_least(1),
    "head_nlayers": _at_least(1),
    "image_size": _at_least(1),
    "global_crop_size": _at_least(1),
    "local_crop_size": _at_least(1),
}


def describe_type(annotation):
    """What a field of this annotation takes, for error messages."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Union and type(None) in args:
        return describe_type(next(a for a in args if a is not type(None))) + " or None"
    if typing.get_origin(annotation) is Union:
        return "a finite number or a tuple of finite numbers"
    if typing.get_origin(annotation) is tuple:
        return "a (low, high) pair of finite numbers"
    return {bool: "a bool (True or False)", int: "an integer", float: "a finite number", str: "a string"}[annotation]


def normalise(name, value, annotation):
    """``value`` as the type of the field ``name`` (an int, a float, a tuple of floats, ...),
    refusing NaN, inf, bools given as numbers and anything else that is not that type."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Union and type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    problem = None
    if annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, str):
            problem = "; text is parsed by PretrainConfig.from_dict, not by the constructor"
    elif annotation is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    elif annotation in (int, float):
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ValueError(
                    f"PretrainConfig.{name}={number!r} is not allowed: must be {describe_type(annotation)}."
                )
            if annotation is float:
                return number
            if isinstance(value, numbers.Integral) or number.is_integer():
                return int(value)
            raise ValueError(f"PretrainConfig.{name}={value!r} is not a whole number: must be an integer.")
    elif isinstance(value, (list, tuple, np.ndarray)):  # a pair, or a float or a tuple of floats
        items = tuple(normalise(name, v, float) for v in value)
        if typing.get_origin(annotation) is tuple:
            return items
        if not items:
            raise ValueError(f"PretrainConfig.{name}=() is empty: must be {describe_type(annotation)}.")
        return items[0] if len(items) == 1 else items
    elif typing.get_origin(annotation) is Union and isinstance(value, numbers.Real):
        return normalise(name, value, float)
    raise TypeError(
        f"PretrainConfig.{name}={value!r} ({type(value).__name__}) is not allowed: must be "
        f"{describe_type(annotation)}{problem or ''}."
    )


def _sequence_text(name, text):
    """``"0.25 1"``, ``"0.25,1"``, ``"[0.25, 1]"`` or ``"(0.25, 1.0)"`` as a list of strings/values."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        items = [t for t in re.split(r"[\s,]+", text.strip().strip("[]()")) if t]
        if not items:
            raise ValueError(f"PretrainConfig.from_dict: {name}={text!r} is empty.") from None
        return items


def coerce(name, value, annotation):
    """``value`` read as the field ``name``'s type when it is text (or 0/1 for a bool); other
    values are left to ``PretrainConfig``'s checks. Raises ``ValueError`` naming ``name``."""
    if value is None:
        return None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Union:
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            if isinstance(value, str) and value.strip().lower() == "none":
                return None
            return coerce(name, value, non_none[0])
        annotation = Tuple[float, ...]  # a float or a tuple of floats: a scalar stays one
        if isinstance(value, str):
            value = _sequence_text(name, value)
        if not isinstance(value, (list, tuple)):
            return coerce(name, value, float)
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, str):
            value = _sequence_text(name, value)
        if isinstance(value, (list, tuple)):
            return tuple(coerce(name, v, float) for v in value)
        return value
    if annotation is bool:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE + _FALSE:
                return lowered in _TRUE
            raise ValueError(
                f"PretrainConfig.from_dict: {name}={value!r} is not a boolean: use true or false "
                "(any case; 1/0 and on/off are read too)."
            )
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        return value
    if annotation in (int, float) and isinstance(value, str):
        try:
            return int(value) if annotation is int else float(value)
        except ValueError:
            pass
        try:
            return float(value)  # "3.0" for an int: PretrainConfig takes whole numbers only
        except ValueError:
            kind = "an integer" if annotation is int else "a number"
            raise ValueError(f"PretrainConfig.from_dict: {name}={value!r} cannot be read as {kind}.") from None
    if annotation is str and isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value)
    return value
