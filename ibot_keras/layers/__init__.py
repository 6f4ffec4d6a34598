"""Building blocks of the iBOT ViT and head, one layer per file."""

from ibot_keras.layers.attention import Attention
from ibot_keras.layers.dense import Dense
from ibot_keras.layers.drop_path import DropPath
from ibot_keras.layers.layer_normalization import LayerNormalization
from ibot_keras.layers.mlp import Mlp
from ibot_keras.layers.patch_embedding import PatchEmbedding
from ibot_keras.layers.position_embedding import interpolate_position_embedding
from ibot_keras.layers.transformer_block import TransformerBlock
from ibot_keras.layers.weight_norm_dense import WeightNormDense

__all__ = [
    "Attention",
    "Dense",
    "DropPath",
    "LayerNormalization",
    "Mlp",
    "PatchEmbedding",
    "TransformerBlock",
    "WeightNormDense",
    "interpolate_position_embedding",
]
