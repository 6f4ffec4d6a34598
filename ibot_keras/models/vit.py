"""The iBOT Vision Transformer: mask token, official position interpolation, drop path."""

import math
import numbers

import keras
import numpy as np
from keras import ops

from ibot_keras.layers.initializers import linear_kernel_init
from ibot_keras.layers.layer_normalization import LayerNormalization
from ibot_keras.layers.patch_embedding import PatchEmbedding
from ibot_keras.layers.position_embedding import interpolate_position_embedding
from ibot_keras.layers.transformer_block import TransformerBlock

# Official sizes (embed_dim, depth, num_heads); all use mlp_ratio 4 and qkv_bias.
VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


def _positive_int(name, value):
    """``value`` as an int >= 1 (a whole float is accepted), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer() or value < 1:
        raise ValueError(f"VisionTransformer: {name}={value!r} is not allowed: must be an integer >= 1.")
    return int(value)


def _non_negative_int(name, value):
    """``value`` as an int >= 0 (a whole float is accepted), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer() or value < 0:
        raise ValueError(f"VisionTransformer: {name}={value!r} is not allowed: must be an integer >= 0.")
    return int(value)


@keras.saving.register_keras_serializable(package="ibot_keras")
class VisionTransformer(keras.Model):
    """ViT backbone with the official iBOT/DINO semantics.

    Call: ``vit(images, masks=None, training=False)`` with ``images`` ``(B, H, W, C)``
    channels-last (any ``H``, ``W`` that are multiples of ``patch_size``) and optional ``masks``
    ``(B, H/p, W/p)`` bool (needs ``use_mask_token=True``) returns every token
    ``(B, 1 + N, D)`` after the final LayerNorm; the CLS token is ``[:, 0]``.

    Masked patch embeddings are replaced by ``masked_embed`` (zeros at init) before the CLS
    token and the (interpolated) position embedding are added. Stochastic depth rates rise
    linearly from 0 in block 0 to ``drop_path_rate`` in the last block.

    ``num_registers`` (default 0: the official model): ``n`` learned register tokens
    (``register_tokens`` ``(1, n, D)``, initialised like ``cls_token``; "Vision Transformers
    Need Registers", DINOv2) inserted after [CLS] and before the patches once the position
    embedding is added, so they get none. The blocks see ``(B, 1 + n + N, D)``
    (``prepare_tokens``); the outputs drop the registers (``drop_registers``), so ``vit(images)``
    is still ``(B, 1 + N, D)``.

    ``remat`` (default False): in training, every block recomputes its activations in the
    backward pass instead of keeping them (``TransformerBlock(remat=True)``): the same values
    and gradients for less memory and one more forward of the blocks.
    """

    def __init__(
        self,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        use_mask_token=False,
        image_size=224,
        in_channels=3,
        seed=None,
        num_registers=0,
        remat=False,
        **kwargs,
    ):
        # Applied after the sublayers exist, so that trainable=False reaches them.
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        self.patch_size = _positive_int("patch_size", patch_size)
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.depth = _positive_int("depth", depth)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.drop_path_rate = float(drop_path_rate)
        self.use_mask_token = bool(use_mask_token)
        self.image_size = _positive_int("image_size", image_size)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.seed = seed
        self.num_registers = _non_negative_int("num_registers", num_registers)
        self.remat = bool(remat)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"VisionTransformer: embed_dim={embed_dim} is not divisible by num_heads={num_heads} "
                "(each attention head takes embed_dim / num_heads channels)."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(
                f"VisionTransformer: drop_path_rate={drop_path_rate!r} is out of range: must be in [0, 1)."
            )
        if not (math.isfinite(self.mlp_ratio) and int(self.embed_dim * self.mlp_ratio) >= 1):
            raise ValueError(
                f"VisionTransformer: mlp_ratio={mlp_ratio!r} is not allowed: the MLP width "
                f"int(embed_dim * mlp_ratio) must be >= 1."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={image_size} is not a multiple of patch_size={patch_size}."
            )
        self.grid_size = self.image_size // self.patch_size
        self.num_patches = self.grid_size**2

        self.patch_embed = PatchEmbedding(
            self.patch_size, self.embed_dim, self.in_channels, name="patch_embed"
        )
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        self.blocks = [
            TransformerBlock(
                self.embed_dim,
                self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                drop_path_rate=float(rates[i]),
                seed=None if seed is None else seed + i,
                remat=self.remat,
                name=f"blocks_{i}",
            )
            for i in range(self.depth)
        ]
        self.norm = LayerNormalization(epsilon=1e-6, name="norm")
        self.build()
        self.trainable = trainable

    def build(self, input_shape=None):
        # Keras runs build() inside this layer's name scope, so every sublayer variable gets a
        # unique path (student/teacher/...): PyTorch registers parameters by path.
        self.cls_token = self.add_weight(
            name="cls_token", shape=(1, 1, self.embed_dim), initializer=linear_kernel_init()
        )
        self.pos_embed = self.add_weight(
            name="pos_embed",
            shape=(1, 1 + self.num_patches, self.embed_dim),
            initializer=linear_kernel_init(),
        )
        self.masked_embed = None
        if self.use_mask_token:
            self.masked_embed = self.add_weight(
                name="masked_embed", shape=(1, self.embed_dim), initializer="zeros"
            )
        self.register_tokens = None
        if self.num_registers:
            self.register_tokens = self.add_weight(
                name="register_tokens",
                shape=(1, self.num_registers, self.embed_dim),
                initializer=linear_kernel_init(),
            )
        self.patch_embed.build((None, self.image_size, self.image_size, self.in_channels))
        for block in self.blocks:
            block.build((None, None, self.embed_dim))
        self.norm.build((None, None, self.embed_dim))
        self.built = True

    # -- input checks ---------------------------------------------------------------------
    def _check_images(self, images):
        shape = tuple(images.shape)
        if len(shape) != 4:
            raise ValueError(
                f"Images must be (batch, height, width, {self.in_channels}) channels-last; got a "
                f"tensor of rank {len(shape)} with shape {shape}."
            )
        if shape[-1] != self.in_channels:
            raise ValueError(
                f"Images must have {self.in_channels} channels in the last axis (channels-last); "
                f"got shape {shape}."
            )
        height, width = shape[1], shape[2]
        if height is None or width is None:
            raise ValueError(f"Image height and width must be static; got shape {shape}.")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Crop size {height}x{width} is not a multiple of patch_size={self.patch_size}."
            )
        return height // self.patch_size, width // self.patch_size

    def _check_masks(self, masks, rows, cols):
        if not self.use_mask_token:
            raise ValueError(
                "Masks were given to a VisionTransformer built with use_mask_token=False."
            )
        shape = tuple(masks.shape)
        if shape[1:] == (rows, cols):
            return ops.reshape(masks, (-1, rows * cols))
        if shape[1:] == (rows * cols,):
            return masks
        raise ValueError(
            f"Masks must be (batch, {rows}, {cols}) for a {rows * self.patch_size}x"
            f"{cols * self.patch_size} crop with patch_size={self.patch_size}; got shape {shape}."
        )

    # -- forward ----------------------------------------------------------------------------
    def position_embedding_for(self, rows, cols):
        """The position table for a ``rows x cols`` patch grid, ``(1, 1 + rows*cols, D)``."""
        return interpolate_position_embedding(ops.convert_to_tensor(self.pos_embed), rows, cols)

    def prepare_tokens(self, images, masks=None):
        """Patch embedding, mask-token replacement, CLS concat, position add and the register
        tokens: ``(B, 1 + n + N, D)`` ([CLS], ``n = num_registers`` registers, patches)."""
        rows, cols = self._check_images(images)
        tokens = self.patch_embed(images)
        batch = ops.shape(tokens)[0]
        tokens = ops.reshape(tokens, (batch, rows * cols, self.embed_dim))
        if masks is not None:
            flat = self._check_masks(masks, rows, cols)
            mask_token = ops.cast(ops.convert_to_tensor(self.masked_embed), tokens.dtype)
            tokens = ops.where(ops.expand_dims(flat, -1), mask_token[None], tokens)
        cls = ops.broadcast_to(ops.cast(ops.convert_to_tensor(self.cls_token), tokens.dtype), (batch, 1, self.embed_dim))
        tokens = ops.concatenate([cls, tokens], axis=1)
        tokens = tokens + ops.cast(self.position_embedding_for(rows, cols), tokens.dtype)
        if not self.num_registers:
            return tokens
        registers = ops.cast(ops.convert_to_tensor(self.register_tokens), tokens.dtype)
        registers = ops.broadcast_to(registers, (batch, self.num_registers, self.embed_dim))
        return ops.concatenate([tokens[:, :1], registers, tokens[:, 1:]], axis=1)

    def drop_registers(self, tokens, axis=1):
        """``tokens`` without the register positions along ``axis``: ``(B, 1 + n + N, D)`` ->
        ``(B, 1 + N, D)``; unchanged when ``num_registers`` is 0."""
        if not self.num_registers:
            return tokens
        before = (slice(None),) * axis
        head, rest = tokens[before + (slice(0, 1),)], tokens[before + (slice(1 + self.num_registers, None),)]
        return ops.concatenate([head, rest], axis=axis)

    def call(self, images, masks=None, training=False):
        x = self.prepare_tokens(images, masks)
        for block in self.blocks:
            x = block(x, training=training)
        return self.drop_registers(self.norm(x))

    def get_last_selfattention(self, images, masks=None, include_registers=False):
        """Attention weights of the last block (inference mode), ``(B, heads, 1 + N, 1 + N)``:
        [CLS] then the patches, as queries (axis 2) and keys (axis 3). With registers the rows
        are the [CLS]/patch rows and columns of the full softmax (the weight on the registers
        is left out, so a row sums to less than 1); ``include_registers=True`` returns the full
        ``(B, heads, 1 + n + N, 1 + n + N)`` map in ``prepare_tokens`` order."""
        x = self.prepare_tokens(images, masks)
        for block in self.blocks[:-1]:
            x = block(x, training=False)
        attention = self.blocks[-1].attention_probs(x)
        if include_registers:
            return attention
        return self.drop_registers(self.drop_registers(attention, axis=2), axis=3)

    def compute_output_shape(self, images_shape, masks_shape=None):
        rows = images_shape[1] // self.patch_size
        cols = images_shape[2] // self.patch_size
        return (images_shape[0], 1 + rows * cols, self.embed_dim)

    # -- official parameter names -------------------------------------------------------------
    def official_weights(self):
        """``[(official_name, variable, layout)]`` in the official ``named_parameters()`` order.

        ``layout`` tells how the Keras array maps to the official tensor (see
        ``ibot_keras.checkpoint``): ``"same"``, ``"linear"`` (transpose) or ``"conv"``.
        """
        weights = [("cls_token", self.cls_token, "same"), ("pos_embed", self.pos_embed, "same")]
        if self.register_tokens is not None:  # DINOv2's name and place
            weights.append(("register_tokens", self.register_tokens, "same"))
        if self.masked_embed is not None:
            weights.append(("masked_embed", self.masked_embed, "same"))
        weights += [
            ("patch_embed.proj.weight", self.patch_embed.kernel, "conv"),
            ("patch_embed.proj.bias", self.patch_embed.bias, "same"),
        ]
        for i, block in enumerate(self.blocks):
            prefix = f"blocks.{i}."
            weights += [
                (prefix + "norm1.weight", block.norm1.gamma, "same"),
                (prefix + "norm1.bias", block.norm1.beta, "same"),
            ]
            if block.attn.qkv_bias:
                weights += [
                    (prefix + "attn.qkv.weight", block.attn.qkv.kernel, "linear"),
                    (prefix + "attn.qkv.bias", block.attn.qkv.bias, "same"),
                ]
            else:
                weights.append((prefix + "attn.qkv.weight", block.attn.qkv.kernel, "linear"))
            weights += [
                (prefix + "attn.proj.weight", block.attn.proj.kernel, "linear"),
                (prefix + "attn.proj.bias", block.attn.proj.bias, "same"),
                (prefix + "norm2.weight", block.norm2.gamma, "same"),
                (prefix + "norm2.bias", block.norm2.beta, "same"),
                (prefix + "mlp.fc1.weight", block.mlp.fc1.kernel, "linear"),
                (prefix + "mlp.fc1.bias", block.mlp.fc1.bias, "same"),
                (prefix + "mlp.fc2.weight", block.mlp.fc2.kernel, "linear"),
                (prefix + "mlp.fc2.bias", block.mlp.fc2.bias, "same"),
            ]
        weights += [("norm.weight", self.norm.gamma, "same"), ("norm.bias", self.norm.beta, "same")]
        return weights

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path_rate=self.drop_path_rate,
            use_mask_token=self.use_mask_token,
            image_size=self.image_size,
            in_channels=self.in_channels,
            seed=self.seed,
            num_registers=self.num_registers,
            remat=self.remat,
        )
        return config


def _factory(arch):
    embed_dim, depth, num_heads = VIT_SIZES[arch]

    def build(patch_size=16, **kwargs):
        return VisionTransformer(
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            **kwargs,
        )

    build.__name__ = arch
    build.__doc__ = (
        f"Official ``{arch}``: embed_dim {embed_dim}, depth {depth}, {num_heads} heads, "
        "mlp_ratio 4, qkv_bias. Keyword arguments go to ``VisionTransformer``."
    )
    return build


vit_tiny = _factory("vit_tiny")
vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
vit_large = _factory("vit_large")
