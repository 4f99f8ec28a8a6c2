"""Baking two LoRAs into a full-size SDXL checkpoint (fp16, 6.9 GB), whole process, on the CPU: ``sdtune merge``
into a single file and into a diffusers folder, against diffusers.

Inputs, built here without ever holding the model: a random-init SDXL 1.0 single file in SGM layout, written
tensor by tensor (key names and shapes from ``ldm.to_single_file`` on meta modules, then each tensor's random
bytes), and two kohya LoRAs of rank 32 on every attention, feed-forward and text-encoder linear layer of both
encoders (``lora_apply.write_kohya``), baked at weights 0.8 and 1.0:

- sdtune:    ``sdtune merge --model xl.safetensors --lora a.safetensors:0.8 --lora b.safetensors --out OUT``
  (OUT ``merged.safetensors``: SGM single file; OUT a folder: diffusers layout)
- diffusers: ``StableDiffusionXLPipeline.from_single_file(xl.safetensors, config=FOLDER, torch_dtype=fp16)``,
  ``load_lora_weights`` x2, ``set_adapters``, ``fuse_lora`` (unet and both text encoders),
  ``unload_lora_weights``, ``save_pretrained``; run only when the machine has --diffusers-gb of memory available.

Each run is its own process, started through a small wrapper that reads the run's peak RSS with
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``: on exec Linux carries the parent's high-water RSS over into
the child's, so the parent must be small, and this script's own peak (one tensor of the checkpoint at a time)
is not. Outputs are synced to disk before the next run starts. The diffusers and sdtune folders are compared on
probe layers (UNet attention, each encoder's q projection), relative to the change the LoRAs make.

Heavy: about 21 GB of disk under --work at the peak (everything deleted at the end unless --keep) and, for
the diffusers run, about 16 GB of RAM.

    python benchmarks/bake_sdxl.py [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from sdtune import checkpoints, families, ldm, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_apply import write_kohya  # noqa: E402  (the LoRAs of the apply benchmark)

WEIGHTS = (0.8, 1.0)
RANK = 32
WRAPPER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""
DIFFUSERS_CHILD = """
import sys, warnings
warnings.simplefilter("ignore")
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import logging
logging.set_verbosity_error()
logging.disable_progress_bar()
model, config, a, b, out = sys.argv[1:6]
pipe = StableDiffusionXLPipeline.from_single_file(model, config=config, torch_dtype=torch.float16,
                                                  local_files_only=True)
pipe.load_lora_weights(a, adapter_name="a")
pipe.load_lora_weights(b, adapter_name="b")
pipe.set_adapters(["a", "b"], adapter_weights=[%s, %s])
pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0, adapter_names=["a", "b"])
pipe.unload_lora_weights()
pipe.save_pretrained(out)
""" % WEIGHTS
TE2 = families.SDXL.text_encoders[1].single_file_prefix
# (file in the folder, key there, key in the single file, rows of it): UNet cross-attention, te1 and te2 q_proj.
PROBES = (("unet/diffusion_pytorch_model", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
           ldm.UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", None),
          ("text_encoder/model", "encoder.layers.3.self_attn.q_proj.weight",
           "conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight", None),
          ("text_encoder_2/model", "text_model.encoder.layers.5.self_attn.q_proj.weight",
           TE2 + "transformer.resblocks.5.attn.in_proj_weight", (0, 1280)))


def write_checkpoint(path: Path) -> None:
    """A random-init SDXL fp16 single file, one tensor in memory at a time."""
    with init_empty_weights():
        parts = models.build_parts(families.SDXL)
    state = ldm.to_single_file(parts, families.SDXL)  # meta tensors (position ids: real), names and shapes only
    dtype = {k: torch.float16 if v.is_floating_point() else v.dtype for k, v in state.items()}
    header, offset = {}, 0
    for key, value in state.items():
        nbytes = value.numel() * dtype[key].itemsize
        header[key] = {"dtype": {torch.float16: "F16", torch.int64: "I64"}[dtype[key]], "shape": list(value.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps({"__metadata__": {checkpoints.META_ARCH: "sdxl"}, **header}).encode()
    head += b" " * (-len(head) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for key, value in state.items():
            tensor = value if not value.is_meta else (torch.randn(value.shape, generator=g) * 0.02).half()
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


def prepare(work: Path) -> dict:
    paths = {"model": work / "xl.safetensors", "a": work / "a_kohya.safetensors", "b": work / "b_kohya.safetensors"}
    done = work / "inputs.done"  # written last: a run killed half-way builds them again
    if not done.exists():
        write_checkpoint(paths["model"])
        with init_empty_weights():
            shells = SimpleNamespace(family=families.SDXL, dtype=torch.float16, **models.build_parts(families.SDXL))
        write_kohya(shells, paths["a"], 1, RANK, alpha=16.0)
        write_kohya(shells, paths["b"], 2, RANK, alpha=8.0)
        done.write_text("")
    return paths


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one process."""
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, rss.name, *cmd], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
        os.sync()
        return seconds, int(rss.read()) * 1024 / 1e9


