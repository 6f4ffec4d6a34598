import keras
from keras import ops

from ibot_keras import backend_specific
from ibot_keras.layers.initializers import torch_linear_default_init


@keras.saving.register_keras_serializable(package="ibot_keras")
class WeightNormDense(keras.layers.Layer):
    """Bias-free weight-normalised linear layer (``torch.nn.utils.weight_norm``, dim 0):
    ``(..., in) -> (..., units)`` with effective kernel ``g * v / ||v||`` per output unit.

    ``weight_v`` is ``(in, units)`` (Keras layout; the official ``(units, in)`` transposed) and
    ``weight_g`` is ``(1, units)`` (the official ``(units, 1)`` transposed). Both are 2-D, so the
    official rule "weight decay on every tensor with ndim >= 2" covers a trainable ``g``.
    ``g`` starts at 1 and is frozen when ``train_g=False`` (official ``norm_last_layer=True``).
    Computed in float32 whatever the global dtype policy: these are the logits that go through
    temperature-0.04 softmaxes.
    """

    def __init__(self, units, input_dim, train_g=True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.units = int(units)
        self.input_dim = int(input_dim)
        self.train_g = bool(train_g)

    def build(self, input_shape=None):
        self.weight_v = self.add_weight(
            name="weight_v",
            shape=(self.input_dim, self.units),
            initializer=torch_linear_default_init(self.input_dim),
        )
        self.weight_g = self.add_weight(
            name="weight_g",
            shape=(1, self.units),
            initializer="ones",
            trainable=self.train_g,
        )
        self.built = True

    def effective_kernel(self):
        """``(in, units)`` kernel ``g * v / ||v||``."""
        norm = ops.sqrt(ops.sum(ops.square(self.weight_v), axis=0, keepdims=True))
        return self.weight_v * (self.weight_g / norm)

    def call(self, x):
        return backend_specific.dense(x, self.effective_kernel())

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, input_dim=self.input_dim, train_g=self.train_g)
        return config
