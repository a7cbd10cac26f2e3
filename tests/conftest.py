import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers: http_server, npz_reference


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty checkpoint cache; nothing touches the user's."""
    monkeypatch.setenv("BIT_HOME", str(tmp_path_factory.mktemp("bit_home")))
