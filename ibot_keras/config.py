"""``PretrainConfig`` (the official ``main_ibot.py`` arguments) and ``build_pretrainer``."""

import ast
import dataclasses
import difflib
import json
import math
import numbers
import os
import re
import typing
import warnings
from typing import Callable, NamedTuple, Optional, Tuple, Union

import keras
import numpy as np

from ibot_keras.data.augment import check_view_recipe
from ibot_keras.models.head import SUPPORTED_ACTIVATIONS, SUPPORTED_NORMS
from ibot_keras.models.vit import VIT_SIZES

_ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}

# main_ibot.py arguments (and keys its argument dump adds) with no counterpart here.
_OFFICIAL_NOT_IMPLEMENTED = {
    "window_size": "Swin only; only ViTs are implemented",
    "load_from": "not read: load an official checkpoint with ibot_keras.checkpoint.load_official",
    "dist_url": "torch.distributed; use keras.distribution or tf.distribute",
    "local_rank": "torch.distributed",
    "rank": "torch.distributed",
    "gpu": "torch.distributed",
    "world_size": "only used to turn batch_size_per_gpu into batch_size",
}
_TRUE = ("true", "1", "on")  # the official bool_flag's words, any case
_FALSE = ("false", "0", "off")


class _Rule(NamedTuple):
    test: Callable
    allowed: str
    problem: str = "is out of range"


def _why(why):
    return f" ({why})" if why else ""


def _at_least(low, why=None):
    return _Rule(lambda v: v >= low, f">= {low}{_why(why)}")


def _above(low, why=None):
    return _Rule(lambda v: v > low, f"> {low}{_why(why)}")


def _within(low, high, open_high=False, why=None):
    if open_high:
        return _Rule(lambda v: low <= v < high, f"in [{low}, {high}){_why(why)}")
    return _Rule(lambda v: low <= v <= high, f"in [{low}, {high}]{_why(why)}")


def _one_of(choices):
    return _Rule(lambda v: v in choices, f"one of {choices}", "is not supported")


def _fractions(why):
    """A number in [0, 1), or a tuple of them."""
    entries = lambda v: v if isinstance(v, tuple) else (v,)  # noqa: E731
    return _Rule(lambda v: all(0 <= x < 1 for x in entries(v)), f"in [0, 1) ({why}; for a tuple, every entry)")


_TEMPERATURE = _above(0, "a temperature divides the logits")
_LOSS_WEIGHT = _at_least(0, "a loss weight")
_MASK_RATIO = _fractions("a fraction of the patches")
_CROP_SCALE = _Rule(
    lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
    "(low, high) with 0 < low <= high <= 1 (fractions of the image area)",
)
_FROM_ARCH = _at_least(1, "None takes the value from arch")

