"""The `sdtune` command: parse, call the Python API, print. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .safeio import SdtuneError


def _base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="tiny (built-in), a diffusers folder, a .safetensors/.ckpt "
                   "SD 1.x checkpoint, or a hub id (default: tiny)")
    p.add_argument("--device", help="cuda | mps | cpu (default: the best available)")
    p.add_argument("--dtype", help="fp32 | fp16 | bf16 (default: fp16 on CUDA, else fp32)")


def _adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="SOURCE[:WEIGHT]",
                   help="a LoRA file or hub source (owner/repo[/file]), weight 1.0 by default; repeatable")
    p.add_argument("--lora-dir", action="append", default=[], help="folder for <lora:name:weight> in prompts")
    p.add_argument("--embedding", action="append", default=[], metavar="SOURCE[:TOKEN]",
                   help="a TI embedding file or hub source; repeatable")
    p.add_argument("--embedding-dir", action="append", default=[],
                   help="folder whose embeddings are usable by file name in prompts")
    p.add_argument("--allow-partial", action="store_true",
                   help="apply a LoRA even if some of its keys match no module (warns)")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=-1, help="-1: random")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdtune", description="Personalise Stable Diffusion with LoRA and "
                                 "Textual Inversion: train, load, mix, merge, convert.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="txt2img with any mix of LoRAs and embeddings")
    _base_args(g)
    _adapter_args(g)
    g.add_argument("--prompt", required=True)
    _gen_args(g)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--out", default="out")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_generate)
    return ap


def cmd_generate(a) -> None:
    from . import api

    base = api.load(a.model, a.device, a.dtype, loras=a.lora, embeddings=a.embedding, lora_dirs=a.lora_dir,
                    embedding_dirs=a.embedding_dir, allow_partial=a.allow_partial)
    results = api.generate(base, a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance,
                           seed=a.seed, scheduler=a.scheduler, width=a.width, height=a.height,
                           num_images=a.num_images, progress=not a.no_progress, lora_dirs=a.lora_dir,
                           allow_partial=a.allow_partial)
    from .generate import save_batch

    for path in save_batch(results, a.out):
        print(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SdtuneError as e:
        if args.debug:
            raise
        print(f"sdtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
