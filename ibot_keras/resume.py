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
"""

import json
import os
import re
import shutil
import warnings
import weakref

import keras
import numpy as np

POINTER = "checkpoint.json"

# The only files of a run directory that are ever read or deleted: the rolling checkpoint
# (what the pointer may name) and the kept copies. ASCII digits only, no path separators.
_ROLLING_NAME = re.compile(r"checkpoint-(?:(?P<epochs>[0-9]{4,})|step(?P<step>[0-9]{8,}))\.weights\.h5")
_KEPT_NAME = re.compile(r"checkpoint(?P<epochs>[0-9]{4,})\.weights\.h5")
_NAMES = "checkpoint-<epochs:04d>.weights.h5 or checkpoint-step<step:08d>.weights.h5"

# Metric sums restored by restore_training_state, applied at the start of the resumed epoch.
_pending_metrics = weakref.WeakKeyDictionary()
# ``{real path: step}`` of the run directories each model was restored from or saved to.
_own_directories = weakref.WeakKeyDictionary()


class _CorruptPointer(ValueError):
    """``checkpoint.json`` is unreadable or lacks its entries (a fallback is possible)."""


def _fsync_directory(directory):
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
    _fsync_directory(os.path.dirname(path) or ".")


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


def model_step(model):
    """The model's global step counter as a Python int (one host read)."""
    return int(keras.ops.convert_to_numpy(model.step))


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checkpoint_files(directory, steps_per_epoch):
    """The checkpoint files of ours in ``directory``, newest first, as ``[(step, name)]``.

    Only regular files (no links) named like ours count; an epoch-boundary name counts
    ``epochs * steps_per_epoch`` steps, and at equal steps the rolling file comes before its
    kept copy.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = _ROLLING_NAME.fullmatch(name) or _KEPT_NAME.fullmatch(name)
        path = os.path.join(directory, name)
        if match is None or os.path.islink(path) or not os.path.isfile(path):
            continue
        step = match.groupdict().get("step")
        step = int(step) if step else int(match["epochs"]) * int(steps_per_epoch)
        found.append((step, match.re is _ROLLING_NAME, name))
    return [(step, name) for step, _, name in sorted(found, reverse=True)]


def _describe(name, step):
    match = _ROLLING_NAME.fullmatch(name) or _KEPT_NAME.fullmatch(name)
    if match is not None and not match.groupdict().get("step"):
        return f"{name}, after epoch {int(match['epochs'])}"
    return f"{name}, at step {step}"


def _first_non_finite(model):
    """The path of the first model or optimizer variable holding a NaN or inf, else None."""
    variables = list(model.weights)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    for variable in variables:
        if keras.backend.is_float_dtype(variable.dtype):
            if not np.isfinite(np.asarray(keras.ops.convert_to_numpy(variable))).all():
                return variable.path
    return None


def _schedule_object(value):
    """A schedule as ``{"class": name, **config}``, a number as a float, else None."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return {"class": type(value).__name__, **value.get_config()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def schedule_settings(model):
    """The settings that shape the training schedules, as a flat ``{name: JSON value}``.

    ``epochs``, ``steps_per_epoch``, the teacher momentum, the teacher temperature schedules
    (``ibot_loss``), the optimizer's learning-rate schedule (a constant rate is a variable of
    the checkpoint itself), weight decay (``weight_decay_value`` of ``IBOTAdamW``) and
    ``freeze_steps``. Settings a model lacks are left out.
    """
    settings = {"epochs": getattr(model, "epochs", None), "steps_per_epoch": int(model.steps_per_epoch),
                "momentum_teacher": getattr(model, "momentum_teacher", None)}
    loss = getattr(model, "ibot_loss", None)
    for key in ("warmup_teacher_temp", "teacher_temp", "warmup_teacher_patch_temp", "teacher_patch_temp",
                "warmup_teacher_temp_epochs", "mim_start_epoch"):
        settings[f"ibot_loss.{key}"] = getattr(loss, key, None)
    optimizer = model.optimizer
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # under a LossScaleOptimizer
    if optimizer is not None:
        schedule = getattr(optimizer, "learning_rate_schedule", None)
        if schedule is not None:
            settings["optimizer.learning_rate"] = _schedule_object(schedule)
        else:
            learning_rate = optimizer.get_config().get("learning_rate")
            if isinstance(learning_rate, dict):  # a serialized schedule
                settings["optimizer.learning_rate"] = {"class": learning_rate.get("class_name"),
                                                       **learning_rate.get("config", {})}
        decay = getattr(optimizer, "weight_decay_value", getattr(optimizer, "weight_decay", None))
        settings["optimizer.weight_decay"] = _schedule_object(decay)
        settings["optimizer.freeze_steps"] = getattr(optimizer, "freeze_steps", None)
    flat = {}

    def flatten(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}.{key}", item)
        elif value is not None:
            flat[prefix] = value

    for key, value in settings.items():
        flatten(key, value)
    return json.loads(json.dumps(flat, default=repr))  # as it reads back from the pointer


