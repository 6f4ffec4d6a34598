"""Optimizers with a learning-rate multiplier per variable (or per slice of a variable).

PyTorch expresses "this parameter gets ``lr * s``" with parameter groups; Keras 3 has one
learning rate per optimizer. ``PerVariableLearningRateMixin`` adds the groups back: it
multiplies the learning rate handed to ``update_step`` (and the decoupled weight decay) by a
scale looked up from the variable's ``path``. A scale may be a float or an array that
broadcasts against the variable (e.g. ``(heads, 1, 1)`` for a stack of linear heads, one lr
per head). Everything happens inside the optimizer's own ``update_step``, so it runs
unchanged on JAX (stateless apply), PyTorch and TensorFlow.
"""

import keras
import numpy as np
from keras import ops


def _as_scale(value):
    array = np.asarray(value, dtype=np.float32)
    return float(array) if array.ndim == 0 else array


class PerVariableLearningRateMixin:
    """Mix in before a Keras optimizer class: ``class X(PerVariableLearningRateMixin, SGD)``.

    ``lr_scales``: ``{variable.path: scale}``; variables not listed get scale 1. Scales act
    on the learning rate, not on the gradient, so they are exact for adaptive optimizers
    (Adam) too, where scaling a gradient would be normalised away.
    """

    def _set_lr_scales(self, lr_scales):
        self.lr_scales = {str(path): _as_scale(scale) for path, scale in dict(lr_scales or {}).items()}

    def build(self, variables):
        super().build(variables)
        paths = [variable.path for variable in variables]
        scaled = [path for path in paths if path in self.lr_scales]
        if self.lr_scales and not scaled:
            raise ValueError(
                "None of the lr_scales paths names a variable this optimizer trains; e.g. "
                f"scales for {sorted(self.lr_scales)[:3]} but variables {paths[:3]}."
            )
        repeated = sorted({path for path in scaled if scaled.count(path) > 1})
        if repeated:
            raise ValueError(f"Several trained variables share the path(s) {repeated}; scales would be ambiguous.")
        self._scale_by_index = [self.lr_scales.get(path, 1.0) for path in paths]

    def lr_scale_for(self, variable):
        """The scale of ``variable`` (float or NumPy array), by the optimizer's own index."""
        return self._scale_by_index[self._get_variable_index(variable)]

    def _scaled(self, learning_rate, variable):
        scale = self.lr_scale_for(variable)
        if isinstance(scale, float) and scale == 1.0:
            return learning_rate
        return ops.multiply(ops.cast(learning_rate, variable.dtype), ops.convert_to_tensor(scale, variable.dtype))

    def update_step(self, gradient, variable, learning_rate):
        super().update_step(gradient, variable, self._scaled(learning_rate, variable))

    def _apply_weight_decay(self, variables):
        # Decoupled decay ``w -= lr * scale * wd * w`` (PyTorch AdamW with a group lr).
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                factor = ops.multiply(self._scaled(self.learning_rate, variable), ops.cast(self.weight_decay, variable.dtype))
                variable.assign(variable - variable * factor)

    def _scales_config(self):
        return {path: (scale.tolist() if isinstance(scale, np.ndarray) else scale) for path, scale in self.lr_scales.items()}


@keras.saving.register_keras_serializable(package="ibot_keras")
class ProbeSGD(PerVariableLearningRateMixin, keras.optimizers.Optimizer):
    """SGD with PyTorch's momentum form (``buf = m * buf + g``; ``w -= lr * scale * buf``),
    no dampening, no Nesterov, no weight decay: the optimizer of the official linear probe.

    Keras's own SGD keeps ``lr`` inside the velocity (``v = m * v - lr * g``), which differs
    from PyTorch once the learning rate is annealed; this one matches PyTorch. Because the
    update is linear in ``lr``, a scale array gives every slice its own learning rate.
    """

    def __init__(self, learning_rate=1.0, momentum=0.9, lr_scales=None, name="probe_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self._set_lr_scales(lr_scales)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentum_buffers = [self.add_variable_from_reference(v, "momentum") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        # Overrides the mixin's update_step (MRO), so the scale is applied here.
        learning_rate = self._scaled(learning_rate, variable)
        buffer = self.momentum_buffers[self._get_variable_index(variable)]
        gradient = ops.cast(gradient, variable.dtype)
        new_buffer = ops.add(ops.multiply(buffer, ops.cast(self.momentum, variable.dtype)), gradient)
        self.assign(buffer, new_buffer)
        self.assign_sub(variable, ops.multiply(ops.cast(learning_rate, variable.dtype), new_buffer))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, lr_scales=self._scales_config())
        return config


@keras.saving.register_keras_serializable(package="ibot_keras")
class LayerwiseAdamW(PerVariableLearningRateMixin, keras.optimizers.AdamW):
    """Keras AdamW where variable ``path`` trains with ``learning_rate * lr_scales[path]``
    and decays with the same scaled rate (PyTorch AdamW with BEiT's parameter groups).

    ``no_weight_decay``: variable paths that get no weight decay (biases, norms, position
    embedding, [CLS]; see ``ibot_keras.eval.finetune.no_weight_decay_paths``).
    """

    def __init__(self, learning_rate=1e-3, lr_scales=None, no_weight_decay=(), name="layerwise_adamw", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._set_lr_scales(lr_scales)
        self.no_weight_decay = sorted(str(path) for path in no_weight_decay)

    def _use_weight_decay(self, variable):
        path = getattr(variable, "path", None)
        if path is None:  # a backend-native variable (TF update paths): find the Keras one
            path = self._trainable_variables[self._get_variable_index(variable)].path
        if path in self.no_weight_decay:
            return False
        return super()._use_weight_decay(variable)

    def get_config(self):
        config = super().get_config()
        config.update(lr_scales=self._scales_config(), no_weight_decay=list(self.no_weight_decay))
        return config
