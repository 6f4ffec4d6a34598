"""Export a ``VisionTransformer`` to ``keras_hub.models.ViTBackbone``.

The code lives in ``ibot_keras.weights.keras_hub``; this module keeps the old import path working.
"""

from ibot_keras.weights.keras_hub import resize_position_table, to_keras_hub

__all__ = ["resize_position_table", "to_keras_hub"]
