"""The benchmarks read each trainer's step times from its progress output: tqdm's marks (diffusers' scripts) and
sdtune's own log lines. They stopped finding sdtune's once its progress off a terminal became log lines; this
keeps the two in step (no timing is measured here)."""

import sys
from pathlib import Path

import pytest

from sdtune import console

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as bench  # noqa: E402  (benchmarks are scripts, not a package)


def test_step_times_are_read_from_sdtune_log_lines_and_tqdm_marks(capsys, monkeypatch):
    monkeypatch.setenv(console.LOG_SECONDS_ENV, bench.child_env(2, Path("."))["SDTUNE_LOG_SECONDS"])
    monkeypatch.setattr(console, "on_terminal", lambda: False)
    bar = console.progress(3, "train lora", "step", initial=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    ours = capsys.readouterr().err
    marks = bench.step_times(ours, 3)
    assert sorted(marks) == [1, 2, 3] and marks[1] <= marks[2] <= marks[3]
    theirs = "".join(f"@step Steps|{n}|3|{0.5 * n:.4f}@\n" for n in range(4))
    assert bench.step_times(theirs, 3) == {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5}
    with pytest.raises(SystemExit, match="no step times"):
        bench.seconds_per_step("nothing", 1, 3)