def _check_settings(pointer, model, directory):
    saved = pointer.get("steps_per_epoch")
    if saved is not None and int(saved) != int(model.steps_per_epoch):
        raise ValueError(
            f"The checkpoint in {directory} was written with steps_per_epoch={saved}, the model has "
            f"{model.steps_per_epoch}: the schedules would restart. Use the same data and batch size, or "
            "another output directory."
        )
    saved = pointer.get("schedule")
    if not isinstance(saved, dict):
        return  # a pointer from before the settings were recorded
    current = schedule_settings(model)
    differing = [
        f"{key}: checkpoint {saved[key]!r}, model {current[key]!r}" if key in current
        else f"{key}: checkpoint {saved[key]!r}, model has none"
        for key in sorted(saved) if current.get(key, ...) != saved[key]
    ]
    if differing:
        raise ValueError(
            f"The checkpoint in {directory} was written with other schedule settings ({'; '.join(differing)}): "
            "resuming would change the schedules mid-run. Build the model with the settings of that run, or "
            "train into another output directory."
        )


def read_pointer(directory):
    """``checkpoint.json`` of ``directory`` as a dict, None when there is none.

    Raises ``ValueError`` when it is unreadable or lacks ``weights``/``step``/``epoch``, and
    when ``weights`` is not the name of one of our checkpoint files in the directory itself.
    """
    path = os.path.join(directory, POINTER)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            pointer = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _CorruptPointer(f"{path} is unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(pointer, dict) or "weights" not in pointer or not all(
        _is_count(pointer.get(key)) for key in ("step", "epoch")
    ):
        shown = sorted(pointer) if isinstance(pointer, dict) else type(pointer).__name__
        raise _CorruptPointer(
            f"{path} is not a checkpoint pointer (it needs 'weights', and 'step' and 'epoch' as counts; got {shown})"
        )
    weights = pointer["weights"]
    if not (isinstance(weights, str) and _ROLLING_NAME.fullmatch(weights)):
        raise ValueError(
            f"{path} names weights={weights!r}, which is not a checkpoint file of ours ({_NAMES}, in "
            f"{directory} itself); that file is neither read nor deleted. Point it at a checkpoint file of "
            f"{directory}, or delete {POINTER} to restore the newest checkpoint file there."
        )
    return pointer


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
    bad = _first_non_finite(model)
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
            _fsync_directory(directory)
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
    except _CorruptPointer as error:
        pointer, problem = None, str(error)
    candidates = _checkpoint_files(directory, steps)
    if pointer is not None:
        path = os.path.join(directory, pointer["weights"])
        if os.path.islink(path) or not os.path.isfile(path):
            raise FileNotFoundError(
                f"{POINTER} names {pointer['weights']}, which is missing (or not a regular file) in {directory}. "
                f"Delete {POINTER} to restore the newest checkpoint file there instead."
            )
        _check_settings(pointer, model, directory)
        error = _load(model, path)
        if error is None:
            if pointer.get("metrics") is not None:
                _pending_metrics[model] = pointer["metrics"]
            _mark_own(model, directory)
            return int(pointer["epoch"])
        problem = f"{path}, which {POINTER} names, is unreadable ({error})"
        candidates = [(step, name) for step, name in candidates if name != pointer["weights"]]
    elif not candidates:
        if problem is None:
            return 0
        raise ValueError(
            f"{problem}, and {directory} holds no checkpoint file ({_NAMES}) to fall back to. Delete {POINTER} "
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
        match = _ROLLING_NAME.fullmatch(name) or _KEPT_NAME.fullmatch(name)
        epochs = int(match["epochs"]) if match.groupdict().get("epochs") else step // steps
        note = ""
        if step % steps:
            _pending_metrics[model] = None  # the running sums were in the pointer
            note = " The logged metrics of the resumed epoch count only its remaining steps."
        warnings.warn(
            f"{problem}: restored the newest readable checkpoint in {directory} instead ({_describe(name, step)})"
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


class _RunCallbacks(keras.callbacks.CallbackList):
    """The user's callbacks through the two ``fit`` calls of a resumed run, seen as one run:
    one ``on_train_begin``/``on_train_end``, batch numbers of the resumed epoch counted from
    where it was interrupted, and its running metric sums restored."""

    def __init__(self, callbacks, model, metrics, **params):
        super().__init__(callbacks, add_history=True, add_progbar=params["verbose"] != 0, model=model, **params)
        self.batch_offset = 0
        self.final = False
        self._begun = False
        self._metrics = metrics

    def on_train_begin(self, logs=None):
        if not self._begun:
            self._begun = True
            super().on_train_begin(logs)

    def on_train_end(self, logs=None):
        if self.final:
            super().on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        if self._metrics is not None:  # after fit's reset_metrics, before the first step
            for variable, value in zip(self.model.metrics_variables, self._metrics):
                variable.assign(np.asarray(value, variable.dtype))
            self._metrics = None
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch + self.batch_offset, logs)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch + self.batch_offset, logs)