# Range of every field with one. Types come from the annotations (``_normalise``); ``arch``,
# ``optimizer``, the view rates and ``blur_radius`` have their own checks in ``validate``.
_RULES = {
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


@dataclasses.dataclass
class PretrainConfig:
    """iBOT pretraining settings under the official argument names, with official defaults.

    Differences from ``main_ibot.py``:
    - ``batch_size`` is the **global** batch (official: ``batch_size_per_gpu`` x world size);
      the peak learning rate is ``lr * batch_size / 256`` as in the official code.
    - ``use_fp16`` defaults to False (float32), since this library also targets CPUs. True
      builds the model under Keras' ``mixed_float16`` policy (float16 compute, float32
      variables, dynamic loss scaling), the counterpart of the official autocast + GradScaler;
      for bfloat16 set ``keras.config.set_dtype_policy("mixed_bfloat16")`` before building.
    - Explicit size overrides: ``embed_dim``, ``depth``, ``num_heads`` (default: from ``arch``),
      ``head_hidden_dim``/``head_bottleneck_dim``/``head_nlayers`` (official 2048/256/3),
      ``image_size`` (position-table size), ``global_crop_size``/``local_crop_size``.
    - Only ViTs (no Swin) and the ``adamw`` optimizer are implemented.
    - Every field is checked at construction (``validate``): its type (a bool must be a bool,
      an int may be given as a whole float, NaN and inf are refused) and its range, with a
      ``TypeError``/``ValueError`` naming the field, the value and what is allowed.
    - ``koleo_loss_weight`` (default 0): DINOv2's KoLeo regulariser on the student [CLS], an
      option that iBOT does not have (see ``IBOT``).
    - Steps with a non-finite loss or gradients are skipped and counted (``IBOT``);
      ``max_consecutive_skips`` (default 25, 0 = never) stops training after that many in a
      row. The official loop trains on with NaN weights.
    - View-recipe knobs, default the official recipe: ``flip_p``, ``color_jitter_p``,
      ``grayscale_p``, ``solarize_p`` (second and later global crops) and ``blur_radius``
      (pixels; official (0.1, 2.0), meant for 224/96-px crops). See ``MultiCropAugmentation``.
    """

    # Model
    arch: str = "vit_small"
    patch_size: int = 16
    out_dim: int = 8192
    patch_out_dim: int = 8192
    shared_head: bool = False
    shared_head_teacher: bool = True
    norm_last_layer: bool = True
    momentum_teacher: float = 0.996
    norm_in_head: Optional[str] = None
    act_in_head: str = "gelu"
    use_masked_im_modeling: bool = True
    # Masking and loss weights
    pred_ratio: Union[float, Tuple[float, ...]] = 0.3
    pred_ratio_var: Union[float, Tuple[float, ...]] = 0.0
    pred_shape: str = "block"
    pred_start_epoch: int = 0
    lambda1: float = 1.0
    lambda2: float = 1.0
    koleo_loss_weight: float = 0.0  # DINOv2's KoLeo on the student [CLS]; not in iBOT (0 = official)
    # Temperatures
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    # Optimisation
    use_fp16: bool = False
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    batch_size: int = 128
    epochs: int = 100
    freeze_last_layer: int = 1
    lr: float = 5e-4
    warmup_epochs: int = 10
    min_lr: float = 1e-6
    optimizer: str = "adamw"
    drop_path: float = 0.1
    # Crops
    global_crops_number: int = 2
    global_crops_scale: Tuple[float, float] = (0.14, 1.0)
    local_crops_number: int = 0
    local_crops_scale: Tuple[float, float] = (0.05, 0.4)
    # View recipe (not official flags; defaults are the official DataAugmentationiBOT)
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    solarize_p: float = 0.2
    blur_radius: Tuple[float, float] = (0.1, 2.0)
    # Misc
    data_path: Optional[str] = None
    output_dir: str = "."
    saveckp_freq: int = 40
    seed: int = 0
    num_workers: int = 10
    # Reliability (not an official flag): stop after this many non-finite steps in a row (0: never)
    max_consecutive_skips: int = 25
    # Explicit sizes (not official flags)
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    image_size: int = 224
    global_crop_size: int = 224
    local_crop_size: int = 96

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Normalise every field to its annotated type and check its range and the settings
        that must agree; raises ``TypeError``/``ValueError`` naming the field. Runs at
        construction (and in ``dataclasses.replace``); call it again after changing a field."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, _normalise(field.name, getattr(self, field.name), field.type))
        self.arch = _ARCH_ALIASES.get(self.arch, self.arch)
        if self.arch not in VIT_SIZES:
            raise ValueError(
                f"PretrainConfig.arch={self.arch!r} is not supported; use one of {sorted(VIT_SIZES)} "
                "(or deit_tiny/deit_small)."
            )
        if self.optimizer != "adamw":
            raise ValueError(f"PretrainConfig.optimizer={self.optimizer!r} is not implemented; use 'adamw'.")
        rates = {name: getattr(self, name) for name in ("flip_p", "color_jitter_p", "grayscale_p", "solarize_p")}
        check_view_recipe(rates, self.blur_radius)
        for name, rule in _RULES.items():
            value = getattr(self, name)
            if value is not None and not rule.test(value):
                raise ValueError(f"PretrainConfig.{name}={value!r} {rule.problem}: must be {rule.allowed}.")
        self._check_together()

    def _check_together(self):
        """Settings that must agree with each other."""
        ratios = self.pred_ratio if isinstance(self.pred_ratio, tuple) else (self.pred_ratio,)
        variances = self.pred_ratio_var
        if isinstance(variances, tuple) and len(variances) != len(ratios):
            raise ValueError(
                f"PretrainConfig.pred_ratio_var={variances} has {len(variances)} entries but "
                f"pred_ratio={self.pred_ratio} has {len(ratios)}: give one variation per ratio, or one number."
            )
        if not isinstance(variances, tuple):
            variances = (variances,) * len(ratios)
        for ratio, var in zip(ratios, variances):
            if ratio - var < 0 or ratio + var > 1:
                raise ValueError(
                    f"PretrainConfig.pred_ratio={self.pred_ratio} with pred_ratio_var={self.pred_ratio_var}: "
                    f"each ratio r and its variation v need 0 <= r - v and r + v <= 1 (the masked "
                    f"fraction is drawn from U(r - v, r + v)); got r={ratio}, v={var}."
                )
        for name in ("image_size", "global_crop_size", "local_crop_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(
                    f"PretrainConfig.{name}={getattr(self, name)} is not a multiple of "
                    f"patch_size={self.patch_size}: sizes must be whole numbers of patches."
                )
        embed_dim, _, num_heads = self.model_dims
        if embed_dim % num_heads:
            raise ValueError(
                f"PretrainConfig: embed_dim={embed_dim} is not divisible by num_heads={num_heads} "
                f"(arch={self.arch!r}, overrides embed_dim={self.embed_dim}, num_heads={self.num_heads}): "
                "each attention head takes embed_dim / num_heads channels."
            )
        if self.global_crops_number == 1 and self.local_crops_number == 0:
            raise ValueError(
                "PretrainConfig: global_crops_number=1 with local_crops_number=0 leaves the [CLS] loss "
                "without a pair of views; use global_crops_number=2 (official) or add local crops."
            )
        if self.shared_head_teacher and not self.shared_head and self.patch_out_dim != self.out_dim:
            raise ValueError(
                f"shared_head=False with shared_head_teacher=True needs patch_out_dim == out_dim "
                f"(got {self.patch_out_dim} and {self.out_dim}): the shared teacher head has out_dim "
                "patch prototypes (the official code crashes here, issue #4). Set shared_head=True "
                "as the README recipes do, or patch_out_dim=out_dim."
            )
        if self.epochs < self.warmup_teacher_temp_epochs + self.pred_start_epoch:
            raise ValueError(
                f"PretrainConfig.epochs={self.epochs} must be at least warmup_teacher_temp_epochs "
                f"({self.warmup_teacher_temp_epochs}) + pred_start_epoch ({self.pred_start_epoch})."
            )
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"PretrainConfig.warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}."
            )

    # -- derived values ---------------------------------------------------------------------
    @property
    def model_dims(self):
        """``(embed_dim, depth, num_heads)``: the overrides, or ``arch``'s value where None."""
        defaults = VIT_SIZES[self.arch]
        overrides = (self.embed_dim, self.depth, self.num_heads)
        return tuple(d if o is None else o for o, d in zip(overrides, defaults))

    @property
    def loss_patch_out_dim(self):
        """Patch prototypes: ``out_dim`` when either head is shared (official ``same_dim``)."""
        return self.out_dim if (self.shared_head or self.shared_head_teacher) else self.patch_out_dim

    @property
    def max_masked_patches(self):
        """Most patches ``BlockMasking`` can mask in one global crop with these ratios:
        ``floor(max(pred_ratio + pred_ratio_var) * N)`` (block masks stay below the target,
        ``rand`` masks take ``int`` of it)."""
        ratios = self.pred_ratio if isinstance(self.pred_ratio, tuple) else (self.pred_ratio,)
        variances = self.pred_ratio_var
        if not isinstance(variances, tuple):
            variances = (variances,) * len(ratios)
        highest = max(r + v for r, v in zip(ratios, variances))
        num_patches = (self.global_crop_size // self.patch_size) ** 2
        return min(num_patches, max(1, int(highest * num_patches)))

    @property
    def scaled_lr(self):
        """Peak learning rate, ``lr * batch_size / 256`` (linear scaling rule)."""
        return self.lr * self.batch_size / 256.0

    # -- I/O --------------------------------------------------------------------------------
    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values, strict=False):
        """Build from a dict of official names; text values (``"true"``, ``"40"``) are parsed.

        ``batch_size_per_gpu`` times ``world_size`` (default 1) becomes ``batch_size``. Keys
        that are not fields raise a ``ValueError`` when ``strict``; otherwise one warning names
        them (with the closest field name) and the official ``main_ibot.py`` arguments that are
        not implemented here (``dist_url``, ``window_size``, ...), which are always ignored.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dict(values)
        if "batch_size_per_gpu" in values:
            per_gpu = _coerce("batch_size_per_gpu", values.pop("batch_size_per_gpu"), int)
            world = values.pop("world_size", None)
            world = 1 if world is None else _coerce("world_size", world, int)
            for name, value in (("batch_size_per_gpu", per_gpu), ("world_size", world)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"PretrainConfig.from_dict: {name}={value!r} must be an integer >= 1.")
            if "batch_size" in values and _coerce("batch_size", values["batch_size"], int) != per_gpu * world:
                raise ValueError(
                    f"PretrainConfig.from_dict: batch_size={values['batch_size']!r} disagrees with "
                    f"batch_size_per_gpu={per_gpu} x world_size={world}; give one of them."
                )
            values["batch_size"] = per_gpu * world
        unknown = sorted(k for k in values if k not in fields and k not in _OFFICIAL_NOT_IMPLEMENTED)
        official = sorted(k for k in values if k in _OFFICIAL_NOT_IMPLEMENTED)
        if unknown:
            known = sorted(fields) + ["batch_size_per_gpu", "world_size"]
            names = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                names.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            if strict:
                raise ValueError(
                    f"PretrainConfig.from_dict: unknown setting(s) {', '.join(names)}. The known "
                    "names are the PretrainConfig fields, batch_size_per_gpu and world_size."
                )
        if unknown or official:
            parts = []
            if unknown:
                parts.append(
                    f"ignored unknown setting(s) {', '.join(names)} (strict=True makes this an error)."
                )
            if official:
                listed = ", ".join(f"{k}={values[k]!r} ({_OFFICIAL_NOT_IMPLEMENTED[k]})" for k in official)
                parts.append(f"ignored official main_ibot.py argument(s) not implemented here: {listed}.")
            warnings.warn("PretrainConfig.from_dict " + " It also ".join(parts), UserWarning, stacklevel=2)
        kwargs = {name: _coerce(name, value, fields[name].type) for name, value in values.items() if name in fields}
        return cls(**kwargs)

    @classmethod
    def from_official_args(cls, path, strict=False):
        """Read an official ``args.txt``: ``key: value`` lines (what ``main_ibot.py`` prints),
        an ``argparse.Namespace(...)`` repr, or JSON, through ``from_dict`` (``strict``, the
        warning on keys that are not fields, and ``batch_size_per_gpu`` x ``world_size``)."""
        with open(path) as f:
            text = f.read().strip()
        try:
            values = parse_official_args(text)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from error
        return cls.from_dict(values, strict=strict)


def parse_official_args(text):
    """Parse an official argument dump into a dict of Python values (``True``/``False``/``None``
    in any case; other text that is not a Python literal stays a string)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"The arguments file looks like JSON but is not valid JSON: {error}.") from None
    if text.startswith("Namespace("):
        call = ast.parse(text, mode="eval").body
        return {kw.arg: _literal(ast.get_source_segment(text, kw.value)) for kw in call.keywords}
    values = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*[:=]\s*(.*?)\s*$", line)
        if not match:
            continue
        key, raw = match.groups()
        # main_ibot.py prints "git:\n  sha: ..., status: ..., branch: ..." before the arguments.
        if (key == "git" and not raw) or (key == "sha" and "branch:" in raw):
            continue
        values[key] = _literal(raw)
    if not values:
        raise ValueError("No 'key: value' lines, Namespace(...) or JSON found in the arguments file.")
    return values


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered == "none":
            return None
        return text


