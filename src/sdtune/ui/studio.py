"""What the web UI's buttons do, as plain Python: each method calls the sdtune API and returns paths, texts or
dicts. No web framework here, so that every action (and every refusal) is testable without a browser.

Names typed or picked on the page go through ``guard.Folders`` before the API sees them: a LoRA or embedding
is looked up the way the API looks it up (``sources.resolve`` in the configured folder) and the file found must
lie inside that folder. The model stays loaded between requests; one lock keeps two requests from changing
its adapters at the same time.
"""

from __future__ import annotations

import functools
import html
import itertools
import re
import shutil
import tempfile
import threading
import time
import tomllib
import urllib.parse
import warnings
from contextlib import contextmanager
from pathlib import Path

from .. import api, sources, xyplot
from .. import prompts as prompt_syntax
from ..generate import ImageWriter, model_label, parse_infotext, read_infotext
from ..lora import blocks as block_weights
from ..lora import inspect as lora_inspect
from ..lora.bake import merge
from ..lora.formats import convert, load_lora, word_files
from ..lora.hashes import file_sha256
from ..model_names import known_family
from ..models import load_base, vae_weights
from ..safeio import SdtuneError, atomic_path, read_toml, visible_paths
from ..samplers import sampler_key
from ..ti.formats import load_embedding
from ..ti.tokens import find_in_prompt
from ..tiny import model as tiny_model
from ..train import kohya_dataset
from ..train import queue as train_queue
from ..train.data import config_steps
from ..train.loop import SAMPLE_KEY, STATE_FILE
from ..train.report import BEST_FILE
from . import trainform
from .guard import LABELS, UPLOADS, Folders, Refused, check_upload, upload_file_name
from .jobs import CONFIG_FILE, QUEUE, JobRunner, progress

# A1111 settings an image may carry that sdtune's generation has no control for: named when an image is reused
NOT_APPLIED = ("Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength", "Eta",
               "ENSD", "Variation seed", "Variation seed strength", "Face restoration", "Refiner", "NGMS",
               "Schedule max sigma", "Schedule min sigma", "Schedule rho", "Old prompt editing timelines",
               "Pad conds v0", "Downcast alphas_cumprod")
# what A1111 assumes of a PNG an earlier version wrote (its infotext_versions.backcompat), where sdtune draws
# otherwise: (before this version, the setting, when it applies)
BACKCOMPAT = (((1, 6, 0, 0), "Old prompt editing timelines", lambda p: "[" in p.get("prompt", "")),
              ((1, 6, 0, 0), "Pad conds v0", lambda p: p.get("Sampler") in ("DDIM", "PLMS")),
              ((1, 7, 0, 225), "Downcast alphas_cumprod", lambda p: True))
KIND_OF = {"loras": "lora", "embeddings": "embedding"}  # folder -> the kind sources.resolve takes
# models the page can always switch to (no file, offline); tiny-random (random weights, for tests) only when the
# page was started with it
BUILT_IN = ("tiny", "tiny-xl")
# the Generate and Compare sliders' ranges (app.py draws them from here), A1111's own: an image's value outside
# one is not put in the form, whose slider would refuse it before any handler runs
RANGES = {"steps": (1, 150), "cfg": (1, 30), "clip_skip": (1, 12), "width": (0, 2048), "height": (0, 2048)}
# an entry of an image's "Lora weights": NAME=W, NAME=TE:UNET, then :te2=W, :lbw=...
_LORA_ENTRY = re.compile(r"(.+?)=([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?(?::.*)?)", re.IGNORECASE)
GRID_NAME = "xy"  # a Compare grid's file names in its folder: xy.png, xy.json, xy-ROW-COL.png
MERGED = "merged: "  # the menu's prefix of the models merged on the page (out/merged/NAME)
# the links of a page sdtune wrote (report.html, queue.html): relative, double-quoted
PAGE_LINK = re.compile(r'\b(src|href)="([^"]*)"')
FILE_ROUTE = "gradio_api/file="  # Gradio's route for files under launch(allowed_paths=...), login-checked
# the training settings that name folders and files: what a job reads (reg_dir: where class images are also
# written; network_weights, init_embedding: the files a run starts from), names inside the output folder
PATH_SETTINGS = ("data", "validation_dir", "reg_dir", "network_weights", "init_embedding")


@functools.cache
def _tokenizers() -> list:
    """CLIP's tokenizer (every family's vocabulary), to count a prompt's chunks without a model."""
    return [tiny_model.tokenizer()]


class Cancelled(SdtuneError):
    """The user pressed Cancel."""


def _seed(value) -> int:
    """A seed box's value: emptied (the browser empties a number box it cannot read) means random, as -1 does
    and as in A1111."""
    return -1 if value is None or str(value).strip() == "" else int(value)


def _unquoted(axis: str | None) -> str:
    """An axis as typed, without the shell quotes a command-line example carries ('prompt=a|b')."""
    text = (axis or "").strip()
    return text[1:-1].strip() if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def _split_names(text: str, names: set[str]) -> list[str]:
    """'NAME[:WEIGHT]' items of a comma- or line-separated list, where a NAME of the folder may hold commas: the
    longest run of comma-separated pieces that reads as one of ``names`` is one item."""
    items = []
    for line in text.splitlines():
        pieces, i = line.split(","), 0
        while i < len(pieces):
            end = next((j for j in range(len(pieces), i + 1, -1) if _names_one(",".join(pieces[i:j]), names)), i + 1)
            items.append(",".join(pieces[i:end]).strip())
            i = end
    return [item for item in items if item]


def _names_one(spec: str, names: set[str]) -> bool:
    try:
        return sources.parse_weighted(spec.strip())[0] in names
    except SdtuneError:
        return False


