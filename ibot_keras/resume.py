"""Training checkpoints: the full state written atomically, and exact resume.

A checkpoint is ``<dir>/checkpoint-<epoch>.weights.h5`` (every model variable — student,
teacher, both centers, the step counter, the drop-path random state — and the optimizer
state) plus ``<dir>/checkpoint.json``, which names the latest complete one. Each file is
written to a temporary name and renamed into place (atomic on POSIX), and the pointer moves
only after the weights are on disk: a process killed at any moment leaves the last good
checkpoint intact. The data pipeline needs no saved state: ``MultiCropLoader`` draws each
batch from ``(seed, epoch, position)``, so resuming at an epoch replays it exactly.
"""

import json
import os
import shutil

import keras

POINTER = "checkpoint.json"


def _atomic_write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_training_state(model, directory, epoch, keep=False):
    """Write the state after ``epoch`` (0-based, completed) and point ``checkpoint.json`` at it.

    ``keep=True`` also keeps a copy named like the official ``checkpoint<epoch+1:04>``.
    Returns the weights path.
    """
    os.makedirs(directory, exist_ok=True)
    name = f"checkpoint-{epoch + 1:04d}.weights.h5"
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f".tmp-{name}")
    model.save_weights(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    previous = read_pointer(directory)
    _atomic_write_json(
        os.path.join(directory, POINTER),
        {"epoch": epoch + 1, "weights": name, "step": int(keras.ops.convert_to_numpy(model.step))},
    )
    if keep:
        shutil.copyfile(path, os.path.join(directory, f"checkpoint{epoch + 1:04d}.weights.h5"))
    if previous and previous["weights"] != name:
        stale = os.path.join(directory, previous["weights"])
        if os.path.exists(stale):
            os.remove(stale)
    return path


def read_pointer(directory):
    path = os.path.join(directory, POINTER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def restore_training_state(model, directory):
    """Load the latest checkpoint of ``directory`` into a compiled ``model``.

    Returns the number of completed epochs (the ``initial_epoch`` for ``fit``), 0 when there
    is no checkpoint.
    """
    pointer = read_pointer(directory)
    if pointer is None:
        return 0
    path = os.path.join(directory, pointer["weights"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{POINTER} names {pointer['weights']}, which is missing in {directory}.")
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return int(pointer["epoch"])


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves the full training state after every ``save_freq`` epochs and at the end of
    training (official: ``checkpoint.pth`` every epoch), keeping a permanent copy every
    ``keep_freq`` epochs (official ``--saveckp_freq``; 0 keeps none)."""

    def __init__(self, directory, save_freq=1, keep_freq=0):
        super().__init__()
        self.directory = directory
        self.save_freq = int(save_freq)
        self.keep_freq = int(keep_freq)
        self._last_saved = None

    def on_epoch_end(self, epoch, logs=None):
        keep = bool(self.keep_freq) and (epoch + 1) % self.keep_freq == 0
        if (epoch + 1) % self.save_freq == 0 or keep:
            save_training_state(self.model, self.directory, epoch, keep=keep)
            self._last_saved = epoch
        self._last_epoch = epoch

    def on_train_end(self, logs=None):
        last = getattr(self, "_last_epoch", None)
        if last is not None and last != self._last_saved:
            save_training_state(self.model, self.directory, last)
