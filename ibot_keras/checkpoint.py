"""Weights in and out under the official iBOT parameter names.

Official layouts differ from Keras ones: a Linear weight is ``(out, in)`` (Keras kernels are
``(in, out)``), the patch-embedding Conv2d weight is ``(D, C, p, p)`` (Keras ``(p, p, C, D)``),
weight-norm ``weight_g`` is ``(K, 1)`` (here ``(1, K)``). Names keep the official dots:
``backbone.blocks.0.attn.qkv.weight``, ``head.last_layer.weight_v`` and so on.
"""

import keras
import numpy as np

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


def load_state(weights, state, what="model"):
    """Assign ``state`` (official names -> arrays) to ``weights`` ``[(name, variable, layout)]``.

    Entries are applied in ``weights`` order, as ``load_state_dict`` does (a later alias of the
    same variable wins). Raises ``ValueError`` listing every missing key, unexpected key and
    shape mismatch; nothing is assigned in that case.
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
    if missing or mismatched or unexpected:
        lines = [f"The checkpoint does not match the {what}."]
        if missing:
            lines.append(f"Missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"Shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise ValueError("\n".join(lines))
    for variable, value in updates:
        variable.assign(value.astype(variable.dtype))


def export_state(weights):
    """``{official name: NumPy array}`` in the official layout."""
    return {name: to_official_layout(keras.ops.convert_to_numpy(variable), layout) for name, variable, layout in weights}


def load_official(model, checkpoint):
    """Load official-named arrays into an ``IBOT`` model or a ``VisionTransformer``.

    For ``IBOT``: ``checkpoint = {"student": {...}, "teacher": {...}}`` (state dicts of the
    official ``MultiCropWrapper``s, ``module.`` prefixes allowed) and optionally
    ``"ibot_loss": {"center": (1, K), "center2": (1, 1, Kp)}``.
    For a ``VisionTransformer``: a backbone state dict (``module.`` / ``backbone.`` prefixes
    allowed).
    """
    from ibot_keras.models.ibot import IBOT
    from ibot_keras.models.vit import VisionTransformer

    if isinstance(model, IBOT):
        for part in ("student", "teacher"):
            if part not in checkpoint:
                raise ValueError(f"The checkpoint has no '{part}' entry (keys: {sorted(checkpoint)}).")
        student = strip_prefixes(checkpoint["student"])
        teacher = strip_prefixes(checkpoint["teacher"])
        load_state(model.student_weights(include_aliases=True), student, "student")
        load_state(model.teacher_weights(include_aliases=True), teacher, "teacher")
        centers = checkpoint.get("ibot_loss")
        if centers is not None:
            load_state(
                [
                    ("center", model.ibot_loss.center, "same"),
                    ("center2", model.ibot_loss.patch_center, "same"),
                ],
                centers,
                "iBOT loss centers",
            )
        return model
    if isinstance(model, VisionTransformer):
        state = strip_prefixes(checkpoint, ("module.", "backbone."))
        load_state(model.official_weights(), state, "backbone")
        return model
    raise TypeError(f"load_official expects an IBOT model or a VisionTransformer, got {type(model).__name__}.")


def export_official(model):
    """The inverse of ``load_official``: NumPy arrays under official names and layouts.

    ``IBOT`` -> ``{"student": ..., "teacher": ..., "ibot_loss": {"center", "center2"}}`` with the
    shared-head ``last_layer2.*`` aliases listed as the official ``state_dict()`` does;
    ``VisionTransformer`` -> a backbone state dict.
    """
    from ibot_keras.models.ibot import IBOT
    from ibot_keras.models.vit import VisionTransformer

    if isinstance(model, IBOT):
        return {
            "student": export_state(model.student_weights(include_aliases=True)),
            "teacher": export_state(model.teacher_weights(include_aliases=True)),
            "ibot_loss": {
                "center": keras.ops.convert_to_numpy(model.ibot_loss.center),
                "center2": keras.ops.convert_to_numpy(model.ibot_loss.patch_center),
            },
        }
    if isinstance(model, VisionTransformer):
        return export_state(model.official_weights())
    raise TypeError(f"export_official expects an IBOT model or a VisionTransformer, got {type(model).__name__}.")
