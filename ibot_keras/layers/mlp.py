import keras

from ibot_keras import backend_specific
from ibot_keras.layers.dense import Dense
from ibot_keras.layers.initializers import linear_kernel_init


@keras.saving.register_keras_serializable(package="ibot_keras")
class Mlp(keras.layers.Layer):
    """Transformer MLP ``fc1 -> GELU (exact, erf) -> fc2``: ``(..., D) -> (..., D)``."""

    def __init__(self, dim, hidden_dim, **kwargs):
        # Applied after the sublayers exist, so that trainable=False reaches them.
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.hidden_dim = int(hidden_dim)
        self.fc1 = Dense(
            self.hidden_dim, kernel_initializer=linear_kernel_init(), name="fc1"
        )
        self.fc2 = Dense(
            self.dim, kernel_initializer=linear_kernel_init(), name="fc2"
        )
        self.trainable = trainable

    def build(self, input_shape=None):
        self.fc1.build((None, None, self.dim))
        self.fc2.build((None, None, self.hidden_dim))
        self.built = True

    def call(self, x):
        return self.fc2(backend_specific.gelu(self.fc1(x)))

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, hidden_dim=self.hidden_dim)
        return config
