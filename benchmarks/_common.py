"""What the training benchmarks share: the model and data both trainers read, running a trainer as a whole
process, per-step times from its own progress bar, FLOPs per step, the machine's matmul rate, the profile.

Fairness rules, the same for sdtune and diffusers' example scripts:
- one model folder (``--arch``: a mid-size random-init SD 1.x architecture, ``write_mid_model``, or a small
  random-init SDXL architecture, ``write_small_xl_model``) and one image folder, written once per benchmark run;
  the same settings (size, batch, steps, lr, seed, fp32);
- each run is a fresh process started the same way; whole-process time is its wall time from start to exit
  (imports, loading, training, saving), peak RSS is the ``ru_maxrss`` that ``wait4`` reports for it (which
  covers the processes it waited for, so ``run.sh`` and the python it starts count as one), taken by a small
  launcher process (``LAUNCHER``): a process's ``ru_maxrss`` starts at the peak RSS of the process it was
  spawned from (Linux carries the old memory's high-water mark over ``exec``), which for the benchmark itself,
  holding torch and a model, would be the floor of every row;
- seconds per step come from each trainer's own tqdm bar: ``TQDM_BAR_FORMAT`` (tqdm reads its defaults from
  ``TQDM_*`` variables) makes every bar print its description, ``n``, total and the exact elapsed seconds at
  each update; the training bar is the last one of ``steps`` steps that is not a "Loading ..." bar (diffusers'
  SDXL DreamBooth script loads a pipeline after training), each step is timed at its bar's first mark of it
  (later marks of the same step are postfix updates, or work after the last step such as sdtune's final
  validation loss), and the rate is taken between step ``warmup`` and the last step, so start-up and the
  first steps do not count;
- runs alternate between the trainers and repeat; the tables show medians (the machine is shared);
- a diffusers script that cannot run here (absent, or it stops with an error) gets a row that says why, and
  the sdtune rows are still measured;
- on a GPU (``--device cuda``, see ``gpu_sdxl.sh``) each row also gets its peak GPU memory: the most nvidia-smi
  reports in use on the GPU while the trainer runs, less what was in use before it started, polled four times a
  second (PyTorch's caching allocator keeps what it reserved, so a peak lasts until the process frees its cache
  or ends); both trainers run in the same dtype (``--dtype bf16``: sdtune loads the model in bf16 and trains
  with bf16 mixed precision, the scripts with ``--mixed_precision bf16``), and MFU is taken against the GPU's
  own matmul rate in that dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# diffusers' example scripts: beside the checkout, or where SDTUNE_DIFFUSERS_EXAMPLES says (gpu_sdxl.sh: a copy
# carried to a machine that has no ../shared)
EXAMPLES = Path(os.environ.get("SDTUNE_DIFFUSERS_EXAMPLES") or ROOT.parent / "shared" / "oracles" / "diffusers-examples")

# A mid-size model of the SD 1.x architecture: SD 1.5's block types, attention layout and CLIP-L text width
# (768, which is what makes it an SD 1.x model to any loader), with a tenth of the channels and one text layer
# (a step is then about 9 GFLOP for TI, 3.5 for LoRA: a minute of training on 2 shared cores, where SD 1.5's
# real sizes would take hours; at 64 px the text encoder is a larger share of the work than at 512 px).
MID_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
MID_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=2,
    block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
MID_TEXT = dict(
    hidden_size=768, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=12, vocab_size=49408,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
    eos_token_id=49407, pad_token_id=49407)
MID_NAME = "mid-size SD 1.x (UNet 32/64/128/128, 10M; CLIP width 768, 1 layer; VAE 32..128)"

# The small SDXL architecture is sdtune's ``sdxl-small-random`` (``sdtune.tiny.xl_config``): SDXL's three UNet
# levels with transformer depths 1, 2, 10, its added conditioning (pooled text + six time ids) and module names,
# at channel widths 32/64/128, and both text encoders at SDXL's widths (768 and 1280, so the embedding tables
# and the UNet's 2048-wide cross-attention are SDXL's) with two layers each. At 64 px the cross-attention
# projections of the 77 text tokens are most of a step's FLOPs, as the text side is in a real SDXL at 1024 px.
XL_NAME = "small SDXL (UNet 32/64/128, depths 1/2/10, 54M; CLIP-L/bigG widths 768/1280, 2 layers each)"
# SDXL at its real sizes (sdtune's ``sdxl-random``), for the GPU rows: a CPU would take minutes per step at 1024 px.
FULL_XL_NAME = "full-size SDXL, random init (UNet 2.6B; CLIP-L and OpenCLIP bigG)"

STEP_MARK = re.compile(r"@step (.*?)\|(\d+)\|(\d+|None)\|([0-9.]+)@")
# sdtune's progress in a log file (console.LogLines): "train lora: 12/60 step, 1.2345 s, ..." (a line per step here)
LOG_LINE = re.compile(r"^(.*?): (\d+)/(\d+) \w+, ([0-9]+\.[0-9]+) s", re.M)


def write_mid_model(folder: Path, device: str = "cpu", dtype: str = "fp32") -> Path:
    """The mid-size model (random init, seed 0) as a diffusers folder that both trainers load; drawn on the CPU
    in fp32 (the same numbers on any device), saved in ``dtype``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as tf_logging

    from sdtune.tiny.model import tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**MID_UNET), vae=AutoencoderKL(**MID_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**MID_TEXT)), tokenizer=tokenizer(),
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tf_logging.disable_progress_bar()
    pipe.to(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).save_pretrained(folder)
    return folder


