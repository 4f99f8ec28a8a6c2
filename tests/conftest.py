import copy
import io
import logging
import os
import pickle
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

# Tests never reach a model hub: hub sources must fail fast with a clear message instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sdtune.models import load_base  # noqa: E402  (after the lines above: huggingface_hub reads them at import)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="module")
def base():
    """A random-init SD1 model, fresh for each test module (its tests attach adapters to it and train on it)."""
    return load_base("tiny-random")


@pytest.fixture(scope="module")
def pristine():
    """A random-init SD1 model per test module that no test changes: ``fresh_base`` copies it."""
    return load_base("tiny-random")


@pytest.fixture
def fresh_base(pristine):
    """A copy of ``pristine`` for one test; its adapters are detached after."""
    b = copy.deepcopy(pristine)
    yield b
    b.loras.detach()


class _RunsCode:
    """Unpickled, it touches ``marker``: what a malicious .pt/.ckpt does, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def code_pickle():
    """``make(path, key, marker, protocol)``: a pickle at ``path`` whose ``{key: ...}`` would run code when
    loaded unsafely (it touches ``marker``); returns ``path``."""
    def make(path: Path, key: str, marker: Path, protocol: int = 2) -> Path:
        path.write_bytes(pickle.dumps({key: _RunsCode(marker)}, protocol=protocol))
        return path
    return make


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real adapter fixtures not present at {FIXTURES}")
    return FIXTURES


def _said_while(call) -> str:
    """Everything diffusers, transformers and PEFT say while ``call()`` runs: their logs, warnings and prints."""
    out, logs = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(out), redirect_stderr(out):
            warnings.simplefilter("always")
            call()
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return out.getvalue() + logs.getvalue() + " ".join(str(w.message) for w in caught)


@pytest.fixture
def diffusers_says():
    """``diffusers_says(call)``: what the libraries said while ``call()`` ran (to assert no unmatched keys)."""
    return _said_while
