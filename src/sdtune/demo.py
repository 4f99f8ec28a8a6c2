"""``sdtune demo``: the whole story on the built-in model, offline, on a CPU, written up as a report folder.

1. data   render two small training sets from the shapes world: a colour-on-shape pair the base model never
          saw together (for Textual Inversion, captioned with a new word) and shapes drawn in the held-out
          "outline" style (for LoRA, captioned *without* the style word);
2. ti     train a TI embedding with ``sdtune.train`` (the code behind ``sdtune train ti``);
3. lora   train a LoRA the same way (``sdtune train lora``);
4. grids  X/Y plots (``sdtune grid``): base vs TI, base vs LoRA, a LoRA weight sweep, the two mixed;
5. report score the grid images with the shapes-world judge, write ``scores.json``, ``reproduce.sh`` and an
          ``index.html`` that shows it all.

Every finished phase is recorded in ``phases.json`` with a signature of everything that decides its output
(the plan, the model's hash, the phases before it); a re-run skips phases whose record matches and whose
files exist, unless ``fresh``. A training phase killed half-way resumes from its own last save.
"""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from . import console, sources
from .demo_report import write_report
from .generate import grid, save_png
from .models import load_base
from .safeio import SdtuneError, atomic_write_text, output_folder
from .tiny import judge, world
from .tiny.evaluate import HELD_IN
from .train.config import LoraSettings, TISettings, load_settings
from .train.lora import train_lora
from .train.report import REPORT_FILE
from .train.ti import train_ti
from .xyplot import Axis, xy_plot

PHASES = ("data", "ti", "lora", "grids", "report")
PHASES_FILE = "phases.json"