def write_small_xl_model(folder: Path, device: str = "cpu", dtype: str = "fp32") -> Path:
    """The small SDXL-architecture model (``sdxl-small-random``, random init, seed 0) as a diffusers folder."""
    from sdtune.models import load_base, save_diffusers

    return save_diffusers(load_base("sdxl-small-random", device="cpu", dtype=dtype), folder)


def release_gpu(device: str) -> None:
    """Hand this process's cached GPU memory back: the trainers' GPU memory is measured on a GPU it left empty."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def write_full_xl_model(folder: Path, device: str = "cpu", dtype: str = "fp32") -> Path:
    """SDXL at its real sizes (``sdxl-random``, random init, seed 0) as a diffusers folder: drawn on ``device``
    (seconds on a GPU; 3.5 B parameters are minutes on a CPU), saved in ``dtype`` (7 GB in bf16)."""
    from sdtune.models import load_base, save_diffusers

    save_diffusers(load_base("sdxl-random", device=device, dtype=dtype), folder)
    release_gpu(device)
    return folder


@dataclass(frozen=True)
class Arch:
    """A model architecture the benchmarks run on: how to write its model folder, and diffusers' example
    script for each kind of training on it."""
    title: str
    write_model: Callable[[Path, str, str], Path]  # (folder, device, dtype) -> folder; small ones draw on the CPU
    scripts: dict[str, str]  # "ti" / "lora" -> script in EXAMPLES


# SDXL LoRA runs against train_dreambooth_lora_sdxl.py, the script the SDXL issue names: it reads a plain folder
# of images (every file in it as an image) with one instance prompt, whose text it encodes once, as sdtune does.
# train_text_to_image_lora_sdxl.py also runs here (datasets' imagefolder with a metadata.jsonl, as the SD 1.x
# row's script does) but encodes each batch's captions again at every step.
ARCHS = {
    "sd1": Arch(MID_NAME, write_mid_model, {"ti": "textual_inversion.py", "lora": "train_text_to_image_lora.py"}),
    "sdxl": Arch(XL_NAME, write_small_xl_model,
                 {"ti": "textual_inversion_sdxl.py", "lora": "train_dreambooth_lora_sdxl.py"}),
    "sdxl-full": Arch(FULL_XL_NAME, write_full_xl_model,
                      {"ti": "textual_inversion_sdxl.py", "lora": "train_dreambooth_lora_sdxl.py"}),
}


def arguments(kind: str, doc: str) -> argparse.ArgumentParser:
    """The command line both benchmarks take (``kind``: "ti" or "lora")."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=list(ARCHS), default="sd1",
                   help="the model: a mid-size SD 1.x, a small SDXL, or (for a GPU) a full-size SDXL architecture "
                        "(default sd1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both trainers run")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (default), or bf16: the model's weights, and mixed precision for both trainers")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="both trainers checkpoint activations (diffusers' TI script only its text encoders')")
    p.add_argument("--model-folder", type=Path, metavar="DIR",
                   help="write the model here, or use the one already written here (a full-size SDXL takes "
                        "minutes to write; train_lora.py and train_ti.py can share it)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3, help="runs per trainer, alternating (medians are shown)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the per-step time")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--sdtune-args", action="append", default=[], metavar="FLAGS",
                   help=f"also run sdtune with these extra train {kind} flags, as its own row (repeatable; write "
                        "--sdtune-args=--flag: argparse takes a lone value starting with -- for an option)")
    p.add_argument("--profile", action="store_true", help="also print a profile of sdtune's steps")
    p.add_argument("--no-diffusers", action="store_true", help="run sdtune only")
    return p


