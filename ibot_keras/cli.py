"""Command-line settings: every ``PretrainConfig`` field as an official-name flag, the
small-data defaults of the embedded digits, and the image source a command line names."""

import argparse
import dataclasses
import typing

import numpy as np

from ibot_keras import recipes
from ibot_keras.config import PretrainConfig
from ibot_keras.data.augment import to_pil
from ibot_keras.data.sources import ArraySource, ImageFolderSource, load_digits

# Small-data defaults for the embedded digits (official values are PretrainConfig's).
DIGITS_DEFAULTS = dict(
    arch="vit_tiny", patch_size=4, embed_dim=128, depth=4, num_heads=4, image_size=16,
    global_crop_size=16, local_crop_size=8, local_crops_number=0, out_dim=512, patch_out_dim=512,
    shared_head=True, norm_last_layer=True, head_hidden_dim=256, head_bottleneck_dim=64,
    batch_size=32, epochs=30, lr=2e-3, warmup_epochs=2, min_lr=1e-5, momentum_teacher=0.996,
    # A sharper, constant [CLS] teacher temperature (official 0.04 -> 0.07): with 0.04-0.07 the
    # CLS target goes uniform here and `cls` sits at ln(out_dim) (benchmarks/RESULTS.md).
    warmup_teacher_temp=0.02, teacher_temp=0.02, warmup_teacher_temp_epochs=5, drop_path=0.0,
    global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4), pred_ratio=(0.0, 0.3),
    pred_ratio_var=(0.0, 0.2), saveckp_freq=10, output_dir="runs/digits", num_workers=2,
    # Views for digits, not the official recipe: a mirrored, inverted (solarised) or recoloured
    # digit is another glyph, and a 2-px blur erases a 16-px one (official 0.1-2 px x ~16/224).
    flip_p=0.0, color_jitter_p=0.0, solarize_p=0.0, blur_radius=(0.0075, 0.15),
    koleo_loss_weight=1.0,  # not iBOT: DINOv2's KoLeo; +22 k-NN points here (benchmarks/RESULTS.md)
)


# The small-data recipe's training time on a slow machine: with start-up, compiling and the k-NN
# reports, a run of ~10,000 small images stays within 15 minutes (benchmarks/RESULTS.md).
DEFAULT_TIME_BUDGET_MINUTES = 10.0


def str2bool(value):
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_config_arguments(parser):
    """Add a ``--<field>`` flag (default ``None``: not given) for every ``PretrainConfig`` field,
    plus ``--batch_size_per_gpu``, ``--dataset`` and ``--official_defaults``."""
    for field in dataclasses.fields(PretrainConfig):
        kind = field.type
        args = typing.get_args(kind)
        if kind is bool:
            parser.add_argument(f"--{field.name}", type=str2bool, metavar="BOOL")
        elif typing.get_origin(kind) is tuple or (args and any(typing.get_origin(a) is tuple for a in args)):
            parser.add_argument(f"--{field.name}", type=float, nargs="+")
        elif args:  # Optional[...]
            inner = [a for a in args if a is not type(None)][0]
            parser.add_argument(f"--{field.name}", type=inner if inner in (int, float) else str)
        else:
            parser.add_argument(f"--{field.name}", type=kind)
    parser.add_argument("--batch_size_per_gpu", type=int, help="official name; times the device count")
    parser.add_argument("--dataset", default="digits", help="digits (embedded, default), or a keras.datasets "
                        "name (cifar10, cifar100, mnist, fashion_mnist; downloads)")
    parser.add_argument("--official_defaults", action="store_true",
                        help="start from the official defaults, not the digits ones")
    parser.add_argument("--time_budget_minutes", type=float, default=DEFAULT_TIME_BUDGET_MINUTES,
                        help="small-data recipe without --epochs: train fewer epochs than it chooses where a "
                        "measured step says they would take longer than this (0: no limit)")
    return parser


def default_settings(args, source=None):
    """The settings a command line starts from, and their name: the official ones
    (``--official_defaults``), the small-data recipe for an image folder of small data
    (``ibot_keras.recipes.small_data``), the official ones for other folders, else the digits'.
    ``source``: the ``--data_path`` folder already opened (``source_from_args``), not listed again."""
    if args.official_defaults:
        return {}, "the official defaults"
    if args.data_path:
        folder = source if source is not None else ImageFolderSource(args.data_path)
        size = max(to_pil(folder[0]).size) if len(folder) else 0
        if recipes.is_small_data(len(folder), size):
            values = recipes.small_data(len(folder), size, epochs=args.epochs or None,
                                        global_crop_size=args.global_crop_size, local_crop_size=args.local_crop_size)
            name = f"the small-data recipe for {len(folder)} images of {size} px (ibot_keras.recipes.small_data)"
            if not values["local_crops_number"]:
                name += (f"; no local crops: local_crop_size={values['local_crop_size']} is not a whole number "
                         f"of {values['patch_size']}-px patches")
            return values, name
        return {}, f"the official defaults ({len(folder)} images of {size} px is not small data)"
    return dict(DIGITS_DEFAULTS), "the digits defaults (ibot_keras.cli.DIGITS_DEFAULTS)"


