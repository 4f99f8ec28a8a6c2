"""The `sdtune` command: parse, call the Python API, print. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from .console import (
    Interrupted,
    Terminated,
    cli_warnings,
    imports_without_gc,
    main_process,
    restore_interrupt,
    terminate_unwinds,
)

with imports_without_gc():  # the commands' modules, as the package's (see console.imports_without_gc)
    from . import api, demo, sources, xyplot
    from .generate import SCHEDULERS, ImageWriter, check_clip_skip, check_scheduler
    from .lora import blocks as block_weights
    from .lora import inspect
    from .lora import tools as lora_tools
    from .lora.bake import merge
    from .lora.formats import convert, word_files
    from .models import load_base
    from .safeio import SdtuneError, output_folder, user_path
    from .tiny import evaluate
    from .train import presets
    from .train import queue as train_queue
    from .train.config import (
        KINDS,
        TOPICS,
        check_given,
        load_settings,
        planned_settings,
        read_settings,
        setting_helps,
        setting_type,
    )
    from .train.lora import train_lora
    from .train.ti import train_ti
    from .version import __version__


MODEL_HELP = ("tiny or tiny-xl (built-in), a diffusers folder, a .safetensors/.ckpt SD 1.x/2.x/SDXL checkpoint, or a "
              "hub id (default: tiny)")


def _base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    _device_args(p)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda | mps | cpu (default: the best available)")
    p.add_argument("--dtype", help="fp32 | fp16 | bf16 (default: fp16 on CUDA, else fp32)")


def _adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="SOURCE[:WEIGHT[:UNET_WEIGHT]][:lbw=W,W,…|PRESET]",
                   help="a LoRA file or hub source (owner/repo[/file]), weight 1.0 by default; optionally the UNet's "
                   "own weight, as A1111 reads <lora:name:0.5:0.8>: SOURCE:0.5:0.8 or SOURCE:te=0.5:unet=0.8, "
                   "SDXL's second text encoder's te2=W, and block weights as the lora-block-weight extension's "
                   "(lbw=1,0,… or lbw=INALL); repeatable")
    p.add_argument("--lora-dir", action="append", default=[], help="folder for <lora:name:weight> in prompts")
    p.add_argument("--embedding", action="append", default=[], metavar="SOURCE[:TOKEN]",
                   help="a TI embedding file or hub source; repeatable")
    p.add_argument("--embedding-dir", action="append", default=[],
                   help="folder whose embeddings are usable by file name in prompts")
    p.add_argument("--allow-partial", action="store_true",
                   help="apply a LoRA even if some of its keys match no module (warns)")


SCHEDULER_HELP = f"sampler: {', '.join(SCHEDULERS)}, or A1111's name (\"Euler a\") (default ddim)"
CLIP_SKIP_HELP = ("A1111's and ComfyUI's clip skip: the text encoder layer counted from its end (default 1, the "
                  "last; anime SD 1.x models expect 2; SDXL reads its 2nd anyway)")


VAE_HELP = ("a VAE file (.safetensors/.ckpt) or diffusers VAE folder to decode with instead of the model's own, as "
            "A1111's SD VAE setting (e.g. vae-ft-mse-840000 for SD 1.x, the fp16-fix for SDXL)")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default: 7.5)")
    p.add_argument("--seed", type=int, default=-1, help="the first image's seed, +1 for each next (default: -1, "
                   "random)")
    p.add_argument("--scheduler", default="ddim", help=SCHEDULER_HELP)
    p.add_argument("--clip-skip", type=int, default=1, help=CLIP_SKIP_HELP)
    p.add_argument("--vae", help=VAE_HELP)
    p.add_argument("--width", type=int, help="a multiple of 8 (default, or 0: the model's size)")
    p.add_argument("--height", type=int, help="a multiple of 8 (default, or 0: the model's size)")


# the libraries whose versions decide what a run computes and reads (a bug report names them)
VERSIONED = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "peft")


def version_line() -> str:
    found = []
    for name in VERSIONED:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:  # peft is optional
            pass
    return f"sdtune {__version__} ({', '.join(found)}; Python {sys.version.split()[0]})"


class _Version(argparse.Action):
    """--version: one line as it is (argparse's own version action wraps it at the terminal's width)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdtune", description="Personalise Stable Diffusion with LoRA and "
                                 "Textual Inversion: train, load, mix, merge, convert.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--version", action=_Version, nargs=0,
                    help="sdtune's version and the libraries' it runs on (for a bug report)")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="txt2img with any mix of LoRAs and embeddings")
    _base_args(g)
    _adapter_args(g)
    g.add_argument("--prompt", required=True)
    _gen_args(g)
    g.add_argument("--num-images", type=int, default=1, help="images to make (default: 1)")
    g.add_argument("--out", default="out", help="output folder (default: out)")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="what a LoRA, embedding or checkpoint file holds: format, family, ranks, "
                       "alphas, modules, hashes")
    i.add_argument("file", nargs="+", help="one or more files (loras/*.safetensors), or a diffusers model folder")
    i.add_argument("--json", action="store_true", help="JSON: one object, or a list of them for several files")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="rewrite a LoRA in another layout (lossless)")
    c.add_argument("input")
    c.add_argument("output", nargs="?", help="the file to write (or --out FILE, as the other commands name it)")
    c.add_argument("--out", help=argparse.SUPPRESS)
    c.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    c.set_defaults(func=cmd_convert)

    _lora_tool_args(sub.add_parser("lora", help="LoRA toolbox: merge several into one, resize, extract from two models"))

    m = sub.add_parser("merge", help="bake LoRAs into a checkpoint (on the CPU; safetensors inputs are streamed)")
    m.add_argument("--model", default="tiny", help=MODEL_HELP)
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT[:UNET_WEIGHT]][:lbw=W,W,…|PRESET]",
                   help="a LoRA to bake in, with its weight (optionally the UNet's own weight, as A1111 reads "
                   "<lora:name:0.5:0.8>: FILE:0.5:0.8 or FILE:te=0.5:unet=0.8; SDXL's second text encoder's: "
                   "te2=W) and optional lora-block-weight block weights; repeatable")
    m.add_argument("--out", required=True,
                   help="a folder (diffusers layout) or a .safetensors file (the family's single-file layout)")
    m.add_argument("--save-dtype", help="fp16 | bf16 | fp32 (default: as loaded)")
    m.add_argument("--allow-partial", action="store_true")
    m.set_defaults(func=cmd_merge)

    t = sub.add_parser("train", help="train a TI embedding or a LoRA from a folder of images and captions")
    tsub = t.add_subparsers(dest="kind", required=True)
    for kind, text in (("ti", "Textual Inversion: learn a new token"), ("lora", "LoRA on the UNet (+ text encoder)")):
        # the usage line names the few flags a run needs: all of them would fill a screen before the sections
        tp = tsub.add_parser(kind, help=text, description=f"{text}. Settings start from a preset (the base "
                             "model's own unless --preset names one), then the --config file, then the flags.",
                             usage="%(prog)s [--config FILE] [--data FOLDER] [--out FOLDER] [--model MODEL] "
                                   "[option ...]")
        tp.add_argument("--config", metavar="FILE", help="TOML file with the same settings (flags override it; a "
                        "run's own settings.toml reruns it, as does a .safetensors file sdtune trained, and a kohya "
                        "sd-scripts config reads as sd-scripts reads it)")
        tp.add_argument("--list-presets", action="store_true", help="list the presets and what each is for")
        tp.add_argument("--print-settings", action="store_true",
                        help="print the settings the run would use (preset, then --config, then flags) as the TOML "
                             "--config reads, and stop: what sdtune made of a kohya config, say")
        _device_args(tp)
        _settings_args(tp, kind)
        tp.set_defaults(func=cmd_train)
    tq = tsub.add_parser("queue", help="several runs in turn, with sweeps, compared in queue.html",
                         formatter_class=argparse.RawDescriptionHelpFormatter, description=train_queue.__doc__)
    tq.add_argument("jobs", help="the queue file (TOML, as above)")
    tq.add_argument("--out", help="the queue's folder (default: the file's out = key, else its name without .toml)")
    _device_args(tq)
    tq.set_defaults(func=cmd_train_queue)

    gr = sub.add_parser("grid", help="X/Y comparison plot (prompts, seeds, adapter weights, guidance, steps)")
    _base_args(gr)
    _adapter_args(gr)
    gr.add_argument("--prompt", required=True)
    gr.add_argument("--negative-prompt", default="")
    gr.add_argument("--x", metavar="KIND=VALUES",
                    help="column axis, e.g. seed=1-4, weight=0,0.5,1, cfg=3,7, steps=10,20, sampler=ddim,euler, "
                         "clip_skip=1,2, "
                         "'prompt=a red star|a blue star', sr=red|blue, 'loras=none|a|a:0.5+b:1', "
                         "'embeddings=none|<tok>', 'adapters=none|a|a:0.5+<tok>' (LoRAs and embeddings in one axis), "
                         "'blocks=INALL|OUTALL|1,0,…' (block weights of the --lora)")
    gr.add_argument("--y", metavar="KIND=VALUES", help="row axis (same kinds as --x)")
    gr.add_argument("--weights", metavar="W1,W2,...",
                    help="shorthand for --x weight=...: sweep the weight of the (only or named) --lora")
    gr.add_argument("--sweep", metavar="NAME", help="which loaded LoRA a weight axis sweeps (default: the only one)")
    gr.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    gr.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default: 7.5)")
    gr.add_argument("--seed", type=int, default=1, help="every cell's seed unless an axis sweeps it (default: 1, "
                    "fixed, so cells differ only by their axes)")
    gr.add_argument("--scheduler", default="ddim", help=SCHEDULER_HELP)
    gr.add_argument("--clip-skip", type=int, default=1, help=CLIP_SKIP_HELP)
    gr.add_argument("--vae", help=VAE_HELP)
    gr.add_argument("--width", type=int, help="a multiple of 8 (default: the model's size)")
    gr.add_argument("--height", type=int, help="a multiple of 8 (default: the model's size)")
    gr.add_argument("--cell", type=int, default=128, help="grid cell width in pixels (small images are scaled up)")
    gr.add_argument("--name", default="xy", help="file name stem of the grid (default: xy)")
    gr.add_argument("--out", default="grid", help="output folder (default: grid)")
    gr.add_argument("--no-progress", action="store_true")
    gr.set_defaults(func=cmd_grid)

    d = sub.add_parser("demo", help="the whole story on the built-in model: train TI and LoRA, mix, compare")
    _base_args(d)
    d.add_argument("--out", default="demo", help="report folder (default: demo)")
    d.add_argument("--quick", action="store_true", help="fewer steps and images, for a first look")
    d.add_argument("--fresh", action="store_true", help="redo every phase, even those finished before")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval-tiny", help="judge how well a model draws shapes-world prompts",
                       description="Draw each shapes-world prompt (held in: pairs the built-in models were trained "
                                   "on; held out: an unseen shape, unseen colour-shape pairs, the outline style) and "
                                   "print the share of images the shapes-world judge finds right. For tiny, tiny-xl "
                                   "and models trained on the shapes world.")
    _base_args(e)
    e.add_argument("--images", type=int, default=8, help="images per prompt (default: 8)")
    e.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    e.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default: 5.0)")
    e.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    e.add_argument("--min-held-in", type=float, metavar="PCT",
                   help="after the table, fail (exit 2) if the held-in overall share is below PCT percent")
    e.set_defaults(func=cmd_eval_tiny)

    u = sub.add_parser("ui", help="the whole workflow in a browser: generate, compare, train, LoRA files, gallery")
    _base_args(u)
    u.add_argument("--lora-dir", help="LoRA folder the UI lists and writes to (default: OUT/loras)")
    u.add_argument("--embedding-dir", help="embedding folder (default: OUT/embeddings)")
    u.add_argument("--model-dir", help="folder of models (.safetensors, .ckpt, diffusers folders) the page can "
                   "switch to, besides the built-in ones and --model")
    u.add_argument("--out", default="outputs", help="output folder: images, grids, training jobs, datasets "
                   "(default: outputs)")
    u.add_argument("--port", type=int, default=7860, help="(default: 7860)")
    u.add_argument("--listen", action="store_true", help="serve on every network interface, not only this "
                   "machine (use with --auth)")
    u.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    u.add_argument("--max-upload-mb", type=float, default=512, help="largest upload accepted (default: 512)")
    u.add_argument("--vae", help=VAE_HELP + "; for every model the page loads")
    u.set_defaults(func=cmd_ui)
    return ap