def model_folder(a: argparse.Namespace, scratch: Path) -> Path:
    """The model both trainers read: the one in ``--model-folder`` if written there before, else a new one."""
    folder = a.model_folder or scratch / "model"
    if (folder / "model_index.json").is_file():
        print(f"using the model already in {folder}", file=sys.stderr, flush=True)
        return folder
    start = time.perf_counter()
    ARCHS[a.arch].write_model(folder, a.device, a.dtype)
    print(f"wrote the model to {folder} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return folder


def check_device(device: str) -> None:
    """One line, before anything is written, where the device asked for is not here."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu")


def write_images(folder: Path, n: int = 8, style: str | None = None, captions: bool = True) -> Path:
    """``n`` shapes-world images (a purple star, or any shape in ``style``), with .txt captions if asked and a
    metadata.jsonl (the layout diffusers' text-to-image scripts read through ``datasets``' imagefolder)."""
    from sdtune.tiny import world

    fixed = {"style": style} if style else {"shape": "star", "colour": "purple"}
    world.write_dataset(folder, world.concept_scenes(n, seed=0, **fixed), template=None, with_style=False)
    lines = [json.dumps({"file_name": p.name, "text": p.with_suffix(".txt").read_text().strip()})
             for p in sorted(folder.glob("*.png"))]
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    else:
        for f in folder.glob("*.txt"):
            f.unlink()
    return folder


# ---------------------------------------------------------------- running a trainer

def child_env(threads: int, scratch: Path) -> dict:
    """The environment of every trainer process: same threads, offline, caches in the run's scratch folder,
    and progress that prints each step's exact elapsed time: tqdm's bars (the scripts') in a format of marks,
    sdtune's log lines (its progress off a terminal) at every step."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(scratch / "hf-datasets"), "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1",
            "TQDM_BAR_FORMAT": "@step {desc}|{n}|{total}|{elapsed_s:.4f}@\n", "SDTUNE_LOG_SECONDS": "0",
            "PATH": f"{Path(sys.executable).parent}:"
            f"{os.environ.get('PATH', '')}",
            # this checkout's sdtune first; packages installed beside the environment's (gpu_sdxl.sh) stay found
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}


class TrainerFailed(Exception):
    """A trainer process ended with an error; ``reason`` is its last error line, ``output`` the end of its output."""

    def __init__(self, reason: str, output: str):
        super().__init__(reason)
        self.reason, self.output = reason, output


ERROR_LINE = re.compile(r"^(\w+(\.\w+)*(Error|Exception)\b.*|.*can't open file.*|.*No such file.*)$")


# Runs argv[2:] and writes its ru_maxrss (KB) to argv[1]; a small python (about 10 MB) without torch.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status) & 255)")


class GpuMemory:
    """The most GPU memory in use (GB) while it is entered, less what was in use on entry: nvidia-smi polled in a
    thread four times a second."""

    def __init__(self, device: str):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0]
        index = device.partition(":")[2] or visible or "0"
        self.query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index]
        self.peak_gb, self._stop = 0.0, threading.Event()

    def used_gb(self) -> float:
        return float(subprocess.run(self.query, capture_output=True, text=True, check=True).stdout) / 1024

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            self.peak_gb = max(self.peak_gb, self.used_gb() - self.before)

    def __enter__(self):
        self.before = self.used_gb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_process(cmd: list[str], env: dict, device: str = "cpu") -> dict:
    """Run ``cmd`` as a fresh process: wall seconds, peak RSS (GB), on a GPU its peak GPU memory (GB), and its
    output; ``TrainerFailed`` on failure."""
    gpu = GpuMemory(device) if device.startswith("cuda") else None
    with tempfile.TemporaryDirectory() as tmp, gpu or contextlib.nullcontext():
        rss = Path(tmp) / "maxrss"
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(rss), *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        out = proc.stdout.read()
        proc.wait()
        wall = time.perf_counter() - start
        maxrss_kb = int(rss.read_text()) if rss.is_file() else 0
    if proc.returncode:
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        errors = [line for line in lines if ERROR_LINE.match(line)]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1][:300]
        raise TrainerFailed(f"{reason} (exit status {proc.returncode})", out[-4000:])
    gpu_gb = {"peak_gpu_gb": gpu.peak_gb} if gpu else {}
    return {"wall_s": wall, "peak_rss_gb": maxrss_kb / 2**20, **gpu_gb, "output": out}  # ru_maxrss: KB on Linux


