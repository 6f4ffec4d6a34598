"""State dicts under official names: assign them to ``[(name, variable, layout)]`` lists, export
them, and pick the backbone out of any supported checkpoint layout."""

import dataclasses
import warnings

import keras
import numpy as np

from ibot_keras.weights.layouts import from_official_layout, strip_prefixes, to_numpy, to_official_layout


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
    state = {key: to_numpy(value) for key, value in state.items()}
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
        lines += _register_hints(missing, unexpected, state)
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


def _register_hints(missing, unexpected, state):
    """What to do when only one side has ViT register tokens (``num_registers``)."""
    if any(name.endswith("register_tokens") for name in missing):
        return ["The checkpoint has no register tokens (official iBOT/DINO checkpoints have none) but the "
                "model was built with num_registers > 0: build it with num_registers=0, or pass "
                "strict=False to load the rest and keep the registers at their initial values."]
    for name in unexpected:
        if name.endswith("register_tokens") and np.ndim(state[name]) == 3:
            return [f"The checkpoint has {np.shape(state[name])[1]} register tokens ('{name}'): build "
                    f"the model with num_registers={np.shape(state[name])[1]}."]
    return []


def export_state(weights):
    """``{official name: NumPy array}`` in the official layout."""
    return {name: to_official_layout(keras.ops.convert_to_numpy(variable), layout) for name, variable, layout in weights}


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


