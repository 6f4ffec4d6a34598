"""Official-named weights of an ``IBOT`` model or a ``VisionTransformer``: load, export, save,
and a backbone built to fit a state dict."""

import functools
import os

import keras
import numpy as np

from ibot_keras.weights.files import WeightsFileError, file_format, read_state, write_state
from ibot_keras.weights.layouts import resize_position_table, strip_prefixes, to_numpy
from ibot_keras.weights.optimizer_state import export_official_optimizer, load_official_optimizer
from ibot_keras.weights.state_dict import LoadReport, export_state, load_state, select_backbone_state


def _from_file(path, read):
    """``read(state)`` of the state dict stored at ``path`` (``read_state``). A file holding no
    dict is refused, and a ``ValueError`` about the content names the file."""
    state = read_state(path)
    if not isinstance(state, dict):
        raise WeightsFileError(path, file_format(path), f"it holds a {type(state).__name__}, not a state dict.")
    try:
        return read(state)
    except ValueError as error:
        raise ValueError(f"'{path}': {error}") from error


def _load_backbone(vit, state, strict, interpolate_pos_embed):
    state = dict(state)
    interpolated = []
    table = state.get("pos_embed")
    expected = tuple(vit.pos_embed.shape)
    if interpolate_pos_embed and table is not None and tuple(np.shape(table)) != expected:
        if np.shape(table)[-1] == expected[-1] and np.ndim(table) == 3:
            state["pos_embed"] = resize_position_table(to_numpy(table), vit.grid_size, vit.grid_size)
            interpolated.append("pos_embed")
    report = load_state(vit.official_weights(), state, "backbone", strict=strict)
    report.interpolated += interpolated
    return report


def load_official(model, source, *, part="teacher", strict=True, interpolate_pos_embed=True, optimizer=False):
    """Load official-named weights into an ``IBOT`` model or a ``VisionTransformer``.

    ``source``: a path (``.pth`` needs torch, ``.npz``, ``.safetensors``; any backend) or an
    already-loaded dict.
    For ``IBOT``: an official training checkpoint ``{"student": {...}, "teacher": {...}}``
    (``MultiCropWrapper`` state dicts, ``module.`` prefixes allowed) and optionally
    ``"ibot_loss": {"center": (1, K), "center2": (1, 1, Kp)}``. ``optimizer=True`` also loads
    the checkpoint's ``"optimizer"`` (the official AdamW state) and sets the step counters from
    its ``"epoch"``, to continue an official run exactly (``load_official_optimizer``; then
    ``fit(..., initial_epoch=report.epoch)``).
    For a ``VisionTransformer``: any state accepted by ``select_backbone_state`` (``part``
    picks ``teacher`` or ``student`` of a training checkpoint). A ``pos_embed`` trained at
    another resolution is resized to the model's ``image_size`` the official way
    (``interpolate_pos_embed``).
    Returns a ``LoadReport``. Raises ``ValueError`` listing every mismatch (naming the file
    when ``source`` is a path), ``FileNotFoundError`` or ``state_files.WeightsFileError`` for a
    file that cannot be read.
    """
    from ibot_keras.models.ibot import IBOT
    from ibot_keras.models.vit import VisionTransformer

    if isinstance(source, (str, os.PathLike)):
        return _from_file(source, functools.partial(load_official, model, part=part, strict=strict,
                                                    interpolate_pos_embed=interpolate_pos_embed, optimizer=optimizer))
    epoch = source.get("epoch") if isinstance(source.get("epoch"), (int, np.integer)) else None
    if isinstance(model, IBOT):
        for name in ("student", "teacher"):
            if not isinstance(source.get(name), dict):
                raise ValueError(
                    f"The checkpoint has no '{name}' state dict (keys: {sorted(source)}); an IBOT model "
                    "needs an official training checkpoint. Load a backbone-only file into "
                    "model.student_backbone / model.teacher_backbone instead."
                )
        report = LoadReport(epoch=epoch)
        for name, weights in (
            ("student", model.student_weights(include_aliases=True)),
            ("teacher", model.teacher_weights(include_aliases=True)),
        ):
            report.merge(load_state(weights, strip_prefixes(source[name]), name, strict=strict), f"{name}.")
        centers = source.get("ibot_loss")
        if centers is not None:
            report.merge(
                load_state(
                    [
                        ("center", model.ibot_loss.center, "same"),
                        ("center2", model.ibot_loss.patch_center, "same"),
                    ],
                    centers,
                    "iBOT loss centers",
                    strict=strict,
                ),
                "ibot_loss.",
            )
        if optimizer:
            if not isinstance(source.get("optimizer"), dict):
                raise ValueError(f"optimizer=True, but the checkpoint has no 'optimizer' state (keys: {sorted(source)}).")
            load_official_optimizer(model, source["optimizer"], epoch=epoch)
        return report
    if isinstance(model, VisionTransformer):
        state, ignored = select_backbone_state(source, part)
        report = _load_backbone(model, state, strict, interpolate_pos_embed)
        report.ignored, report.epoch = ignored, epoch
        return report
    raise TypeError(f"load_official expects an IBOT model or a VisionTransformer, got {type(model).__name__}.")


