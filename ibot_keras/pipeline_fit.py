"""``model.fit`` on a ``Pipeline`` from ``model.step`` on: the exact continuation of a run
restored from a checkpoint (``ibot_keras.resume``), also from one taken mid-epoch.

A ``Pipeline`` makes batch ``step`` from ``(seed, epoch, position)`` alone, so training on
batches ``model.step ...`` continues with those an uninterrupted run would have used. A run
interrupted mid-epoch is continued by two Keras ``fit`` calls (the rest of that epoch, then
whole epochs) that the callbacks see as one, with the epoch's running metric sums of the
checkpoint restored, so the logs of the resumed epoch equal the uninterrupted ones.
"""

import warnings
import weakref

import keras
import numpy as np

from ibot_keras.run_directory import model_step

# Metric sums restored by restore_training_state, applied at the start of the resumed epoch.
_pending_metrics = weakref.WeakKeyDictionary()


def hold_epoch_metrics(model, sums):
    """Keep the running metric sums of a mid-epoch checkpoint (``model.metrics_variables``
    values, or None when they are unknown) for the ``fit_pipeline`` that continues that epoch;
    until then ``resumed_mid_epoch(model)`` is True."""
    _pending_metrics[model] = sums


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


def fit_data(model, fit, x, *args, callbacks=None, **kwargs):
    """``fit`` (Keras' ``Model.fit`` of ``model``) on ``x``: a ``Pipeline`` through
    ``fit_pipeline`` (keyword arguments only); a source with ``epoch_callback()``
    (``MultiCropLoader``) gets its epoch set at the start of every epoch and keeps its own
    order; anything else as Keras takes it, with a warning when ``model`` was restored from a
    mid-epoch checkpoint (only a ``Pipeline`` continues at that step)."""
    if hasattr(x, "stream") and hasattr(x, "total_steps"):
        if args:
            raise ValueError("fit(pipeline, ...) takes keyword arguments only (epochs=..., callbacks=...).")
        return fit_pipeline(model, x, fit, callbacks=callbacks, **kwargs)
    if resumed_mid_epoch(model):
        warnings.warn(
            f"The model was restored from a mid-epoch checkpoint (step {model_step(model)}); only a "
            "Pipeline (ibot_keras.data.build_pipeline) continues at that step. With this data the epoch "
            "starts again from its first batch while the schedules continue from the saved step.",
            stacklevel=3,
        )
    if hasattr(x, "epoch_callback"):
        callbacks = list(callbacks or []) + [x.epoch_callback()]
        kwargs["shuffle"] = False
    return fit(x, *args, callbacks=callbacks, **kwargs)