def step_times(output: str, steps: int) -> dict[int, float]:
    """Step -> seconds since the bar started, from the ``TQDM_BAR_FORMAT`` marks (or sdtune's log lines) of the
    training bar: the last bar of ``steps`` steps that is not a model-loading bar, each step at its first mark."""
    bars: list[tuple[str, str, dict[int, float]]] = []
    current: dict[str, dict[int, float]] = {}  # the open bar of each description and total (bars may interleave)
    for desc, n, total, t in STEP_MARK.findall(output) + LOG_LINE.findall(output):
        key, n = f"{desc}|{total}", int(n)
        marks = current.get(key)
        if marks is None or (n == 0 and max(marks) > 0):  # a new bar (one bar may print step 0 again)
            marks = current[key] = {}
            bars.append((desc, total, marks))
        marks.setdefault(n, float(t))
    training = [marks for desc, total, marks in bars if total == str(steps) and not desc.startswith("Loading")]
    return training[-1] if training else {}


def seconds_per_step(output: str, warmup: int, steps: int) -> float:
    marks = step_times(output, steps)
    last = max(marks, default=0)
    if last <= warmup or warmup not in marks:
        raise SystemExit(f"no step times after step {warmup} in the output:\n{output[-2000:]}")
    return (marks[last] - marks[warmup]) / (last - warmup)


def diffusers_examples() -> Path | None:
    """The folder of diffusers' example scripts and run.sh, or None (with a message) when it is absent."""
    if (EXAMPLES / "run.sh").is_file():
        return EXAMPLES
    print(f"diffusers' example scripts are not at {EXAMPLES}: skipping the diffusers side of the comparison",
          file=sys.stderr)
    return None


