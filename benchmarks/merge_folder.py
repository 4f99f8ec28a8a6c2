"""Baking two LoRAs into a diffusers folder, whole process: ``sdtune merge`` against diffusers (CPU).

Two kohya LoRAs of rank 32 (random values, on every attention, feed-forward and text-encoder linear layer)
baked at weights 0.8 and 1.0 into a random-init SD 1.5 (``load_base("sd15-random")``) saved as a diffusers
folder, and into the same model as an LDM single file; the output is a diffusers folder. Each run is a
separate process, timed from start to exit, its peak RSS read by ``/usr/bin/time`` (a child's own
``ru_maxrss`` would include the RSS of a big parent at fork):

- sdtune:    ``sdtune merge --model FOLDER|FILE --lora a.safetensors:0.8 --lora b.safetensors --out OUT``
- diffusers: ``StableDiffusionPipeline.from_pretrained(FOLDER)`` or ``.from_single_file(FILE, config=FOLDER)``,
  then ``load_lora_weights`` x2, ``set_adapters``, ``fuse_lora``, ``unload_lora_weights``, ``save_pretrained``

Runs alternate (sdtune, diffusers, sdtune, ...) so that a change in machine load hits both sides alike; each
output is deleted and the page cache flushed (``sync``) before the next run, so that no run pays for the
previous one's writes. The table gives the median of each side.

A third process gives the floor: importing torch, diffusers and transformers, then copying the input folder
(what any merge into a folder must at least do: the output's bytes are written either way). sdtune's time over
the floor says how much is left to win; diffusers' time over the floor bounds any speed-up.

Heavy: about 17 GB of disk under --work (the inputs are kept between runs and built once) and 5 GB of RAM.

    python benchmarks/merge_folder.py [--work DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_apply import write_kohya, write_ldm_file  # noqa: E402  (the inputs of the apply benchmark)

WEIGHTS = (0.8, 1.0)
DIFFUSERS_CHILD = """
import sys, warnings
warnings.simplefilter("ignore")
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging
logging.set_verbosity_error()
logging.disable_progress_bar()
model, folder, a, b, out = sys.argv[1:6]
if model.endswith(".safetensors"):
    pipe = StableDiffusionPipeline.from_single_file(model, config=folder, torch_dtype=torch.float32,
                                                    safety_checker=None)