@dataclass(frozen=True)
class Plan:
    """Everything that decides the demo's outputs (besides the model)."""

    colour: str = "cyan"  # TI concept: a held-out colour-on-shape pair (the base's stars are often purple anyway)
    shape: str = "triangle"
    token: str = "<sks>"  # opaque: without the embedding, CLIP would read "<cyan-triangle>" as its words
    init_token: str = "triangle"
    style: str = "outline"  # LoRA: the held-out style
    lora_name: str = "outline"
    ti_images: int = 5
    ti_background: str = "white"
    lora_images: int = 48
    # training recipes: "" is the model's own preset (sdtune.train.presets, where the why of each value is),
    # what ``sdtune train`` uses on it with no flags
    ti_preset: str = ""
    lora_preset: str = ""
    seed: int = 0
    gen_steps: int = 20
    guidance: float = 5.0
    scheduler: str = "ddim"
    grid_seed: int = 1
    seeds: int = 8  # images per row of the TI grid (and so per TI score)
    lora_prompts: int = 8  # held-in prompts in the base-vs-LoRA grid
    sweep_prompts: int = 4
    sweep_weights: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
    mix_seeds: int = 4
    mix_weight: float = 0.75

    def signature(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


FULL = Plan()
QUICK = Plan(lora_images=16, ti_preset="tiny-quick", lora_preset="tiny-quick", gen_steps=8, seeds=4, lora_prompts=4,
             sweep_prompts=2, sweep_weights=(0.0, 0.5, 1.0, 1.5), mix_seeds=2)


# ---------------------------------------------------------------------------------------------- data

def write_ti_set(folder: str | Path, n: int = 5, seed: int = 0, colour: str = FULL.colour, shape: str = FULL.shape,
                 background: str | None = "white") -> Path:
    """``n`` renders of one colour-on-shape concept, without caption files: TI training then uses its object
    templates ("a photo of a <token>", ...), so the concept is known only by the new token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = world.concept_scenes(n, seed=seed, shape=shape, colour=colour, style="flat", background=background)
    for i, scene in enumerate(scenes):
        world.render(scene).save(folder / f"{i:04d}.png")
    return folder


def style_scenes(n: int, seed: int = 0, style: str = "outline") -> list[world.Scene]:
    """``n`` scenes in ``style`` with shapes and colour pairs the base model knows (no held-out shape/pair)."""
    rng = random.Random(f"demo-style:{seed}")
    scenes = []
    while len(scenes) < n:
        s = world.random_scene(rng, style=style)
        if s.shape not in world.HELD_OUT_SHAPES and (s.colour, s.shape) not in world.HELD_OUT_PAIRS:
            scenes.append(s)
    return scenes


def write_style_set(folder: str | Path, n: int = 24, seed: int = 0, style: str = "outline") -> Path:
    """``n`` renders in ``style``, captioned without the style word (the LoRA must learn it from pixels)."""
    return world.write_dataset(folder, style_scenes(n, seed, style), template=None, with_style=False, seed=seed)


def contact_sheet(folder: Path, out: Path, cols: int = 8) -> Path:
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    return save_png(grid(images, cols=min(cols, len(images)), cell=96), out)


# ---------------------------------------------------------------------------------------------- phases

class _Phases:
    """``phases.json``: which phases finished, with what signature, in how many seconds."""

    def __init__(self, out: Path, fresh: bool):
        self.path = out / PHASES_FILE
        self.records: dict = {}
        if not fresh and self.path.is_file():
            try:
                self.records = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                self.records = {}  # a damaged marker file only costs a re-run
        self.chain_intact = True
        self.sigs: dict[str, str] = {}

    def signature(self, name: str, *parts) -> str:
        before = [self.sigs[p] for p in PHASES[: PHASES.index(name)] if p in self.sigs]
        sig = hashlib.sha256(json.dumps([name, *map(str, parts), before]).encode()).hexdigest()[:16]
        self.sigs[name] = sig
        return sig

    def reusable(self, name: str, sig: str, outputs: list[Path]) -> bool:
        rec = self.records.get(name, {})
        ok = self.chain_intact and rec.get("done") and rec.get("signature") == sig and all(
            p.exists() for p in outputs)
        self.chain_intact = bool(ok)
        return bool(ok)

    def started_with(self, name: str) -> str | None:
        return self.records.get(name, {}).get("signature")

    def mark(self, name: str, sig: str, done: bool, seconds: float = 0.0, **info) -> None:
        self.records[name] = {"signature": sig, "done": done, "seconds": round(seconds, 1), **info}
        for later in PHASES[PHASES.index(name) + 1:]:  # their inputs changed: they must run again
            if not done:
                self.records.pop(later, None)
        atomic_write_text(json.dumps(self.records, indent=1), self.path)


TRAINERS = {"ti": train_ti, "lora": train_lora}  # what ``sdtune train ti|lora`` calls


def _preset(name: str) -> dict:
    """The plan's preset as a setting: none given (not preset "", which names no preset at all) is the model's."""
    return {"preset": name} if name else {}


def ti_settings(plan: Plan, data: Path, out: Path, model: str, progress: bool, family=None) -> TISettings:
    return load_settings(None, dict(data=str(data), out=str(out), model=model, **_preset(plan.ti_preset),
                                    token=plan.token, init_token=plan.init_token, seed=plan.seed, progress=progress),
                         kind="ti", family=family)


def lora_settings(plan: Plan, data: Path, out: Path, model: str, progress: bool, family=None) -> LoraSettings:
    return load_settings(None, dict(data=str(data), out=str(out), model=model, **_preset(plan.lora_preset),
                                    seed=plan.seed, name=plan.lora_name, progress=progress), kind="lora",
                         family=family)


_NOT_FLAGS = {"progress", "resume"}  # how a run behaves, not what it computes


def train_command(kind: str, settings) -> str:
    """The ``sdtune train`` command line for ``settings``: its preset, and every option that differs from it."""
    defaults = load_settings(None, {"preset": settings.preset or None}, kind=kind)
    words = ["sdtune", "train", kind]
    shown = {"data", "out", "preset"} if settings.preset else {"data", "out"}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name in _NOT_FLAGS or (value == getattr(defaults, f.name) and f.name not in shown):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def _trained_file(result, folder: Path, kind: str) -> Path:
    """The file a trainer wrote (it may return the file, a list of files, or its output folder)."""
    if isinstance(result, (list, tuple)):
        result = next((Path(p) for p in result if Path(p).suffix == ".safetensors"), None)
    path = Path(result) if result else folder
    if path.is_dir():
        wanted = "embedding" if kind == "ti" else "lora"
        try:
            path = sources.resolve(path, wanted)
        except SdtuneError:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise SdtuneError(f"{path}: {kind} training wrote no single .safetensors result; check its log")
            path = found[0]
    return path


# ---------------------------------------------------------------------------------------------- grids

def lora_prompt(colour: str, shape: str) -> str:
    return f"a {colour} {shape} on a white background"


def _spec(name: str, title: str, prompt: str, x, y, loras=(), embeddings=()) -> dict:
    return {"name": name, "title": title, "prompt": prompt, "x": x, "y": y, "loras": list(loras),
            "embeddings": list(embeddings)}


# Row and column labels that compute_scores looks the cells up by: it names what it scores, so reordering the
# axes in _grid_specs cannot make it score the wrong images.
BASE = "base"
LORA_ON = "LoRA 1.0"
MIX_FULL = "TI + LoRA 1"


def _ti_prompts(plan: Plan) -> tuple[str, str, str]:
    """The TI grid's rows: the base with the init word, the base told the concept in words, the learned word."""
    return (f"a photo of a {plan.init_token}", f"a photo of a {plan.colour} {plan.shape}",
            f"a photo of a {plan.token}")


def _grid_specs(plan: Plan, ti_file: Path, lora_file: Path) -> list[dict]:
    """The four X/Y plots of the report (what ``compute_scores`` reads back)."""
    init, words, learned = _ti_prompts(plan)
    held, sweep_held = HELD_IN[: plan.lora_prompts], HELD_IN[: plan.sweep_prompts]
    lo, tok, w = plan.lora_name, plan.token, plan.mix_weight
    return [
        _spec("ti", "Textual Inversion: the base with the init word, the base told in words, the learned word",
              learned, Axis("seed", list(range(plan.grid_seed, plan.grid_seed + plan.seeds))),
              Axis("prompt", [init, words, learned], labels=[f"base: {init}", f"base: {words}", f"TI: {learned}"]),
              embeddings=[ti_file]),
        _spec("lora", "LoRA: base model vs the style LoRA, prompts without the style word", lora_prompt(*held[0]),
              Axis("prompt", [lora_prompt(c, s) for c, s in held], labels=[f"{c} {s}" for c, s in held]),
              Axis("loras", ["none", lo], labels=[BASE, LORA_ON]), loras=[lora_file]),
        _spec("sweep", "LoRA weight sweep", lora_prompt(*sweep_held[0]),
              Axis("weight", list(plan.sweep_weights), target=lo),
              Axis("prompt", [lora_prompt(c, s) for c, s in sweep_held], labels=[f"{c} {s}" for c, s in sweep_held]),
              loras=[lora_file]),
        _spec("mix", f"Two adapters mixed: TI + LoRA at {w:g}", learned,
              Axis("adapters", ["none", tok, lo, f"{lo}:{w:g}+{tok}", f"{lo}+{tok}"],
                   labels=[BASE, "TI", "LoRA", f"TI + LoRA {w:g}", MIX_FULL]),
              Axis("seed", list(range(plan.grid_seed, plan.grid_seed + plan.mix_seeds))),
              loras=[lora_file], embeddings=[ti_file]),
    ]


def grid_command(spec: dict, plan: Plan, model: str, out: Path) -> str:
    words = ["sdtune", "grid", "--model", model, "--prompt", spec["prompt"]]
    for path in spec["loras"]:
        words += ["--lora", str(path)]
    for path in spec["embeddings"]:
        words += ["--embedding", str(path)]
    for flag, axis in (("--x", spec["x"]), ("--y", spec["y"])):
        sep = "|" if axis.kind in ("prompt", "sr", "adapters", "loras", "embeddings") else ","
        values = sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in axis.values)
        words += [flag, f"{axis.kind}={values}"]
    if any(a.kind == "weight" for a in (spec["x"], spec["y"])):
        words += ["--sweep", plan.lora_name]
    words += ["--steps", str(plan.gen_steps), "--guidance", f"{plan.guidance:g}", "--seed", str(plan.grid_seed),
              "--scheduler", plan.scheduler, "--out", str(out / GRIDS), "--name", spec["name"]]
    return shlex.join(words)


