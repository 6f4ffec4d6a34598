"""``PretrainConfig``: the official ``main_ibot.py`` arguments, their checks and the reading of
official argument files. ``build_pretrainer`` is in ``ibot_keras.builder`` (also importable
from here); the field checks are in ``ibot_keras.config_checks``."""

import ast
import dataclasses
import difflib
import json
import os
import re
import warnings
from typing import Optional, Tuple, Union

from ibot_keras.backend_specific import set_random_seed  # noqa: F401 (its old import path)
from ibot_keras.config_checks import RULES, coerce, normalise
from ibot_keras.data.augment import check_view_recipe
from ibot_keras.masking import BlockMasking
from ibot_keras.models.head import SUPPORTED_ACTIVATIONS, SUPPORTED_NORMS  # noqa: F401 (old import path)
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
    - DINOv2-family options, off by default (``docs/training.md``): ``centering``
      ("ema" | "sinkhorn_knopp"), ``patch_normalization`` ("image" | "token"),
      ``pred_ratio_stratified`` and ``num_registers``.
    - ``remat`` (default False): the student's blocks recompute their activations in the
      backward pass instead of keeping them (``VisionTransformer(remat=True)``): the same
      values and gradients for less memory and a little more compute (``docs/training.md``).
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
    # DINOv2-family stabilisers (not in iBOT; the defaults are official)
    centering: str = "ema"  # or "sinkhorn_knopp" (teacher targets by Sinkhorn-Knopp, no center)
    patch_normalization: str = "image"  # or "token" (every masked patch of the batch weighs the same)
    pred_ratio_stratified: bool = False  # mask ratios stratified across each batch (DINOv2's collate)
    num_registers: int = 0  # register tokens in the ViT
    # Memory (not an official flag): the student's blocks recompute their activations in the backward
    remat: bool = False
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
    drop_path: float = 0.1  # the student's VisionTransformer(drop_path_rate): both names are official
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
            setattr(self, field.name, normalise(field.name, getattr(self, field.name), field.type))
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
        for name, rule in RULES.items():
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
            if name == "local_crop_size" and not self.local_crops_number:
                continue  # no local crops: their size is unused
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
        """Most patches ``BlockMasking`` can mask in one global crop with these ratios
        (``BlockMasking.max_masked_patches`` of the ``N`` patches of a global crop), at least 1."""
        masking = BlockMasking(self.pred_ratio, self.pred_ratio_var, pred_shape=self.pred_shape)
        return max(1, masking.max_masked_patches((self.global_crop_size // self.patch_size) ** 2))

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
    def small_data(cls, num_images, image_size, **overrides):
        """Settings for ``num_images`` images of about ``image_size`` px
        (``ibot_keras.recipes.small_data``), then ``overrides``; an ``epochs`` override also sets
        the recipe's warm-ups for that run length, crop-size overrides its patch and local crops."""
        from ibot_keras import recipes

        values = recipes.small_data(num_images, image_size, epochs=overrides.get("epochs"),
                                    global_crop_size=overrides.get("global_crop_size"),
                                    local_crop_size=overrides.get("local_crop_size"))
        return cls(**{**values, **overrides})

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
            per_gpu = coerce("batch_size_per_gpu", values.pop("batch_size_per_gpu"), int)
            world = values.pop("world_size", None)
            world = 1 if world is None else coerce("world_size", world, int)
            for name, value in (("batch_size_per_gpu", per_gpu), ("world_size", world)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"PretrainConfig.from_dict: {name}={value!r} must be an integer >= 1.")
            if "batch_size" in values and coerce("batch_size", values["batch_size"], int) != per_gpu * world:
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
        kwargs = {name: coerce(name, value, fields[name].type) for name, value in values.items() if name in fields}
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


def __getattr__(name):
    # build_pretrainer's old import path; ibot_keras.builder imports this module, so not at import time.
    if name == "build_pretrainer":
        from ibot_keras.builder import build_pretrainer

        return build_pretrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
