"""X/Y comparison plots, as A1111 users know them: one setting per column, another per row, same everything else.

    from sdtune.xyplot import Axis, xy_plot
    xy_plot(base, "a red star", x=Axis("weight", [0, 0.5, 1], target="style"), y=Axis("seed", [1, 2]),
            loras=["style.safetensors"], out_dir="grid")

Axis kinds: ``prompt`` (whole prompts), ``sr`` (A1111's Prompt S/R: the first value is searched for in the
prompt and negative prompt, each value replaces it), ``seed``, ``guidance``, ``steps``, ``sampler``, ``clip_skip``,
``weight`` (one LoRA's weight), ``blocks`` (one LoRA's block weights, the lora-block-weight extension's
``lbw=`` values: presets or vectors, ``'blocks=INALL|OUTALL|1,0,0,…'``: split on '|' only), ``adapters`` /
``loras`` / ``embeddings`` (which adapters are on: each value is ``none`` or ``A[:W]+B[:W]+<token>``, a LoRA item
may end in ``:lbw=…``; names of adapters given with ``loras=``/``embeddings=`` or file paths). A ``loras=`` spec
may carry ``:lbw=…`` too: that LoRA's block weights wherever no axis sets them.

Adapters are loaded once; between cells only ``LoraSet.set_weights`` runs (a weight of 0 puts the pristine
layer back, so that cell is the base model bit for bit) and embeddings are added or removed from the
``EmbeddingSet``. Whatever the plot loaded is unloaded at the end, and adapters the base already had get their
weights back. Cells that differ only by consecutive seeds are generated as one batch. Block weights change by
re-adding that LoRA (from the ``Lora`` the plot read once) with its new vector: so they apply to LoRAs the plot
loads itself, not to ones the base already had.

Output in ``out_dir``: ``NAME.png`` (the labelled grid; its ``parameters`` text holds the shared settings and
``X Type``/``X Values``/``Y Type``/``Y Values``), ``NAME-RR-CC.png`` (each cell, with its own ``parameters``),
and ``NAME.json`` (axes, settings and cell file names, for scripts).
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import api, console, sources
from .generate import check_clip_skip, draw_grid, infotext, read_layer, save_png
from .lora import blocks as block_weights
from .lora.formats import load_lora
from .lora.hashes import lora_hashes_field
from .safeio import SdtuneError, atomic_write_text, output_folder
from .samplers import SCHEDULERS, check_scheduler, sampler_key
from .ti.formats import load_embedding
from .ti.tokens import find_in_prompt

KIND_NAMES = {  # kind -> the axis title A1111 users know
    "prompt": "Prompt", "sr": "Prompt S/R", "seed": "Seed", "guidance": "CFG Scale", "steps": "Steps",
    "sampler": "Sampler", "weight": "LoRA weight", "adapters": "Adapters", "loras": "LoRAs",
    "embeddings": "Embeddings", "blocks": "LoRA block weights", "clip_skip": "Clip skip",
}
ALIASES = {"prompts": "prompt", "prompt_sr": "sr", "seeds": "seed", "cfg": "guidance", "cfg_scale": "guidance",
           "scheduler": "sampler", "weights": "weight", "lora_weight": "weight", "adapter": "adapters",
           "lora": "loras", "embedding": "embeddings", "ti": "embeddings", "lbw": "blocks",
           "block_weights": "blocks", "clip-skip": "clip_skip", "clipskip": "clip_skip"}
ADAPTER_KINDS = ("adapters", "loras", "embeddings")
TARGETED_KINDS = ("weight", "blocks")  # axes that act on one LoRA (``Axis.target``)
NONE_WORDS = ("none", "base", "off", "")


# ---------------------------------------------------------------------------------------------- axes

@dataclass
class Axis:
    """One axis: a kind, its values (typed by kind), an optional LoRA name for ``weight``, optional labels."""

    kind: str
    values: list
    target: str | None = None  # weight/blocks axis: the LoRA swept (a name from loras=, or a file)
    labels: list[str] | None = None  # drawn instead of the default labels

    def __post_init__(self):
        kind = ALIASES.get(self.kind, self.kind)
        if kind not in KIND_NAMES:
            raise SdtuneError(f"unknown axis kind {self.kind!r}; choose one of: {', '.join(KIND_NAMES)}")
        self.kind = kind
        if not self.values:
            raise SdtuneError(f"{kind} axis has no values; give at least one, e.g. {kind}={_EXAMPLES[kind]}")
        self.values = [_typed(kind, v) for v in self.values]
        if self.labels is not None and len(self.labels) != len(self.values):
            raise SdtuneError(f"{kind} axis: {len(self.labels)} labels for {len(self.values)} values")
        if kind == "sr" and len(self.values) < 2:
            raise SdtuneError("sr axis: give the text to search for, then its replacements, e.g. "
                              "'sr=red|blue|green'")

    @property
    def title(self) -> str:
        return KIND_NAMES[self.kind]

    def label(self, i: int, target: str | None = None) -> str:
        """Cell ``i``'s heading; ``target``: the LoRA a weight axis sweeps where the plot found it (one loaded)."""
        if self.labels is not None:
            return self.labels[i]
        v = self.values[i]
        if self.kind == "seed":
            return f"seed {v}"
        if self.kind == "guidance":
            return f"CFG {v:g}"
        if self.kind == "steps":
            return f"{v} steps"
        if self.kind == "weight":
            return f"{self.target or target or 'LoRA'} {v:g}"
        if self.kind in ADAPTER_KINDS:
            return "base" if v.strip().lower() in NONE_WORDS else v
        if self.kind == "sampler":
            return SCHEDULERS[v][2]  # A1111's name, as its X/Y plot labels a sampler
        return str(v)

    def describe(self) -> str:
        """The values as A1111's ``X Values`` field writes them."""
        sep = " | " if self.kind in ("prompt", "sr", "blocks", *ADAPTER_KINDS) else ", "
        if self.kind == "sampler":  # A1111's names, which its X/Y script reads back
            return sep.join(SCHEDULERS[v][2] for v in self.values)
        return sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in self.values)

    def to_json(self, target: str | None = None) -> dict:
        return {"kind": self.kind, "title": self.title, "values": self.values, "target": self.target or target,
                "labels": [self.label(i, target) for i in range(len(self.values))]}