# ---------------------------------------------------------------------------------------------- scores

GRIDS = "grids"  # subfolder of the report that holds the plots and their single images


def _cells(out: Path, name: str) -> dict:
    """A plot's record (``xyplot``'s NAME.json), its cell files made relative to the report folder."""
    rec = json.loads((out / GRIDS / f"{name}.json").read_text(encoding="utf-8"))
    rec["cells"] = [[f"{GRIDS}/{f}" for f in row] for row in rec["cells"]]
    return rec


def _measure(out: Path, items: list[tuple[str, dict]]) -> dict:
    """Judge the images ``items`` = [(file, wanted attributes)]: fraction whose verdict matches, per image."""
    images = [Image.open(out / f).convert("RGB") for f, _ in items]
    verdicts = judge.judge(images)
    hits = [v.matches(**wanted) for v, (_, wanted) in zip(verdicts, items)]
    return {"value": sum(hits) / len(hits), "n": len(hits),
            "items": [{"file": f, "wanted": w, "seen": {k: getattr(v, k) for k in judge.ATTRIBUTES}, "hit": h}
                      for (f, w), v, h in zip(items, verdicts, hits)]}


def _at(axis: dict, name) -> int:
    """The position of the row or column labelled ``name`` (or, failing that, with the value ``name``)."""
    for key in ("labels", "values"):
        if name in axis[key]:
            return axis[key].index(name)
    raise SdtuneError(f"the {axis['title']} axis of a demo grid has no {name!r} (it has {', '.join(axis['labels'])}); "
                      "the grids come from another version of the demo: rerun it with --fresh")