def config_from_args(args, num_replicas=1, report=None, source=None):
    """The ``PretrainConfig`` of parsed flags: ``default_settings(args)``, then every flag given.
    Warm-ups not given are fitted to ``--epochs`` (``recipes.derive_warmups``: scaled with the
    run for the digits defaults, cut only where too long for the official ones). ``report``
    (e.g. ``print``) gets one line naming the settings used; ``source`` as in ``default_settings``."""
    values, name = default_settings(args, source)
    base_epochs = values.get("epochs")
    given = set()
    for field in dataclasses.fields(PretrainConfig):
        value = getattr(args, field.name)
        if value is not None:
            values[field.name] = value
            given.add(field.name)
    if args.batch_size_per_gpu:
        values["batch_size"] = args.batch_size_per_gpu * num_replicas
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    for field in ("epochs", "warmup_epochs", "warmup_teacher_temp_epochs", "pred_start_epoch"):
        values.setdefault(field, defaults[field])
    recipe = name.startswith("the small-data recipe")
    values = recipes.derive_warmups(values, given, base_epochs=None if recipe or not base_epochs else base_epochs)
    if report is not None:
        shown = ", ".join(f"{k}={values[k]}" for k in sorted(values) if k not in ("output_dir", "data_path"))
        report(f"settings: {name}{', then the flags given' if given else ''}: {shown}")
    return PretrainConfig(**values)


def uses_small_data_recipe(args, source=None):
    """True where ``default_settings`` starts from ``recipes.small_data``."""
    return default_settings(args, source)[1].startswith("the small-data recipe")


def fit_to_time_budget(args, config, source, previous_epochs=None, report=None):
    """``config``, or the same settings with fewer epochs (warm-ups refitted) where the run would
    train longer than ``--time_budget_minutes``: only for the small-data recipe with no
    ``--epochs`` given. The step is measured here (``recipes.measure_seconds_per_step``,
    compiling a throwaway model). ``previous_epochs``: the run in the output folder already
    chose, so a resumed run keeps its length and nothing is measured."""
    budget = float(getattr(args, "time_budget_minutes", 0) or 0)
    if budget <= 0 or args.epochs or not uses_small_data_recipe(args, source):
        return config
    if previous_epochs:
        epochs, why = int(previous_epochs), "as the run being resumed chose"
    else:
        steps_per_epoch = len(source) // config.batch_size
        seconds = recipes.measure_seconds_per_step(config, source)
        epochs = recipes.epochs_for_budget(config.epochs, 60 * budget, seconds, steps_per_epoch)
        why = (f"a step takes {seconds:.3f} s here (measured), so {config.epochs} epochs of {steps_per_epoch} steps "
               f"would train ~{config.epochs * steps_per_epoch * seconds / 60:.1f} min; "
               f"--time_budget_minutes {budget:g}")
    if epochs == config.epochs:
        if report is not None and not previous_epochs:
            report(f"time budget: {why}: all {epochs} epochs fit")
        return config
    # The recipe's warm-ups for a run of that length; nothing else it chooses depends on it.
    rebuilt = config_from_args(argparse.Namespace(**{**vars(args), "epochs": epochs}), source=source)
    fields = ("epochs", "warmup_epochs", "warmup_teacher_temp_epochs")
    budgeted = dataclasses.replace(config, **{name: getattr(rebuilt, name) for name in fields})
    if report is not None:
        report(f"time budget: {why}: training {epochs} epochs instead of {config.epochs} "
               f"(warmup_epochs={budgeted.warmup_epochs}, warmup_teacher_temp_epochs="
               f"{budgeted.warmup_teacher_temp_epochs}; --epochs N or --time_budget_minutes 0 to choose otherwise)")
    return budgeted


def source_from_args(args):
    """``--data_path`` (an image folder), else ``--dataset`` (the embedded digits, or a
    ``keras.datasets`` name, which downloads)."""
    if args.data_path:
        return ImageFolderSource(args.data_path)
    if args.dataset == "digits":
        images, labels = load_digits()
        return ArraySource(images, labels)
    import keras

    loader = getattr(keras.datasets, args.dataset, None)
    if loader is None:
        raise ValueError(f"Unknown --dataset {args.dataset!r}.")
    (images, labels), _ = loader.load_data()
    return ArraySource(images, np.asarray(labels).reshape(-1))
