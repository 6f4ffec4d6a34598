import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ibot_keras")
class LastValue(keras.metrics.Metric):
    """Reports the most recent value (for schedule values such as ``lr`` in the logs), where a
    ``Mean`` would average a quantity that is meant to change every step."""

    def __init__(self, name="last_value", dtype="float32", **kwargs):
        super().__init__(name=name, dtype=dtype, **kwargs)
        # "mean": under tf.distribute every replica holds the same value; the default "sum"
        # would report it times the replica count.
        self.value = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="value", aggregation="mean"
        )

    def update_state(self, value):
        self.value.assign(ops.cast(value, self.dtype))

    def result(self):
        return ops.convert_to_tensor(self.value)

    def reset_state(self):
        self.value.assign(ops.zeros((), self.dtype))
