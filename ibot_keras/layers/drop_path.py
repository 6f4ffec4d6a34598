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
        return x * self.sample_scale(x)

    def sample_scale(self, x):
        """A fresh draw of the per-sample factor for ``x`` ``(B, ...)``: ``(B, 1, ..., 1)`` of
        ``x.dtype``, 0 for a dropped sample and ``1 / (1 - rate)`` for a kept one (``rate > 0``)."""
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)
        return ops.floor(keep + noise) / keep

    # The random state is part of the training state: a resumed run must draw the same
    # drop-path masks. Keras does not save SeedGenerator state with the weights by itself.
    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.rate > 0.0:
            store["seed_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        if "seed_state" in store.keys():
            if self.rate > 0.0:
                self.seed_generator.state.assign(store["seed_state"])
            store = {key: store[key] for key in store.keys() if key != "seed_state"}
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config
