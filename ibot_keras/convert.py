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
"""

import argparse
import pathlib
import sys

from ibot_keras import checkpoint
from ibot_keras.state_files import file_format, read_state, write_state


def _load_keras(path, part):
    import keras

    from ibot_keras.models.ibot import IBOT

    model = keras.saving.load_model(path, compile=False)
    if isinstance(model, IBOT):
        if part == "all":
            return model
        return model.teacher_backbone if part == "teacher" else model.student_backbone
    return model


def convert(src, dst, *, part="teacher", num_heads=None, image_size=None, keras_hub=False, include_mask_token=True, strict=True):
    """Convert ``src`` to ``dst`` (formats from the suffixes; see the module docstring)."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("SRC and DST are the same file.")
    if src.suffix == ".keras":
        model = _load_keras(src, part)
    elif part == "all":
        state = read_state(src)
        model = None
    else:
        model = checkpoint.backbone_from_official(
            src, part=part, num_heads=num_heads, image_size=image_size, strict=strict
        )

    if dst.suffix == ".keras":
        if part == "all" and model is None:
            raise ValueError("--part all converts between state-dict files; a .keras DST holds one backbone.")
        if keras_hub:
            from ibot_keras.keras_hub_export import to_keras_hub

            model = to_keras_hub(model, image_size=image_size)
        elif image_size and image_size != model.image_size:
            # Rebuild at the new size; the position table is resized the official way on load.
            model = checkpoint.backbone_from_official(
                checkpoint.export_official(model), num_heads=model.num_heads, image_size=image_size
            )
        model.save(dst)
        return dst
    file_format(dst)  # a clear error for an unknown suffix before any work
    if part == "all":
        if model is not None:
            state = checkpoint.export_official(model)
        wanted = {key: state[key] for key in ("student", "teacher", "ibot_loss", "epoch") if key in state}
        missing = {"student", "teacher"} - set(wanted)
        if missing:
            raise ValueError(f"--part all needs a training checkpoint; '{src}' has no {sorted(missing)}.")
        return write_state(wanted, dst)
    return checkpoint.save_official(model, dst, include_mask_token=include_mask_token)


def main(argv=None):
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    try:
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
    except (ValueError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
