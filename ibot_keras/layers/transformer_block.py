import keras

from ibot_keras.layers.attention import Attention
from ibot_keras.layers.drop_path import DropPath
from ibot_keras.layers.layer_normalization import LayerNormalization
from ibot_keras.layers.mlp import Mlp


@keras.saving.register_keras_serializable(package="ibot_keras")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm ViT block: ``x + DP(Attn(LN1(x)))`` then ``x + DP(MLP(LN2(x)))``; ``(B, T, D)``.

    LayerNorm eps is 1e-6 as in the official ViT; no layer-scale. ``remat=True``: in training,
    the block's activations are recomputed in the backward pass instead of kept (``keras.remat``;
    less memory, one more forward of the block); the drop-path draws are made before, so the
    recomputation drops the same samples and the values and gradients are those of
    ``remat=False``.
    """

    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        seed=None,
        remat=False,
        **kwargs,
    ):
        # Applied after the sublayers exist, so that trainable=False reaches them.
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.drop_path_rate = float(drop_path_rate)
        self.seed = seed
        self.remat = bool(remat)
        self.norm1 = LayerNormalization(epsilon=1e-6, name="norm1")
        self.attn = Attention(self.dim, self.num_heads, qkv_bias=self.qkv_bias, name="attn")
        self.norm2 = LayerNormalization(epsilon=1e-6, name="norm2")
        self.mlp = Mlp(self.dim, int(self.dim * self.mlp_ratio), name="mlp")
        self.drop_path = DropPath(self.drop_path_rate, seed=seed, name="drop_path")
        self.trainable = trainable

    def build(self, input_shape=None):
        shape = (None, None, self.dim)
        for layer in (self.norm1, self.attn, self.norm2, self.mlp):
            layer.build(shape)
        self.built = True

    def call(self, x, training=False):
        if not (training and self.remat):
            x = x + self.drop_path(self.attn(self.norm1(x)), training=training)
            return x + self.drop_path(self.mlp(self.norm2(x)), training=training)
        scales = [self.drop_path.sample_scale(x) for _ in range(2)] if self.drop_path.rate else []
        return keras.remat(self._branches)(x, *scales)

    def _branches(self, x, *scales):
        """The block with the drop-path factors given (none: nothing dropped)."""
        attn = self.attn(self.norm1(x))
        x = x + (attn * scales[0] if scales else attn)
        mlp = self.mlp(self.norm2(x))
        return x + (mlp * scales[1] if scales else mlp)

    def attention_probs(self, x):
        """The attention weights of this block, ``(B, heads, T, T)``."""
        return self.attn.attention_probs(self.norm1(x))

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path_rate=self.drop_path_rate,
            seed=self.seed,
            remat=self.remat,
        )
        return config
