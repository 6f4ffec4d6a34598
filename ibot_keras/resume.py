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
"""

import json
import os
import shutil
import weakref

import keras
import numpy as np

POINTER = "checkpoint.json"


# Metric sums restored by restore_training_state, applied at the start of the resumed epoch.
_pending_metrics = weakref.WeakKeyDictionary()


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


def _atomic_write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(os.path.dirname(path) or ".")


def model_step(model):
    """The model's global step counter as a Python int (one host read)."""
    return int(keras.ops.convert_to_numpy(model.step))


def save_training_state(model, directory, epoch=None, keep=False):
    """Write the model's state and point ``checkpoint.json`` at it.

    At an epoch boundary (``model.step`` a multiple of ``steps_per_epoch``) the file is
    ``checkpoint-<epochs done:04d>.weights.h5``; mid-epoch it is
    ``checkpoint-step<step:08d>.weights.h5`` and the pointer also keeps the epoch's running
    metric sums. ``epoch`` (0-based, completed) names the file of a model whose step is 0
    (one that was not trained through ``fit``); otherwise the step decides.
    ``keep=True`` also keeps a copy named like the official ``checkpoint<epoch+1:04>``.
    Returns the weights path.
    """
    os.makedirs(directory, exist_ok=True)
    step = model_step(model)
    steps_per_epoch = int(model.steps_per_epoch)
    done, position = divmod(step, steps_per_epoch)
    if epoch is not None and step == 0:
        done = epoch + 1  # a model that did not train through fit (tests, conversions)
    name = f"checkpoint-{done:04d}.weights.h5" if position == 0 else f"checkpoint-step{step:08d}.weights.h5"
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f".tmp-{name}")
    model.save_weights(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    previous = read_pointer(directory)
    pointer = {"epoch": done, "weights": name, "step": step, "steps_per_epoch": steps_per_epoch}
    if position:
        pointer["metrics"] = [np.asarray(keras.ops.convert_to_numpy(v)).tolist() for v in model.metrics_variables]
    _atomic_write_json(os.path.join(directory, POINTER), pointer)
    if keep:
        shutil.copyfile(path, os.path.join(directory, f"checkpoint{done:04d}.weights.h5"))
    if previous and previous.get("weights") != name:
        stale = os.path.join(directory, os.path.basename(str(previous.get("weights"))))
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

    Returns the number of completed epochs (the ``initial_epoch`` for ``fit``; for a
    mid-epoch checkpoint, the epoch in progress), 0 when there is no checkpoint. After a
    mid-epoch checkpoint, ``model.fit(pipeline, ...)`` finishes that epoch first.
    """
    pointer = read_pointer(directory)
    if pointer is None:
        return 0
    path = os.path.join(directory, pointer["weights"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{POINTER} names {pointer['weights']}, which is missing in {directory}.")
    saved_steps = pointer.get("steps_per_epoch")
    if saved_steps is not None and int(saved_steps) != int(model.steps_per_epoch):
        raise ValueError(
            f"The checkpoint in {directory} was written with steps_per_epoch={saved_steps}, the model has "
            f"{model.steps_per_epoch}: the schedules would restart. Use the same data and batch size, or "
            "another output directory."
        )
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    if pointer.get("metrics") is not None:
        _pending_metrics[model] = pointer["metrics"]
    return int(pointer["epoch"])


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
    hooks of every step synchronously (it reads the logs each step)."""

    def __init__(self, directory, save_freq=1, keep_freq=0, save_steps=0):
        super().__init__()
        if save_freq < 1 or keep_freq < 0 or save_steps < 0:
            raise ValueError(
                f"TrainingCheckpoint needs save_freq >= 1, keep_freq >= 0 and save_steps >= 0; got "
                f"{save_freq}, {keep_freq} and {save_steps}."
            )
        self.directory = directory
        self.save_freq = int(save_freq)
        self.keep_freq = int(keep_freq)
        self.save_steps = int(save_steps)
        self._last_saved = None
        self._last_epoch = None
        if not self.save_steps:
            # Keras dispatches batch hooks asynchronously only when no callback overrides them.
            self.on_train_batch_end = super().on_train_batch_end

    def on_train_begin(self, logs=None):
        self._steps = int(self.model.steps_per_epoch)
        self._epoch = 0

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