_EXAMPLES = {"prompt": "'a red star|a blue star'", "sr": "'red|blue|green'", "seed": "1,2,3 or 1-4",
             "guidance": "3,5,7.5", "steps": "10,20,30", "sampler": "ddim,euler_a",
             "weight": "0,0.25,0.5,1,1.5", "adapters": "'none|style|style:0.5+detail:1'",
             "loras": "'none|style|style:0.5+detail:1'", "embeddings": "'none|<my-thing>'",
             "blocks": "'INALL|OUTALL|MIDD'", "clip_skip": "1,2"}


def _typed(kind: str, v):
    try:
        if kind in ("seed", "steps", "clip_skip"):
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            n = int(v)
            if kind in ("steps", "clip_skip") and n < 1:
                raise SdtuneError(f"{kind} axis value {n}: must be at least 1")
            if kind == "seed" and n < -1:  # a typo (or a range through negatives), not a wish for random seeds
                raise SdtuneError(f"seed axis value {n}: a seed is 0 or more, or -1 for a random one")
            if kind == "seed" and n == -1:  # a random seed, drawn now so that the label names it (as A1111)
                n = random.randrange(2**31 - 1)
            return n
        if kind in ("guidance", "weight"):
            if not math.isfinite(float(v)):  # said here, by its axis, not later by a flag the user did not type
                raise SdtuneError(f"{kind} axis value {v!r}: must be a finite number; e.g. {kind}={_EXAMPLES[kind]}")
            return float(v)
    except (TypeError, ValueError):
        raise SdtuneError(f"{kind} axis value {v!r} is not a number; e.g. {kind}={_EXAMPLES[kind]}") from None
    if kind == "sampler":
        name = sampler_key(str(v)) or str(v)  # A1111's names as well ("Euler a")
        if name not in SCHEDULERS:
            raise SdtuneError(f"sampler axis value {v!r}: choose from {', '.join(SCHEDULERS)}")
        return name
    return str(v)


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
MAX_CELLS = 2500  # a 50 x 50 grid; the drawn grid alone of a larger one takes gigabytes
# A1111's ranges: low-high, low-high (+step), low-high [count] (count values from low to high)
_RANGE = re.compile(rf"({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*\+\s*({_NUMBER})\s*\)|\[\s*(\d+)\s*\])?")


def _range(kind: str, text: str) -> list | None:
    """The values of a numeric axis range, or None when ``text`` is not one."""
    m = _RANGE.fullmatch(text) if kind in ("seed", "steps", "guidance", "weight", "clip_skip") else None
    if m is None:
        return None
    whole = kind in ("seed", "steps", "clip_skip")
    lo, hi = float(m.group(1)), float(m.group(2))
    step, count = float(m.group(3) or 1), int(m.group(4) or 0)
    if hi < lo or step <= 0 or (m.group(4) and count < 1) or not math.isfinite(hi - lo) or \
            (whole and not (lo.is_integer() and hi.is_integer())):
        raise SdtuneError(f"{kind} axis range {text!r}: write low-high, low-high(+step) or low-high[count], e.g. "
                          f"1-10(+3) or 3-7[5]")
    count = count or int((hi - lo) / step + 1e-9) + 1
    if count > MAX_CELLS:  # said before a list of millions is made (seed=1-100000000 took a minute to refuse)
        raise SdtuneError(f"{kind} axis range {text!r}: {count} values; a grid takes at most {MAX_CELLS} cells")
    if m.group(4):
        values = [lo + (hi - lo) * i / max(count - 1, 1) for i in range(count)]
    else:
        values = [lo + step * i for i in range(count)]
    return [int(round(v)) for v in values] if whole else [round(v, 10) for v in values]


