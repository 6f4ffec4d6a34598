"""Convert checkpoints: ``python -m ibot_keras.convert SRC DST [options]``.

SRC: an official iBOT training checkpoint (``checkpoint.pth``), a backbone state dict (official
``checkpoint_teacher.pth``, DINO ``dino_vitsmall16_pretrain.pth``, timm, or one written here) as
``.pth``/``.npz``/``.safetensors``, or a ``.keras`` file of a ``VisionTransformer`` or ``IBOT``.
DST by suffix:

* ``.pth`` / ``.npz`` / ``.safetensors``: the backbone state dict in the official/timm layout
  (``--part all``: the whole training state, student + teacher + centers, official names);
* ``.keras``: our ``VisionTransformer`` (``--keras_hub``: a ``keras_hub.models.ViTBackbone``
  for ``--image_size`` inputs).

Examples::

    python -m ibot_keras.convert checkpoint.pth teacher_backbone.safetensors
    python -m ibot_keras.convert dino_vitsmall16_pretrain.pth vits16.keras --image_size 384
    python -m ibot_keras.convert vits16.keras vits16_hub.keras --keras_hub --image_size 224

On any failure (a bad path, format or option, a file that cannot be read) it prints one line,
``convert: error: <what is wrong>``, and exits with code 2.
"""

import argparse
import pathlib
import sys

from ibot_keras.weights.files import WeightsFileError, check_file, file_format, read_state, write_state
from ibot_keras.weights.official import backbone_from_official, export_official, save_official


def _load_keras(path, part):
    import keras

    from ibot_keras.models.ibot import IBOT
    from ibot_keras.models.vit import VisionTransformer

    check_file(path, ".keras")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise WeightsFileError(path, ".keras", f"Keras could not load it ({detail}).") from error
    if isinstance(model, IBOT):
        if part == "all":
            return model
        return model.teacher_backbone if part == "teacher" else model.student_backbone
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"'{path}' holds a {type(model).__name__}; convert reads a VisionTransformer or an IBOT model."
        )
    return model


def _check_arguments(src, dst, part, num_heads, image_size, keras_hub):
    """Refuse bad paths and options before any file is read."""
    if src.suffix != ".keras":
        file_format(src)
    if dst.suffix != ".keras":
        file_format(dst)
        if keras_hub:
            raise ValueError(f"--keras_hub writes a .keras file; DST '{dst}' is not one.")
    elif part == "all" and src.suffix != ".keras":
        raise ValueError("--part all converts between state-dict files; a .keras DST holds one backbone.")
    for name, value in (("--num_heads", num_heads), ("--image_size", image_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}.")
    if src.resolve() == dst.resolve():
        raise ValueError("SRC and DST are the same file.")
    if not src.is_file():
        raise FileNotFoundError(f"SRC '{src}' " + ("is a directory." if src.is_dir() else "does not exist."))


def convert(src, dst, *, part="teacher", num_heads=None, image_size=None, keras_hub=False, include_mask_token=True, strict=True):
    """Convert ``src`` to ``dst`` (formats from the suffixes; see the module docstring)."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    _check_arguments(src, dst, part, num_heads, image_size, keras_hub)
    if src.suffix == ".keras":
        model = _load_keras(src, part)
    elif part == "all":
        state = read_state(src)
        model = None
    else:
        model = backbone_from_official(
            src, part=part, num_heads=num_heads, image_size=image_size, strict=strict
        )

    if dst.suffix == ".keras":
        if keras_hub:
            from ibot_keras.weights.keras_hub import to_keras_hub

            model = to_keras_hub(model, image_size=image_size)
        elif image_size and image_size != model.image_size:
            # Rebuild at the new size; the position table is resized the official way on load.
            model = backbone_from_official(
                export_official(model), num_heads=model.num_heads, image_size=image_size
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        model.save(dst)
        return dst
    if part == "all":
        if model is not None:
            state = export_official(model)
        if not isinstance(state, dict):
            raise WeightsFileError(src, file_format(src), f"it holds a {type(state).__name__}, not a state dict.")
        wanted = {key: state[key] for key in ("student", "teacher", "ibot_loss", "epoch") if key in state}
        missing = {"student", "teacher"} - set(wanted)
        if missing:
            raise ValueError(f"--part all needs a training checkpoint; '{src}' has no {sorted(missing)}.")
        return write_state(wanted, dst)
    return save_official(model, dst, include_mask_token=include_mask_token)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage too, over several lines
        raise _UsageError(f"{message} (see --help)")


def main(argv=None):
    """The command line; returns 0 on success, exits with code 2 and one line on stderr on failure."""
    parser = _Parser(
        prog="python -m ibot_keras.convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--part", default="teacher", choices=("teacher", "student", "all"),
                        help="which network of a training checkpoint (default: teacher, as the official evaluations)")
    parser.add_argument("--num_heads", type=int, help="attention heads, when the width is not an official size")
    parser.add_argument("--image_size", type=int, help="build the backbone for this input size (position table resized)")
    parser.add_argument("--keras_hub", action="store_true", help="write a keras_hub.models.ViTBackbone (.keras DST)")
    parser.add_argument("--no_mask_token", action="store_true",
                        help="leave out masked_embed (timm's load_state_dict(strict=True) rejects it)")
    parser.add_argument("--non_strict", action="store_true",
                        help="load matching keys only; missing/unexpected keys are reported, not fatal")
    try:
        args = parser.parse_args(argv)
        out = convert(
            args.src,
            args.dst,
            part=args.part,
            num_heads=args.num_heads,
            image_size=args.image_size,
            keras_hub=args.keras_hub,
            include_mask_token=not args.no_mask_token,
            strict=not args.non_strict,
        )
    except Exception as error:
        known = isinstance(error, (_UsageError, ValueError, TypeError, ImportError, OSError))
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"convert: error: {message if known else f'{type(error).__name__}: {message}'}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
