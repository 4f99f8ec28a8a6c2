import os
from pathlib import Path

import pytest

# Tests never reach a model hub: hub sources must fail fast with a clear message instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real adapter fixtures not present at {FIXTURES}")
    return FIXTURES
