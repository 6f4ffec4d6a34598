"""Read and write state dicts as ``.pth``, ``.npz`` and ``.safetensors`` files.

A state is a dict of NumPy arrays, possibly nested one level deep as the official training
checkpoint is (``{"student": {...}, "teacher": {...}, "ibot_loss": {...}, "epoch": 7}``).
``.npz`` and ``.safetensors`` store nested entries under ``"<outer>/<inner>"`` keys; plain
numbers (``epoch``) go into ``.npz`` as 0-d arrays and into the ``.safetensors`` metadata.

``.pth`` needs torch and ``.safetensors`` needs the ``safetensors`` package; both are read
without importing the Keras backend's framework, so a JAX user can read a ``.pth`` as long as
torch is installed.

A file that cannot be read raises ``WeightsFileError`` (a ``ValueError``) naming the path, the
format and what is wrong; a missing one ``FileNotFoundError``.
"""

import argparse
import os
import pathlib
import struct
import zipfile

import numpy as np

FORMATS = (".pth", ".pt", ".npz", ".safetensors")
_NEST = "/"
_DESCRIBE = {
    ".pth": "a PyTorch checkpoint (.pth)",
    ".npz": "a NumPy archive (.npz)",
    ".safetensors": "a safetensors file (.safetensors)",
    ".keras": "a Keras model file (.keras)",
}


class WeightsFileError(ValueError):
    """A weights file that cannot be read; the message names the path, the format and the fault.
    ``path`` and ``format`` (``".pth"``, ``".npz"``, ``".safetensors"``, ``".keras"``) say which."""

    def __init__(self, path, format, problem):
        super().__init__(f"Cannot read '{path}' as {_DESCRIBE.get(format, format)}: {problem}")
        self.path, self.format = str(path), format


def _summary(error):
    """``Type: first line`` of a library error (torch's and Keras' run over many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def check_file(path, kind):
    """Raise ``FileNotFoundError`` / ``WeightsFileError`` when ``path`` is plainly not a readable
    ``kind`` file (missing, a directory, empty, text, a Git LFS pointer, the wrong magic bytes,
    a truncated zip archive or safetensors header). Reads the first bytes only."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint file at '{path}'.")
    if path.is_dir():
        raise WeightsFileError(path, kind, "it is a directory, not a file.")
    size = path.stat().st_size
    if size == 0:
        raise WeightsFileError(path, kind, "empty file (0 bytes); was it written completely?")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise WeightsFileError(path, kind, "it is a Git LFS pointer, not the file itself: run `git lfs pull`.")
    zipped = head.startswith(b"PK")
    problem = None
    if kind == ".safetensors":
        problem = _safetensors_problem(head, size)
    elif kind == ".pth" and head[:1] == b"\x80":
        pass  # torch's legacy (pickle) format
    elif zipped:  # .npz, torch's .pth and .keras are zip archives; the directory is at the end
        if not zipfile.is_zipfile(path):
            problem = f"truncated or corrupt zip archive ({size} bytes, no zip directory at its end)."
    elif kind == ".npz" and head.startswith(b"\x93NUMPY"):
        problem = "it holds one .npy array, not a .npz archive of named arrays (save with np.savez)."
    else:
        expected = "a zip archive" + (" or a pickle" if kind == ".pth" else "")
        problem = f"not {expected} ({size} bytes{_starts_with(head)})."
    if problem:
        raise WeightsFileError(path, kind, problem)


def _starts_with(head):
    text = head[:32]
    if text and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in text):
        return f", text starting {text.decode('ascii')!r}"
    return f", starting {head[:8]!r}"


def _safetensors_problem(head, size):
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then
    the header ``{...}``."""
    if size < 10:
        return f"only {size} bytes, shorter than a safetensors header."
    length = struct.unpack("<Q", head[:8])[0]
    if head[8:9] != b"{":
        return f"not a safetensors file (no JSON header after the 8-byte length; {size} bytes{_starts_with(head)})."
    if 8 + length > size:
        return f"truncated: its header alone claims {length} bytes, the file has {size}."
    return None


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
    ``argparse.Namespace`` that official training checkpoints keep under ``args``. Raises
    ``FileNotFoundError`` for a missing file and ``WeightsFileError`` for one that cannot be read.
    """
    path = pathlib.Path(path)
    kind = file_format(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint file at '{path}'.")
    if kind == ".pth":
        _require("torch", ".pth", "torch")
    elif kind == ".safetensors":
        _require("safetensors", ".safetensors", "safetensors")
    check_file(path, kind)
    try:
        return _read(path, kind)
    except Exception as error:
        if "Weights only load failed" in str(error):
            problem = (
                f"torch.load(weights_only=True) refused it ({_summary(error)}); only tensors, numbers, "
                "containers and argparse.Namespace are read."
            )
        elif "allow_pickle" in str(error):
            problem = "it holds Python objects (pickled), which are not read; store plain arrays."
        else:
            problem = f"truncated or corrupt ({_summary(error)})."
        raise WeightsFileError(path, kind, problem) from error


def _read(path, kind):
    if kind == ".npz":
        with np.load(path, allow_pickle=False) as data:
            flat = {key: data[key] for key in data.files}
        return _nest({key: (value.item() if value.ndim == 0 and key == "epoch" else value) for key, value in flat.items()})
    if kind == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            flat = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        state = _nest(flat)
        if "epoch" in metadata:
            state["epoch"] = int(metadata["epoch"])
        return state
    import torch

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
