"""Weights in and out under the official iBOT parameter names.

Official layouts differ from Keras ones: a Linear weight is ``(out, in)`` (Keras kernels are
``(in, out)``), the patch-embedding Conv2d weight is ``(D, C, p, p)`` (Keras ``(p, p, C, D)``),
weight-norm ``weight_g`` is ``(K, 1)`` (here ``(1, K)``). Names keep the official dots:
``backbone.blocks.0.attn.qkv.weight``, ``head.last_layer.weight_v`` and so on.
"""

import dataclasses
import functools
import os
import warnings

import keras
import numpy as np

from ibot_keras.layers.position_embedding import official_interpolation_matrices
from ibot_keras.state_files import WeightsFileError, file_format, read_state, write_state

_TO_OFFICIAL = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
}
_FROM_OFFICIAL = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
}


def to_official_layout(array, layout):
    return np.ascontiguousarray(_TO_OFFICIAL[layout](np.asarray(array)))


def from_official_layout(array, layout):
    return np.ascontiguousarray(_FROM_OFFICIAL[layout](np.asarray(array)))


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


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def strip_prefixes(state, prefixes=("module.",)):
    """Drop leading ``module.`` (DDP) and similar prefixes from every key."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


@dataclasses.dataclass
class LoadReport:
    """What ``load_official`` did besides assigning matching weights.

    ``missing`` / ``unexpected``: keys of the model absent from the checkpoint and keys of the
    checkpoint the model has no place for (only possible with ``strict=False``).
    ``ignored``: the projection-head entries of a training-wrapper state dict loaded into a
    backbone (``head.*`` next to ``backbone.*``). ``interpolated``: tables resized to the
    model's image size (``pos_embed``). ``epoch``: the checkpoint's epoch, when it has one.
    """

    missing: list = dataclasses.field(default_factory=list)
    unexpected: list = dataclasses.field(default_factory=list)
    ignored: list = dataclasses.field(default_factory=list)
    interpolated: list = dataclasses.field(default_factory=list)
    epoch: int = None

    def merge(self, other, prefix=""):
        self.missing += [prefix + key for key in other.missing]
        self.unexpected += [prefix + key for key in other.unexpected]
        self.interpolated += [prefix + key for key in other.interpolated]
        return self


def load_state(weights, state, what="model", strict=True):
    """Assign ``state`` (official names -> arrays) to ``weights`` ``[(name, variable, layout)]``.

    Entries are applied in ``weights`` order, as ``load_state_dict`` does (a later alias of the
    same variable wins). Shape mismatches always raise ``ValueError``; missing and unexpected
    keys raise too when ``strict`` (the default), else they are warned about and returned.
    The error lists every problem at once, and nothing is assigned in that case.
    """
    state = {key: _to_numpy(value) for key, value in state.items()}
    by_variable = {}
    for name, variable, _ in weights:
        by_variable.setdefault(id(variable), []).append(name)
    known = {name for name, _, _ in weights}
    missing, mismatched, updates = [], [], []
    for name, variable, layout in weights:
        if name not in state:
            # An alias (shared head) may be absent when its variable is loaded by another name.
            if not any(other in state for other in by_variable[id(variable)]):
                missing.append(name)
            continue
        value = from_official_layout(state[name], layout)
        if tuple(value.shape) != tuple(variable.shape):
            expected = to_official_layout(np.zeros(variable.shape), layout).shape
            mismatched.append(f"{name}: checkpoint {tuple(state[name].shape)}, expected {tuple(expected)}")
            continue
        updates.append((variable, value))
    unexpected = sorted(set(state) - known)
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"The checkpoint does not match the {what}."]
        if missing:
            lines.append(f"Missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"Shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        if not mismatched:
            lines.append("Pass strict=False to load the matching keys anyway (the others are reported).")
        raise ValueError("\n".join(lines))
    if missing or unexpected:
        warnings.warn(
            f"Partial load of the {what}: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]} (see the returned LoadReport).",
            stacklevel=3,
        )
    for variable, value in updates:
        variable.assign(value.astype(variable.dtype))
    return LoadReport(missing=missing, unexpected=unexpected)


def export_state(weights):
    """``{official name: NumPy array}`` in the official layout."""
    return {name: to_official_layout(keras.ops.convert_to_numpy(variable), layout) for name, variable, layout in weights}


def resize_position_table(table, grid_rows, grid_cols):
    """A ``(1, 1 + g*g, D)`` table resized to ``grid_rows x grid_cols`` patches, NumPy float64
    arithmetic with the official bicubic scale-factor mapping (what the official ViT does at
    forward time for another image size)."""
    table = np.asarray(table, dtype=np.float64)
    grid = int(round((table.shape[1] - 1) ** 0.5))
    if grid * grid != table.shape[1] - 1:
        raise ValueError(f"pos_embed has {table.shape[1] - 1} patch positions, not a square grid.")
    rows, cols = official_interpolation_matrices(grid, grid_rows, grid_cols)
    patches = table[0, 1:].reshape(grid, grid, -1)
    resized = np.einsum("ia,abd,jb->ijd", rows, patches, cols).reshape(1, grid_rows * grid_cols, -1)
    return np.concatenate([table[:, :1], resized], axis=1).astype(np.float32)


def select_backbone_state(state, part="teacher"):
    """The backbone entries of any supported state dict, and the head entries left out.

    Accepts a backbone state dict (DINO ``*_pretrain.pth``, timm, ``export_official``), a
    ``MultiCropWrapper`` state dict (``backbone.*`` + ``head.*``), or a checkpoint holding one
    of those under ``part`` (``"teacher"`` / ``"student"``), ``"state_dict"`` or ``"model"``.
    ``module.`` (DDP) and ``backbone.`` prefixes are removed.
    """
    nested = [key for key, value in state.items() if isinstance(value, dict)]
    if nested:
        for key in (part, "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        else:
            raise ValueError(
                f"The checkpoint holds {sorted(nested)}, none of which is '{part}', 'state_dict' or "
                "'model'; choose one with part=."
            )
    state = strip_prefixes(state)
    ignored = []
    if any(key.startswith("backbone.") for key in state):
        ignored = sorted(key for key in state if key.startswith("head."))
        state = {key: value for key, value in state.items() if not key.startswith("head.")}
    return strip_prefixes(state, ("backbone.",)), ignored


def _load_backbone(vit, state, strict, interpolate_pos_embed):
    state = dict(state)
    interpolated = []
    table = state.get("pos_embed")
    expected = tuple(vit.pos_embed.shape)
    if interpolate_pos_embed and table is not None and tuple(np.shape(table)) != expected:
        if np.shape(table)[-1] == expected[-1] and np.ndim(table) == 3:
            state["pos_embed"] = resize_position_table(_to_numpy(table), vit.grid_size, vit.grid_size)
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
        slot = optimizer._get_variable_index(variable)
        count = float(keras.ops.convert_to_numpy(optimizer._step_counts[slot]))
        if count > 0:
            state[index] = {
                "step": np.asarray(count, np.float32),  # a 0-d tensor in torch >= 1.12
                "exp_avg": to_official_layout(keras.ops.convert_to_numpy(optimizer._momentums[slot]), layout),
                "exp_avg_sq": to_official_layout(keras.ops.convert_to_numpy(optimizer._velocities[slot]), layout),
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
        slot = optimizer._get_variable_index(variable)
        if entry is None:
            zeros = np.zeros(variable.shape, "float32")
            updates.append((slot, zeros, zeros, 0.0))
            continue
        m = from_official_layout(_to_numpy(entry["exp_avg"]), layout)
        v = from_official_layout(_to_numpy(entry["exp_avg_sq"]), layout)
        if tuple(m.shape) != tuple(variable.shape) or tuple(v.shape) != tuple(variable.shape):
            expected = to_official_layout(np.zeros(variable.shape), layout).shape
            mismatched.append(f"{name}: checkpoint {tuple(_to_numpy(entry['exp_avg']).shape)}, expected {tuple(expected)}")
            continue
        updates.append((slot, m, v, float(_to_numpy(entry["step"]))))
    if mismatched:
        raise ValueError("The optimizer state does not match the model. Shape mismatches: " + "; ".join(mismatched))
    for slot, m, v, count in updates:
        optimizer._momentums[slot].assign(m.astype("float32"))
        optimizer._velocities[slot].assign(v.astype("float32"))
        optimizer._step_counts[slot].assign(count)
    if epoch is not None:
        step = int(epoch) * model.steps_per_epoch
        optimizer.iterations.assign(step)
        model.step.assign(step)


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

    Width, depth, patch size, MLP ratio, qkv bias, mask token and the trained image size are
    read off the tensors; ``num_heads`` is not stored, so it defaults to the official value for
    the width (ViT-T/S/B/L: 3/6/12/16) and must be given otherwise. ``image_size`` (default: the
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