def export_official(model, include_mask_token=True, optimizer=False, epoch=None):
    """The inverse of ``load_official``: NumPy arrays under official names and layouts.

    ``IBOT`` -> ``{"student": ..., "teacher": ..., "ibot_loss": {"center", "center2"}}`` with the
    shared-head ``last_layer2.*`` aliases listed as the official ``state_dict()`` does;
    ``VisionTransformer`` -> a backbone state dict, which timm's ``VisionTransformer`` and the
    official ViT accept in ``load_state_dict`` (``include_mask_token=False`` leaves out the
    iBOT-only ``masked_embed``, for timm's ``strict=True``). For ``IBOT``, ``optimizer=True``
    adds ``"optimizer"`` (``export_official_optimizer``; only ``.pth`` files can hold it) and
    ``epoch`` adds ``"epoch"`` (completed epochs, as official checkpoints count).
    """
    from ibot_keras.models.ibot import IBOT
    from ibot_keras.models.vit import VisionTransformer

    if isinstance(model, IBOT):
        state = {
            "student": export_state(model.student_weights(include_aliases=True)),
            "teacher": export_state(model.teacher_weights(include_aliases=True)),
            "ibot_loss": {
                "center": keras.ops.convert_to_numpy(model.ibot_loss.center),
                "center2": keras.ops.convert_to_numpy(model.ibot_loss.patch_center),
            },
        }
        if optimizer:
            state["optimizer"] = export_official_optimizer(model)
        if epoch is not None:
            state["epoch"] = int(epoch)
        return state
    if isinstance(model, VisionTransformer):
        state = export_state(model.official_weights())
        if not include_mask_token:
            state.pop("masked_embed", None)
        return state
    raise TypeError(f"export_official expects an IBOT model or a VisionTransformer, got {type(model).__name__}.")


def save_official(model, path, include_mask_token=True, optimizer=False, epoch=None):
    """``export_official(model, ...)`` written to ``path`` (``.pth``, ``.npz`` or
    ``.safetensors``; an optimizer state needs ``.pth``)."""
    if optimizer and not str(path).endswith(".pth"):
        raise ValueError(f"An optimizer state can only be saved to a .pth file (the official format); got '{path}'.")
    state = export_official(model, include_mask_token=include_mask_token, optimizer=optimizer, epoch=epoch)
    return write_state(state, path)


# Official sizes by width, used when a state dict does not say its number of heads.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16}


def backbone_from_official(source, *, part="teacher", num_heads=None, image_size=None, strict=True, **kwargs):
    """A ``VisionTransformer`` built to fit an official/timm/DINO state and loaded from it.

    Width, depth, patch size, MLP ratio, qkv bias, mask token, register tokens (DINOv2's
    ``register_tokens``) and the trained image size are read off the tensors; ``num_heads`` is
    not stored, so it defaults to the official value for the width (ViT-T/S/B/L: 3/6/12/16)
    and must be given otherwise. ``image_size`` (default: the
    trained one) resizes the position table the official way.
    """
    if isinstance(source, (str, os.PathLike)):
        return _from_file(source, functools.partial(backbone_from_official, part=part, num_heads=num_heads,
                                                    image_size=image_size, strict=strict, **kwargs))
    state, _ = select_backbone_state(source, part)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"Not a ViT state dict: no '{key}' (keys: {sorted(state)[:10]} ...).")
    width = int(np.shape(state["cls_token"])[-1])
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    patch_size = int(np.shape(state["patch_embed.proj.weight"])[-1])
    grid = int(round((np.shape(state["pos_embed"])[1] - 1) ** 0.5))
    if num_heads is None:
        if width not in _HEADS_BY_WIDTH:
            raise ValueError(f"Embedding width {width} is not an official size: pass num_heads=.")
        num_heads = _HEADS_BY_WIDTH[width]
    registers = state.get("register_tokens")
    kwargs.setdefault("num_registers", 0 if registers is None else int(np.shape(registers)[1]))
    from ibot_keras.models.vit import VisionTransformer

    vit = VisionTransformer(
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=np.shape(state["blocks.0.mlp.fc1.weight"])[0] / width,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        use_mask_token="masked_embed" in state,
        image_size=image_size or grid * patch_size,
        in_channels=int(np.shape(state["patch_embed.proj.weight"])[1]),
        **kwargs,
    )
    load_official(vit, state, strict=strict)
    return vit
