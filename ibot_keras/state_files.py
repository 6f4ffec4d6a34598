"""Read and write state dicts as ``.pth``, ``.npz`` and ``.safetensors`` files.

A state is a dict of NumPy arrays, possibly nested one level deep as the official training
checkpoint is (``{"student": {...}, "teacher": {...}, "ibot_loss": {...}, "epoch": 7}``).
``.npz`` and ``.safetensors`` store nested entries under ``"<outer>/<inner>"`` keys; plain
numbers (``epoch``) go into ``.npz`` as 0-d arrays and into the ``.safetensors`` metadata.

``.pth`` needs torch and ``.safetensors`` needs the ``safetensors`` package; both are read
without importing the Keras backend's framework, so a JAX user can read a ``.pth`` as long as
torch is installed.
"""

import argparse
import os
import pathlib

import numpy as np

FORMATS = (".pth", ".pt", ".npz", ".safetensors")
_NEST = "/"


def file_format(path):
    """``".pth"`` (also for ``.pt``/``.pth.tar``), ``".npz"`` or ``".safetensors"``."""
    name = str(path).lower()
    if name.endswith((".pth", ".pt", ".pth.tar", ".ckpt")):
        return ".pth"
    for suffix in (".npz", ".safetensors"):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"Unknown checkpoint format for '{path}': expected one of {', '.join(FORMATS)}.")


def _require(module, purpose, package):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        others = {".pth": ".npz or .safetensors", ".safetensors": ".npz or .pth"}[purpose]
        raise ImportError(
            f"Reading or writing {purpose} files needs the '{package}' package: `pip install {package}` "
            f"(any backend works with it). Without it, use {others} files, which "
            "`python -m ibot_keras.convert` can produce where that package is installed."
        ) from error


def _to_numpy(value):
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return value


def _convert_tree(value):
    if isinstance(value, dict):
        return {key: _convert_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_convert_tree(item) for item in value)
    return _to_numpy(value)


def _nest(flat):
    nested = {}
    for key, value in flat.items():
        if _NEST in key:
            outer, inner = key.split(_NEST, 1)
            nested.setdefault(outer, {})[inner] = value
        else:
            nested[key] = value
    return nested


def _flatten(state):
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            for inner, item in value.items():
                if isinstance(item, dict):
                    raise ValueError(f"'{key}{_NEST}{inner}' is nested more than one level deep.")
                flat[f"{key}{_NEST}{inner}"] = item
        else:
            flat[key] = value
    return flat


def read_state(path):
    """The state stored in ``path`` as (possibly nested) dicts of NumPy arrays.

    ``.pth`` files are opened with ``torch.load(weights_only=True)``, allowing the
    ``argparse.Namespace`` that official training checkpoints keep under ``args``.
    """
    path = pathlib.Path(path)
    kind = file_format(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint file at '{path}'.")
    if kind == ".npz":
        with np.load(path, allow_pickle=False) as data:
            flat = {key: data[key] for key in data.files}
        return _nest({key: (value.item() if value.ndim == 0 and key == "epoch" else value) for key, value in flat.items()})
    if kind == ".safetensors":
        _require("safetensors", ".safetensors", "safetensors")
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            flat = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        state = _nest(flat)
        if "epoch" in metadata:
            state["epoch"] = int(metadata["epoch"])
        return state
    torch = _require("torch", ".pth", "torch")
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, map_location="cpu", weights_only=True)
    return _convert_tree(state)


def write_state(state, path):
    """Write ``state`` (dicts of arrays, nested at most once) to ``path``; format from the suffix.

    The file appears atomically (written next to it, then renamed). ``.pth`` files hold torch
    tensors, so PyTorch code can ``load_state_dict`` them directly.
    """
    path = pathlib.Path(path)
    kind = file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix is kept so that np.savez does not append ".npz" to the temporary name.
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        if kind == ".npz":
            flat = {key: np.asarray(value) for key, value in _flatten(state).items()}
            with open(temporary, "wb") as handle:
                np.savez(handle, **flat)
        elif kind == ".safetensors":
            _require("safetensors", ".safetensors", "safetensors")
            from safetensors.numpy import save_file

            flat = _flatten(state)
            metadata = {key: str(value) for key, value in flat.items() if np.ndim(value) == 0 and key == "epoch"}
            arrays = {key: np.ascontiguousarray(value) for key, value in flat.items() if key not in metadata}
            save_file(arrays, str(temporary), metadata=metadata or None)
        else:
            torch = _require("torch", ".pth", "torch")

            def to_torch(value):
                if isinstance(value, dict):
                    return {key: to_torch(item) for key, item in value.items()}
                if isinstance(value, np.ndarray):
                    return torch.from_numpy(np.ascontiguousarray(value))
                return value

            torch.save(to_torch(state), temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