@contextmanager
def said():
    """The notes the API says inside (its UserWarnings, each time, not once per line as Python shows them),
    collected into the yielded list when the block ends, for the page to show."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notes: list[str] = []
        yield notes
        notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


class Studio:
    """One server's state: its folders, the loaded model, the training queue."""

    def __init__(self, folders: Folders, model: str = "tiny", device: str | None = None, dtype: str | None = None,
                 max_upload_mb: float = 512, vae: str | None = None):
        self.folders, self.model, self.device, self.dtype = folders, model, device, dtype
        self.vae = vae  # --vae: put in place of the VAE of every model the page loads
        self._vae_hash: str | None = None  # its short hash, once asked (vae_hash)
        self.started_with = model  # the --model, always offered
        self.max_upload = int(max_upload_mb * 2**20)
        self._base = None
        self.lock = threading.Lock()
        # the generations and grids running or waiting for the model: (owner, event); cancel(owner) sets the
        # events of that owner's (a page's Cancel stops what that page started, not another tab's or user's)
        self._running: list[tuple[object, threading.Event]] = []
        self._counting = threading.Lock()
        extra = (["--device", device] if device else []) + (["--dtype", dtype] if dtype else [])
        self.jobs = JobRunner(folders.out / "train", extra_args=tuple(extra))

    @contextmanager
    def model_in_use(self):
        """The loaded model (loaded on first use), held for one request; the API's warnings are collected in
        the list yielded with it, for the page to show."""
        with self.lock, said() as notes:
            if self._base is None:
                self._base = load_base(self.model, device=self.device, dtype=self.dtype, vae=self.vae or None)
            yield self._base, notes

    # ---------------------------------------------------------------- the base model

    def model_choices(self) -> list[str]:
        """What the page may switch to: the built-in models, the --model, the models in --model-dir (its
        .safetensors/.ckpt files and diffusers folders, by their names in it) and those merged on the page
        (``merged: NAME``, in the output folder's merged/)."""
        choices = list(dict.fromkeys([*BUILT_IN, self.started_with]))
        if self.folders.models is not None:
            choices += self._models_in("models", self.folders.models)
        return choices + [MERGED + name for name in self._models_in("out", self.folders.out / "merged")]

    def _models_in(self, kind: str, root: Path) -> list[str]:
        """The model files and diffusers folders under ``root`` (in folder ``kind``), by their paths in it."""
        found = []
        for p in visible_paths(root, folders=True):
            rel = p.relative_to(root)
            weights = p.is_file() and p.suffix in (".safetensors", ".ckpt")
            if weights and any((q / "model_index.json").is_file() for q in p.parents if root in q.parents):
                continue  # a part of a diffusers folder, listed as that folder
            if weights or (p.is_dir() and (p / "model_index.json").is_file()):
                try:
                    self.folders.inside(p, kind)
                except Refused:
                    continue
                found.append(rel.as_posix())
        return found

    def model_spec(self, choice: str) -> str:
        """The spec to load for ``choice``, which must be one of ``model_choices``."""
        choice = str(choice or "").strip()
        if choice in (*BUILT_IN, self.started_with):  # not any spec: a full-size random SDXL is a way to fill RAM
            return choice
        if choice.startswith(MERGED):
            path = self.folders.child("out", "merged/" + choice[len(MERGED):])
        else:
            path = self.folders.child("models", choice)  # refuses '..', absolute paths, symlinks out
        if choice not in self.model_choices():
            raise Refused(f"{choice}: not a model in the model folder ({self.folders.models}); pick one "
                          f"from the list")
        return str(path.resolve())

    def model_choice(self) -> str:
        """The menu's name of the model in use: a model-dir or merged file by its name in the menu
        (``model_spec`` resolved it there), else the spec itself (built-in, --model)."""
        if self.model in (*BUILT_IN, self.started_with):
            return self.model
        for prefix, root in (("", self.folders.models), (MERGED, self.folders.out / "merged")):
            if root is None:
                continue
            try:
                return prefix + Path(self.model).relative_to(root.resolve()).as_posix()
            except ValueError:
                pass
        return self.model

    def _page_family(self):
        """The page's model's family: the loaded one's, else as ``known_family`` reads it without loading."""
        return self._base.family if self._base is not None else known_family(self.model)

    def form_values(self, kind: str, preset: str = "") -> dict:
        """The Train form's values for ``kind``: the named preset's, else the model's own preset (by its family
        when it is loaded, else as ``known_family`` reads it from the name, the file's header or the folder's
        config), as ``sdtune train`` starts from. A model whose family only loading tells (a .ckpt) shows the
        plain defaults until it loads, and its jobs name no preset."""
        family = self._page_family()
        return trainform.preset_values(kind, family, preset)

    def file_form_values(self, kind: str, upload) -> tuple[dict, list[str]]:
        """(the Train form's values for ``kind`` from an uploaded settings file, what reading it said): as
        ``sdtune train --config FILE`` reads it, over the page's model's preset."""
        path = check_upload(upload, "settings", self.max_upload)
        if kohya_dataset.holds_datasets(path):  # its image folders are the uploader's, not the server's
            raise Refused(f"{path.name}: a kohya dataset config, whose folders sdtune train --data {path.name} reads; "
                          f"this page trains on a dataset of the output folder: pick it, and set the caption options "
                          f"under Advanced settings")
        # the upload named as the user named it, in refusals and notes (not the server's temporary copy)
        try:
            with said() as notes:
                values = trainform.file_values(kind, path, self._page_family())
        except SdtuneError as e:
            raise SdtuneError(str(e).replace(str(path), path.name)) from None
        return values, [n.replace(str(path), path.name) for n in notes]

    def set_model(self, choice: str) -> str:
        """Switch the base model to ``choice`` (one of ``model_choices``); it loads on the next use. Returns
        the model's spec."""
        spec = self.model_spec(choice)
        with self.lock:  # not while a request uses the old one
            if spec != self.model:
                self.model, self._base = spec, None
        return spec

    # ---------------------------------------------------------------- files in the folders

    def _names(self, kind: str) -> list[str]:
        root = self.folders.root(kind)
        names = []
        for p in visible_paths(root):
            rel = p.relative_to(root)
            if p.suffix not in sources.WEIGHT_SUFFIXES or not p.is_file() or any(c in str(rel) for c in ":<>"):
                continue  # not a file, or not writable as <lora:name:w>
            try:
                self.folders.inside(p, kind)  # a symlink out of the folder is not offered
            except Refused:
                continue
            names.append(rel.with_suffix("").as_posix())
        return names

    def lora_names(self) -> list[str]:
        return self._names("loras")

    def embedding_names(self) -> list[str]:
        return self._names("embeddings")

    def adapter_file(self, kind: str, name: str) -> Path:
        """The file the API will open for LoRA/embedding ``name``, refused unless it is in folder ``kind``."""
        self.folders.child(kind, name, must_exist=False)  # no absolute path, no '..'
        label = "LoRA" if kind == "loras" else "embedding"
        try:
            path = sources.resolve(name, KIND_OF[kind], (self.folders.root(kind),))
        except SdtuneError:
            raise Refused(f"{name}: no {label} of that name in the {label} folder ({self.folders.root(kind)})") \
                from None
        return self.folders.inside(path, kind, shown=name)

    def check_prompt(self, *texts: str) -> None:
        """Refuse a prompt whose ``<lora:...>`` tags or embedding names lead outside the configured folders."""
        for text in texts:
            for name, _, _ in api.parse_lora_tags(text)[1]:
                self.adapter_file("loras", name)
            for word, path in find_in_prompt(self.folders.embeddings, text).items():
                self.folders.inside(path, "embeddings", shown=word)

    # ---------------------------------------------------------------- Generate

    @staticmethod
    def with_loras(prompt: str, picks) -> str:
        """The prompt with the picked LoRAs as A1111 tags: the PNG then says which LoRAs made the image, at what
        weights and block weights, and dropping it back on the page reproduces it. A pick is (name, weight,
        te_weight) or (name, weight, te_weight, blocks): blocks as the lora-block-weight extension writes them
        after ``lbw=`` (a preset name or a comma vector; empty: none)."""
        tags = []
        for name, weight, te_weight, *rest in picks:
            if not name:
                continue
            # A1111's order: the text encoders' weight, then the UNet's where it differs
            both = f"{float(weight):g}" if te_weight is None or float(te_weight) == float(weight) else \
                f"{float(te_weight):g}:{float(weight):g}"
            blocks = re.sub(r"\s+", "", str(rest[0] or "")) if rest else ""
            if re.search(r"[:<>]", blocks):  # it goes inside a tag: nothing that ends the tag or adds an option
                raise SdtuneError(f"block weights {blocks!r} for {name}: write a preset name (e.g. INALL) or "
                                  f"comma-separated numbers (e.g. 1,0,0,1,1,0,0,0,0,0,0,0)")
            tags.append(f"<lora:{name}:{both}" + (f":{block_weights.LBW}{blocks}" if blocks else "")
                        + ">")
        # joined by a space, as A1111's network cards add them: a comma would stay as a token once the tags are out
        return " ".join([prompt.strip(), *tags]).strip()

    def block_presets(self) -> list[str]:
        """The block-weight presets the page offers: those of the loaded model's family (none for a family
        without a block layout); before the model is loaded, the names the layouts share (each family's preset
        of a name weights its own blocks)."""
        base = self._base
        if base is not None:
            layout = block_weights.LAYOUTS.get(base.family.name)
            return list(layout.presets) if layout else []
        return list(dict.fromkeys(n for lay in block_weights.LAYOUTS.values() for n in lay.presets))

    def cancel(self, owner=None) -> bool:
        """Stop ``owner``'s generations and grids in progress (running, or waiting for the model; None: everyone's)
        after their current denoising step; False when there is none (a later one is not cancelled in advance).
        The page's owner is its tab's session and what its Cancel button stops ("generation" or "grid")."""
        with self._counting:
            hit = [event for who, event in self._running if owner is None or who == owner]
            for event in hit:
                event.set()
            return bool(hit)

    @contextmanager
    def _cancellable(self, what: str, on_step=None, owner=None):
        """Counts a generation or grid as running (so that ``cancel`` reaches it, even while it waits for the
        model) and yields its ``on_step``, which stops it with ``Cancelled`` once cancelled."""
        entry = (owner, threading.Event())

        def step(done: int, total: int) -> None:
            if entry[1].is_set():
                raise Cancelled(f"{what} cancelled at step {done} of {total}")
            if on_step is not None:
                on_step(done, total)

        with self._counting:
            self._running.append(entry)
        try:
            yield step
        finally:
            with self._counting:
                self._running.remove(entry)

    def generate(self, prompt: str, negative: str = "", *, sampler: str = "ddim", steps: int = 20,
                 cfg: float = 7.5, seed: int = -1, width: int = 0, height: int = 0, count: int = 1,
                 clip_skip: int = 1, picks=(), on_step=None, owner=None) -> tuple[list[tuple[Path, str]], list[str]]:
        """Images saved in ``out/generate`` with their parameters, and any warnings. ``on_step(done, total)``
        follows the denoising steps; ``cancel()`` or ``cancel(owner)`` (from another request) stops it with
        ``Cancelled``, or, once a batch is saved, returns the images saved with a note that it was cancelled."""
        full = self.with_loras(prompt, picks)
        self.check_prompt(full, negative)
        # each batch is written when done, as the command line writes them: a Cancel keeps the finished ones, as
        # A1111's Interrupt does
        writer, saved = ImageWriter(self.folders.out / "generate"), []
        with self._cancellable("generation", on_step, owner) as step, self.model_in_use() as (base, notes):
            try:
                api.generate(base, full, negative_prompt=negative or "", steps=int(steps), guidance=float(cfg),
                             seed=_seed(seed), scheduler=sampler, clip_skip=int(clip_skip),
                             width=int(width) or None, height=int(height) or None, num_images=int(count),
                             progress=False, lora_dirs=(self.folders.loras,),
                             embedding_dirs=(self.folders.embeddings,), on_step=step,
                             on_batch=lambda batch: saved.extend(zip(writer.add(batch), batch)))
            except Cancelled as e:
                if not saved:
                    raise Cancelled(f"{e}; nothing was saved") from None
                notes = [*notes, f"{e}; the {len(saved)} image(s) finished before it are kept"]
        writer.finish()
        return [(p, r.infotext) for p, r in saved], notes

    def vae_hash(self) -> str:
        """A1111's short hash of the page's --vae ("": none, the models' own VAEs), as its PNGs carry it."""
        if self.vae and self._vae_hash is None:
            self._vae_hash = file_sha256(vae_weights(self.vae))[:10]
        return self._vae_hash or ""

    def settings_of(self, path: str | Path, *, uploaded: bool) -> dict:
        """The Generate form's values from an sdtune or A1111 PNG (dropped on the page, or in the output folder)."""
        path = check_upload(path, "image", self.max_upload) if uploaded else self.folders.inside(Path(path), "out")
        text = read_infotext(path)
        if not text:
            raise SdtuneError(f"{Path(path).name}: no generation parameters in this image (sdtune and A1111 PNGs "
                              f"have them, as A1111 JPEGs and WebPs do; an edited image usually not)")
        p = parse_infotext(text)
        form = {"prompt": p["prompt"], "negative_prompt": p.get("negative_prompt", ""), "parameters": text}
        try:
            if "Steps" in p:
                form["steps"] = int(p["Steps"])
            if "CFG scale" in p:
                form["cfg"] = float(p["CFG scale"])
            if "Seed" in p:
                form["seed"] = int(p["Seed"])
            if "Size" in p:
                form["width"], form["height"] = (int(v) for v in p["Size"].lower().split("x"))
            if "Steps" in p:  # settings, not just a text (A1111 writes Clip skip only when not 1)
                form["clip_skip"] = int(p.get("Clip skip", 1))
        except ValueError:
            raise SdtuneError(f"{Path(path).name}: its parameters are not readable ({text.splitlines()[-1]})") from None
        sampler = sampler_key(p.get("Sampler", ""), p.get("Schedule type", ""))
        if sampler:
            form["sampler"] = sampler
        form["not_applied"] = [k for k in NOT_APPLIED if k in p]
        for key, name in (("steps", "Steps"), ("cfg", "CFG scale"), ("clip_skip", "Clip skip")):
            low, high = RANGES[key]
            if key in form and not low <= form[key] <= high:
                form["not_applied"].append(f"{name} {p.get(name, form[key])} (the page takes {low} to {high})")
                del form[key]
        if "seed" in form and not -1 <= form["seed"] < 2**63:  # what generation takes (-1: random)
            form["not_applied"].append(f"Seed {p['Seed']} (seeds go from -1, random, up)")
            del form["seed"]
        low, high = RANGES["width"]
        if "width" in form and not all(low <= form[k] <= high for k in ("width", "height")):
            form["not_applied"].append(f"Size {p['Size']} (the page takes {low} to {high} a side)")
            del form["width"], form["height"]
        version = re.match(r"v?(\d+)\.(\d+)\.(\d+)(?:-(\d+))?", p.get("Version", ""))
        if version:  # an older A1111's PNG: the settings its version implies
            made = tuple(int(v or 0) for v in version.groups())
            form["not_applied"] += [f"{setting} (A1111 {p['Version']})" for before, setting, applies in BACKCOMPAT
                                    if made < before and applies(p) and setting not in p]
        # sdtune draws the first noise on the CPU (and says so); A1111 writes RNG only when it is not its GPU default
        if p.get("RNG", "GPU") != "CPU" and "Steps" in p:
            form["not_applied"].append(f"RNG {p.get('RNG', 'GPU (A1111 default)')}")
        # A1111's tests, on each text as prompt editing makes it: brackets (emphasis), and chunks of 75 tokens
        # (after taking the <lora:…> tags out, as A1111 does first: a name's brackets are not emphasis)
        texts = [[t for _, t in prompt_syntax.schedule(api.EXTRA_NETWORK.sub("", p.get(k, "")), form.get("steps", 20))]
                 for k in ("prompt", "negative_prompt")]
        weighted = any(c in t for ts in texts for t in ts for c in "([")
        if "Pad conds" not in p and len({prompt_syntax.chunk_count(_tokenizers(), t) for ts in texts for t in ts}) > 1:
            form["not_applied"].append("Pad conds off (A1111 ran the prompt and negative prompt of different lengths "
                                       "apart; sdtune pads the shorter)")
        if weighted and p.get("Emphasis", "Original") != "No norm":  # A1111's default rescales; sdtune's does not
            form["not_applied"].append(f"Emphasis {p.get('Emphasis', 'Original')} (sdtune weighs as No norm)")
        if p.get("Sampler") and not sampler:  # the page's sampler stays: say so
            schedule = f" ({p['Schedule type']} schedule)" if p.get("Schedule type") else ""
            form["not_applied"].append(f"Sampler {p['Sampler']}{schedule} (sdtune has no such sampler)")
        if ("VAE" in p or "VAE hash" in p) and p.get("VAE hash") != self.vae_hash():  # the page's --vae decodes
            page = Path(self.vae).name if self.vae else "the model's own"
            form["not_applied"].append(f"VAE {p.get('VAE') or p.get('VAE hash')} (the page's is {page})")
        self._take_loras(p, form)
        # the embeddings it used (A1111's TI hashes): one the folder lacks leaves its name a plain word here
        used = [e.rpartition(":")[0].strip() for e in str(p.get("TI hashes", "")).split(",") if ":" in e]
        have = {Path(n).name.lower() for n in self.embedding_names()}  # a prompt names one by its file's stem
        lacking = [n for n in used if n and n.lower() not in have]
        if lacking:
            form["not_applied"].append(f"embedding {', '.join(lacking)} (not in the embedding folder)")
        if SAMPLE_KEY in p:  # the adapter being trained was in the model, not in the prompt
            form["not_applied"].append(f"the adapter in training ({p[SAMPLE_KEY]}; pick its saved LoRA or "
                                       f"embedding; this image is the first row of its grid)")
        # A1111 names a checkpoint by its file name without suffix (sdtune did by its path before)
        if p.get("Model") and Path(p["Model"]).stem != Path(model_label(self.model)).stem:
            form["not_applied"].append(f"Model {p['Model']} (the page's is {self.model_choice()})")
        return form

    def _take_loras(self, p: dict, form: dict) -> None:
        """LoRAs an image names only in its ``Lora weights`` (a grid's cells load theirs as adapters, not as
        prompt tags) go into the prompt as tags when the LoRA folder has them; the others are named as not
        applied. Entries of tags (``<lora:name>=w``) are in the prompt already; a tag naming a LoRA the folder
        lacks is taken out of it and named (A1111 generates without it; Generate here would refuse it)."""
        names = self.lora_names()
        tags, missing, have = [], [], {*names, *(Path(n).name for n in names)}  # A1111 names one in a subfolder

        def drop_missing(m: re.Match) -> str:
            if m.group(2) in have:
                return m.group(0)
            missing.append(m.group(2))
            return ""
        form["prompt"] = re.sub(r"(\s*,?\s*)" + api.LORA_TAG.pattern, drop_missing, form["prompt"]).strip(" ,")
        in_prompt = {m.group(1) for m in api.LORA_TAG.finditer(form["prompt"])}
        for item in filter(None, (x.strip() for x in str(p.get("Lora weights", "")).split(";"))):
            # NAME=WEIGHTS: the first '=' before a number (a file name may hold '=' too, the weights lbw= and te2=)
            found = _LORA_ENTRY.fullmatch(item)
            name, weights = found.groups() if found else (item, "")
            # the prompt has its tag (sdtune writes one), or had it and it is named already
            if name.startswith("<lora:") or name in in_prompt or name in missing:
                continue
            if name in have and weights:
                tags.append(f"<lora:{name}:{weights}>")
            else:
                missing.append(name)
        if tags:
            form["prompt"] = " ".join([form["prompt"], *tags]).strip()
        if missing:
            form["not_applied"].append(f"LoRA {', '.join(missing)} (not in the LoRA folder)")

    # ---------------------------------------------------------------- Compare

    def _cell_prompts(self, prompt: str, negative: str, axes) -> list[tuple[str, str]]:
        """Every (prompt, negative prompt) a cell of the plot will use, as xy_plot sets them (y, then x)."""
        ranges = [range(len(a.values)) for a in axes]
        out = []
        for idx in itertools.product(*ranges):
            p, n = prompt, negative
            for a, i in zip(axes, idx):
                if a.kind == "prompt":
                    p = a.values[i]
                elif a.kind == "sr":
                    p, n = p.replace(a.values[0], a.values[i]), n.replace(a.values[0], a.values[i])
            out.append((p, n))
        return out

    def compare(self, prompt: str, negative: str = "", *, x: str = "", y: str = "", loras=(), sweep: str = "",
                steps: int = 20, cfg: float = 7.5, seed: int = 1, sampler: str = "ddim", clip_skip: int = 1,
                width: int = 0, height: int = 0, cell: int = 128, on_step=None,
                owner=None) -> tuple[Path, list[Path], list[str]]:
        """An X/Y plot in a new folder under ``out/grids``: the grid, and all its files (cells, JSON).
        ``on_step(done, total)`` follows the denoising steps; ``cancel()`` or ``cancel(owner)`` stops it as it
        stops a generation: once a cell is drawn, the grid of the cells drawn is saved and returned with a note."""
        if not (x or "").strip():  # the page's words, not the command line's (--x KIND=VALUES)
            raise SdtuneError("no X axis; write KIND=VALUES in it, e.g. seed=1-4 or weight=0,0.5,1")
        x_axis, y_axis = xyplot.axes_from_specs(_unquoted(x), _unquoted(y) or None, sweep=sweep or None)
        xyplot.check_cells(x_axis, y_axis)  # before the checks per cell below (a million cells took minutes)
        axes = [a for a in (y_axis, x_axis) if a is not None]
        files = {}
        for n in filter(None, loras):
            path = str(self.adapter_file("loras", n))
            if files.setdefault(Path(n).name, path) != path:
                raise SdtuneError(f"two picked LoRAs are named {Path(n).name} ({n} and another folder's); a grid's "
                                  f"cells name a LoRA by its file name: rename one")
        for a in axes:
            if a.kind in xyplot.TARGETED_KINDS and a.target is None and len(files) != 1 and \
                    not any(b.kind in xyplot.ADAPTER_KINDS for b in axes):
                raise SdtuneError(f"{a.kind} axis: pick the LoRA it sweeps in 'weight axis sweeps', or pick exactly "
                                  f"one LoRA for the plot")
        for a in axes:  # adapter names on an axis must be picked LoRAs or files in the folders
            if a.kind == "weight" and a.target and a.target not in files:
                self.adapter_file("loras", a.target)
            # the folders an item may come from: an adapters axis takes both (a refusal names the LoRA folder's)
            where = {"loras": ("loras",), "embeddings": ("embeddings",)}.get(a.kind, ("loras", "embeddings"))
            for v in (a.values if a.kind in xyplot.ADAPTER_KINDS else []):
                for item in v.split("+"):
                    src = sources.split_suffix(item.strip())[0]
                    if src.lower() in xyplot.NONE_WORDS or src in files:
                        continue
                    refusals = []
                    for folder in where:
                        try:
                            self.adapter_file(folder, src)
                            break
                        except Refused as e:
                            refusals.append(e)
                    else:
                        raise refusals[0]
        for p, n in self._cell_prompts(prompt, negative, axes):
            self.check_prompt(p, n)
        grids = self.folders.out / "grids"
        folder = grids / time.strftime("%Y%m%d-%H%M%S")
        while folder.exists():
            folder = folder.with_name(folder.name + "-1")
        try:
            with self._cancellable("grid", on_step, owner) as step, self.model_in_use() as (base, notes):
                grid = xyplot.xy_plot(base, prompt, x_axis, y_axis, negative_prompt=negative or "", seed=_seed(seed),
                                      steps=int(steps), guidance=float(cfg), scheduler=sampler,
                                      clip_skip=int(clip_skip), width=int(width) or None,
                                      height=int(height) or None, loras=list(files.values()),
                                      lora_dirs=(self.folders.loras,), embedding_dirs=(self.folders.embeddings,),
                                      out_dir=folder, name=GRID_NAME, cell=int(cell), progress=False,
                                      on_step=step, keep_on=(Cancelled,))
        except BaseException as e:
            if folder.is_dir() and not any(folder.iterdir()):  # refused (or cancelled) before a cell: no folder
                folder.rmdir()
            if not isinstance(e, Cancelled):
                raise
            grid = folder / f"{GRID_NAME}.png"  # the cells drawn, in a grid with gaps
            if not grid.is_file():
                raise Cancelled(f"{e}; nothing was saved") from None
            drawn = len(list(folder.glob(f"{GRID_NAME}-[0-9][0-9]-[0-9][0-9].png")))
            notes = [*notes, f"{e}; the grid shows the {drawn} cell(s) drawn before it, blank where a cell was not"]
        parts = sorted(folder.iterdir())
        return grid, [grid] + [p for p in parts if p != grid], notes

    # ---------------------------------------------------------------- LoRA files

    def lora_source(self, name: str | None, upload: str | None) -> Path:
        if upload:
            return check_upload(upload, "weights", self.max_upload)
        return self.adapter_file("loras", name or "")

    def inspect(self, name: str | None = None, upload: str | None = None) -> tuple[str, dict]:
        path = self.lora_source(name, upload)
        info = lora_inspect.describe(path)  # reads through safeio.load_state: no code in a pickle runs
        info["file"] = Path(upload).name if upload else name  # the file read: an upload wins, as in lora_source
        return lora_inspect.render(info), info

    def _new_file(self, kind: str, name: str, suffix: str = ".safetensors", under: str = "") -> Path:
        """A new file (or folder) NAME+suffix in folder ``kind`` (in its subfolder ``under``)."""
        name = self.folders.new_name(name, "output name")
        if not name.endswith(suffix):
            name += suffix
        path = self.folders.child(kind, f"{under}/{name}" if under else name, must_exist=False)
        if path.exists():
            where = f"{LABELS.get(kind, kind)} folder" + (f"'s {under}" if under else "")
            raise SdtuneError(f"{name} exists already in the {where}; pick another name")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def convert(self, name: str, to: str, out_name: str) -> tuple[Path, list[Path]]:
        """Write LoRA ``name`` in layout ``to`` as a new file in the LoRA folder. Returns it and the files of the
        words it bundles, which the diffusers layout keeps apart: in the embedding folder, where the page and
        prompts find them (beside the LoRA they were offered as LoRAs)."""
        src = self.adapter_file("loras", name)
        dest = self._new_file("loras", out_name)
        lora = convert(src, dest, to=to, words_in=self.folders.embeddings)
        return dest, list(word_files(lora, dest, self.folders.embeddings)) if to == "diffusers" else []

    def merge(self, specs: str, out_name: str, fmt: str = "single") -> Path:
        """Bake 'NAME[:WEIGHT]' LoRAs (comma or line separated) into the model, written under ``out/merged``."""
        pairs = []
        for spec in _split_names(specs, set(self.lora_names())):
            src, weight = sources.parse_weighted(spec)
            pairs.append((self.adapter_file("loras", src), weight))
        if not pairs:
            raise SdtuneError("no LoRA to merge; write NAME or NAME:WEIGHT, e.g. style:0.8")
        dest = self._new_file("out", out_name, ".safetensors" if fmt == "single" else "", under="merged")
        with self.lock:
            return merge(self.model, pairs, dest, fmt=fmt)

    def add_upload(self, upload: str, kind: str) -> str:
        """Put an uploaded LoRA or embedding into its folder (after reading it safely); returns its name."""
        path = check_upload(upload, "weights", self.max_upload)
        lora = kind == "loras"
        wanted, other = (load_lora, load_embedding) if lora else (load_embedding, load_lora)
        try:
            wanted(path)  # refuse what is not one, before copying
        except SdtuneError as e:  # named by the upload's name, not the server's temporary copy
            try:
                other(path)
            except SdtuneError:
                raise SdtuneError(str(e).replace(str(path), Path(path).name)) from None
            mine, theirs, guess = (("LoRA layers", "embedding", "an embedding") if lora
                                   else ("embedding", "LoRA", "a LoRA"))
            raise SdtuneError(f"{Path(path).name}: holds no {mine} ({guess}?); add it to the {theirs} folder "
                              f"instead") from None
        # A1111 names such as "my style (v2)" are kept readable: what a file name in the folder may not hold, or
        # a prompt cannot type, becomes '_' (letters of any script stay)
        stem = re.sub(r"[^\w.-]+", "_", Path(path).stem).strip("._-")[:100] or "upload"
        return self._copy_in(kind, stem, path, Path(path).suffix.lower())

    def _copy_in(self, kind: str, stem: str, src: Path, suffix: str = ".safetensors") -> str:
        """Copy ``src`` into folder ``kind`` as STEM+suffix, or STEM-2... where that name holds another file (the
        same file already there is named); returns the name it has there."""
        data = src.read_bytes()
        for n in itertools.count(1):
            candidate = stem if n == 1 else f"{stem}-{n}"
            path = self.folders.child(kind, candidate + suffix, must_exist=False)
            if path.is_file() and path.read_bytes() == data:
                return candidate
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:  # the folder's lists never show half a file
                    shutil.copyfile(src, tmp)
                return candidate

    # ---------------------------------------------------------------- Gallery

    def gallery_view(self, query: str = "", shown: int = 200) -> tuple[list[tuple[Path, str]], str]:
        """The Gallery's images (``gallery``, at most ``shown``) and its line saying how many, and whether more
        match than it shows."""
        rows = self.gallery(query, limit=shown + 1)
        more = " (the newest; more match: search to narrow them down)" if len(rows) > shown else ""
        return rows[:shown], f"{min(len(rows), shown)} image(s){more}"

    def gallery(self, query: str = "", limit: int = 200) -> list[tuple[Path, str]]:
        """PNGs in the output folder, newest first, with their parameters; ``query`` filters on both."""
        out = self.folders.out
        found = []
        for p in visible_paths(out):
            rel = p.relative_to(out)
            if p.suffix != ".png" or rel.parts[0] == "datasets":
                continue
            try:
                found.append((p.stat().st_mtime, p))
            except OSError:  # replaced or removed since the walk
                continue
        found.sort(key=lambda t: t[0], reverse=True)
        q = query.strip().lower()
        rows = []
        for _, p in found:
            try:
                text = read_infotext(p) or ""
            except OSError:
                continue
            if q and q not in text.lower() and q not in str(p.relative_to(out)).lower():
                continue
            rows.append((p, text))
            if len(rows) >= limit:
                break
        return rows

    # ---------------------------------------------------------------- Train

    def datasets(self) -> list[str]:
        root = self.folders.out / "datasets"
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def add_dataset_files(self, name: str, uploads) -> tuple[str, str]:
        """Uploaded images and captions into ``out/datasets/NAME``; returns the name and a line saying what it
        got: images and captions (a file chosen twice counts once) and captions with no image beside them."""
        name = self.folders.new_name(name, "dataset name")
        caption = lambda p: Path(p).suffix.lower() in UPLOADS["caption"][0]  # noqa: E731
        checked, given = {}, {}  # plain name -> the upload; plain name -> the name it came with
        for u in uploads or []:
            plain = upload_file_name(Path(u).name)
            if given.get(plain, Path(u).name) != Path(u).name:  # (the browser may send a file twice: counted once)
                raise Refused(f"{given[plain]} and {Path(u).name} would both be saved as {plain}; rename one")
            given[plain] = Path(u).name
            checked[plain] = check_upload(u, "caption" if caption(u) else "image", self.max_upload)
        if not checked:
            raise SdtuneError("no files; add images (and same-name .txt captions)")
        folder = self.folders.child("out", f"datasets/{name}", must_exist=False)
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, path in checked.items():
            shutil.copyfile(path, folder / file_name)
        captions = sorted(n for n in checked if caption(n))
        images = {p.stem for p in folder.iterdir() if not caption(p)}
        alone = [n for n in captions if Path(n).stem not in images]
        said = f"{len(checked) - len(captions)} image(s) and {len(captions)} caption(s) added to dataset {name}"
        renamed = [f"{was} as {plain}" for plain, was in given.items() if plain != was]
        return name, said + (f"; no image for {', '.join(alone)} (not used)" if alone else "") + (
            f"; saved {', '.join(renamed[:3])}{' ...' if len(renamed) > 3 else ''} (plain names)" if renamed else "")

    def submit(self, kind: str, name: str, dataset: str, values: dict):
        """Queue a training job of ``kind`` from the form's values; returns the job. Folders and files it names
        (the dataset, ``PATH_SETTINGS``) are names inside the output folder."""
        if kind not in trainform.KINDS:
            raise SdtuneError(f"unknown training kind {kind!r}; use ti or lora")
        name = self.folders.new_name(name, "job name") if name and name.strip() else self._job_name(kind)
        if not dataset or not str(dataset).strip():
            raise SdtuneError("no training data; pick a dataset (a folder in out/datasets) or upload images first")
        data = self.folders.child("out", f"datasets/{dataset}" if dataset and "/" not in dataset else dataset)
        values = dict(values)
        for setting in PATH_SETTINGS:  # the other folders and files a form names: inside the output folder too
            if setting != "data" and isinstance(values.get(setting), str) and values[setting].strip():
                values[setting] = str(self.folders.child("out", values[setting].strip(), must_exist=False).resolve())
        settings = trainform.settings_for(kind, values, data=str(data.resolve()),
                                          out=str(self.jobs.root.resolve() / name), model=self.model)
        self._check_size(settings.resolution, settings.bucket_step)
        return self.jobs.submit(name, kind, trainform.to_toml(settings))

    def _check_size(self, resolution: int, bucket_step: int) -> None:
        """A training size the model cannot take, said at Start (the queued job failed on it later); a model
        whose family only loading tells is checked by its job."""
        family = self._page_family()
        if not resolution or family is None:
            return
        configs = family.component_configs() if self._base is None else {
            "unet": self._base.unet.config, "vae": self._base.vae.config}
        step = bucket_step or config_steps(configs["unet"], configs["vae"])[1]
        if resolution % step:
            near = max(step, round(resolution / step) * step)
            raise SdtuneError(f"resolution {resolution}: must be a multiple of {step} for this model, e.g. {near}")

    def submit_queue(self, source: str | Path, *, uploaded: bool, name: str = ""):
        """Queue a queue file (the TOML of jobs and sweeps that ``sdtune train queue`` runs) as one job: its runs
        train in turn outside the server, in ``out/train/NAME/RUN``, compared in ``out/train/NAME/queue.html``.
        ``source``: an uploaded file, or (``uploaded=False``) a file name inside the output folder. As for the
        forms, the file may only use the configured folders: its folder settings (``data``, ``validation_dir``,
        ``reg_dir``) are names inside the output folder, its ``model`` one the page offers (default: the model
        in use), and its ``out`` is replaced by the job's folder. Every key and value is checked as the command
        checks them, before anything is queued; returns the job."""
        shown = Path(str(source)).name if uploaded else str(source or "").strip()
        path = source if uploaded else self.folders.child("out", shown)
        path = check_upload(path, "queue", self.max_upload)
        try:
            table = read_toml(path, "queue")
        except SdtuneError as e:  # named as the user gave it, not as the upload's temporary path
            raise SdtuneError(str(e).replace(str(path), shown)) from None
        text = trainform.table_toml(self._queue_in_folders(table, shown))
        # checked as `sdtune train queue` will read it, so that a bad file is refused here, named as given
        scratch = self.folders.out / ".cache"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            check = Path(tmp) / CONFIG_FILE
            check.write_text(text, encoding="utf-8")
            try:
                train_queue.read_queue(check)
            except SdtuneError as e:
                raise SdtuneError(str(e).replace(str(check), shown)) from None
        name = self.folders.new_name(name, "job name") if name and name.strip() else self._job_name(QUEUE)
        return self.jobs.submit(name, QUEUE, text)

    def _queue_in_folders(self, table: dict, shown: str) -> dict:
        """A queue file's table with its folders resolved inside the output folder and its model checked."""
        table = {k: v for k, v in table.items() if k != "out"}  # the job's folder is the queue's
        if not isinstance(table.get("defaults", {}), dict):
            return table  # read_queue says what is wrong with it
        defaults = table.setdefault("defaults", {})
        if not any(k == "model" for k in defaults):
            defaults["model"] = self.model
        jobs = table.get("job") if isinstance(table.get("job"), list) else []
        sections = [("[defaults]", defaults)] + [(f"job {i}", j) for i, j in enumerate(jobs, 1) if isinstance(j, dict)]
        for where, section in sections:
            sweep = section.get("sweep")
            for values, each in ((section, False), (sweep if isinstance(sweep, dict) else {}, True)):
                for key, value in values.items():
                    setting = key.replace("-", "_")
                    if setting not in (*PATH_SETTINGS, "model"):
                        continue
                    try:
                        values[key] = ([self._queue_value(setting, v) for v in value] if each and isinstance(value, list)
                                       else self._queue_value(setting, value))
                    except Refused as e:
                        raise Refused(f"{shown}: {where}: {key}: {e}") from None
        return table

    def _queue_value(self, setting: str, value):
        if not isinstance(value, str) or not value.strip():
            return value  # not a name: read_queue refuses a wrong type; "" is "none"
        if setting == "model":
            try:
                return self.model_spec(value)
            except Refused as e:  # say which model, whatever the reason
                raise Refused(str(e) if str(e).startswith(value) else f"{value}: {e}") from None
        return str(self.folders.child("out", value, must_exist=False).resolve())

    def _job_name(self, kind: str) -> str:
        n = 1
        while f"{kind}-{n:03d}" in self.jobs.jobs or (self.jobs.root / f"{kind}-{n:03d}").exists():
            n += 1
        return f"{kind}-{n:03d}"

    def resume(self, name: str) -> str:
        """Queue a stopped or failed job again; says where it will start."""
        self.jobs.resume(name)
        job = self.jobs.get(name)
        if job.kind == QUEUE or (Path(job.folder) / STATE_FILE).is_file():
            return f"job {name}: queued again; it resumes from its last save"
        return f"job {name}: queued again; it saved nothing before it stopped, so it starts over (a save every " \
               f"N steps keeps what a stopped run learned)"

    def job_view(self, name: str) -> dict:
        job = self.jobs.get(name)
        return {"job": job, **progress(job.folder)}

    def use_result(self, name: str) -> str:
        """Copy a finished job's result into the LoRA or embedding folder and say what to type: the checkpoint its
        report recommends (``best.safetensors``, the lowest validation loss) where there is one, else the final
        file; a LoRA named after the job, an embedding after its token (the folder's embeddings are used by file
        name, as in A1111); a name in use gets a number (``-2``), the same file already there is named."""
        view = self.job_view(name)
        if view["job"].kind == QUEUE:
            raise SdtuneError(f"job {name} is a queue: its runs' results are in their folders under "
                              f"{view['job'].folder}, compared in its queue.html")
        if view["result"] is None:
            raise SdtuneError(f"job {name} has no result yet ({view['job'].state})")
        result = Path(view["result"])
        best = result.parent / BEST_FILE
        chosen, which = (best, "its report's best checkpoint") if best.is_file() else (result, "its final file")
        lora = view["job"].kind == "lora"
        kind = "loras" if lora else "embeddings"
        stem = name if lora else (re.sub(r"[^\w.-]", "", load_embedding(result).token) or name)
        candidate = self._copy_in(kind, stem, chosen)
        use = f"<lora:{candidate}:1>" if lora else candidate
        return f"{which} is in the {'LoRA' if lora else 'embedding'} folder as {candidate}; put {use} in a prompt"

    # ---------------------------------------------------------------- pages in the output folder

    def embed_page(self, page: Path, height: int = 640) -> str:
        """An HTML page sdtune wrote in the output folder (a report), as an iframe to show on the page. Its
        relative links become Gradio file URLs, each checked to lie in the output folder; any other link is
        dropped. The frame runs no scripts and its links open in a new tab."""
        page = self.folders.inside(Path(page), "out")
        folder = page.parent

        def link(m: re.Match) -> str:
            attr, target = m.group(1), html.unescape(m.group(2))
            if not target or re.match(r"^([a-z][a-z0-9+.-]*:|/|\\|#)", target, re.I):
                return f'{attr}="#"'
            try:
                path = self.folders.inside(folder / urllib.parse.unquote(target), "out")
            except Refused:
                return f'{attr}="#"'
            return f'{attr}="{html.escape(FILE_ROUTE + urllib.parse.quote(str(path.resolve())))}"'

        text = PAGE_LINK.sub(link, page.read_text(encoding="utf-8"))
        text = text.replace("<head>", '<head><base target="_blank">', 1)
        return (f'<iframe title="{html.escape(page.name)}" sandbox="allow-same-origin allow-popups" '
                f'style="width:100%;height:{int(height)}px;border:1px solid #ccc" srcdoc="{html.escape(text)}">'
                f'</iframe>')

    def report(self, name: str) -> Path | None:
        """The job's report.html once training has written it."""
        report = self.job_view(name)["report"]
        return None if report is None else self.folders.inside(report, "out")

    def compare_jobs(self) -> Path:
        """``out/train/queue.html``: the training jobs side by side (settings that differ, validation loss,
        best checkpoint, samples), the page ``sdtune train queue`` writes."""
        runs, state = [], {}
        for job in sorted(self.jobs.list(), key=lambda j: j.submitted):
            if job.kind == QUEUE:
                continue  # its own queue.html compares its runs
            try:
                table = tomllib.loads((Path(job.folder) / CONFIG_FILE).read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError):
                continue
            runs.append(train_queue.Run(job.name, job.kind, table))
            state[job.name] = {"state": job.state}
        if not runs:
            raise SdtuneError("no training jobs yet; start one above")
        return train_queue.write_page(self.jobs.root, runs, state, intro="The training jobs of the web UI, "
                                      "oldest first; each job's folder holds its own report, files and logs.")
