"""iBOT self-supervised ViT pretraining for Keras 3 (JAX, PyTorch, TensorFlow)."""

from ibot_keras import callbacks
from ibot_keras import checkpoint
from ibot_keras import layers
from ibot_keras import resume
from ibot_keras import schedules
from ibot_keras.builder import build_pretrainer
from ibot_keras.config import PretrainConfig
from ibot_keras.losses import IBOTLoss
from ibot_keras.masking import BlockMasking
from ibot_keras.models import IBOT
from ibot_keras.models import IBOTHead
from ibot_keras.models import VisionTransformer
from ibot_keras.models import vit_base
from ibot_keras.models import vit_large
from ibot_keras.models import vit_small
from ibot_keras.models import vit_tiny
from ibot_keras.optimizers import IBOTAdamW

__version__ = "0.1.0"

__all__ = [
    "IBOT",
    "IBOTAdamW",
    "IBOTHead",
    "IBOTLoss",
    "BlockMasking",
    "PretrainConfig",
    "VisionTransformer",
    "build_pretrainer",
    "callbacks",
    "checkpoint",
    "layers",
    "resume",
    "schedules",
    "vit_base",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