def sdtune_cmd(paths: dict, out: Path) -> list[str]:
    return [sys.executable, "-m", "sdtune.cli", "merge", "--model", str(paths["model"]),
            "--lora", f"{paths['a']}:{WEIGHTS[0]}", "--lora", f"{paths['b']}:{WEIGHTS[1]}", "--out", str(out)]


def config_folder(folder: Path, dst: Path) -> Path:
    """The configs, tokenizers and scheduler of a diffusers folder, without weights (diffusers' ``config=``)."""
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"), dirs_exist_ok=True)
    return dst


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 / 1e9


def _tensor(path: Path, key: str, rows=None) -> torch.Tensor:
    """A tensor (or a block of its rows) of a file, by its key with or without transformers' ``text_model.``."""
    with safe_open(str(path), "pt") as f:
        key = key if key in f.keys() else key.removeprefix("text_model.")
        return (f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]).double()


def _folder_tensor(folder: Path, stem: str, key: str) -> torch.Tensor:
    """A weight of a diffusers folder's component, from its one file or from the shard that holds it."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return _tensor(single, key)
    weight_map = json.loads(index.read_text())["weight_map"]
    key = key if key in weight_map else key.removeprefix("text_model.")
    return _tensor(index.parent / weight_map[key], key)


def max_relative_difference(ours: Path, theirs: Path, base: Path, merged_single: Path) -> float:
    """Largest |ours - theirs| / |theirs - base| over the probes, ours: the folder and the single file."""
    worst = 0.0
    for stem, key, single_key, rows in PROBES:
        w0, y = _tensor(base, single_key, rows), _folder_tensor(theirs, stem, key)
        for x in (_folder_tensor(ours, stem, key), _tensor(merged_single, single_key, rows)):
            worst = max(worst, ((x - y).norm() / (y - w0).norm()).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdtune-bench-bake-sdxl")
    ap.add_argument("--keep", action="store_true", help="keep the inputs and outputs (about 21 GB)")
    ap.add_argument("--diffusers-gb", type=float, default=16.0, help="memory the diffusers run needs available")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = prepare(args.work)
    size = paths["model"].stat().st_size / 1e9
    lora_mb = sum(paths[k].stat().st_size for k in "ab") / 1e6
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {available_gb():.1f} GB available; "
          f"inputs ({size:.2f} GB checkpoint, LoRAs {lora_mb:.0f} MB together) built in "
          f"{time.perf_counter() - start:.0f} s in {args.work}", flush=True)

    rows = []
    outs = {"single": args.work / "merged.safetensors", "folder": args.work / "merged"}
    for label, out in (("sdtune merge -> SGM single file", outs["single"]), ("sdtune merge -> diffusers folder",
                                                                           outs["folder"])):
        seconds, gb = run(sdtune_cmd(paths, out))
        rows.append((label, seconds, gb, os.getloadavg()[0]))
        print(f"  {label}: {seconds:.1f} s, {gb:.2f} GB (load average {rows[-1][3]:.1f})", flush=True)
    theirs = args.work / "diffusers"
    if available_gb() >= args.diffusers_gb:
        config = config_folder(outs["folder"], args.work / "config")
        seconds, gb = run([sys.executable, "-c", DIFFUSERS_CHILD, str(paths["model"]), str(config), str(paths["a"]),
                           str(paths["b"]), str(theirs)])
        rows.append(("diffusers from_single_file + fuse_lora + save_pretrained", seconds, gb, os.getloadavg()[0]))
        print(f"  {rows[-1][0]}: {seconds:.1f} s, {gb:.2f} GB (load average {rows[-1][3]:.1f})", flush=True)
    else:
        print(f"  diffusers: not run, {available_gb():.1f} GB available (< --diffusers-gb {args.diffusers_gb:.0f})")

    print(f"\n| SDXL fp16 ({size:.1f} GB) + two rank-{RANK} LoRAs, whole process | seconds | peak RSS GB | "
          "load average after |\n|---|---|---|---|")
    for label, seconds, gb, load in rows:
        print(f"| {label} | {seconds:.1f} | {gb:.2f} | {load:.1f} |")
    if theirs.exists():
        rel = max_relative_difference(outs["folder"], theirs, paths["model"], outs["single"])
        print(f"sdtune (folder and single file) vs diffusers on the probe layers: largest difference {rel:.1e} of "
              "the weight change")
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