def _describe(annotation):
    """What a field of this annotation takes, for error messages."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Union and type(None) in args:
        return _describe(next(a for a in args if a is not type(None))) + " or None"
    if typing.get_origin(annotation) is Union:
        return "a finite number or a tuple of finite numbers"
    if typing.get_origin(annotation) is tuple:
        return "a (low, high) pair of finite numbers"
    return {bool: "a bool (True or False)", int: "an integer", float: "a finite number", str: "a string"}[annotation]


def _normalise(name, value, annotation):
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
                raise ValueError(f"PretrainConfig.{name}={number!r} is not allowed: must be {_describe(annotation)}.")
            if annotation is float:
                return number
            if isinstance(value, numbers.Integral) or number.is_integer():
                return int(value)
            raise ValueError(f"PretrainConfig.{name}={value!r} is not a whole number: must be an integer.")
    elif isinstance(value, (list, tuple, np.ndarray)):  # a pair, or a float or a tuple of floats
        items = tuple(_normalise(name, v, float) for v in value)
        if typing.get_origin(annotation) is tuple:
            return items
        if not items:
            raise ValueError(f"PretrainConfig.{name}=() is empty: must be {_describe(annotation)}.")
        return items[0] if len(items) == 1 else items
    elif typing.get_origin(annotation) is Union and isinstance(value, numbers.Real):
        return _normalise(name, value, float)
    raise TypeError(
        f"PretrainConfig.{name}={value!r} ({type(value).__name__}) is not allowed: must be "
        f"{_describe(annotation)}{problem or ''}."
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


def _coerce(name, value, annotation):
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
            return _coerce(name, value, non_none[0])
        annotation = Tuple[float, ...]  # a float or a tuple of floats: a scalar stays one
        if isinstance(value, str):
            value = _sequence_text(name, value)
        if not isinstance(value, (list, tuple)):
            return _coerce(name, value, float)
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, str):
            value = _sequence_text(name, value)
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(name, v, float) for v in value)
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


def set_random_seed(seed):
    """``keras.utils.set_random_seed`` (Python, NumPy, Keras and backend seeds) without
    importing TensorFlow into a JAX or PyTorch process.

    Keras' version also seeds TensorFlow whenever it is installed, which imports it: ~400 MB of
    resident memory and seconds of start-up for a user who never runs TensorFlow. When another
    backend is selected and TensorFlow is not imported yet, it is hidden from that one call.
    """
    import sys

    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    try:
        from keras.src.utils import module_utils

        lazy_tensorflow = module_utils.tensorflow
        previous = lazy_tensorflow._available
    except (ImportError, AttributeError):  # another Keras layout: accept the import
        keras.utils.set_random_seed(seed)
        return
    lazy_tensorflow._available = False
    try:
        keras.utils.set_random_seed(seed)
    finally:
        lazy_tensorflow._available = previous


def build_pretrainer(config, steps_per_epoch, jit_compile="auto", seed=None):
    """A compiled ``IBOT`` for ``config`` with official schedules, ready for ``fit``.

    Sets the random seeds to ``config.seed`` (as the official ``fix_random_seeds``; see
    ``set_random_seed``) unless ``seed=False``. ``config.use_fp16`` builds under the
    ``mixed_float16`` policy (the global policy is restored afterwards); otherwise the model
    takes the global policy. ``steps_per_epoch`` is the number of batches per epoch: lr, weight
    decay and teacher momentum are per-iteration schedules over ``epochs * steps_per_epoch``
    and the teacher temperatures change per epoch.
    """
    if isinstance(config, dict):
        config = PretrainConfig.from_dict(config)
    if not config.use_fp16:
        return _build_pretrainer(config, steps_per_epoch, jit_compile, seed)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        return _build_pretrainer(config, steps_per_epoch, jit_compile, seed)
    finally:
        keras.config.set_dtype_policy(previous)


def _build_pretrainer(config, steps_per_epoch, jit_compile, seed):
    from ibot_keras.losses import IBOTLoss
    from ibot_keras.models.head import IBOTHead
    from ibot_keras.models.ibot import IBOT
    from ibot_keras.models.vit import VisionTransformer
    from ibot_keras.optimizers import IBOTAdamW
    from ibot_keras.schedules import CosineSchedule

    if seed is not False:
        set_random_seed(config.seed if seed is None else seed)
    steps_per_epoch = int(steps_per_epoch)
    embed_dim, depth, num_heads = config.model_dims
    vit_kwargs = dict(
        patch_size=config.patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        image_size=config.image_size,
    )
    student_backbone = VisionTransformer(
        drop_path_rate=config.drop_path,
        use_mask_token=config.use_masked_im_modeling,
        seed=config.seed,
        name="student_backbone",
        **vit_kwargs,
    )
    teacher_backbone = VisionTransformer(name="teacher_backbone", **vit_kwargs)
    head_kwargs = dict(
        out_dim=config.out_dim,
        patch_out_dim=config.patch_out_dim,
        hidden_dim=config.head_hidden_dim,
        bottleneck_dim=config.head_bottleneck_dim,
        num_layers=config.head_nlayers,
        norm=config.norm_in_head,
        act=config.act_in_head,
        in_dim=embed_dim,
    )
    student_head = IBOTHead(
        norm_last_layer=config.norm_last_layer,
        shared_head=config.shared_head,
        name="student_head",
        **head_kwargs,
    )
    # As in main_ibot.py the teacher head keeps the default norm_last_layer=True.
    teacher_head = IBOTHead(
        norm_last_layer=True,
        shared_head=config.shared_head_teacher,
        name="teacher_head",
        **head_kwargs,
    )
    loss = IBOTLoss(
        out_dim=config.out_dim,
        patch_out_dim=config.loss_patch_out_dim,
        num_global_crops=config.global_crops_number,
        num_local_crops=config.local_crops_number,
        warmup_teacher_temp=config.warmup_teacher_temp,
        teacher_temp=config.teacher_temp,
        warmup_teacher_patch_temp=config.warmup_teacher_patch_temp,
        teacher_patch_temp=config.teacher_patch_temp,
        warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
        epochs=config.epochs,
        lambda1=config.lambda1,
        lambda2=config.lambda2,
        mim_start_epoch=config.pred_start_epoch,
        name="ibot_loss",
    )
    model = IBOT(
        student_backbone,
        student_head,
        teacher_backbone,
        teacher_head,
        loss,
        steps_per_epoch=steps_per_epoch,
        momentum_teacher=config.momentum_teacher,
        max_masked_patches=config.max_masked_patches,
        koleo_loss_weight=config.koleo_loss_weight,
        global_crop_size=config.global_crop_size,
        max_consecutive_skips=config.max_consecutive_skips,
        name="ibot",
    )
    optimizer = IBOTAdamW(
        learning_rate=CosineSchedule(
            config.scaled_lr, config.min_lr, config.epochs, steps_per_epoch, config.warmup_epochs
        ),
        weight_decay=CosineSchedule(
            config.weight_decay, config.weight_decay_end, config.epochs, steps_per_epoch
        ),
        clip_grad=config.clip_grad,
        freeze_steps=config.freeze_last_layer * steps_per_epoch,
    )
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    return model