def check_cells(x: Axis, y: Axis | None) -> int:
    """The plot's number of cells; refused above ``MAX_CELLS``, before any work per cell."""
    n_cells = len(x.values) * (len(y.values) if y is not None else 1)
    if n_cells > MAX_CELLS:
        raise SdtuneError(f"{n_cells} cells: a grid takes at most {MAX_CELLS}; use fewer axis values (or several "
                          f"grids)")
    return n_cells


def parse_values(kind: str, text: str) -> list:
    """Axis values from a command-line string: split on '|' when there is one, else on ','.

    Numeric axes also take A1111's ranges: ``1-4`` is 1,2,3,4, ``1-10(+3)`` is 1,4,7,10, ``3-7(+0.5)`` steps by
    0.5 and ``3-7[5]`` is 5 values from 3 to 7."""
    kind = ALIASES.get(kind, kind)
    # block-weight vectors hold commas: that axis splits on '|' only
    parts = [p.strip() for p in (text.split("|") if "|" in text or kind == "blocks" else text.split(","))]
    if kind not in ("prompt", "sr"):
        parts = [p for p in parts if p or kind in ADAPTER_KINDS]
    out: list = []
    for p in parts:
        values = _range(kind, p)
        out.extend([p] if values is None else values)
    return out


def parse_axis(spec: str, target: str | None = None) -> Axis:
    """``KIND=VALUES`` (e.g. ``seed=1-4``, ``weight=0,0.5,1``, ``'prompt=a red star|a blue star'``) -> Axis."""
    kind, sep, text = spec.partition("=")
    if not sep:
        raise SdtuneError(f"axis {spec!r}: write KIND=VALUES, e.g. seed=1,2,3 (kinds: {', '.join(KIND_NAMES)})")
    said = kind.strip()
    kind = ALIASES.get(said, said)
    if kind not in KIND_NAMES:
        raise SdtuneError(f"axis {spec!r}: unknown kind {kind!r}; choose one of: {', '.join(KIND_NAMES)}")
    try:
        return Axis(kind, parse_values(kind, text), target=target)
    except SdtuneError as e:  # in the words the user wrote: "cfg axis value", not "guidance axis value"
        if said == kind:
            raise
        raise SdtuneError(re.sub(rf"\b{kind}(?= axis|=)", said, str(e))) from None


def axes_from_specs(x: str | None = None, y: str | None = None, *, weights: str | None = None,
                    sweep: str | None = None) -> tuple[Axis, Axis | None]:
    """The plot's (x, y) axes from ``KIND=VALUES`` strings (what ``sdtune grid --x/--y`` takes).

    ``weights`` ("0,0.5,1") is shorthand for a weight axis, which then comes first (the columns) and pushes
    the other axis given to the rows; ``sweep`` names the LoRA a weight or blocks axis sweeps (default: the only
    one loaded)."""
    if x is None and weights is None:
        raise SdtuneError("sdtune grid: give --x KIND=VALUES (e.g. --x seed=1-4) or --lora FILE --weights 0,0.5,1")
    if x is not None and weights is not None and y is not None:
        raise SdtuneError("sdtune grid: --weights is a third axis next to --x and --y; drop one of them")
    axes = [Axis("weight", parse_values("weight", weights), target=sweep)] if weights is not None else []
    axes += [parse_axis(spec, target=sweep) for spec in (x, y) if spec is not None]
    return axes[0], (axes[1] if len(axes) > 1 else None)


# ---------------------------------------------------------------------------------------------- adapters

