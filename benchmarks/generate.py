"""Seconds per image: sdtune's `generate` vs a plain diffusers StableDiffusionPipeline call on the same
components, same prompt, steps, guidance and starting noise. Prints a table with the ratio.

    python benchmarks/generate.py [--steps 20] [--sd15-steps 5] [--skip-sd15]

(a) the built-in tiny model at 64 px; (b) a random-init model of the real SD 1.5 architecture at 256 px.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdtune.generate import generate
from sdtune.models import load_base

PROMPT = "a red circle on a white background"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(spec: str, size: int, steps: int, repeats: int) -> tuple[float, float]:
    base = load_base(spec, device="cpu", dtype="fp32")
    pipe = base.pipeline()
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.vae_scale_factor

    def ours():
        generate(base, PROMPT, steps=steps, guidance=7.5, seed=1, width=size, height=size, progress=False)

    def theirs():
        g = torch.Generator("cpu").manual_seed(1)
        latents = torch.randn((1, 4, size // scale, size // scale), generator=g)
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, latents=latents, height=size, width=size)

    return timed(ours, repeats), timed(theirs, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sd15-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-sd15", action="store_true")
    a = ap.parse_args()
    rows = [("tiny, 64 px", a.steps, *bench("tiny", 64, a.steps, a.repeats))]
    if not a.skip_sd15:
        rows.append(("sd15-random, 256 px", a.sd15_steps, *bench("sd15-random", 256, a.sd15_steps, 1)))
    print(f"{'model':<22} {'steps':>5} {'sdtune s/img':>13} {'diffusers s/img':>16} {'ratio':>6}")
    for name, steps, ours, theirs in rows:
        print(f"{name:<22} {steps:>5} {ours:>13.3f} {theirs:>16.3f} {theirs / ours:>6.2f}")
    print(f"torch threads: {torch.get_num_threads()}; ratio > 1 means sdtune is faster")


if __name__ == "__main__":
    main()