def _row(rec: dict, name, wanted) -> list[tuple[str, dict]]:
    """The row ``name`` of a plot's cells, each with what the judge should see (``wanted(col)``)."""
    r = _at(rec["y"], name)
    return [(rec["cells"][r][c], wanted(c)) for c in range(rec["cols"])]


def _col(rec: dict, name, wanted) -> list[tuple[str, dict]]:
    """The column ``name`` of a plot's cells, each with what the judge should see (``wanted(row)``)."""
    c = _at(rec["x"], name)
    return [(rec["cells"][r][c], wanted(r)) for r in range(rec["rows"])]


def compute_scores(out: Path, plan: Plan) -> dict:
    """Before/after numbers, each from the judge's verdicts on the saved grid images (nothing hard-coded)."""
    ti, lora, sweep, mix = (_cells(out, n) for n in ("ti", "lora", "sweep", "mix"))
    held, sweep_held = HELD_IN[: plan.lora_prompts], HELD_IN[: plan.sweep_prompts]
    concept = {"shape": plan.shape, "colour": plan.colour}
    style = {"style": plan.style}
    everything = {**concept, **style}
    init, words, learned = _ti_prompts(plan)

    def compare(id_, grid, what, before_label, before, after_label, after):
        return {"id": id_, "grid": grid, "what": what, "before_label": before_label, "after_label": after_label,
                "before": _measure(out, before), "after": _measure(out, after)}

    def as_prompted(pairs):
        return lambda i: {"shape": pairs[i][1], "colour": pairs[i][0]}

    rows = [
        compare("ti", f"{GRIDS}/ti.png", f"TI: the image shows a {plan.colour} {plan.shape}",
                f"base, '{init}' (the init word)", _row(ti, init, lambda c: concept),
                f"TI, '{learned}'", _row(ti, learned, lambda c: concept)),
        compare("ti_words", f"{GRIDS}/ti.png", f"Reference: the base told '{plan.colour} {plan.shape}' in words",
                f"base, '{init}'", _row(ti, init, lambda c: concept),
                f"base, '{words}'", _row(ti, words, lambda c: concept)),
        compare("lora_style", f"{GRIDS}/lora.png", f"LoRA: {plan.style} style, though no prompt names it",
                "base", _row(lora, BASE, lambda c: style), "LoRA at 1.0", _row(lora, LORA_ON, lambda c: style)),
        compare("lora_content", f"{GRIDS}/lora.png", "LoRA: shape and colour still as prompted (held-in prompts)",
                "base", _row(lora, BASE, as_prompted(held)), "LoRA at 1.0", _row(lora, LORA_ON, as_prompted(held))),
        compare("mix", f"{GRIDS}/mix.png", f"Mixed: a {plan.colour} {plan.shape} in {plan.style} style",
                f"base, '{learned}'", _col(mix, BASE, lambda r: everything),
                "TI + LoRA at 1", _col(mix, MIX_FULL, lambda r: everything)),  # the table shows the partial mix too
    ]
    sweep_rows = [{"weight": w, "style": _measure(out, _col(sweep, w, lambda r: style)),
                   "content": _measure(out, _col(sweep, w, as_prompted(sweep_held)))}
                  for w in plan.sweep_weights]
    mix_cols = [{"label": label, "concept": _measure(out, _col(mix, label, lambda r: concept)),
                 "style": _measure(out, _col(mix, label, lambda r: style))}
                for label in mix["x"]["labels"]]
    return {"scores": rows, "sweep": sweep_rows, "mix": mix_cols}


