import keras
from keras import ops

from ibot_keras import backend_specific


@keras.saving.register_keras_serializable(package="ibot_keras")
class PatchEmbedding(keras.layers.Layer):
    """Non-overlapping ``p x p`` patches to ``D``-dim tokens: ``(B, H, W, C) -> (B, H/p, W/p, D)``.

    Equivalent to the official ``Conv2d(C, D, kernel=p, stride=p)``; computed as a reshape and a
    matmul. ``kernel`` has the Keras ``Conv2D`` layout ``(p, p, C, D)``; the official
    ``(D, C, p, p)`` weight is its transpose ``(3, 2, 0, 1)``.
    Initialisation follows PyTorch's default Conv2d init, ``U(+-1/sqrt(C*p*p))``, as the
    official ViT keeps it.
    """

    def __init__(self, patch_size, embed_dim, in_channels=3, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.in_channels = int(in_channels)

    def build(self, input_shape=None):
        p, c = self.patch_size, self.in_channels
        bound = 1.0 / (c * p * p) ** 0.5
        init = keras.initializers.RandomUniform(-bound, bound)
        self.kernel = self.add_weight(
            name="kernel", shape=(p, p, c, self.embed_dim), initializer=init
        )
        self.bias = self.add_weight(name="bias", shape=(self.embed_dim,), initializer=init)
        self.built = True

    def call(self, images):
        batch = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        p, c = self.patch_size, self.in_channels
        rows, cols = height // p, width // p
        patches = ops.reshape(images, (batch, rows, p, cols, p, c))
        patches = ops.transpose(patches, (0, 1, 3, 2, 4, 5))
        patches = ops.reshape(patches, (batch, rows, cols, p * p * c))
        kernel = ops.reshape(self.kernel, (p * p * c, self.embed_dim))
        return backend_specific.dense(patches, kernel, self.bias)

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            in_channels=self.in_channels,
        )
        return config
