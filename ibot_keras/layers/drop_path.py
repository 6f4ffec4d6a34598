import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ibot_keras")
class DropPath(keras.layers.Layer):
    """Stochastic depth per sample: in training, each sample's residual branch is dropped with
    probability ``rate`` and kept samples are scaled by ``1 / (1 - rate)``. Identity otherwise."""

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"DropPath rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        if self.rate > 0.0:
            self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)
        return x * (ops.floor(keep + noise) / keep)

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config
