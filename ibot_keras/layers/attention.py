import keras
from keras import ops

from ibot_keras.backend_specific import attention
from ibot_keras.layers.dense import Dense
from ibot_keras.layers.initializers import linear_kernel_init


@keras.saving.register_keras_serializable(package="ibot_keras")
class Attention(keras.layers.Layer):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``
    (timm/official layout): ``(B, T, D) -> (B, T, D)``; scale ``head_dim ** -0.5``."""

    def __init__(self, dim, num_heads, qkv_bias=True, **kwargs):
        # Applied after the sublayers exist, so that trainable=False reaches them.
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}.")
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.qkv_bias = bool(qkv_bias)
        self.head_dim = self.dim // self.num_heads
        self.qkv = Dense(
            3 * self.dim,
            use_bias=self.qkv_bias,
            kernel_initializer=linear_kernel_init(),
            name="qkv",
        )
        self.proj = Dense(
            self.dim, kernel_initializer=linear_kernel_init(), name="proj"
        )
        self.trainable = trainable

    def build(self, input_shape=None):
        self.qkv.build((None, None, self.dim))
        self.proj.build((None, None, self.dim))
        self.built = True

    def _split_heads(self, x):
        batch, tokens = ops.shape(x)[0], ops.shape(x)[1]
        qkv = ops.reshape(self.qkv(x), (batch, tokens, 3, self.num_heads, self.head_dim))
        # unstack, not indexing: on torch, one copy in the backward instead of three zero-filled ones.
        return tuple(ops.transpose(t, (0, 2, 1, 3)) for t in ops.unstack(qkv, 3, axis=2))  # (B, heads, T, head_dim)

    def attention_probs(self, x):
        """Attention weights ``(B, heads, T, T)``."""
        q, k, _ = self._split_heads(x)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (self.head_dim**-0.5)
        return ops.softmax(scores, axis=-1)

    def call(self, x):
        batch, tokens = ops.shape(x)[0], ops.shape(x)[1]
        q, k, v = self._split_heads(x)
        out = attention(q, k, v, self.head_dim**-0.5)  # (B, heads, T, head_dim)
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (batch, tokens, self.dim))
        return self.proj(out)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, num_heads=self.num_heads, qkv_bias=self.qkv_bias)
        return config
