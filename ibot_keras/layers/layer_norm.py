import keras

from ibot_keras import backend_specific


@keras.saving.register_keras_serializable(package="ibot_keras")
class LayerNorm(keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` over the last axis (same weights ``gamma``/``beta``,
    same config), computed in float32 in the form that is fastest on the current backend
    (``backend_specific.layer_norm``): ``(..., D) -> (..., D)``."""

    def call(self, inputs):
        if self.axis not in (-1, [-1], len(inputs.shape) - 1, [len(inputs.shape) - 1]) or self.rms_scaling:
            return super().call(inputs)
        gamma = self.gamma if self.scale else keras.ops.ones((inputs.shape[-1],))
        beta = self.beta if self.center else keras.ops.zeros((inputs.shape[-1],))
        outputs = backend_specific.layer_norm(inputs, gamma, beta, self.epsilon)
        return keras.ops.cast(outputs, self.compute_dtype)
