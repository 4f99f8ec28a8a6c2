"""Loading a single-file checkpoint on the CPU, whole process: sdtune's ``load_base(FILE)`` against diffusers'
``from_single_file(FILE, config=FOLDER)``, on random-init SD 1.5 (fp32, 4.3 GB) and SDXL (fp16, 6.9 GB) files.

Inputs, built here in a child process: each family's random-init model (``sd15-random``, ``sdxl-random``) written
as a single file by ``models.save_single_file`` (LDM/SGM layout, as A1111 and ComfyUI keep them) and, for
diffusers' ``config=``, the configs, tokenizers and scheduler of its diffusers folder without the weights.

Each load is its own process, started through ``bake_sdxl``'s wrapper that reads the process's peak RSS (the
parent stays small, since exec carries its high-water RSS into the child); the child loads, then draws one 64 px
image in one step, and prints the seconds of both (after imports). sdtune and diffusers alternate, --repeats each, medians printed with their ratio.
Both load in the file's dtype (fp32 for SD 1.5, fp16 for SDXL).

    python benchmarks/load_single_file.py [--work DIR] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bake_sdxl import WRAPPER, available_gb, config_folder  # noqa: E402

# (label, random model, dtype of the file and of the load, diffusers pipeline class)
CASES = (("SD 1.5 fp32", "sd15-random", "fp32", "StableDiffusionPipeline"),
         ("SDXL fp16", "sdxl-random", "fp16", "StableDiffusionXLPipeline"))
PREPARE = """
import shutil, sys
from sdtune.models import load_base, save_diffusers, save_single_file
spec, dtype, file, folder = sys.argv[1:5]
base = load_base(spec, device="cpu", dtype=dtype)
save_single_file(base, file)
save_diffusers(base, folder)
"""
# Each child loads, then draws one 64 px image in one step (every weight of the UNet, the text encoders and the
# VAE used once): diffusers' tensors stay views of the file until first used, so a load alone would leave the
# reading out of its time and its memory
FIRST_IMAGE = """
pipe.set_progress_bar_config(disable=True)
pipe("a photo", num_inference_steps=1, height=64, width=64, guidance_scale=1.0)
print(loaded - start, time.perf_counter() - start)
"""
SDTUNE_CHILD = """
import sys, time
from sdtune.models import load_base
start = time.perf_counter()
pipe = load_base(sys.argv[1], device="cpu", dtype=sys.argv[2]).pipeline()
loaded = time.perf_counter()
""" + FIRST_IMAGE
DIFFUSERS_CHILD = """
import sys, time, warnings
warnings.simplefilter("ignore")
import diffusers, torch
from diffusers.utils import logging
logging.set_verbosity_error()
logging.disable_progress_bar()
file, dtype, config, pipeline = sys.argv[1:5]
start = time.perf_counter()
pipe = getattr(diffusers, pipeline).from_single_file(
    file, config=config, local_files_only=True, torch_dtype={"fp32": torch.float32, "fp16": torch.float16}[dtype])
loaded = time.perf_counter()
""" + FIRST_IMAGE


def prepare(work: Path, spec: str, dtype: str) -> tuple[Path, Path]:
    file, config = work / f"{spec}.safetensors", work / f"{spec}-config"
    done = work / f"{spec}.done"  # written last: a run killed half-way builds them again
    if not done.exists():
        folder = work / f"{spec}-folder"
        subprocess.run([sys.executable, "-c", PREPARE, spec, dtype, str(file), str(folder)], check=True)
        config_folder(folder, config)
        shutil.rmtree(folder)
        done.write_text("")
    return file, config


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds to load, seconds to load and draw, as the child reports them; peak RSS in GB) of one process."""
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        proc = subprocess.run([sys.executable, "-c", WRAPPER, rss.name, *cmd], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
        load, image = (float(x) for x in proc.stdout.split()[-2:])
        return load, image, int(rss.read()) * 1024 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdtune-bench-load")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the inputs (about 11 GB)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {available_gb():.1f} GB available",
          flush=True)
    print("\n| file | load s, sdtune / diffusers | load + first image s | faster | peak RSS | memory |\n"
          "|---|---|---|---|---|---|")
    for label, spec, dtype, pipeline in CASES:
        file, config = prepare(args.work, spec, dtype)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(run([sys.executable, "-c", SDTUNE_CHILD, str(file), dtype]))
            theirs.append(run([sys.executable, "-c", DIFFUSERS_CHILD, str(file), dtype, str(config), pipeline]))
        (s, i, m), (ds, di, dm) = ([statistics.median(x[k] for x in runs) for k in range(3)]
                                   for runs in (ours, theirs))
        size = file.stat().st_size / 1e9
        print(f"| {label} ({size:.1f} GB) | {s:.1f} / {ds:.1f} | {i:.1f} / {di:.1f} | {di / i:.2f}x | "
              f"{m:.2f} / {dm:.2f} GB | {m / dm:.2f}x |", flush=True)
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