class _Adapters:
    """What the plot loaded and controls, and how to put the base back afterwards."""

    def __init__(self, base, lora_dirs=(), embedding_dirs=(), allow_partial: bool = False):
        self.allow_partial = allow_partial  # apply LoRAs whose keys only partly fit the model (warns)
        self.loras = base.loras  # sdtune.lora.patch.LoraSet
        self.embs = base.embeddings  # sdtune.ti.tokens.EmbeddingSet
        self.lora_dirs, self.embedding_dirs = tuple(lora_dirs), tuple(embedding_dirs)
        self.two_encoders = len(base.family.text_encoders) > 1
        self.start_weights = {r["name"]: self._weights_of(r) for r in self.loras.list()}
        self.start_tokens = list(self.embs.tokens)
        self.held = {t: self.embs.get(t) for t in self.start_tokens}  # token -> Embedding, to re-add
        self.added_loras: list[str] = []
        self.by_file: dict[str, str] = {}  # resolved path -> name of a LoRA the plot loaded
        self.added_tokens: list[str] = []
        self.controlled_loras: set[str] = set()
        self.controlled_tokens: set[str] = set()
        self.fixed: dict[str, float] = {}  # LoRAs given with loras= and not on an axis: their weight
        self.read: dict[str, object] = {}  # name -> the ``Lora`` the plot read, to re-add with other block weights
        self.base_blocks: dict[str, str] = {}  # name -> lbw= of its loras= spec: its blocks where no axis says
        self.blocks: dict[str, str | None] = {}  # name -> the block weights it is patched with now (None: none)
        self.family = base.family

    # ---- loading ----
    def _lora_name(self, path: Path) -> str:
        stem, name, n = path.stem, path.stem, 2
        while name in self.loras:
            name, n = f"{stem}_{n}", n + 1
        return name

    def add_lora_file(self, spec: str) -> str:
        spec, lbw = block_weights.split_spec(str(spec))
        src, weight = sources.parse_weighted(spec)
        if isinstance(weight, tuple):  # a grid's weights are one number per LoRA (its axes sweep them)
            raise SdtuneError(f"{spec}: a grid takes one weight per LoRA; give FILE:0.8, or the text encoders' "
                              f"weight in a prompt tag (<lora:name:te=0.5:unet=0.8>)")
        if src in self.loras:  # already loaded under that name
            self.fixed[src] = weight
            self._set_base_blocks(src, lbw)
            return src
        try:
            path = sources.resolve(src, "lora", self.lora_dirs)
        except SdtuneError as e:
            loaded = [n for n in self.loras.names() if n not in self.added_loras]
            if loaded:  # a typo of a loaded name reads as a file or hub id
                raise SdtuneError(f"{e} (the LoRAs loaded before the plot are named: {', '.join(loaded)})") from None
            raise
        key = str(Path(path).resolve())
        if key in self.by_file:  # the same file named twice (e.g. on an axis and with loras=): load it once
            self._set_base_blocks(self.by_file[key], lbw)
            return self.by_file[key]
        name = self._lora_name(path)
        lora = load_lora(path, model_keys=self.loras.modules)
        lora.metadata["source"] = str(path)  # what LoraSet lists as its source (PNG "Lora hashes" hash that file)
        self.loras.add(name, lora, 0.0, allow_partial=self.allow_partial)
        self.read[name] = lora
        self.blocks[name] = None
        self.added_loras.append(name)
        self.by_file[key] = name
        self.fixed[name] = weight
        self._set_base_blocks(name, lbw)
        return name

    def prompt_name(self, name: str) -> str:
        """The name prompts and PNGs give LoRA ``name``: its file's stem where the plot read it from a file."""
        lora = self.read.get(name)
        source = lora.metadata.get("source") if lora is not None else None
        return Path(source).stem if source else name

    def _set_base_blocks(self, name: str, lbw: str | None) -> None:
        if lbw is not None:
            self.check_blocks(name, lbw)
            self.base_blocks[name] = lbw

    def check_blocks(self, name: str, lbw: str) -> None:
        """Fail before any image when a LoRA cannot take block weights here, or the vector does not fit."""
        if name not in self.read:
            raise SdtuneError(f"lbw={lbw}: {name} was loaded before the plot, so the plot cannot re-add it with "
                              f"block weights; give its file instead (loras=[FILE], --lora FILE)")
        block_weights.parse(lbw, self.family)

    def add_embedding_file(self, spec: str) -> str:
        src, token = sources.split_suffix(str(spec))
        if token is None and self.token_of(src):
            return self.token_of(src)
        emb = load_embedding(sources.resolve(src, "embedding", self.embedding_dirs), token=token)
        existing = self.token_of(emb.token)
        if existing:
            return existing
        self.embs.add(emb)
        self.held[emb.token] = emb
        self.added_tokens.append(emb.token)
        return emb.token

    def add_prompt_words(self, texts) -> None:
        """The embedding-folder files whose names the cells' prompts use as words, loaded once for the plot as
        generate loads them (A1111's rule); a word an axis already turns on and off stays the axis's. One that
        cannot be used is skipped with a note, as generate skips it."""
        for d in self.embedding_dirs:
            for text in texts:
                for name, path in find_in_prompt(d, text).items():
                    if self.token_of(name) is None and api.load_folder_word(self.embs, name, path):
                        self.held[name] = self.embs.get(name)
                        self.added_tokens.append(name)

    def token_of(self, word: str) -> str | None:
        for t in self.held:
            if t.lower() == word.lower():
                return t
        return None

    # ---- axis values ----
    def resolve_set(self, kind: str, value: str) -> tuple[dict[str, float], set[str], dict[str, str]]:
        """({lora name: weight}, {embedding tokens}, {lora name: lbw=}) that an adapter-axis value turns on."""
        loras: dict[str, float] = {}
        tokens: set[str] = set()
        lbws: dict[str, str] = {}
        if value.strip().lower() in NONE_WORDS:
            return loras, tokens, lbws
        for item in (i.strip() for i in value.split("+")):
            if not item:
                raise SdtuneError(f"{kind} axis value {value!r}: an empty item between '+' signs")
            item, lbw = block_weights.split_spec(item)
            if lbw is not None:
                name = self._lora_item(kind, item)
                self.check_blocks(name, lbw)
                loras[name] = self._item_weight(item)
                lbws[name] = lbw
                continue
            token = self.token_of(item)
            if token is not None:
                tokens.add(token)
                continue
            src, tail = sources.split_suffix(item)
            weight = None
            if tail is not None:
                try:
                    weight = float(tail)
                except ValueError:
                    weight = None
            if src in self.loras and kind != "embeddings":
                loras[src] = 1.0 if weight is None else weight
                continue
            if self.token_of(src) is not None:
                raise SdtuneError(f"{kind} axis item {item!r}: embeddings take no weight; write {src}")
            if kind == "embeddings" or (kind == "adapters" and tail is not None and weight is None):
                tokens.add(self.add_embedding_file(item))
                continue
            try:
                name = self.add_lora_file(src)
                self.fixed.pop(name, None)
            except SdtuneError as lora_error:
                if kind == "loras" or weight is not None:
                    raise
                try:
                    tokens.add(self.add_embedding_file(src))
                    continue
                except SdtuneError:
                    raise lora_error from None
            loras[name] = 1.0 if weight is None else weight
        return loras, tokens, lbws

    def _lora_item(self, kind: str, item: str) -> str:
        """The LoRA an adapter-axis item with ``:lbw=`` names (a loaded name or a file)."""
        if kind == "embeddings":
            raise SdtuneError(f"embeddings axis item {item!r}: lbw= is for LoRAs")
        src, _ = sources.split_suffix(item)
        src = src if self._item_weight(item, strict=False) is not None else item
        if src in self.loras:
            return src
        name = self.add_lora_file(src)
        self.fixed.pop(name, None)
        return name

    @staticmethod
    def _item_weight(item: str, strict: bool = True) -> float | None:
        """The ``:W`` of an adapter-axis item (1 without one); ``strict=False``: None when it has none."""
        _, tail = sources.split_suffix(item)
        try:
            return float(tail) if tail is not None else (1.0 if strict else None)
        except ValueError:
            if strict:
                raise SdtuneError(f"adapter axis item {item!r}: with lbw=, write NAME[:WEIGHT]:lbw=…") from None
            return None

    def weight_target(self, axis: Axis) -> str:
        if axis.target is None:
            names = self.loras.names()
            if len(names) != 1:
                raise SdtuneError(f"{axis.kind} axis: say which LoRA to sweep (loaded: {', '.join(names) or 'none'}); "
                                  f"give exactly one --lora, or name it with --sweep NAME (in Python: "
                                  f"Axis('{axis.kind}', ..., target=NAME))")
            name = names[0]
        else:
            name = axis.target if axis.target in self.loras else self.add_lora_file(axis.target)
        if axis.kind == "blocks":
            for v in axis.values:
                self.check_blocks(name, v)
        return name

    def _weights_of(self, row: dict) -> tuple:
        """A LoRA's weight per component as ``set_weights`` takes it back: SDXL's second text encoder may
        have a weight of its own."""
        pair = (row["unet_weight"], row["te_weight"])
        return (*pair, row["te2_weight"]) if self.two_encoders else pair

    # ---- applying ----
    def apply(self, loras: dict[str, float], tokens: set[str], blocks: dict[str, str | None]) -> None:
        weights = {n: 0.0 for n in self.controlled_loras}
        weights.update(loras)
        current = {r["name"]: self._weights_of(r) for r in self.loras.list()}
        # a LoRA whose block weights change is re-added with them (and its weight), in the same pass
        reblock = {n: b for n, b in blocks.items() if n in self.read and self.blocks.get(n) != b}
        changed = {n: w for n, w in weights.items() if set(current.get(n, ())) != {w} and n not in reblock}
        with self.loras.batch():
            for n, b in reblock.items():
                w = weights.get(n, current[n])
                self.loras.add(n, self.read[n], w, allow_partial=self.allow_partial, blocks=b)
                self.blocks[n] = b
            if changed:
                self.loras.set_weights(changed)
        for t in sorted(self.controlled_tokens):
            on = t in tokens
            if on and t not in self.embs:
                self.embs.add(self.held[t])
            elif not on and t in self.embs:
                self.embs.remove(t)

    def restore(self) -> None:
        for name in self.added_loras:
            if name in self.loras:
                self.loras.remove(name)
        back = {n: w for n, w in self.start_weights.items() if n in self.loras}
        if back:
            self.loras.set_weights(back)
        for t in self.added_tokens:
            if t in self.embs:
                self.embs.remove(t)
        for t in self.start_tokens:
            if t not in self.embs:
                self.embs.add(self.held[t])


