"""The command line: exit codes and one-line errors, and that it writes what it says."""

import subprocess
import sys

import pytest

from sdtune.cli import main
from sdtune.generate import parse_infotext, read_infotext


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdtune.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, words", [
    (["--model", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
    (["--model", "tiny-random", "--scheduler", "bogus"], "unknown scheduler 'bogus'"),
    (["--model", "tiny-random", "--width", "63"], "multiple of 8"),
])
def test_generate_errors_are_one_line(tmp_path, args, words):
    r = run_cli("generate", "--prompt", "x", "--steps", "1", "--out", str(tmp_path), *args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("sdtune: error:")]
    assert len(lines) == 1 and words in lines[0]
    assert "Traceback" not in r.stderr


def test_corrupt_weights_are_one_line(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    r = run_cli("generate", "--prompt", "x", "--model", str(bad), "--out", str(tmp_path))
    assert r.returncode == 2 and "broken.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_generate_writes_pngs_with_metadata(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-random", "--prompt", "a red circle", "--steps", "2", "--seed", "3",
                 "--num-images", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3 and all(p.endswith(".png") for p in printed)
    info = parse_infotext(read_infotext(tmp_path / "00001-4.png"))
    assert info["prompt"] == "a red circle" and info["Seed"] == "4" and info["Steps"] == "2"