else:
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
pipe.load_lora_weights(a, adapter_name="a")
pipe.load_lora_weights(b, adapter_name="b")
pipe.set_adapters(["a", "b"], adapter_weights=[%s, %s])
pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["a", "b"])
pipe.unload_lora_weights()
pipe.save_pretrained(out)
""" % WEIGHTS
# The least any merge into a folder does, whole process: import what reads the model (torch, diffusers' UNet,
# transformers' CLIP) and write the output's bytes, here as a plain copy of the input folder by the kernel.
FLOOR_CHILD = """
import shutil, sys
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel
shutil.copytree(sys.argv[1], sys.argv[2])
"""
# Layers compared between the two outputs (UNet attention, UNet feed-forward, text-encoder attention).
PROBES = (("unet/diffusion_pytorch_model.safetensors", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
          ("unet/diffusion_pytorch_model.safetensors", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"),
          ("text_encoder/model.safetensors", "encoder.layers.2.self_attn.q_proj.weight"))


def prepare(work: Path, rank: int) -> dict:
    """The inputs, built once: the model as a diffusers folder and as an LDM single file, and two LoRAs."""
    paths = {"folder": work / "sd15_random", "single": work / "sd15_random.safetensors",
             "a": work / "a_kohya.safetensors", "b": work / "b_kohya.safetensors"}
    done = work / "inputs.done"  # written last: a run killed half-way builds them again
    if done.exists():
        return paths
    from sdtune.models import load_base, save_diffusers

    base = load_base("sd15-random", device="cpu", dtype="fp32")
    save_diffusers(base, paths["folder"])
    write_ldm_file(base, paths["single"])
    write_kohya(base, paths["a"], 1, rank, alpha=16.0)
    write_kohya(base, paths["b"], 2, rank, alpha=8.0)
    del base
    gc.collect()
    done.write_text("")
    return paths


def run(cmd: list[str], out: Path, keep: bool = False) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one process writing ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-o", stats.name, "-f", "%M", *cmd], capture_output=True, text=True,
                              check=False)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
        rss_kb = int(stats.read().split()[-1])
    if not keep:
        shutil.rmtree(out)
    return seconds, rss_kb * 1024 / 1e9


def sdtune_cmd(model: Path, paths: dict, out: Path) -> list[str]:
    return ["sdtune", "merge", "--model", str(model), "--lora", f"{paths['a']}:{WEIGHTS[0]}",
            "--lora", f"{paths['b']}:{WEIGHTS[1]}", "--out", str(out)]


def diffusers_cmd(model: Path, paths: dict, out: Path) -> list[str]:
    return [sys.executable, "-c", DIFFUSERS_CHILD, str(model), str(paths["folder"]), str(paths["a"]),
            str(paths["b"]), str(out)]


def floor_cmd(model: Path, paths: dict, out: Path) -> list[str]:
    return [sys.executable, "-c", FLOOR_CHILD, str(paths["folder"]), str(out)]


def max_relative_difference(ours: Path, theirs: Path, base: Path) -> float:
    """Largest |ours - theirs| / |theirs - base| over the probe layers (how far apart the two bakes are,
    relative to the change the LoRAs make)."""
    worst = 0.0
    for file, key in PROBES:
        with safe_open(str(ours / file), "pt") as a, safe_open(str(theirs / file), "pt") as b, \
                safe_open(str(base / file), "pt") as c:
            x, y, w0 = (f.get_tensor(key).double() for f in (a, b, c))
        worst = max(worst, ((x - y).norm() / (y - w0).norm()).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdtune-bench-merge")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side and input (alternating)")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.rank)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; inputs in {args.work}", flush=True)

    rows = {}  # (input, tool) -> [(seconds, GB), ...]
    for i in range(args.repeats):
        last = i == args.repeats - 1  # the last outputs are kept and compared
        for source in ("folder", "single"):
            for tool, command in (("sdtune", sdtune_cmd), ("diffusers", diffusers_cmd), ("floor", floor_cmd)):
                if tool == "floor" and source == "single":
                    continue  # one floor: the output is the same folder
                out = args.work / f"out_{tool}_{source}"
                rows.setdefault((source, tool), []).append(
                    run(command(paths[source], paths, out), out, keep=last and tool != "floor"))
                seconds, gb = rows[source, tool][-1]
                print(f"  {tool:9} {source:6} run {i + 1}: {seconds:5.1f} s, {gb:.2f} GB "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)

    print(f"\n| merge into a diffusers folder, whole process (median of {args.repeats}) | diffusers s | sdtune s "
          "| speed-up | diffusers GB | sdtune GB | RSS ratio |\n|---|---|---|---|---|---|---|")
    for source, label in (("folder", "diffusers folder in"), ("single", "LDM single file in")):
        d_s, d_gb = (statistics.median(v) for v in zip(*rows[source, "diffusers"]))
        s_s, s_gb = (statistics.median(v) for v in zip(*rows[source, "sdtune"]))
        print(f"| {label} | {d_s:.1f} | {s_s:.1f} | {d_s / s_s:.1f}x | {d_gb:.2f} | {s_gb:.2f} | {d_gb / s_gb:.1f}x |")
    f_s = statistics.median(s for s, _ in rows["folder", "floor"])
    d_s, s_s = (statistics.median(s for s, _ in rows["folder", tool]) for tool in ("diffusers", "sdtune"))
    print(f"\nFloor (import torch/diffusers/transformers + copy the input folder, whole process): {f_s:.1f} s. "
          f"sdtune takes {s_s / f_s:.2f}x the floor, diffusers {d_s / f_s:.2f}x; the most any tool could be "
          f"faster than diffusers here is {d_s / f_s:.1f}x.")
    for source in ("folder", "single"):
        ours, theirs = args.work / f"out_sdtune_{source}", args.work / f"out_diffusers_{source}"
        rel = max_relative_difference(ours, theirs, paths["folder"])
        print(f"{source} in: sdtune vs diffusers output (probe layers): largest difference {rel:.1e} of the "
              "weight change")
        shutil.rmtree(ours)
        shutil.rmtree(theirs)


if __name__ == "__main__":
    main()
