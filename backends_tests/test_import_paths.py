"""Every public import path of ibot_keras as of 2026-12-01 (``fixtures/public_api.json``,
written from the package before the modules were reorganised) still imports."""

import importlib
import json

import pytest
from conftest import FIXTURES

API = json.loads((FIXTURES / "public_api.json").read_text())


@pytest.mark.parametrize("module", sorted(API))
def test_public_names_import_from_their_old_paths(module):
    imported = importlib.import_module(module)
    missing = [name for name in API[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"
