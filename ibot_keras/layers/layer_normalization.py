import keras

from ibot_keras import backend_specific


@keras.saving.register_keras_serializable(package="ibot_keras")
class LayerNormalization(keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` computed in float32 in the form that is fastest on the
    current backend (``backend_specific.layer_norm``) for a last-axis norm: ``(..., D) -> (..., D)``.

    Same weights (``gamma``, ``beta``), config and class-derived saved-file paths as Keras'
    layer, so ``.keras``/``.weights.h5`` files written with either class load into the other.
    """

    def call(self, inputs):
        if self.axis not in (-1, [-1], len(inputs.shape) - 1, [len(inputs.shape) - 1]) or self.rms_scaling:
            return super().call(inputs)
        gamma = self.gamma if self.scale else keras.ops.ones((inputs.shape[-1],))
        beta = self.beta if self.center else keras.ops.zeros((inputs.shape[-1],))
        outputs = backend_specific.layer_norm(inputs, gamma, beta, self.epsilon)
        return keras.ops.cast(outputs, self.compute_dtype)
