"""Training checkpoints: the full state written atomically, and exact resume at any step.

A checkpoint is a ``.weights.h5`` file in the run directory (every model variable — student,
teacher, both centers, the step counter, the drop-path random state — and the optimizer
state) plus ``checkpoint.json``, which names the latest complete one and the step it was taken
at. Each file is written to a temporary name, fsynced and renamed into place (atomic on POSIX),
and the pointer moves only after the weights are on disk: a process killed at any moment
leaves the last good checkpoint intact.

The data position is the model's step: a ``Pipeline`` (``ibot_keras.data.build_pipeline``)
makes batch ``step`` from ``(seed, epoch, position)`` alone, so ``model.fit(pipeline)`` on a
restored model continues with the batches an uninterrupted run would have used. A checkpoint
taken mid-epoch also holds the epoch's running metric sums, so the logs of the resumed epoch
(progress bar, ``CSVLogger``) equal the uninterrupted ones.

The run directory is the run's alone: only files named like ours (``checkpoint-0003.weights.h5``,
``checkpoint-step00000009.weights.h5``, kept copies ``checkpoint0003.weights.h5``) directly
inside it are ever read or deleted, ``TrainingCheckpoint`` refuses to start a model that was
not restored from the directory's latest checkpoint, a state with a NaN or inf is never
written, and the pointer records the settings that shape the schedules, so that a resume with
others is refused by name.

This module writes and restores checkpoints (``save_training_state``, ``restore_training_state``,
``TrainingCheckpoint``); ``ibot_keras.run_directory`` reads and checks what a run directory
holds, ``ibot_keras.pipeline_fit`` continues training from the restored step. Their public
names are importable from here as well.
"""

import json
import os
import shutil
import warnings
import weakref

import keras
import numpy as np

from ibot_keras.pipeline_fit import fit_pipeline, hold_epoch_metrics, resumed_mid_epoch
from ibot_keras.run_directory import (
    CHECKPOINT_NAMES,
    POINTER,
    CorruptPointerError,
    check_settings,
    checkpoint_files,
    describe_checkpoint,
    first_non_finite,
    model_step,
    name_epochs,
    read_pointer,
    schedule_settings,
)

__all__ = [
    "POINTER",
    "TrainingCheckpoint",
    "fit_pipeline",
    "model_step",
    "read_pointer",
    "restore_training_state",
    "resumed_mid_epoch",
    "save_training_state",
    "schedule_settings",
]

# ``{real path: step}`` of the run directories each model was restored from or saved to.
_own_directories = weakref.WeakKeyDictionary()


def fsync_directory(directory):
    """fsync a directory, so that a rename inside it is on disk (best effort: skipped where it
    cannot be opened or synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp, path):
    """Rename ``tmp`` onto ``path`` and fsync the directory, so the rename itself is durable."""
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(path) or ".")


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)


def _mark_own(model, directory):
    _own_directories.setdefault(model, {})[os.path.realpath(directory)] = model_step(model)


def save_training_state(model, directory, epoch=None, keep=False):
    """Write the model's state and point ``checkpoint.json`` at it.

    At an epoch boundary (``model.step`` a multiple of ``steps_per_epoch``) the file is
    ``checkpoint-<epochs done:04d>.weights.h5``; mid-epoch it is
    ``checkpoint-step<step:08d>.weights.h5`` and the pointer also keeps the epoch's running
    metric sums and, always, ``schedule_settings``. ``epoch`` (0-based, completed) names the
    file of a model whose step is 0 (one that was not trained through ``fit``); otherwise the
    step decides. ``keep=True`` also keeps a copy named like the official
    ``checkpoint<epoch+1:04>``. The file the previous pointer named is then deleted, only if it
    is one of ours. A state with a NaN or inf in any model or optimizer variable is not
    written (a warning names the variable) and every file stays. Returns the weights path, or
    None when skipped.
    """
    os.makedirs(directory, exist_ok=True)
    step = model_step(model)
    steps_per_epoch = int(model.steps_per_epoch)
    done, position = divmod(step, steps_per_epoch)
    if epoch is not None and step == 0:
        done = epoch + 1  # a model that did not train through fit (tests, conversions)
    name = f"checkpoint-{done:04d}.weights.h5" if position == 0 else f"checkpoint-step{step:08d}.weights.h5"
    _build_optimizer(model)
    bad = first_non_finite(model)
    if bad is not None:
        warnings.warn(
            f"Checkpoint skipped at step {step} (epoch {done + 1 if position else done}): {bad} is not finite. "
            f"Every file in {directory} is kept as it was.",
            stacklevel=2,
        )
        return None
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f".tmp-{name}")
    model.save_weights(tmp)
    _fsync_file(tmp)
    _replace(tmp, path)
    try:
        previous = read_pointer(directory)
    except ValueError as error:
        warnings.warn(f"{error} It is replaced; no earlier checkpoint file is deleted.", stacklevel=2)
        previous = None
    pointer = {"epoch": done, "weights": name, "step": step, "steps_per_epoch": steps_per_epoch,
               "schedule": schedule_settings(model)}
    if position:
        pointer["metrics"] = [np.asarray(keras.ops.convert_to_numpy(v)).tolist() for v in model.metrics_variables]
    _atomic_write_json(os.path.join(directory, POINTER), pointer)
    if keep:
        kept = f"checkpoint{done:04d}.weights.h5"
        shutil.copyfile(path, os.path.join(directory, f".tmp-{kept}"))
        _fsync_file(os.path.join(directory, f".tmp-{kept}"))
        _replace(os.path.join(directory, f".tmp-{kept}"), os.path.join(directory, kept))
    if previous and previous["weights"] != name:
        stale = os.path.join(directory, previous["weights"])  # one of our names (read_pointer checks)
        if os.path.islink(stale) or os.path.isfile(stale):
            os.remove(stale)
            fsync_directory(directory)
    _mark_own(model, directory)
    return path


def _build_optimizer(model):
    """Checkpoints always hold the optimizer's slots, also of a model not yet trained."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _load(model, path):
    """Load ``path`` into ``model``; the error, or None."""
    _build_optimizer(model)
    try:
        model.load_weights(path)
    except Exception as error:  # h5py, Keras and the backends raise many kinds on a bad file
        return f"{type(error).__name__}: {error}"
    return None