# ---------------------------------------------------------------------------------------------- cells

@dataclass
class _Cell:
    row: int
    col: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str
    clip_skip: int
    loras: dict[str, float] = field(default_factory=dict)
    tokens: frozenset = frozenset()
    blocks: dict[str, str | None] = field(default_factory=dict)  # LoRA name -> its lbw= (None: none)

    def adapter_key(self) -> tuple:
        return (tuple(sorted(self.loras.items())), tuple(sorted(self.tokens)),
                tuple(sorted((n, b or "") for n, b in self.blocks.items())))

    def group_key(self) -> tuple:
        """Everything but the seed: cells with equal keys and consecutive seeds share one batch."""
        return (self.prompt, self.negative_prompt, self.steps, self.guidance, self.scheduler, self.clip_skip,
                self.adapter_key())


def _apply_value(cell: _Cell, axis: Axis, i: int, adapters: _Adapters, targets: dict) -> None:
    v = axis.values[i]
    if axis.kind == "prompt":
        cell.prompt = v
    elif axis.kind == "sr":
        search = axis.values[0]
        cell.prompt = cell.prompt.replace(search, v)
        cell.negative_prompt = cell.negative_prompt.replace(search, v)
    elif axis.kind == "seed":
        cell.seed = v
    elif axis.kind == "guidance":
        cell.guidance = v
    elif axis.kind == "steps":
        cell.steps = v
    elif axis.kind == "sampler":
        cell.scheduler = v
    elif axis.kind == "clip_skip":
        cell.clip_skip = v
    elif axis.kind == "weight":
        cell.loras[targets[id(axis)]] = v
    elif axis.kind == "blocks":
        cell.blocks[targets[id(axis)]] = v
    else:
        loras, tokens, lbws = adapters.resolve_set(axis.kind, v)
        cell.loras.update(loras)
        cell.tokens = frozenset(cell.tokens | tokens)
        cell.blocks.update(lbws)


