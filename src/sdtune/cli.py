"""The `sdtune` command line: parse it, then call the command (`commands`, or `file_commands` for the file tools),
which calls the Python API and prints. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import os
import re
import sys
from importlib import metadata
from pathlib import Path

from .console import (
    Interrupted,
    Terminated,
    cli_warnings,
    imports_without_gc,
    interrupt_ends_with,
    main_process,
    restore_interrupt,
    terminate_unwinds,
)

# What the parser is built from: settings, presets and names, which load torch but not diffusers or transformers.
# The commands themselves (``commands``) are imported once a line has parsed.
with imports_without_gc():  # (see console.imports_without_gc)
    from .lora.ranks import DYNAMIC
    from .safeio import SdtuneError, user_path
    from .samplers import SCHEDULERS
    from .train import presets, queue_file
    from .train.config import KINDS, TOPICS, likely_name, setting_helps, setting_type
    from .version import __version__


MODEL_HELP = ("tiny or tiny-xl (built-in), a diffusers folder, a .safetensors/.ckpt SD 1.x/2.x/SDXL checkpoint, or a "
              "hub id (default: tiny)")


def _base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    _device_args(p)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda | mps | cpu (default: the best available)")
    p.add_argument("--dtype", help="fp32 | fp16 | bf16 (default: fp16 on CUDA, else fp32)")


def _adapter_args(p: argparse.ArgumentParser, split_weights: bool = True) -> None:
    """``split_weights``: --lora takes a text encoders' weight of its own (a grid's LoRAs take one weight, which
    its axes sweep)."""
    if split_weights:
        form, weights = "[:WEIGHT[:UNET_WEIGHT]]", (
            "weight 1.0 by default; optionally the UNet's own weight, as A1111 reads <lora:name:0.5:0.8>: "
            "SOURCE:0.5:0.8 or SOURCE:te=0.5:unet=0.8, SDXL's second text encoder's te2=W")
    else:
        form, weights = "[:WEIGHT]", ("for the plot, weight 1.0 by default (one weight: a text encoder's own goes in "
                                      "a prompt tag, <lora:name:te=0.5:unet=0.8>)")
    p.add_argument("--lora", action="append", default=[], metavar=f"SOURCE{form}[:lbw=W,W,…|PRESET]",
                   help=f"a LoRA file or hub source (owner/repo[/file]), {weights}, and block weights as the "
                   "lora-block-weight extension's (lbw=1,0,… or lbw=INALL); each file once (prompt tags and PNGs "
                   "name a LoRA by its file name); repeatable")
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
    _Parser.built = []
    ap = _Parser(prog="sdtune", description="Personalise Stable Diffusion with LoRA and "
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
    g.set_defaults(handler="commands.cmd_generate")

    i = sub.add_parser("inspect", help="what a LoRA, embedding or checkpoint file holds: format, family, ranks, "
                       "alphas, modules, hashes")
    i.add_argument("file", nargs="+", help="one or more files (loras/*.safetensors), or a diffusers model folder")
    i.add_argument("--json", action="store_true", help="JSON: one object, or a list of them for several files")
    i.set_defaults(handler="file_commands.cmd_inspect")

    c = sub.add_parser("convert", help="rewrite a LoRA in another layout (lossless)")
    c.add_argument("input")
    c.add_argument("output", nargs="?", help="the file to write (or --out FILE, as the other commands name it)")
    c.add_argument("--out", help=argparse.SUPPRESS)
    c.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    c.set_defaults(handler="file_commands.cmd_convert")

    _lora_tool_args(sub.add_parser("lora", help="LoRA toolbox: merge several into one, resize, extract from two models"))

    m = sub.add_parser("merge", help="bake LoRAs into a checkpoint (on the CPU; safetensors inputs are streamed)")
    m.add_argument("--model", default="tiny", help=MODEL_HELP)
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT[:UNET_WEIGHT]][:lbw=W,W,…|PRESET]",
                   help="a LoRA to bake in, with its weight (optionally the UNet's own weight, as A1111 reads "
                   "<lora:name:0.5:0.8>: FILE:0.5:0.8 or FILE:te=0.5:unet=0.8; SDXL's second text encoder's: "
                   "te2=W) and optional lora-block-weight block weights; repeatable")
    m.add_argument("--out", required=True,
                   help="a folder (diffusers layout) or a .safetensors file (the family's single-file layout)")
    m.add_argument("--save-dtype", help="fp16 | bf16 | fp32: the output's weights (default: the input's dtype; a "
                   "single file keeps its sampling-schedule tensors as stored)")
    m.add_argument("--allow-partial", action="store_true")
    m.set_defaults(handler="commands.cmd_merge")

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
        tp.set_defaults(handler="commands.cmd_train")
    tq = tsub.add_parser("queue", help="several runs in turn, with sweeps, compared in queue.html",
                         formatter_class=argparse.RawDescriptionHelpFormatter, description=_plain_text(queue_file.__doc__))
    tq.add_argument("jobs", help="the queue file (TOML, as above)")
    tq.add_argument("--out", help="the queue's folder (default: the file's out = key, else its name without .toml)")
    _device_args(tq)
    tq.set_defaults(handler="commands.cmd_train_queue")

    gr = sub.add_parser("grid", help="X/Y comparison plot (prompts, seeds, adapter weights, guidance, steps)")
    _base_args(gr)
    _adapter_args(gr, split_weights=False)
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
    gr.set_defaults(handler="commands.cmd_grid")

    d = sub.add_parser("demo", help="the whole story on the built-in model: train TI and LoRA, mix, compare")
    _base_args(d)
    d.add_argument("--out", default="demo", help="report folder (default: demo)")
    d.add_argument("--quick", action="store_true", help="fewer steps and images, for a first look")
    d.add_argument("--fresh", action="store_true", help="redo every phase, even those finished before")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(handler="commands.cmd_demo")

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
    e.set_defaults(handler="commands.cmd_eval_tiny")

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
    u.set_defaults(handler="commands.cmd_ui")
    return ap


def _plain_text(docstring: str) -> str:
    """A module's docstring as --help shows it: without reStructuredText's ``code`` marks and ``::`` blocks."""
    return re.sub(r"``(.+?)``", r"\1", docstring).replace("::\n", ":\n")


class _Parser(argparse.ArgumentParser):
    """A parser that puts itself in the namespace as ``parser``: of a command's parsers the innermost one parsed
    sets it last, so a later refusal is that (sub)command's. ``add_subparsers`` makes its children of this class
    too. Its refusals are one line, as every other of sdtune's, and name the option a mistyped one likely means
    (or the commands that take it)."""

    built: list[_Parser] = []  # every parser of the command line (build_parser starts it anew)
    given: list[str] = []  # the command line being parsed (main sets it)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_defaults(parser=self)
        _Parser.built.append(self)

    def error(self, message):
        # (not the top parser's: its refusals are of the command's name, and the options are the command's)
        hints = [h for token in self.given if (h := self._hint(token))] if self is not _Parser.built[0] else []
        self.exit(2, f"{self.prog}: error: {message}{' (' + '; '.join(hints) + ')' if hints else ''}; see "
                     f"{self.prog} --help\n")

    def _options(self) -> set[str]:
        return set(self._option_string_actions)  # (argparse's table of its flags)

    def _hint(self, token: str) -> str | None:
        """For an option this command does not take: the one it likely means, or the commands that take it."""
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or flag in self._options() | _Parser.built[0]._options():
            return None
        own = {o.removeprefix("--").replace("-", "_") for o in self._options() if o.startswith("--")}
        name = flag.removeprefix("--").lower()
        likely, other_tool = likely_name(name, own)
        if likely is not None:
            said = "--" + likely.replace("_", "-")
            if likely == name.replace("-", "_"):
                return f"{flag}: sdtune writes it {said}"
            return f"{flag}: kohya's/diffusers' name, sdtune's is {said}" if other_tool else f"{flag}: did you mean {said}?"
        elsewhere = [p.prog for p in _Parser.built if flag in p._options()]
        return f"{flag} is an option of {', '.join(elsewhere)}" if elsewhere else f"{flag}: no command takes it"


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


# ---------------------------------------------------------------- the LoRA toolbox (sdtune lora ...)

DROP_BIASES_HELP = ("leave out the changes to biases and norm layers (LyCORIS full's diff_b, train_norm's), which "
                    "LoRA factors cannot hold, instead of refusing the file: a full run resized to a LoRA")


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
    mg.add_argument("--drop-biases", action="store_true", help=DROP_BIASES_HELP)
    mg.add_argument("--json", action="store_true", help="print the per-layer table of the layers merged through "
                    "their ΔW as JSON (a list, empty where every layer was concatenated exactly)")
    mg.set_defaults(handler="commands.cmd_lora_merge")
    rs = tools_sub.add_parser("resize", help="lower a LoRA's rank per layer (fixed or sd-scripts' dynamic modes)")
    rs.add_argument("file")
    rs.add_argument("--rank", type=int, help="the new rank (with --dynamic: the most any layer keeps)")
    rs.add_argument("--conv-rank", type=int, help="the same for convolutions with a kernel above 1x1 (LoCon's 3x3 "
                    "layers; default: --rank)")
    rs.add_argument("--dynamic", choices=list(DYNAMIC))
    rs.add_argument("--param", type=float, help="the --dynamic mode's target (sv_ratio: e.g. 2; sv_fro, "
                    "sv_cumulative: a share, e.g. 0.9)")
    rs.add_argument("--out", required=True)
    rs.add_argument("--to", choices=["kohya", "diffusers"], default="kohya")
    rs.add_argument("--json", action="store_true", help="print the per-layer table as JSON")
    rs.add_argument("--drop-biases", action="store_true", help=DROP_BIASES_HELP)
    rs.set_defaults(handler="commands.cmd_lora_resize")
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
    ex.set_defaults(handler="commands.cmd_lora_extract")


def main(argv: list[str] | None = None) -> int:
    cli_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[1:]:  # also after the command (`sdtune inspect F --debug`), where users add it
        argv.remove("--debug")
        argv.insert(0, "--debug")
    # (a Ctrl-C while the parser is built, which imports torch, is still the starting one's line)
    _Parser.given = argv
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the command's own parser (argparse's top one would name sdtune's)
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    restore_interrupt()  # a Ctrl-C from now on is a KeyboardInterrupt, caught below after cleanups ran
    try:
        with terminate_unwinds():
            # the command's module, imported here rather than above: parsing, --help and a refused flag are
            # answered without the seconds diffusers and transformers take to import (and the file commands
            # never import them)
            module, name = args.handler.split(".")
            with imports_without_gc():
                commands = importlib.import_module(f".{module}", __package__)
            result = getattr(commands, name)(args)
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
    interrupt_ends_with(code)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
