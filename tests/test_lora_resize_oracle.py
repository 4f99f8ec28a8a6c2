"""``sdtune lora resize`` against the per-layer ranks sd-scripts' ``networks/resize_lora.py`` chose on real fixture
LoRAs. The ranks are stored in tests/data/resize_sdscripts_ranks.json (its header says how they were made);
sd-scripts itself is not installed here, so it was run once, outside the project, on the same kohya files."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.cli import main

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "lora"
ORACLE = json.loads((Path(__file__).parent / "data" / "resize_sdscripts_ranks.json").read_text())


def kohya_subset(fixture: Path, layers: list[str], tmp_path: Path) -> Path:
    """The fixture as ``sdtune convert --to kohya`` writes it, cut to the oracle's layers (all their tensors),
    which is the file sd-scripts was given."""
    kohya = tmp_path / "full.safetensors"
    assert main(["convert", str(fixture), str(kohya), "--to", "kohya"]) == 0
    with safe_open(kohya, "pt") as f:
        meta = f.metadata()
    out = tmp_path / "subset.safetensors"
    save_file({k: v for k, v in load_file(kohya).items() if k.split(".")[0] in set(layers)}, out, meta)
    return out


def ranks_of(path: Path) -> dict[str, int]:
    with safe_open(path, "pt") as f:
        return {k.split(".")[0]: f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_down.weight")}


@pytest.mark.parametrize("case", ORACLE["cases"], ids=lambda c: c["fixture"].split("__")[0])
def test_resize_ranks_match_sd_scripts(case, tmp_path, capsys):
    fixture = FIXTURES / case["fixture"]
    if not fixture.exists():
        pytest.skip(f"{fixture} not present (../shared/fixtures)")
    src = kohya_subset(fixture, case["layers"], tmp_path)
    assert set(ranks_of(src)) == set(case["layers"])
    for run in case["runs"]:
        out = tmp_path / "resized.safetensors"
        argv = ["lora", "resize", str(src), "--rank", str(run["new_rank"]), "--out", str(out)]
        if run["dynamic_method"]:
            argv += ["--dynamic", run["dynamic_method"], "--param", str(run["dynamic_param"])]
        assert main(argv) == 0
        capsys.readouterr()
        assert ranks_of(out) == run["ranks"], run
