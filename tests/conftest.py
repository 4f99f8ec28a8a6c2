import copy
import io
import logging
import os
import pickle
import re
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

# Tests never reach a model hub: hub sources must fail fast with a clear message instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from sdtune.cli import main  # noqa: E402
from sdtune.lora import tools  # noqa: E402
from sdtune.models import load_base, save_single_file  # noqa: E402  (after the lines above: huggingface_hub reads them at import)
from sdtune.safeio import SdtuneError  # noqa: E402

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


@pytest.fixture
def bakes_but_merges_not(tmp_path):
    """A check of a file of adapters that change W itself (GLoRA, IA3): ``sdtune merge`` bakes what the in-memory
    patch gives at weight 0.7, from the built-in model (loaded) and from a single file (streamed tensor by
    tensor), and ``lora merge``/``resize`` refuse it, since its change depends on W0 and no plain LoRA holds it."""
    def check(base, path: Path, layers, kind: str) -> None:
        save_single_file(base, tmp_path / "model.safetensors")
        for model, out in (("tiny-random", "baked.safetensors"), (str(tmp_path / "model.safetensors"),
                                                                   "streamed.safetensors")):
            assert main(["merge", "--model", model, "--lora", f"{path}:0.7", "--out", str(tmp_path / out)]) == 0
        base.loras.add("bound", path, weight=0.7)
        for out in ("baked.safetensors", "streamed.safetensors"):
            baked = load_base(str(tmp_path / out), device="cpu", dtype="fp32")
            for p in layers:
                assert torch.equal(baked.unet.get_submodule(p).weight, base.unet.get_submodule(p).weight), (out, p)
        base.loras.remove("bound")
        for call in (lambda: tools.merge_loras([(path, 1.0)], tmp_path / "m.safetensors"),
                     lambda: tools.resize_lora(path, tmp_path / "r.safetensors", rank=2)):
            with pytest.raises(SdtuneError, match=rf"{re.escape(path.name)}: holds {kind} adapters, which change the "
                                                  rf"weight itself, not by a fixed ΔW"):
                call()
    return check


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
