from ibot_keras.models.head import IBOTHead
from ibot_keras.models.ibot import IBOT
from ibot_keras.models.vit import (
    VisionTransformer,
    vit_base,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = ["IBOT", "IBOTHead", "VisionTransformer", "vit_base", "vit_large", "vit_small", "vit_tiny"]
