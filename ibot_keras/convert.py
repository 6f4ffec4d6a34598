"""Convert checkpoints: ``python -m ibot_keras.convert SRC DST [options]``.

The code lives in ``ibot_keras.weights.convert`` (see its docstring or ``--help``); this module
keeps the command and the old import path working.
"""

import sys

from ibot_keras.weights.convert import WeightsFileError, check_file, convert, file_format, main, read_state, write_state

__all__ = ["WeightsFileError", "check_file", "convert", "file_format", "main", "read_state", "write_state"]

if __name__ == "__main__":
    sys.exit(main())