def restore_training_state(model, directory):
    """Load the latest checkpoint of ``directory`` into a compiled ``model``.

    Returns the number of completed epochs (the ``initial_epoch`` for ``fit``; for a
    mid-epoch checkpoint, the epoch in progress), 0 when there is no checkpoint. After a
    mid-epoch checkpoint, ``model.fit(pipeline, ...)`` finishes that epoch first.

    Refused (``ValueError``) when the pointer names a file that is not one of ours, or when
    the run was written with other ``steps_per_epoch`` or schedule settings (each named).
    A missing, corrupt or empty pointer, or an unreadable checkpoint file, falls back to the
    newest readable checkpoint file of ours, with a warning.
    """
    steps = int(model.steps_per_epoch)
    try:
        pointer = read_pointer(directory)
        problem = None
    except CorruptPointerError as error:
        pointer, problem = None, str(error)
    candidates = checkpoint_files(directory, steps)
    if pointer is not None:
        path = os.path.join(directory, pointer["weights"])
        if os.path.islink(path) or not os.path.isfile(path):
            raise FileNotFoundError(
                f"{POINTER} names {pointer['weights']}, which is missing (or not a regular file) in {directory}. "
                f"Delete {POINTER} to restore the newest checkpoint file there instead."
            )
        check_settings(pointer, model, directory)
        error = _load(model, path)
        if error is None:
            if pointer.get("metrics") is not None:
                hold_epoch_metrics(model, pointer["metrics"])
            _mark_own(model, directory)
            return int(pointer["epoch"])
        problem = f"{path}, which {POINTER} names, is unreadable ({error})"
        candidates = [(step, name) for step, name in candidates if name != pointer["weights"]]
    elif not candidates:
        if problem is None:
            return 0
        raise ValueError(
            f"{problem}, and {directory} holds no checkpoint file ({CHECKPOINT_NAMES}) to fall back to. "
            f"Delete {POINTER} "
            "to start afresh there, or restore from the directory that holds the run."
        )
    elif problem is None:
        problem = f"{directory} has checkpoint files but no {POINTER}"
    failures = []
    for _, name in candidates:
        error = _load(model, os.path.join(directory, name))
        if error is not None:
            failures.append(f"{name} ({error})")
            continue
        step = model_step(model)
        named = name_epochs(name)
        epochs = step // steps if named is None else named
        note = ""
        if step % steps:
            hold_epoch_metrics(model, None)  # the running sums were in the pointer
            note = " The logged metrics of the resumed epoch count only its remaining steps."
        warnings.warn(
            f"{problem}: restored the newest readable checkpoint in {directory} instead "
            f"({describe_checkpoint(name, step)})"
            f"{'; unreadable: ' + ', '.join(failures) if failures else ''}.{note}",
            stacklevel=2,
        )
        _mark_own(model, directory)
        return epochs
    raise ValueError(
        f"{problem}, and no other checkpoint file in {directory} is readable"
        f"{': ' + ', '.join(failures) if failures else ' (there is none)'}. The model may be partly loaded: "
        "build it again, and restore from a directory with a good checkpoint or train into an empty one."
    )


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves the full training state after every ``save_freq`` epochs, every ``save_steps``
    training steps (0: never mid-epoch) and at the end of training (official:
    ``checkpoint.pth`` every epoch), keeping a permanent copy every ``keep_freq`` epochs
    (official ``--saveckp_freq``; 0 keeps none). Resuming from a mid-epoch checkpoint is exact
    with a ``Pipeline`` (see the module docstring). With ``save_steps`` Keras runs the batch
    hooks of every step synchronously (it reads the logs each step).

    The directory belongs to one run: training starts only when it holds no checkpoint or the
    model is at the step of its latest one (restored with ``restore_training_state``); any
    other model is refused at ``on_train_begin``, unless ``overwrite=True``, which first
    deletes the directory's checkpoint files (only those, and ``checkpoint.json``)."""

    def __init__(self, directory, save_freq=1, keep_freq=0, save_steps=0, overwrite=False):
        super().__init__()
        if save_freq < 1 or keep_freq < 0 or save_steps < 0:
            raise ValueError(
                f"TrainingCheckpoint needs save_freq >= 1, keep_freq >= 0 and save_steps >= 0; got "
                f"{save_freq}, {keep_freq} and {save_steps}."
            )
        if not isinstance(overwrite, bool):
            raise TypeError(f"TrainingCheckpoint(overwrite=...) must be True or False; got {overwrite!r}.")
        self.directory = directory
        self.save_freq = int(save_freq)
        self.keep_freq = int(keep_freq)
        self.save_steps = int(save_steps)
        self.overwrite = overwrite
        self._last_saved = None
        self._last_epoch = None
        if not self.save_steps:
            # Keras dispatches batch hooks asynchronously only when no callback overrides them.
            self.on_train_batch_end = super().on_train_batch_end

    def on_train_begin(self, logs=None):
        self._steps = int(self.model.steps_per_epoch)
        self._epoch = 0
        self._claim_directory()

    def _latest(self):
        """``(step, description)`` of the directory's latest checkpoint, or None."""
        try:
            pointer = read_pointer(self.directory)
        except ValueError:
            pointer = None  # saving replaces it; its file is then left alone
        if pointer is not None:
            return pointer["step"], f"{pointer['weights']}, at step {pointer['step']} after {pointer['epoch']} epochs"
        files = checkpoint_files(self.directory, self._steps)
        if files:
            step, name = files[0]
            return step, describe_checkpoint(name, step)
        return None

    def _claim_directory(self):
        latest = self._latest()
        if latest is None:
            return
        step = model_step(self.model)
        latest_step, description = latest
        own = _own_directories.get(self.model, {}).get(os.path.realpath(self.directory))
        if own == step or (step == latest_step and step > 0):
            return  # the run that wrote it, resumed
        if not self.overwrite:
            raise ValueError(
                f"{self.directory} already holds checkpoints of a run this model was not restored from (latest: "
                f"{description}) and the model is at step {step}: saving would replace them. Restore that run first "
                f"(restore_training_state(model, {self.directory!r}) before fit), choose an empty directory, or "
                "pass TrainingCheckpoint(..., overwrite=True) to delete its checkpoint files."
            )
        names = [name for _, name in checkpoint_files(self.directory, self._steps)]
        pointer = os.path.join(self.directory, POINTER)
        if os.path.isfile(pointer) and not os.path.islink(pointer):
            names.append(POINTER)
        for name in names:
            os.remove(os.path.join(self.directory, name))
        fsync_directory(self.directory)
        warnings.warn(f"overwrite=True: deleted the previous run's {', '.join(names)} in {self.directory}.",
                      stacklevel=2)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 >= self._steps:
            return  # the epoch's end saves
        step = self._epoch * self._steps + batch + 1
        if step % self.save_steps == 0:
            save_training_state(self.model, self.directory)
            self._last_saved = step

    def on_epoch_end(self, epoch, logs=None):
        keep = bool(self.keep_freq) and (epoch + 1) % self.keep_freq == 0
        end_step = (epoch + 1) * self._steps
        by_steps = bool(self.save_steps) and end_step % self.save_steps == 0
        if (epoch + 1) % self.save_freq == 0 or keep or by_steps:
            save_training_state(self.model, self.directory, epoch, keep=keep)
            self._last_saved = end_step
        self._last_epoch = epoch

    def on_train_end(self, logs=None):
        step = model_step(self.model)
        if self._last_epoch is not None and step != self._last_saved:
            save_training_state(self.model, self.directory, self._last_epoch)