def cmd_generate(a) -> None:
    check_scheduler(a.scheduler)  # a sampler that cannot run, or a file in the way, stops it before the work
    check_clip_skip(a.clip_skip)
    output_folder(a.out)
    base = api.load(a.model, a.device, a.dtype, vae=a.vae, loras=a.lora, embeddings=a.embedding,
                    lora_dirs=a.lora_dir, embedding_dirs=a.embedding_dir, allow_partial=a.allow_partial)
    writer = ImageWriter(a.out)  # each batch is written when done: a Ctrl-C keeps them

    def write(batch) -> None:
        for path in writer.add(batch):
            print(path, flush=True)
    api.generate(base, a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance,
                 seed=a.seed, scheduler=a.scheduler, clip_skip=a.clip_skip, width=a.width,
                 height=a.height, num_images=a.num_images, progress=not a.no_progress, lora_dirs=a.lora_dir,
                 allow_partial=a.allow_partial, on_batch=write)
    grid_path = writer.finish()
    if grid_path:
        print(grid_path)


def _settings_args(p: argparse.ArgumentParser, kind: str) -> None:
    """One flag per training setting (``init_token`` -> ``--init-token``); unset flags stay None so that
    the TOML file's value (or the default) is kept."""
    cls = KINDS[kind]
    preset_set = {name for p in presets.PRESETS[kind].values() for name in p.settings()}
    helps = setting_helps(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # --help in sections (config.TOPICS, those this kind has settings in), in each section's order
    sections = {topic: [fields[name] for name in names if name in fields] for topic, names in TOPICS.items()}
    placed = [(p.add_argument_group(topic), mine) for topic, mine in sections.items() if mine]
    for group, f in ((group, f) for group, mine in placed for f in mine):
        flag, (typ, _) = "--" + f.name.replace("_", "-"), setting_type(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"default: {default}" + (", or the preset's" if f.name in preset_set else "")
        if f.name in helps:  # a help that names its default, or a default of nothing, needs no "(default: …)"
            said = "(default:" in helps[f.name] or default in ("", None, [])
            help_ = helps[f.name] + ("" if said and f.name not in preset_set else f" ({help_})")
        if typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typ is list:
            group.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            group.add_argument(flag, type=typ, default=None, help=help_)


def cmd_train(a) -> None:
    if a.list_presets:
        print(presets.listing(a.kind))
        return
    names = {f.name for f in dataclasses.fields(KINDS[a.kind])}
    overrides = {k: v for k, v in vars(a).items() if k in names}
    given = read_settings(a.config, overrides, kind=a.kind)  # bad values stop before the model loads
    if given.get("preset"):
        presets.get(a.kind, given["preset"])
    if a.print_settings:
        print(planned_settings(a.kind, a.config, overrides, given.get("model", KINDS[a.kind].model)), end="")
        return
    # the run's --vae as the model's: a "no VAE" checkpoint loads only with one
    base = load_base(given.get("model", KINDS[a.kind].model), device=a.device, dtype=a.dtype, vae=given.get("vae"))
    settings = load_settings(a.config, overrides, kind=a.kind, family=base.family)  # the model's preset first
    check_given(settings, a.config, overrides)
    train = train_ti if a.kind == "ti" else train_lora
    written = train(base, settings)
    if main_process():  # once under accelerate launch
        print(written)


def cmd_train_queue(a) -> Path:
    return train_queue.run_queue(a.jobs, a.out, device=a.device, dtype=a.dtype)


def cmd_inspect(a) -> None:
    if len(a.file) == 1:
        info = inspect.describe(a.file[0])
        print(json.dumps(info, indent=1, default=str) if a.json else inspect.render(info))
        return
    # several files: each as one alone, as it comes; one that cannot be read is its one line and the rest go on
    found, failed = [], []
    for number, name in enumerate(a.file):
        try:
            info = inspect.describe(name)
        except SdtuneError as e:
            if a.debug:
                raise
            print(f"sdtune: error: {e}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        if a.json:
            found.append(info)
        else:
            print(("\n" if number else "") + inspect.render(info), flush=True)
    if a.json:
        print(json.dumps(found, indent=1, default=str))
    if failed:
        raise SdtuneError(f"{len(failed)} of {len(a.file)} files could not be inspected (said above): "
                          f"{', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}")


def cmd_convert(a) -> None:
    if (a.output is None) == (a.out is None):
        raise SdtuneError("convert: name the file to write once: sdtune convert IN OUT --to LAYOUT (or --out OUT)")
    output = a.output or a.out
    lora = convert(a.input, output, to=a.to)
    words = word_files(lora, output) if a.to == "diffusers" else {}
    print(f"{output}: {len(lora)} modules in {a.to} layout"
          + "".join(f"; its word {emb.token} in {path} (diffusers loads it with load_textual_inversion)"
                    for path, emb in words.items()))


# ---------------------------------------------------------------- the LoRA toolbox (sdtune lora ...)

def _lora_tool_args(p: argparse.ArgumentParser) -> None:
    tools_sub = p.add_subparsers(dest="tool", required=True)
    mg = tools_sub.add_parser("merge", help="save a weighted mix of LoRAs as one LoRA file")
    mg.add_argument("specs", nargs="+", metavar="FILE[:WEIGHT[:UNET_WEIGHT]][:lbw=W,W,…|PRESET]",
                    help="LoRA files with their weights (optionally the UNet's own weight, as A1111 reads "
                    "<lora:name:0.5:0.8>: FILE:0.5:0.8 or FILE:te=0.5:unet=0.8; SDXL's second text encoder's: te2=W)")
    mg.add_argument("--out", required=True)
    mg.add_argument("--rank", type=int, help="SVD of each layer's summed ΔW to this rank (default: exact, the "
                    "ranks concatenated)")
    mg.add_argument("--to", choices=["kohya", "diffusers"], default="kohya")
    mg.add_argument("--blocks", action="store_true", help="bake the files' lbw= block weights into the result "
                    "(each layer scaled by its block's weight)")
    mg.set_defaults(func=cmd_lora_merge)
    rs = tools_sub.add_parser("resize", help="lower a LoRA's rank per layer (fixed or sd-scripts' dynamic modes)")
    rs.add_argument("file")
    rs.add_argument("--rank", type=int, help="the new rank (with --dynamic: the most any layer keeps)")
    rs.add_argument("--conv-rank", type=int, help="the same for convolutions with a kernel above 1x1 (LoCon's 3x3 "
                    "layers; default: --rank)")
    rs.add_argument("--dynamic", choices=list(lora_tools.DYNAMIC))
    rs.add_argument("--param", type=float, help="the --dynamic mode's target (sv_ratio: e.g. 2; sv_fro, "
                    "sv_cumulative: a share, e.g. 0.9)")
    rs.add_argument("--out", required=True)
    rs.add_argument("--to", choices=["kohya", "diffusers"], default="kohya")
    rs.add_argument("--json", action="store_true", help="print the per-layer table as JSON")
    rs.set_defaults(func=cmd_lora_resize)
    ex = tools_sub.add_parser("extract", help="a LoRA from the difference of two checkpoints")
    ex.add_argument("--base", required=True, help="the original model (any --model form)")
    ex.add_argument("--tuned", required=True, help="the fine-tuned model of the same family")
    ex.add_argument("--rank", type=int, required=True)
    ex.add_argument("--conv-rank", type=int, help="rank of convolutions with a kernel above 1x1 (default: --rank)")
    ex.add_argument("--text-encoder", action="store_true", help="also the text encoder(s)")
    ex.add_argument("--min-diff", type=float, default=0.0, help="leave out layers whose largest change is at most "
                    "this (default: 0)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--to", choices=["kohya", "diffusers"], default="kohya")
    ex.add_argument("--json", action="store_true", help="print the per-layer table as JSON")
    ex.set_defaults(func=cmd_lora_extract)


def _print_reports(reports, as_json: bool) -> None:
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    else:
        print(lora_tools.report_table(reports))


def cmd_lora_merge(a) -> Path:
    specs = []
    for spec in a.specs:
        spec, lbw = block_weights.split_spec(spec)
        if lbw is not None and not a.blocks:
            raise SdtuneError(f"{spec}:lbw={lbw}: block weights in a merge are baked into the file; add --blocks")
        src, w = sources.parse_weighted(spec)
        specs.append((sources.resolve(src, "lora"), w, lbw))
    if a.blocks and all(lbw is None for *_, lbw in specs):
        raise SdtuneError("--blocks bakes the files' block weights, but no FILE has one; give e.g. FILE:1:lbw=INALL")
    _, reports = lora_tools.merge_loras(specs, a.out, rank=a.rank, to=a.to)
    if reports:
        print(lora_tools.report_table(reports))
    return Path(a.out)


def cmd_lora_resize(a) -> Path | None:
    _, reports = lora_tools.resize_lora(sources.resolve(a.file, "lora"), a.out, rank=a.rank, dynamic=a.dynamic,
                                        param=a.param, to=a.to, conv_rank=a.conv_rank)
    _print_reports(reports, a.json)
    return None if a.json else Path(a.out)


def cmd_lora_extract(a) -> Path | None:
    _, reports = lora_tools.extract_lora(a.base, a.tuned, a.out, rank=a.rank, conv_rank=a.conv_rank,
                                         text_encoder=a.text_encoder, min_diff=a.min_diff, to=a.to)
    _print_reports(reports, a.json)
    return None if a.json else Path(a.out)


def cmd_merge(a) -> None:
    pairs = []
    for spec in a.lora:
        spec, lbw = block_weights.split_spec(spec)
        src, w = sources.parse_weighted(spec)
        pairs.append((sources.resolve(src, "lora"), w, lbw))
    fmt = "single" if a.out.endswith(".safetensors") else "diffusers"
    print(merge(a.model, pairs, a.out, fmt=fmt, dtype=a.save_dtype, allow_partial=a.allow_partial))


def cmd_grid(a) -> Path:
    x, y = xyplot.axes_from_specs(a.x, a.y, weights=a.weights, sweep=a.sweep)  # bad axes stop before the load
    check_scheduler(a.scheduler)
    check_clip_skip(a.clip_skip)
    base = api.load(a.model, a.device, a.dtype, vae=a.vae)
    return xyplot.xy_plot(base, a.prompt, x, y, negative_prompt=a.negative_prompt, seed=a.seed, steps=a.steps,
                          guidance=a.guidance, scheduler=a.scheduler, clip_skip=a.clip_skip, width=a.width,
                          height=a.height, loras=a.lora,
                          embeddings=a.embedding, lora_dirs=a.lora_dir, embedding_dirs=a.embedding_dir,
                          allow_partial=a.allow_partial, out_dir=a.out, name=a.name, cell=a.cell,
                          progress=not a.no_progress, keep_earlier=True)


def cmd_demo(a) -> Path:
    return demo.run_demo(a.out, model=a.model, quick=a.quick, fresh=a.fresh, device=a.device, dtype=a.dtype,
                         progress=not a.no_progress)


def cmd_eval_tiny(a) -> None:
    base = load_base(a.model, device=a.device, dtype=a.dtype)
    held_in, held_out = evaluate.evaluate(base, a.images, a.steps, a.guidance, a.seed, progress=True)
    print(evaluate.table(held_in, held_out), flush=True)
    evaluate.check_held_in(held_in, a.min_held_in)


def cmd_ui(a) -> None:
    from . import ui  # Gradio is loaded for this command only

    ui.serve(a.model, out=a.out, lora_dir=a.lora_dir, embedding_dir=a.embedding_dir, model_dir=a.model_dir,
             port=a.port, listen=a.listen, auth=a.auth, device=a.device, dtype=a.dtype, max_upload_mb=a.max_upload_mb,
             vae=a.vae)


def main(argv: list[str] | None = None) -> int:
    restore_interrupt()  # a Ctrl-C from now on is a KeyboardInterrupt, caught below after cleanups ran
    cli_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[1:]:  # also after the command (`sdtune inspect F --debug`), where users add it
        argv.remove("--debug")
        argv.insert(0, "--debug")
    args = build_parser().parse_args(argv)
    try:
        with terminate_unwinds():
            result = args.func(args)
        if isinstance(result, Path):  # commands that make one main file print where it is
            print(result)
    except SdtuneError as e:
        if args.debug:
            raise
        print(f"sdtune: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output piped into `head`, which has read enough: a quiet end, as `cat` has
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141
    except OSError as e:
        if args.debug or not e.filename:  # not about a path: a defect, whose traceback says where
            raise
        print(f"sdtune: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if main_process():  # a launcher's Ctrl-C reaches every process: one says it
            print(f"sdtune: {e if isinstance(e, (Interrupted, Terminated)) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


def _os_error(e: OSError) -> str:
    """A file system refusal (a folder that cannot be made or written, a full disk) as one line: the place, the
    system's reason, the fix."""
    return (f"{user_path(e.filename)}: {e.strerror or e}; check that the folder exists and is writable, or choose "
            f"another place")


def run() -> None:
    """The ``sdtune`` process: ``main`` on the command line, then exit. What the command leaves is frozen
    before the exit (as the imports were, see ``console.imports_without_gc``): Python's collector otherwise
    walks every tracked object once more while the interpreter shuts down, and the exit of a LoRA training run
    cost about a tenth of the whole process (on the shared 2-core test machine). Only the process's entry does
    this: ``main`` called in a longer-lived process (tests, a notebook) leaves its collector alone."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