def resumed_mid_epoch(model):
    """Whether ``model`` was restored from a mid-epoch checkpoint that no ``fit`` on a
    ``Pipeline`` has continued yet."""
    return model in _pending_metrics


class _StepRange(keras.utils.PyDataset):
    """Batches ``start .. stop - 1`` of a ``Pipeline`` as a one-worker ``PyDataset`` (so Keras
    adds no threads of its own). Read in order, they come from the pipeline's worker stream;
    the few that Keras reads twice (its look at the first batches for shapes) are served again
    from a small cache, and any other jump restarts the stream there."""

    def __init__(self, pipeline, start, stop):
        super().__init__(workers=1, use_multiprocessing=False)
        self.pipeline, self.start, self.stop = pipeline, int(start), int(stop)
        self._stream, self._next, self._recent = None, None, {}

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, index):
        step = self.start + int(index)
        if step in self._recent:
            return (self._recent[step],)
        if self._stream is None or step != self._next:
            self.close()
            self._stream = self.pipeline.stream(step, self.stop)
        (batch,) = next(self._stream)
        self._next = step + 1
        self._recent[step] = batch
        self._recent.pop(step - 4, None)
        return (batch,)

    def close(self):
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._recent = {}


def fit_pipeline(model, pipeline, fit, epochs=1, callbacks=None, verbose="auto", initial_epoch=None,
                 steps_per_epoch=None, **kwargs):
    """``model.fit`` on a ``Pipeline`` from ``model.step`` on (``fit`` is Keras' own).

    A run interrupted mid-epoch is continued by two Keras ``fit`` calls (the rest of that epoch,
    then whole epochs) that the callbacks see as one.
    """
    steps = len(pipeline)
    if int(model.steps_per_epoch) != steps:
        raise ValueError(
            f"The model was built with steps_per_epoch={model.steps_per_epoch} but the pipeline has {steps} "
            "batches per epoch: build the model with steps_per_epoch=len(pipeline)."
        )
    if steps_per_epoch is not None and int(steps_per_epoch) != steps:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} differs from the pipeline's {steps}; omit it.")
    if epochs > pipeline.epochs:
        raise ValueError(f"epochs={epochs} but the pipeline was built for {pipeline.epochs} epochs.")
    start = model_step(model)
    epoch, position = divmod(start, steps)
    if initial_epoch is not None and initial_epoch != epoch:
        raise ValueError(
            f"initial_epoch={initial_epoch}, but model.step={start} is in epoch {epoch} (0-based): the pipeline "
            f"continues from the model's step. Pass initial_epoch={epoch} or omit it."
        )
    verbose = 1 if verbose == "auto" else verbose
    metrics = _pending_metrics.pop(model, None) if position else None
    run = _RunCallbacks(callbacks, model, metrics, verbose=verbose, epochs=epochs, steps=steps)
    kwargs.update(verbose=verbose, callbacks=run, shuffle=False)
    if position and epoch < epochs:
        run.batch_offset = position
        run.final = epoch + 1 >= epochs
        _fit_range(fit, pipeline, start, (epoch + 1) * steps, epochs=epoch + 1, initial_epoch=epoch,
                   steps_per_epoch=steps - position, **kwargs)
        run.batch_offset = 0
        epoch += 1
        if model.stop_training:
            if not run.final:
                run.final = True
                run.on_train_end()
            return model.history
    if epoch >= epochs:
        return getattr(model, "history", None)  # already trained that far
    run.final = True
    _fit_range(fit, pipeline, epoch * steps, epochs * steps, epochs=epochs, initial_epoch=epoch,
               steps_per_epoch=steps, **kwargs)
    return model.history


def _fit_range(fit, pipeline, start, stop, **kwargs):
    data = _StepRange(pipeline, start, stop)
    try:
        fit(data, **kwargs)
    finally:
        data.close()  # stop the worker processes now, not at garbage collection


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
        files = _checkpoint_files(self.directory, self._steps)
        if files:
            step, name = files[0]
            return step, _describe(name, step)
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
        names = [name for _, name in _checkpoint_files(self.directory, self._steps)]
        pointer = os.path.join(self.directory, POINTER)
        if os.path.isfile(pointer) and not os.path.islink(pointer):
            names.append(POINTER)
        for name in names:
            os.remove(os.path.join(self.directory, name))
        _fsync_directory(self.directory)
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
