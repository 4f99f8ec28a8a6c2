"""Textual Inversion training speed and memory: sdtune, and diffusers' example script when given.

    python benchmarks/train_ti.py [--steps 20] [--threads 2] [--diffusers-script path/to/textual_inversion.py]

The model is a small SD-architecture one (UNet channels 32/64, the real CLIP tokenizer), trained at 64 px
with batch 4 on the CPU; it is written as a diffusers folder so both trainers read the same weights, and
both train on the same 8 images. Each trainer runs in a fresh process: peak RSS is that process's
maximum resident memory. sdtune's seconds per step are timed between steps (start-up and the first two
steps excluded); the script's as the wall-time difference of a long and a short run, which cancels its
start-up the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
SMALL_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SMALL_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                  vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407, projection_dim=32)


def write_small_model(folder: Path) -> Path:
    """The small SD-architecture model (random init, seed 0) as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.tiny.model import tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SMALL_UNET), vae=AutoencoderKL(**SMALL_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SMALL_TEXT)), tokenizer=tokenizer(),
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    from transformers.utils import logging as tf_logging

    tf_logging.disable_progress_bar()
    pipe.save_pretrained(folder)
    return folder


def write_images(folder: Path, n: int = 8, style: str | None = None, captions: bool = True) -> Path:
    from sdtune.tiny import world

    scenes = world.concept_scenes(n, seed=0, **({"style": style} if style else {"shape": "star", "colour": "purple"}))
    world.write_dataset(folder, scenes, template=None, with_style=False)
    if not captions:
        for f in folder.glob("*.txt"):
            f.unlink()
    return folder


def peak_rss_run(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, output) of a command run in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, out  # ru_maxrss is in KB on Linux


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def sdtune_child(kind: str, settings: dict, model: str, threads: int) -> dict:
    """Run one sdtune training in a fresh process; its step timings and peak RSS."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"kind": kind, "settings": settings, "model": model,
                                                             "threads": threads})]
    wall, rss, out = peak_rss_run(cmd, child_env(threads))
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_gb": rss, "wall_s": wall}


def child_main(spec: dict) -> None:
    """In the fresh process: load, train, print {"s_per_step": ...} as the last line."""
    import torch

    torch.set_num_threads(spec["threads"])
    from sdtune.models import load_base
    from sdtune.train.config import LoraSettings, TISettings
    from sdtune.train.lora import train_lora
    from sdtune.train.ti import train_ti

    base = load_base(spec["model"], device="cpu", dtype="fp32")
    loaded_gb = _rss_gb("VmRSS")
    try:  # reset the peak to the current RSS, so VmHWM at the end is the training phase's peak
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    stamps = []  # (wall, process CPU) after each step
    train = train_ti if spec["kind"] == "ti" else train_lora
    cls = TISettings if spec["kind"] == "ti" else LoraSettings
    train(base, cls(**spec["settings"]),
          callback=lambda step, loss: stamps.append((time.perf_counter(), time.process_time())))
    skip = min(2, len(stamps) - 2)
    n = len(stamps) - 1 - skip
    print(json.dumps({"s_per_step": (stamps[-1][0] - stamps[skip][0]) / n,
                      "cpu_s_per_step": (stamps[-1][1] - stamps[skip][1]) / n, "steps": len(stamps),
                      "loaded_gb": loaded_gb, "train_peak_gb": _rss_gb("VmHWM") if reset else None}))


def _rss_gb(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak) of this process, in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return None


def script_run(script: str, args: list[str], steps: tuple[int, int], threads: int, out: Path) -> dict:
    """Seconds per step and peak RSS of a diffusers example script (long run minus short run)."""
    results = []
    for n in steps:
        cmd = [sys.executable, script, *args, "--max_train_steps", str(n), "--output_dir", str(out / f"run{n}")]
        wall, rss, _ = peak_rss_run(cmd, child_env(threads))
        results.append((wall, rss))
    (w1, _), (w2, rss) = results
    return {"s_per_step": (w2 - w1) / (steps[1] - steps[0]), "peak_rss_gb": rss}


def table(rows: list[tuple[str, dict]]) -> str:
    """s/step: wall time; CPU s/step: the process's CPU time (all threads); peak RSS: the whole process;
    training peak: the highest RSS while training (after the model was loaded), sdtune only."""
    lines = [f"{'trainer':<62} {'s/step':>8} {'CPU s/step':>10} {'peak RSS':>9} {'training peak':>13}", "-" * 106]
    for name, r in rows:
        cpu = f"{r['cpu_s_per_step']:.3f}" if "cpu_s_per_step" in r else "-"
        train = f"{r['train_peak_gb']:.2f}GB" if r.get("train_peak_gb") else "-"
        lines.append(f"{name:<62} {r['s_per_step']:>8.3f} {cpu:>10} {r['peak_rss_gb']:>7.2f}GB {train:>13}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--diffusers-script", help="a copy of diffusers' examples/textual_inversion/textual_inversion.py")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child_main(json.loads(a.child))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_small_model(tmp / "model")
        images = write_images(tmp / "images", captions=False)
        settings = dict(data=str(images), out=str(tmp / "sdtune"), token="<pstar>", init_token="star",
                        steps=a.steps, batch_size=4, resolution=64, lr=5e-3, progress=False)
        rows = [("sdtune train ti (channels 32/64, 64 px, batch 4)", sdtune_child("ti", settings, str(model),
                                                                                 a.threads))]
        if a.diffusers_script:
            args = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images),
                    "--learnable_property", "object", "--placeholder_token", "<pstar>", "--initializer_token", "star",
                    "--resolution", "64", "--train_batch_size", "4", "--learning_rate", "5e-3", "--seed", "0",
                    "--save_steps", "100000", "--checkpointing_steps", "100000", "--dataloader_num_workers", "0",
                    "--mixed_precision", "no"]
            rows.append(("diffusers textual_inversion.py (same)",
                         script_run(a.diffusers_script, args, (3, 3 + a.steps), a.threads, tmp)))
    print(f"Textual Inversion training, CPU, {a.threads} threads, {a.steps} steps")
    print(table(rows))
    if len(rows) == 2:
        print(f"speed-up: {rows[1][1]['s_per_step'] / rows[0][1]['s_per_step']:.2f}x, "
              f"memory ratio: {rows[0][1]['peak_rss_gb'] / rows[1][1]['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