BATCH = 8  # cells generated together at most: a seed range is one run of cells, and memory grows with the batch


def _runs(cells: list[_Cell]) -> list[list[_Cell]]:
    """Cells grouped into batches: same settings, seeds s, s+1, s+2, ... (generate seeds image i with s+i), at
    most ``BATCH`` in one."""
    groups: dict[tuple, list[_Cell]] = {}
    for c in cells:
        groups.setdefault(c.group_key(), []).append(c)
    runs = []
    for members in groups.values():
        members.sort(key=lambda c: c.seed)
        run = [members[0]]
        for c in members[1:]:
            if c.seed == run[-1].seed + 1 and len(run) < BATCH:
                run.append(c)
            else:
                runs.append(run)
                run = [c]
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------- the plot

GAP = 2  # white pixels between the plot's cells (generate.draw_grid draws the grid)


def _free_name(out_dir: Path, name: str) -> str:
    """``name``, or the first ``name-N`` (N = 2, 3...) with no grid, record or cells in ``out_dir``."""
    def taken(stem: str) -> bool:
        return any((out_dir / f"{stem}{end}").exists() for end in (".png", ".json")) or \
            any(out_dir.glob(f"{glob.escape(stem)}-[0-9][0-9]-[0-9][0-9].png"))
    return next(stem for stem in (name if n == 1 else f"{name}-{n}" for n in itertools.count(1)) if not taken(stem))


