"""Weights in and out: official layouts and names (``layouts``), state dicts (``state_dict``),
whole models (``official``), the official AdamW state (``optimizer_state``), ``.pth`` / ``.npz`` /
``.safetensors`` files (``files``), the conversion command line (``convert``:
``python -m ibot_keras.convert``) and the keras-hub export (``keras_hub``)."""

from ibot_keras.weights.files import FORMATS, WeightsFileError, check_file, file_format, read_state, write_state
from ibot_keras.weights.keras_hub import to_keras_hub
from ibot_keras.weights.layouts import (
    from_official_layout,
    resize_position_table,
    strip_prefixes,
    to_official_layout,
)
from ibot_keras.weights.official import backbone_from_official, export_official, load_official, save_official
from ibot_keras.weights.optimizer_state import (
    export_official_optimizer,
    load_official_optimizer,
    official_param_groups,
)
from ibot_keras.weights.state_dict import LoadReport, export_state, load_state, select_backbone_state

__all__ = [
    "FORMATS",
    "LoadReport",
    "WeightsFileError",
    "backbone_from_official",
    "check_file",
    "export_official",
    "export_official_optimizer",
    "export_state",
    "file_format",
    "from_official_layout",
    "load_official",
    "load_official_optimizer",
    "load_state",
    "official_param_groups",
    "read_state",
    "resize_position_table",
    "save_official",
    "select_backbone_state",
    "strip_prefixes",
    "to_keras_hub",
    "to_official_layout",
    "write_state",
]
