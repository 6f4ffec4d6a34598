"""Read and write state dicts as ``.pth``, ``.npz`` and ``.safetensors`` files.

The code lives in ``ibot_keras.weights.files``; this module keeps the old import path working.
"""

from ibot_keras.weights.files import FORMATS, WeightsFileError, check_file, file_format, read_state, write_state

__all__ = ["FORMATS", "WeightsFileError", "check_file", "file_format", "read_state", "write_state"]