def rescore(out_dir: str | Path) -> dict:
    """Recompute every number of ``scores.json`` from the images it lists: {score id: (before, after)}."""
    out = Path(out_dir)
    data = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    result = {}
    for row in data["scores"]:
        result[row["id"]] = tuple(
            _measure(out, [(i["file"], i["wanted"]) for i in row[side]["items"]])["value"] for side in ("before", "after"))
    return result


# ---------------------------------------------------------------------------------------------- the demo

def run_demo(out_dir: str | Path = "demo", model: str = "tiny", quick: bool = False, fresh: bool = False,
             device=None, dtype=None, progress: bool = True, plan: Plan | None = None) -> Path:
    """Run (or finish) the demo in ``out_dir``; returns the path of its ``index.html``."""
    out = output_folder(out_dir)
    plan = plan or (QUICK if quick else FULL)
    phases = _Phases(out, fresh)
    say = tqdm.write if progress else (lambda *_: None)
    base = load_base(model, device=device, dtype=dtype)
    model_hash = base.model_hash
    data_ti, data_lora = out / "data" / "ti", out / "data" / "lora"
    train_ti_dir, train_lora_dir = out / "train-ti", out / "train-lora"
    timings: dict = {}
    outer = console.progress(len(PHASES), "sdtune demo", "phase", enabled=progress)

    def phase(name: str, sig: str, outputs: list[Path]) -> bool:
        """True: run it (and time it). False: reused."""
        if phases.reusable(name, sig, outputs):
            timings[name] = {"seconds": phases.records[name].get("seconds", 0.0), "reused": True}
            say(f"[{name}] finished in an earlier run; reusing it (pass --fresh to redo)")
            outer.update(1)
            return False
        say(f"[{name}] ...")
        return True

    def finish(name: str, sig: str, t0: float, **info) -> None:
        timings[name] = {"seconds": time.time() - t0}
        phases.mark(name, sig, True, time.time() - t0, **info)
        outer.update(1)

    try:
        # 1. data ------------------------------------------------------------------------------------------
        sig = phases.signature("data", plan.signature())
        sheets = [out / "data" / "ti-set.png", out / "data" / "lora-set.png"]
        if phase("data", sig, sheets):
            t0 = time.time()
            for folder in (data_ti, data_lora):
                if folder.exists():
                    shutil.rmtree(folder)
            write_ti_set(data_ti, plan.ti_images, plan.seed, plan.colour, plan.shape, plan.ti_background)
            write_style_set(data_lora, plan.lora_images, plan.seed, plan.style)
            contact_sheet(data_ti, sheets[0])
            contact_sheet(data_lora, sheets[1])
            finish("data", sig, t0)

        # 2./3. training -----------------------------------------------------------------------------------
        trained: dict[str, Path] = {}
        settings = {"ti": ti_settings(plan, data_ti, train_ti_dir, model, progress, base.family),
                    "lora": lora_settings(plan, data_lora, train_lora_dir, model, progress, base.family)}
        for kind, folder in (("ti", train_ti_dir), ("lora", train_lora_dir)):
            recipe = {k: v for k, v in settings[kind].to_dict().items() if k not in _NOT_FLAGS}
            sig = phases.signature(kind, plan.signature(), model, model_hash, json.dumps(recipe, sort_keys=True))
            rec_file = phases.records.get(kind, {}).get("file")
            outputs = [out / rec_file] if rec_file else [out / "missing"]
            if phase(kind, sig, outputs):
                t0 = time.time()
                if phases.started_with(kind) != sig and folder.exists():
                    shutil.rmtree(folder)  # a save from other settings or another model: start over
                phases.mark(kind, sig, False)
                fresh_base = load_base(model, device=device, dtype=dtype)
                result = TRAINERS[kind](fresh_base, settings[kind])
                del fresh_base
                path = _trained_file(result, folder, kind)
                finish(kind, sig, t0, file=path.relative_to(out).as_posix() if path.is_relative_to(out)
                       else str(path))
            rec_file = phases.records[kind]["file"]
            trained[kind] = out / rec_file if not Path(rec_file).is_absolute() else Path(rec_file)

        # 4. grids -----------------------------------------------------------------------------------------
        specs = _grid_specs(plan, trained["ti"], trained["lora"])
        layout = hashlib.sha256(json.dumps(specs, default=repr, sort_keys=True).encode()).hexdigest()[:12]
        sig = phases.signature("grids", plan.signature(), model_hash, layout)  # redo if the grids change
        grid_files = [out / GRIDS / f"{s['name']}{ext}" for s in specs for ext in (".png", ".json")]
        if phase("grids", sig, grid_files):
            t0 = time.time()
            for spec in specs:
                say(f"[grids] {spec['name']}: {spec['title']}")
                xy_plot(base, spec["prompt"], spec["x"], spec["y"], seed=plan.grid_seed, steps=plan.gen_steps,
                        guidance=plan.guidance, scheduler=plan.scheduler, loras=[str(p) for p in spec["loras"]],
                        embeddings=[str(p) for p in spec["embeddings"]], out_dir=out / GRIDS, name=spec["name"],
                        progress=progress)
            finish("grids", sig, t0)

        # 5. report ----------------------------------------------------------------------------------------
        sig = phases.signature("report", plan.signature())
        t0 = time.time()  # always rewritten: it is cheap and shows this run's timings
        say("[report] ...")
        scores = compute_scores(out, plan)
        scores.update(model=model, model_hash=model_hash, quick=quick, plan=asdict(plan))
        atomic_write_text(json.dumps(scores, indent=1), out / "scores.json")
        commands = [
            ("1. the TI training set", _python_call(
                "write_ti_set", str(data_ti), n=plan.ti_images, seed=plan.seed, colour=plan.colour,
                shape=plan.shape, background=plan.ti_background)),
            ("1. the LoRA training set", _python_call(
                "write_style_set", str(data_lora), n=plan.lora_images, seed=plan.seed, style=plan.style)),
            ("2. train the TI embedding", train_command("ti", settings["ti"])),
            ("3. train the LoRA", train_command("lora", settings["lora"])),
            *[(f"4. grid: {s['title']}", grid_command(s, plan, model, out)) for s in specs],
            ("5. the judge's scores, recomputed from the images", _python_call("rescore", str(out), echo=True)),
        ]
        atomic_write_text("#!/bin/sh\nset -e\n" + "\n".join(f"# {t}\n{c}" for t, c in commands) + "\n",
                          out / "reproduce.sh")
        files = {
            "grids": [{"name": s["name"], "title": s["title"], "file": f"{GRIDS}/{s['name']}.png",
                       "json": f"{GRIDS}/{s['name']}.json", "cells": len(s["x"].values) * len(s["y"].values),
                       "command": grid_command(s, plan, model, out)} for s in specs],
            "outputs": [("TI embedding", _rel(trained["ti"], out)), ("LoRA", _rel(trained["lora"], out)),
                        # each run's own page: losses, samples step by step, the best checkpoint
                        *[(f"{kind} training report", _rel(folder / REPORT_FILE, out))
                          for kind, folder in (("TI", train_ti_dir), ("LoRA", train_lora_dir))
                          if (folder / REPORT_FILE).is_file()],
                        ("judge scores, image by image", "scores.json"), ("phases and timings", PHASES_FILE),
                        ("all commands", "reproduce.sh")],
        }
        index = write_report(out, plan, quick, model, model_hash, scores, commands, files, timings)
        finish("report", sig, t0)
        say(f"[report] {index}")
        return index
    finally:
        outer.close()


def _rel(path: Path, out: Path) -> str:
    path = Path(path)
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _python_call(function: str, *args, echo: bool = False, **kwargs) -> str:
    """``python -c 'from sdtune.demo import F; F(...)'`` (strings written with double quotes, JSON-style)."""
    words = [json.dumps(a) if isinstance(a, str) else repr(a) for a in args]
    words += [f"{k}={json.dumps(v) if isinstance(v, str) else repr(v)}" for k, v in kwargs.items()]
    call = f"{function}({', '.join(words)})"
    return shlex.join(["python", "-c", f"from sdtune.demo import {function}; {f'print({call})' if echo else call}"])
