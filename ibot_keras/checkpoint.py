"""Weights in and out under the official iBOT parameter names.

The code lives in ``ibot_keras.weights`` (``layouts``, ``state_dict``, ``official``,
``optimizer_state``, ``files``); this module keeps the old import path working.
"""

from ibot_keras.layers.position_embedding import official_interpolation_matrices
from ibot_keras.weights.files import WeightsFileError, file_format, read_state, write_state
from ibot_keras.weights.layouts import from_official_layout, resize_position_table, strip_prefixes, to_official_layout
from ibot_keras.weights.official import backbone_from_official, export_official, load_official, save_official
from ibot_keras.weights.optimizer_state import (
    export_official_optimizer,
    load_official_optimizer,
    official_param_groups,
)
from ibot_keras.weights.state_dict import LoadReport, export_state, load_state, select_backbone_state

__all__ = [
    "LoadReport",
    "WeightsFileError",
    "backbone_from_official",
    "export_official",
    "export_official_optimizer",
    "export_state",
    "file_format",
    "from_official_layout",
    "load_official",
    "load_official_optimizer",
    "load_state",
    "official_interpolation_matrices",
    "official_param_groups",
    "read_state",
    "resize_position_table",
    "save_official",
    "select_backbone_state",
    "strip_prefixes",
    "to_official_layout",
    "write_state",
]
