"""Do the speed options learn the same? Loss curves of whole runs with each option against the default's.

Every option that changes which kernels run (``--channels-last``, ``--flush-denormals``, ``--mixed-precision
bf16`` where the CPU has bf16 units) trains the built-in tiny model with its own presets, as a user's run does,
through the real command line: LoRA on 48 outline-style renders (300 steps of 8, a tenth held out), TI on 5
renders of a cyan triangle (400 steps of 4). The validation loss is taken every 50 steps (fixed images,
timesteps and noise: see ``sdtune.train.validation``), the training loss is smoothed as TensorBoard does.

"Within noise" is measured, not assumed: the default is run with seeds 0, 1 and 2, and an option (seed 0) is
within noise when its curves are no farther from the default's seed-0 curves than the other seeds' are
(the mean of the two seed distances). Each row also prints the run's wall time (the same run, the same
machine; the training benchmarks are ``train_lora.py`` / ``train_ti.py``).

Measured (2026-11-30, 1 thread of a shared 2-core AMD EPYC with AVX-512 BF16): every option within noise; the
fp32 options' curves equal the default's to 5 digits, bf16's differ by 0.00006 (LoRA) and 0.00014 (TI) at most
against seed gaps of 0.0021 and 0.0016 (table in the README).

    OMP_NUM_THREADS=1 python benchmarks/loss_curves.py [--kinds lora ti] [--options=--channels-last ...]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c

from sdtune import demo
from sdtune.train.logs import read_csv, smooth

OPTIONS = ["--channels-last", "--flush-denormals"] + (["--mixed-precision bf16"] if c.cpu_has_bf16() else [])
NOISE_SEEDS = (1, 2)
EVERY = 50
TOKEN, INIT = "<cyan-triangle>", "triangle"


def write_data(kind: str, folder: Path) -> Path:
    if kind == "lora":
        return demo.write_style_set(folder, n=48)
    return demo.write_ti_set(folder, colour="cyan", shape="triangle")


def run(kind: str, data: Path, out: Path, seed: int, flags: str, threads: int) -> dict:
    extra = ["--token", TOKEN, "--init-token", INIT] if kind == "ti" else []
    cmd = [sys.executable, "-m", "sdtune.cli", "train", kind, "--model", "tiny", "--device", "cpu", "--data",
           str(data), "--out", str(out), "--seed", str(seed), "--validation-every", str(EVERY), "--sample-every", "0",
           "--no-report", "--no-progress", *extra, *shlex.split(flags)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=c.child_env(threads, out.parent))
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    rows = read_csv(out / "loss.csv")
    train = smooth([rows[s]["loss"] for s in sorted(rows) if rows[s]["loss"] is not None], 30)  # step 0: none
    val = {s: row["val_loss"] for s, row in rows.items() if row["val_loss"] is not None}
    return {"wall": wall, "train": train, "val": val}


def distance(a: dict, b: dict) -> tuple[float, float]:
    """(largest validation-loss gap over the shared evaluation steps, mean gap of the smoothed training loss)."""
    shared = sorted(set(a["val"]) & set(b["val"]) - {0})  # step 0 is the same base model for every run
    val = max(abs(a["val"][s] - b["val"][s]) for s in shared)
    train = statistics.fmean(abs(x - y) for x, y in zip(a["train"], b["train"]))
    return val, train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["lora", "ti"], choices=["lora", "ti"])
    p.add_argument("--options", action="append", help="flags of one option (repeatable; default: every option)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    options = a.options or OPTIONS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in a.kinds:
            data = write_data(kind, tmp / f"{kind}-data")
            runs = {f"default, seed {s}": run(kind, data, tmp / f"{kind}-s{s}", s, "", a.threads)
                    for s in (0, *NOISE_SEEDS)}
            for flags in options:
                runs[flags] = run(kind, data, tmp / f"{kind}-{len(runs)}", 0, flags, a.threads)
            ref = runs["default, seed 0"]
            noise = [distance(ref, runs[f"default, seed {s}"]) for s in NOISE_SEEDS]
            noise_val, noise_train = (statistics.fmean(n[i] for n in noise) for i in range(2))
            print(f"\n{kind}: tiny model, its preset, validation loss every {EVERY} steps, {a.threads} thread(s); "
                  f"noise = mean distance of seeds {NOISE_SEEDS} from seed 0")
            print("| run | final validation loss | max validation gap | mean smoothed-training gap | within noise "
                  "| wall s |\n|---|---|---|---|---|---|")
            for name, r in runs.items():
                last = max(r["val"])
                if r is ref:
                    cells = ("-", "-", "reference")
                else:
                    val, train = distance(ref, r)
                    seed_run = name.startswith("default")
                    within = "(the noise)" if seed_run else ("yes" if val <= noise_val and train <= noise_train
                                                              else "NO")
                    cells = (f"{val:.5f}", f"{train:.5f}", within)
                print(f"| {name} | {r['val'][last]:.5f} (step {last}) | {' | '.join(cells)} | {r['wall']:.1f} |")
            print(f"noise: validation gap {noise_val:.5f}, smoothed-training gap {noise_train:.5f}")


if __name__ == "__main__":
    main()