def sdtune_cmd(kind: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sdtune.cli", "train", kind, *args]


def diffusers_cmd(examples: Path, script: str, args: list[str]) -> list[str]:
    if not (examples / script).is_file():
        raise TrainerFailed(f"{script} is not in {examples}", "")
    return ["bash", str(examples / "run.sh"), script, *args]


def compare(trainers: dict[str, Callable[[Path], list[str]]], scratch: Path, threads: int, repeats: int,
            warmup: int, steps: int, device: str = "cpu") -> dict[str, dict]:
    """Run each trainer ``repeats`` times, alternating (the first one changes each round); the median of
    each measure per trainer, with the single values kept under ``runs``. A diffusers script that fails is
    not run again: its entry is ``{"not_run": reason}``; an sdtune failure stops the benchmark."""
    runs: dict[str, list[dict]] = {name: [] for name in trainers}
    failed: dict[str, str] = {}
    names = list(trainers)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if name in failed:
                continue
            out = scratch / f"{names.index(name)}-{r}"
            if out.exists():
                shutil.rmtree(out)
            try:
                res = run_process(trainers[name](out), child_env(threads, out), device)  # the command may refuse too
            except TrainerFailed as e:
                if not name.startswith("diffusers"):
                    raise SystemExit(f"{name} failed: {e.reason}\n{e.output}") from None
                failed[name] = e.reason
                print(f"  round {r + 1}/{repeats} {name}: cannot run here: {e.reason}", file=sys.stderr, flush=True)
                continue
            res["s_per_step"] = seconds_per_step(res.pop("output"), warmup, steps)
            runs[name].append(res)
            gpu = f", GPU {res['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in res else ""
            print(f"  round {r + 1}/{repeats} {name}: {res['wall_s']:.1f} s, {res['peak_rss_gb']:.3f} GB{gpu}, "
                  f"{res['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    return {name: {"not_run": failed[name]} if name in failed else
            {**{k: statistics.median(x[k] for x in rs) for k in rs[0]}, "runs": rs} for name, rs in runs.items()}


# ---------------------------------------------------------------- the limit: FLOPs and matmul rate

def matmul_rates(threads: int, device: str = "cpu", seconds: float = 2.0) -> dict[str, float]:
    """The dense matmul rate (FLOP/s) this process reaches on ``threads`` threads or on the GPU, in fp32 and,
    where the CPU has bf16 units (AVX-512 BF16 or AMX) or on a GPU, bf16: the denominator of MFU. It is the
    80th percentile of the rates of repeated n x n products over ``seconds`` (n = 2048 on a CPU, 8192 on a
    GPU, each product waited for): near the best, but not one lucky timing (on a shared machine single
    timings stray both ways). A GPU's fp32 rate is without TF32, PyTorch's default, which both trainers keep."""
    import torch

    gpu = device.startswith("cuda")
    torch.set_num_threads(threads)
    n = 8192 if gpu else 2048
    dtypes = {"fp32": torch.float32}
    if gpu or cpu_has_bf16():
        dtypes["bf16"] = torch.bfloat16
    rates = {}
    for name, dtype in dtypes.items():
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        torch.mm(a, b)
        seen, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or len(seen) < 5:
            if gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.mm(a, b)
            if gpu:
                torch.cuda.synchronize()
            seen.append(2 * n**3 / (time.perf_counter() - t))
        rates[name] = sorted(seen)[int(0.8 * (len(seen) - 1))]
        del a, b
    release_gpu(device)
    return rates


def cpu_has_bf16() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def run_conditions(a: argparse.Namespace) -> str:
    """The dtype, checkpointing and machine of a run, for its table's title."""
    if a.device.startswith("cuda"):
        import torch

        where = torch.cuda.get_device_name(a.device)
    else:
        where = f"{a.threads} threads, {cpu_name()}"
    return f"{a.dtype}, " + ("gradient checkpointing, " if a.gradient_checkpointing else "") + where


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


# The modules that carry SDXL's added conditioning: the UNet's projection of pooled text + time ids into the
# time embedding, and the second text encoder's projection to the pooled embedding.
ADDED_CONDITIONING = ("add_embedding", "text_projection")


def sdtune_step_flops(kind: str, model: Path, settings: dict, device: str = "cpu",
                      dtype: str = "fp32") -> tuple[float, float, float]:
    """FLOPs of one sdtune training step (its third: data, forward, backward, clipping, optimizer), counted by
    ``torch.utils.flop_counter`` (matmuls, convolutions, attention; elementwise work is free): the model's
    FLOPs (every sample's text projected by the cross-attention, as the scripts do; what MFU counts for every
    row), the part of them spent in the added conditioning of SDXL (``ADDED_CONDITIONING``; 0 for SD 1.x), which
    shows that the count covers that path, and what sdtune executes (a batch's repeated captions projected
    once: ``sdtune.train.shared_text``). Counted without gradient checkpointing: its recomputation is not
    model FLOPs."""
    settings = dict(settings, gradient_checkpointing=False)
    total, added = _count_step_flops(kind, model, dict(settings, out=settings["out"] + "-model", share_text=False),
                                     device, dtype)
    return total, added, _count_step_flops(kind, model, dict(settings, out=settings["out"] + "-run"), device, dtype)[0]


def _count_step_flops(kind: str, model: Path, settings: dict, device: str, dtype: str) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    from sdtune.models import load_base
    from sdtune.train.config import LoraSettings, TISettings
    from sdtune.train.lora import train_lora
    from sdtune.train.ti import train_ti

    base = load_base(str(model), device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)

    def callback(step, loss):  # steps are counted after the optimizer: between the calls lies exactly one step
        if step == 2:
            counter.__enter__()
        elif step == 3:
            counter.__exit__(None, None, None)

    train, cls = (train_ti, TISettings) if kind == "ti" else (train_lora, LoraSettings)
    train(base, cls(**{**settings, "steps": 3, "progress": False, "report": False}), callback=callback)
    added = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                if name.rsplit(".", 1)[-1] in ADDED_CONDITIONING)
    del base  # the next count, or the next trainer, gets the GPU memory back
    release_gpu(device)
    return float(counter.get_total_flops()), float(added)


