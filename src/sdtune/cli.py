"""The `sdtune` command: parse, call the Python API, print. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .console import cli_warnings
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

    i = sub.add_parser("inspect", help="what a LoRA file holds: format, family, ranks, alphas, modules")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="rewrite a LoRA in another layout (lossless)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("merge", help="bake LoRAs into a checkpoint (on the CPU; streams single files)")
    m.add_argument("--model", default="tiny")
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]")
    m.add_argument("--out", required=True, help="a folder (diffusers layout) or a .safetensors file (LDM layout)")
    m.add_argument("--save-dtype", help="fp16 | bf16 | fp32 (default: as loaded)")
    m.add_argument("--allow-partial", action="store_true")
    m.set_defaults(func=cmd_merge)

    t = sub.add_parser("train", help="train a TI embedding or a LoRA from a folder of images and captions")
    tsub = t.add_subparsers(dest="kind", required=True)
    for kind, text in (("ti", "Textual Inversion: learn a new token"), ("lora", "LoRA on the UNet (+ text encoder)")):
        tp = tsub.add_parser(kind, help=text)
        tp.add_argument("--config", help="TOML file with the same settings (flags override it)")
        tp.add_argument("--device")
        tp.add_argument("--dtype")
        _settings_args(tp, kind)
        tp.set_defaults(func=cmd_train)

    from . import demo, xyplot

    gr = sub.add_parser("grid", help="X/Y comparison plot (prompts, seeds, adapter weights, guidance, steps)")
    _base_args(gr)
    _adapter_args(gr)
    xyplot.add_arguments(gr)
    gr.set_defaults(func=xyplot.run_from_args)

    d = sub.add_parser("demo", help="the whole story on the built-in model: train TI and LoRA, mix, compare")
    _base_args(d)
    demo.add_arguments(d)
    d.set_defaults(func=demo.run_from_args)

    e = sub.add_parser("eval-tiny", help="judge how well a model draws shapes-world prompts")
    _base_args(e)
    e.add_argument("--images", type=int, default=8, help="images per prompt")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=5.0)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval_tiny)
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


def _settings_args(p: argparse.ArgumentParser, kind: str) -> None:
    """One flag per training setting (``init_token`` -> ``--init-token``); unset flags stay None so that
    the TOML file's value (or the default) is kept."""
    import dataclasses
    from typing import get_type_hints

    from .train.config import KINDS

    cls = KINDS[kind]
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), str(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"default: {default}"
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif "list" in text:
            p.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            typ = int if hints[f.name] is int else float if "float" in text else str
            p.add_argument(flag, type=typ, default=None, help=help_)


def cmd_train(a) -> None:
    from .models import load_base
    from .train.config import KINDS, load_settings

    names = {f.name for f in __import__("dataclasses").fields(KINDS[a.kind])}
    overrides = {k: v for k, v in vars(a).items() if k in names}
    settings = load_settings(a.config, overrides, kind=a.kind)
    base = load_base(settings.model, device=a.device, dtype=a.dtype)
    if a.kind == "ti":
        from .train.ti import train_ti as train
    else:
        from .train.lora import train_lora as train
    print(train(base, settings))


def cmd_inspect(a) -> None:
    from .lora import inspect

    info = inspect.describe(a.file)
    print(json.dumps(info, indent=1, default=str) if a.json else inspect.render(info))


def cmd_convert(a) -> None:
    from .lora.formats import convert

    lora = convert(a.input, a.output, to=a.to)
    print(f"{a.output}: {len(lora)} modules in {a.to} layout")


def cmd_merge(a) -> None:
    from . import sources
    from .lora.bake import merge

    pairs = []
    for spec in a.lora:
        src, w = sources.parse_weighted(spec)
        pairs.append((sources.resolve(src, "lora"), w))
    fmt = "single" if a.out.endswith(".safetensors") else "diffusers"
    print(merge(a.model, pairs, a.out, fmt=fmt, dtype=a.save_dtype, allow_partial=a.allow_partial))


def cmd_eval_tiny(a) -> None:
    from .models import load_base
    from .tiny import evaluate

    base = load_base(a.model, device=a.device, dtype=a.dtype)
    held_in, held_out = evaluate.evaluate(base, a.images, a.steps, a.guidance, a.seed, progress=True)
    print(evaluate.table(held_in, held_out))


def main(argv: list[str] | None = None) -> int:
    cli_warnings()
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
        if isinstance(result, Path):  # commands that make one main file print where it is
            print(result)
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