def xy_plot(base, prompt: str, x: Axis, y: Axis | None = None, *, negative_prompt: str = "", seed: int = 0,
            steps: int = 20, guidance: float = 7.5, scheduler: str = "ddim", clip_skip: int = 1,
            width: int | None = None,
            height: int | None = None, loras=(), embeddings=(), lora_dirs=(), embedding_dirs=(),
            allow_partial: bool = False, out_dir: str | Path = "grid", name: str = "xy", cell: int | None = 128,
            progress: bool = True, on_step=None, keep_earlier: bool = False, keep_on: tuple = ()) -> Path:
    """Render every (y, x) cell, save the labelled grid and the single images; returns the grid's path.

    ``loras``: "FILE[:W][:lbw=…]" specs loaded for the plot (named by file stem; usable by name in axis values;
    fixed at W, with those block weights, unless an axis controls them). ``embeddings``: "FILE[:TOKEN]" specs, likewise (on unless an axis says).
    ``allow_partial``: apply a LoRA even if some of its keys match no module of the model (with a warning);
    otherwise such a LoRA is refused. ``on_step(done, total)``: after each denoising step of all the cells'
    batches together; an exception it raises stops the plot, which then saves nothing (a Ctrl-C or SIGTERM, or an
    exception of a type in ``keep_on`` (a UI's Cancel), keeps the cells drawn: the grid is saved with gaps, then
    the exception goes on). ``keep_earlier``: a grid
    of that ``name`` in ``out_dir`` stays, the new one is named ``NAME-2`` (``-3``...) as ``generate`` numbers its
    images; otherwise it is replaced.
    """
    scheduler = check_scheduler(scheduler)
    check_clip_skip(clip_skip)
    n_cells = check_cells(x, y)
    if not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
        raise SdtuneError(f"--name {name!r}: a file name stem of letters, digits, '_', '.' or '-' (no folders: "
                          f"the grid goes in --out)")
    if cell is not None and cell < 8:
        raise SdtuneError(f"--cell {cell}: must be at least 8 (pixels)")
    if seed is None or seed < 0:
        raise SdtuneError(f"seed {seed}: an X/Y plot needs a fixed seed (0 or more) so cells are comparable")
    axes = [a for a in (x, y) if a is not None]
    for a in axes:
        if a.kind == "sr" and a.values[0] not in prompt and a.values[0] not in negative_prompt:
            raise SdtuneError(f"sr axis: {a.values[0]!r} is not in the prompt; the first value is the text to "
                              f"replace, e.g. prompt 'a red star' with sr=red|blue")
    for skip in {clip_skip, *(v for a in axes if a.kind == "clip_skip" for v in a.values)}:
        for te, model, _ in base.text_encoders():  # a skip deeper than the encoder: said before the first cell
            read_layer(te, model, skip)
    if y is not None and x.kind == y.kind and x.kind != "sr" and x.target == y.target:
        # the rows would set what the columns set (only one of them would show): two S/R axes replace two texts
        raise SdtuneError(f"--x and --y both set {x.kind}: the grid would show one of them; put all the values on "
                          f"one axis, or another kind on the other")
    out_dir = output_folder(out_dir)
    if keep_earlier:
        name = _free_name(out_dir, name)
    adapters = _Adapters(base, lora_dirs, embedding_dirs, allow_partial)
    results: list = []  # (cell, image) pairs
    interrupted = None
    try:
        given: dict[str, str] = {}  # the name a prompt and the PNG give each LoRA: its file's (A1111's)
        for spec in loras:
            api.once_by_name(given, adapters.prompt_name(adapters.add_lora_file(spec)), spec)
        for spec in embeddings:
            adapters.add_embedding_file(spec)
        targets = {id(a): adapters.weight_target(a) for a in axes if a.kind in TARGETED_KINDS}
        # adapters named on an axis are set by it in every cell (off where a value leaves them out); LoRAs
        # loaded for the plot and on no axis keep their given weight; everything else stays as it is. A blocks
        # axis sets block weights only: its LoRA keeps its weight.
        axis_loras, axis_tokens = {targets[id(a)] for a in axes if a.kind == "weight"}, set()
        for a in axes:
            if a.kind in ADAPTER_KINDS:
                for v in a.values:
                    lo, to, _ = adapters.resolve_set(a.kind, v)
                    axis_loras |= set(lo)
                    axis_tokens |= to
        for n in axis_loras:
            adapters.fixed.pop(n, None)
        adapters.controlled_loras = axis_loras | set(adapters.fixed)
        adapters.controlled_tokens = axis_tokens
        ys = range(len(y.values)) if y is not None else [None]
        cells: list[_Cell] = []
        for r in ys:
            for c in range(len(x.values)):
                cell_ = _Cell(r or 0, c, prompt, negative_prompt, seed, steps, guidance, scheduler, clip_skip,
                              loras=dict(adapters.fixed),
                              blocks={n: adapters.base_blocks.get(n) for n in adapters.read})
                for a, i in ((y, r), (x, c)):
                    if a is not None:
                        _apply_value(cell_, a, i, adapters, targets)
                cells.append(cell_)
        adapters.add_prompt_words(dict.fromkeys(t for c in cells for t in (c.prompt, c.negative_prompt)))
        try:
            _render(base, cells, adapters, width, height, lora_dirs, allow_partial, progress, on_step, results)
        except (KeyboardInterrupt, *keep_on) as e:  # Ctrl-C, SIGTERM, a Cancel: the cells drawn so far are kept
            if not results:
                raise
            interrupted = e
    finally:
        adapters.restore()
    results.sort(key=lambda cr: (cr[0].row, cr[0].col))

    n_rows, n_cols = len(ys), len(x.values)
    grid_images = [[None] * n_cols for _ in range(n_rows)]
    files = [[None] * n_cols for _ in range(n_rows)]
    for c_, res in results:
        path = out_dir / f"{name}-{c_.row:02d}-{c_.col:02d}.png"
        res.save(path)
        grid_images[c_.row][c_.col] = res.image
        files[c_.row][c_.col] = path.name
    kept = {f for row in files for f in row}
    for stale in out_dir.glob(f"{glob.escape(name)}-[0-9][0-9]-[0-9][0-9].png"):  # a replaced, larger grid's cells
        if stale.name not in kept:
            stale.unlink()
    col_labels = [x.label(i, targets.get(id(x))) for i in range(n_cols)]
    row_labels = [y.label(i, targets.get(id(y))) for i in range(n_rows)] if y is not None else None
    canvas = draw_grid(grid_images, row_labels, col_labels, cell=cell, gap=GAP)
    first = results[0][1]
    # per-cell values (each cell's PNG has its own); the first cell's would mislabel the grid
    shared = {k: v for k, v in first.params.items() if k not in ("Seed", "Lora weights", "Lora hashes", "Clip skip")}
    shared["Clip skip"] = clip_skip if clip_skip > 1 else None
    shared["Seed"] = seed  # (steps, CFG and sampler: the first cell's, as A1111 writes them)
    if adapters.fixed:  # the LoRAs of every cell, as a cell's PNG names them (block weights too; hashes: civitai)
        fixed = sorted((adapters.prompt_name(n), w, adapters.base_blocks.get(n)) for n, w in adapters.fixed.items())
        shared["Lora weights"] = "; ".join(f"{n}={w:g}" + (f":lbw={b}" if b else "") for n, w, b in fixed)
        credited = [(adapters.prompt_name(m), adapters.read[m].metadata["source"])
                    for m, w in adapters.fixed.items() if w and m in adapters.read]
        shared["Lora hashes"] = lora_hashes_field(credited) or None
    for tag, a in (("X", x), ("Y", y)):
        if a is not None:
            shared[f"{tag} Type"] = a.title + (f" ({targets[id(a)]})" if a.kind in TARGETED_KINDS else "")
            shared[f"{tag} Values"] = a.describe()
    text = infotext(prompt, negative_prompt, shared)
    grid_path = save_png(canvas, out_dir / f"{name}.png", text)
    record = {"grid": grid_path.name, "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
              "steps": steps, "guidance": guidance, "scheduler": scheduler, "clip_skip": clip_skip,
              "rows": n_rows, "cols": n_cols,
              "x": x.to_json(targets.get(id(x))), "y": y.to_json(targets.get(id(y))) if y else None,
              "cells": files, "cell_prompts": [[None] * n_cols for _ in range(n_rows)], "parameters": text}
    for c_, _ in results:
        record["cell_prompts"][c_.row][c_.col] = c_.prompt
    atomic_write_text(json.dumps(record, indent=1), out_dir / f"{name}.json")
    if interrupted is not None:
        if isinstance(interrupted, KeyboardInterrupt):  # on the terminal; a UI says it on its page
            console.note(f"stopped after {len(results)} of {n_cells} cells: {grid_path} shows them, blank where a "
                         f"cell was not drawn")
        raise interrupted
    return grid_path


def _render(base, cells: list[_Cell], adapters: _Adapters, width, height, lora_dirs, allow_partial: bool,
            progress: bool, on_step, out: list) -> None:
    """Draws the cells, a run of alike cells a batch, appending (cell, image) pairs to ``out`` as they are done."""
    runs = _runs(cells)
    runs.sort(key=lambda run: run[0].adapter_key())
    total, done = sum(run[0].steps for run in runs), 0  # denoising steps of all batches
    with console.progress(len(cells), "grid", "img", enabled=progress, leave=False) as bar:
        for run in runs:
            c0 = run[0]
            adapters.apply(c0.loras, set(c0.tokens), c0.blocks)
            step = None if on_step is None else (lambda d, _, before=done: on_step(before + d, total))
            res = api.generate(base, c0.prompt, negative_prompt=c0.negative_prompt, steps=c0.steps,
                               guidance=c0.guidance, seed=c0.seed, scheduler=c0.scheduler,
                               clip_skip=c0.clip_skip, width=width,
                               height=height, num_images=len(run), batch_size=len(run), progress=False,
                               lora_dirs=lora_dirs, embedding_dirs=(), allow_partial=allow_partial, on_step=step)
            out.extend(zip(run, res))
            done += c0.steps
            bar.update(len(run))