def diffusers_extra_flops(model: Path, batch: int, resolution: int, with_text: bool, device: str = "cpu") -> float:
    """FLOPs diffusers' scripts spend each step on work sdtune does once: the VAE encoding of the batch (and,
    for a UNet-only LoRA on per-image captions, the frozen text encoders' forward passes: one, or SDXL's two)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device).eval()
    encoders = []
    for sub in ("text_encoder", "text_encoder_2") if with_text else ():
        if (model / sub / "config.json").is_file():  # the class the folder was saved from (SDXL's second projects)
            cls = getattr(transformers, json.loads((model / sub / "config.json").read_text())["architectures"][0])
            encoders.append(cls.from_pretrained(model / sub).to(device).eval())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        vae.encode(torch.zeros(batch, 3, resolution, resolution, device=device)).latent_dist.sample()
        for encoder in encoders:
            encoder(torch.zeros(batch, 77, dtype=torch.long, device=device))
    del vae, encoders
    release_gpu(device)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- the table

def report(title: str, results: dict[str, dict], flops: tuple[float, float], extra_flops: float,
           rates: dict[str, float], repeats: int, dtype: str = "fp32") -> str:
    """The comparison table: medians, MFU (against the matmul rate in the run's dtype; the bf16 one for rows
    that run in bf16) and each sdtune row's ratios to diffusers; a trainer that could not run has a row that
    says why. Runs on a GPU also have a peak GPU memory column and ratio."""
    peak = rates["fp32"]
    flops, added, executed = flops
    gpu = any("peak_gpu_gb" in r for r in results.values())
    lines = [title, f"medians of {repeats} alternating runs per trainer; model FLOPs per step {flops / 1e9:.2f} GFLOP"
             + (f", {added / 1e6:.1f} MFLOP of it in the added conditioning (pooled text + time ids)" if added else "")
             + (f"; sdtune executes {executed / 1e9:.2f} GFLOP of them (a batch's repeated captions go through the "
                f"cross-attention's text projections once)" if executed < 0.999 * flops else "")
             + f"; diffusers also spends {extra_flops / 1e9:.2f} GFLOP/step re-encoding what sdtune caches; "
             f"matmul peak fp32 {peak / 1e9:.1f} GFLOP/s"
             + (f", bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s" if "bf16" in rates else ""),
             f"{'trainer':<48} {'s/step':>8} {'whole s':>8} {'peak RSS':>9}" + (f" {'peak GPU':>9}" if gpu else "")
             + f" {'MFU':>9}", "-" * (96 if gpu else 86)]
    for name, r in results.items():
        if "not_run" in r:
            lines.append(f"{name:<48} cannot run here: {r['not_run']}")
            continue
        bf16 = "bf16" in rates and (dtype == "bf16" or "bf16" in name)  # a bf16 run: against the bf16 rate
        rate = rates["bf16"] if bf16 else peak
        mfu = flops / r["s_per_step"] / rate
        # where sdtune skips repeated work, also how busy the FLOPs it does execute keep the cores
        busy = (f" ({100 * executed / r['s_per_step'] / rate:.1f}% executed)"
                if executed < 0.999 * flops and name.startswith("sdtune") else "")
        lines.append(f"{name:<48} {r['s_per_step']:>8.3f} {r['wall_s']:>8.1f} {r['peak_rss_gb']:>7.3f}GB "
                     + (f"{r['peak_gpu_gb']:>7.2f}GB " if gpu else "")
                     + f"{100 * mfu:>8.1f}%" + (" (of bf16)" if bf16 else "") + busy)
    reference = next((r for name, r in results.items() if name.startswith("diffusers") and "not_run" not in r), None)
    for name, r in results.items():
        if reference is not None and r is not reference and "not_run" not in r:
            lines.append(f"{name} / diffusers: speed-up {reference['s_per_step'] / r['s_per_step']:.2f}x per step, "
                         f"{reference['wall_s'] / r['wall_s']:.2f}x whole process (above 1: sdtune faster); "
                         f"peak memory {r['peak_rss_gb'] / reference['peak_rss_gb']:.2f}x"
                         + (f", peak GPU memory {r['peak_gpu_gb'] / reference['peak_gpu_gb']:.2f}x" if gpu else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- the profile

def profile_sdtune(kind: str, model: Path, settings: dict, threads: int, steps: int = 8) -> str:
    """Where one sdtune step's time goes: a torch.profiler summary of ``steps`` steps after two warm-up ones,
    split into data, text input, forward, backward, clipping and optimizer (record_function ranges put
    around the loop's parts here, not in sdtune), the top ops by self time, and what no op accounts for
    (Python and framework overhead)."""
    import torch
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    from sdtune.models import load_base
    from sdtune.train import objective
    from sdtune.train.config import LoraSettings, TISettings
    from sdtune.train.data import TrainingSet
    from sdtune.train.lora import train_lora
    from sdtune.train.ti import train_ti

    torch.set_num_threads(threads)
    parts = {"data": (TrainingSet, "batch"), "text": (objective.TextInput, "__call__"),
             "forward": (objective.Objective, "forward"), "backward": (Accelerator, "backward"),
             "clip": (Accelerator, "clip_grad_norm_")}
    originals = {name: getattr(cls, attr) for name, (cls, attr) in parts.items()}

    def ranged(name, fn):
        def wrapper(*a, **kw):
            with record_function(f"step:{name}"):
                return fn(*a, **kw)
        return wrapper

    for name, (cls, attr) in parts.items():
        setattr(cls, attr, ranged(name, originals[name]))
    base = load_base(str(model), device="cpu", dtype="fp32")
    stamps = []
    try:
        with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=2, active=steps, repeat=1),
                     record_shapes=False) as prof:
            def callback(step, loss):
                stamps.append(time.perf_counter())
                prof.step()

            train, cls = (train_ti, TISettings) if kind == "ti" else (train_lora, LoraSettings)
            train(base, cls(**{**settings, "steps": steps + 2, "progress": False, "report": False}), callback=callback)
    finally:
        for name, (cls, attr) in parts.items():
            setattr(cls, attr, originals[name])
    wall = (stamps[-1] - stamps[1]) / steps
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages}
    lines = [f"sdtune train {kind}: profile of {steps} steps ({wall:.3f} s/step wall, profiler on)"]
    accounted = 0.0
    for name in [*parts, "optimizer"]:
        key = "Optimizer.step#AdamW.step" if name == "optimizer" else f"step:{name}"
        s = by_name[key].cpu_time_total / 1e6 / steps if key in by_name else 0.0
        accounted += s
        lines.append(f"  {name:<10} {s:8.4f} s/step {100 * s / wall:5.1f}%")
    lines.append(f"  {'rest':<10} {wall - accounted:8.4f} s/step {100 * (wall - accounted) / wall:5.1f}%  "
                 f"(lr, NaN check, logging, callback)")
    ops = [e for e in averages if not e.key.startswith(("step:", "Optimizer.", "ProfilerStep"))]
    op_self = sum(e.self_cpu_time_total for e in ops) / 1e6 / steps
    lines.append(f"  time inside aten ops {op_self:.4f} s/step ({100 * op_self / wall:.1f}%); the rest "
                 f"({100 * (1 - op_self / wall):.1f}%) is Python, dispatch and autograd overhead")
    lines.append("  top ops by self CPU time:")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:15]:
        lines.append(f"    {e.key:<48} {e.self_cpu_time_total / 1e6 / steps:8.4f} s/step  x{e.count // steps}")
    return "\n".join(lines)
