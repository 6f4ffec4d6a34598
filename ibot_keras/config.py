"""``PretrainConfig`` (the official ``main_ibot.py`` arguments) and ``build_pretrainer``."""

import ast
import dataclasses
import json
import re
import typing
from typing import Optional, Tuple, Union

import keras

from ibot_keras.data.augment import check_view_recipe
from ibot_keras.models.vit import VIT_SIZES

_ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}


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
    - ``koleo_loss_weight`` (default 0): DINOv2's KoLeo regulariser on the student [CLS], an
      option that iBOT does not have (see ``IBOT``).
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
        self.arch = _ARCH_ALIASES.get(self.arch, self.arch)
        if self.arch not in VIT_SIZES:
            raise ValueError(f"arch={self.arch!r} is not supported; use one of {sorted(VIT_SIZES)}.")
        if self.optimizer != "adamw":
            raise ValueError(f"optimizer={self.optimizer!r} is not implemented; use 'adamw'.")
        for name in ("pred_ratio", "pred_ratio_var"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                value = tuple(float(v) for v in value)
                setattr(self, name, value[0] if len(value) == 1 else value)
        for name in ("global_crops_scale", "local_crops_scale", "blur_radius"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        rates = {name: getattr(self, name) for name in ("flip_p", "color_jitter_p", "grayscale_p", "solarize_p")}
        check_view_recipe(rates, self.blur_radius)
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1.")
        for name in ("image_size", "global_crop_size", "local_crop_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not a multiple of patch_size={self.patch_size}."
                )
        if not (self.shared_head or self.shared_head_teacher) and self.patch_out_dim < 1:
            raise ValueError("patch_out_dim must be >= 1.")
        if self.shared_head_teacher and not self.shared_head and self.patch_out_dim != self.out_dim:
            raise ValueError(
                f"shared_head=False with shared_head_teacher=True needs patch_out_dim == out_dim "
                f"(got {self.patch_out_dim} and {self.out_dim}): the shared teacher head has out_dim "
                "patch prototypes (the official code crashes here, issue #4). Set shared_head=True "
                "as the README recipes do, or patch_out_dim=out_dim."
            )
        if self.epochs < self.warmup_teacher_temp_epochs + self.pred_start_epoch:
            raise ValueError(
                f"epochs={self.epochs} must be at least warmup_teacher_temp_epochs "
                f"({self.warmup_teacher_temp_epochs}) + pred_start_epoch ({self.pred_start_epoch})."
            )
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}.")

    # -- derived values ---------------------------------------------------------------------
    @property
    def model_dims(self):
        """``(embed_dim, depth, num_heads)`` after overrides."""
        embed_dim, depth, num_heads = VIT_SIZES[self.arch]
        return (
            self.embed_dim or embed_dim,
            self.depth or depth,
            self.num_heads or num_heads,
        )

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
        """Build from a dict of official names; unknown keys raise when ``strict``."""
        values = dict(values)
        if "batch_size" not in values and "batch_size_per_gpu" in values:
            world = int(values.get("world_size", 1) or 1)
            values["batch_size"] = int(values["batch_size_per_gpu"]) * world
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if strict and unknown:
            raise ValueError(f"Unknown settings: {unknown}.")
        kwargs = {}
        for name, value in values.items():
            if name in fields:
                kwargs[name] = _coerce(value, fields[name].type)
        return cls(**kwargs)

    @classmethod
    def from_official_args(cls, path):
        """Read an official ``args.txt``: ``key: value`` lines (what ``main_ibot.py`` prints),
        an ``argparse.Namespace(...)`` repr, or JSON. Keys that have no counterpart here
        (``dist_url``, ``local_rank``, ...) are ignored; ``batch_size_per_gpu`` times
        ``world_size`` becomes ``batch_size``."""
        with open(path) as f:
            text = f.read().strip()
        return cls.from_dict(parse_official_args(text))


def parse_official_args(text):
    """Parse an official argument dump into a dict of Python values."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    if text.startswith("Namespace("):
        call = ast.parse(text, mode="eval").body
        return {kw.arg: _literal(ast.get_source_segment(text, kw.value)) for kw in call.keywords}
    values = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*[:=]\s*(.*?)\s*$", line)
        if match:
            values[match.group(1)] = _literal(match.group(2))
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


def _coerce(value, annotation):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        return None
    if origin is Union:
        non_none = [a for a in args if a is not type(None)]
        if isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
        for arg in non_none:
            if arg in (float, int, str, bool):
                return _coerce(value, arg)
        return value
    if origin is tuple:
        return tuple(float(v) for v in value)
    if annotation is bool:
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes", "on")
        return bool(value)
    if annotation in (int, float, str):
        return annotation(value)
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
