"""Textual Inversion training: a new token whose vector(s) learn a concept from a few images.

    v* = argmin_v  E ‖ε − ε_θ(z_t, t, c_θ(y))‖²        (y: "a photo of <token>", ...)

The token is added to the base's ``EmbeddingSet``, its rows starting from the CLIP tokens of ``--init-token``
(``init_rows``: a word of several tokens is fine, as in A1111), in each text encoder of the family from that
encoder's own table (SDXL: a 768-wide clip_l and a 1280-wide clip_g row per vector). During training each text
encoder's token table is wrapped: ids of the new token read their rows from a small trainable parameter
``[num_vectors, width]`` and all other ids the frozen table, so only those rows get a gradient, no full-table
gradient or copy is made, and every other row stays bit-identical. At the end the learned rows are written
into the table (the token stays loaded on the base, ready to use) and saved as ``learned_embeds.safetensors``
(diffusers; for SDXL ``{"clip_l", "clip_g"}``, the layout A1111 and ComfyUI read, which diffusers loads with
one ``load_textual_inversion`` per encoder) and, on request, an A1111 ``.pt``. ``report.html`` then shows each
checkpoint on the sample prompts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from .. import modelspec
from ..console import note
from ..families import kohya_clip_skip
from ..models import vae_swapped
from ..safeio import SdtuneError
from ..ti.formats import Embedding, file_stem, load_embedding, save_embedding
from ..ti.tokens import EmbeddingSet, sub_tokens
from ..version import __version__
from . import loop, report, samples, validation
from .captions import steady_caption
from .config import TISettings, to_toml
from .data import training_set
from .scan import Scan, first_prompts, report_skipped, scan_data

# Prompt templates for images without captions ({} is the token).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a photo of the {}", "a picture of a {}", "an image of the {}", "a close-up photo of a {}",
    "a rendering of a {}", "a good photo of the {}", "a photo of one {}", "a cropped photo of the {}",
    "a bright photo of a {}", "a clean photo of the {}", "a small {}", "a large {}", "the {}", "a {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a picture in the style of {}", "an image in the style of {}",
    "a rendering in the style of {}", "a drawing in the style of {}", "artwork in the style of {}",
    "a photo in the style of {}", "a small picture in the style of {}", "a large picture in the style of {}",
    "a nice picture in the style of {}", "in the style of {}", "{} style",
]
DIFFUSERS_FILE = "learned_embeds.safetensors"


class SplicedEmbedding(nn.Module):
    """A token table whose rows ``first .. first+n-1`` come from the trainable ``rows`` parameter."""

    def __init__(self, table: nn.Embedding, first: int, rows: torch.Tensor):
        super().__init__()
        self.table = table
        self.first = first
        self.rows = nn.Parameter(rows.detach().to(torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the table (e.g. sizes); the new rows live in ``rows``
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            frozen = self.table(ids)
        n = self.rows.shape[0]
        new = (ids >= self.first) & (ids < self.first + n)
        picked = self.rows[(ids - self.first).clamp(0, n - 1)]  # always used, so DDP sees the parameter every step
        return torch.where(new.unsqueeze(-1), picked.to(frozen.dtype), frozen)


def embedding_set(base) -> EmbeddingSet:
    """The base's embedding set (created and attached when it has none)."""
    found = getattr(base, "embeddings", None)
    if found is not None and hasattr(found, "add_placeholder"):
        return found
    made = EmbeddingSet.for_base(base)
    try:
        base.embeddings = made
    except AttributeError:
        pass
    return made


def prompt_templates(scan: Scan, token: str, prop: str) -> list[str] | None:
    """None when every image has a caption that mentions the token (train on those), else the templates."""
    captions = [ex.caption for ex in scan.examples]
    # (--wildcards: each line of a caption is one the run may train on, so each must mention it)
    mentions = [bool(c) and all(token.lower() in line.lower() for line in c.splitlines()) for c in captions]
    if all(mentions):
        return None
    if any(mentions):
        lacking = next(ex for ex, m in zip(scan.examples, mentions) if not m)
        raise SdtuneError(f"{lacking.path}: its caption does not mention {token}; put {token} in every caption, or "
                          f"remove the caption files to train on {prop} prompt templates")
    templates = [t.format(token) for t in (STYLE_TEMPLATES if prop == "style" else OBJECT_TEMPLATES)]
    if any(captions):  # caption files that are not used: said, since a kohya user expects them to be
        note(f"no caption mentions {token}, so the captions are not used: training on the {prop} prompt templates "
             f"({templates[0]!r}, ...); put {token} in every caption to train on the captions")
    return templates


def spread(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` starting vectors from the ``t`` rows of an init text's tokens: n <= t splits the tokens into n
    consecutive groups and takes each group's mean (1: the mean of all, t: one token each); n > t takes token
    ``i * t // n`` for vector i, each token spread over neighbouring vectors (A1111's rule)."""
    t = rows.shape[0]
    if n >= t:
        return rows[[i * t // n for i in range(n)]].clone()
    return torch.stack([rows[i * t // n:(i + 1) * t // n].mean(0) for i in range(n)])


def init_rows(base, text: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """The new token's starting rows in each text encoder (by embedding key), from the tokens of ``text``."""
    parts = {}
    for te, model, tokenizer in base.text_encoders():
        pieces = tokenizer.encode(text, add_special_tokens=False)
        if not pieces:
            raise SdtuneError(f"--init-token {text!r} has no tokens; give a word close to the concept, e.g. cat")
        rows = model.get_input_embeddings().weight.detach()[pieces].to("cpu", torch.float32)
        parts[te.embedding_key] = spread(rows, num_vectors)
    return parts


def starting_embedding(settings: TISettings) -> Embedding | None:
    """The embedding --init-embedding names, under the new token (None without one), checked against
    --num-vectors; ``EmbeddingSet.add`` checks that it fits the model's text encoders."""
    if not getattr(settings, "init_embedding", ""):
        return None
    emb = load_embedding(settings.init_embedding, token=settings.token)
    if emb.num_vectors != settings.num_vectors:
        raise SdtuneError(f"--init-embedding {settings.init_embedding}: has {emb.num_vectors} vector(s) and "
                          f"--num-vectors is {settings.num_vectors}; give --num-vectors {emb.num_vectors}")
    return emb


def check_new_token(base, settings: TISettings) -> Embedding | None:
    """The token (and its sub-tokens) must be new to the tokenizer, and --init-embedding's vectors fit: checked
    first, since a known word is the one fix to make whatever else the data says."""
    known = {t.lower() for t in base.tokenizer.get_vocab()}
    if any(name.lower() in known for name in sub_tokens(settings.token, settings.num_vectors)):
        raise SdtuneError(f"--token {settings.token!r} is already in the tokenizer's vocabulary (a word it knows, or "
                          f"a loaded embedding); choose a new word, e.g. '<{settings.token.strip('<>')}-1>'")
    emb = starting_embedding(settings)
    if emb is not None:
        embedding_set(base).check_fits(emb)
    return emb  # (--init-embedding's, read once)


def add_token(base, settings: TISettings) -> list[int]:
    """Add the token to the base's embeddings with its starting rows (--init-embedding's vectors, else from
    --init-token's words); returns its ids (consecutive)."""
    emb = check_new_token(base, settings)
    embeddings = embedding_set(base)
    if emb is None:
        emb = Embedding.from_parts(settings.token, init_rows(base, settings.init_token, settings.num_vectors),
                                   f"placeholder {settings.token}", "diffusers")
    elif settings.init_token.strip():  # (kohya's configs give init_word beside weights, which win there too)
        note(f"--init-token {settings.init_token!r} is not used: the vectors start from --init-embedding "
             f"{settings.init_embedding}")
    embeddings.add(emb)
    return embeddings.ids(settings.token)


def _state_key(embedding_key: str) -> str:
    """The resume state's name of an encoder's rows: "rows" (one encoder), "rows.clip_l", "rows.clip_g"."""
    return f"rows.{embedding_key}" if embedding_key else "rows"


def training_facts(base, settings, step: int) -> dict[str, str]:
    """What an embedding file records of its run (``Embedding.training``): the step, the base model's name and
    hash (A1111's sd_checkpoint_name / sd_checkpoint in a .pt), the settings (``--config`` reads them back) and
    the sdtune that trained it."""
    return {"step": str(step), "base_model": Path(str(getattr(base, "name", ""))).name, "version": __version__,
            "base_model_hash": str(getattr(base, "model_hash", "")), "settings": to_toml(settings)}


def train_ti(base, settings: TISettings, callback=None) -> Path:
    """Train a Textual Inversion embedding; returns ``out/learned_embeds.safetensors``.

    Afterwards the token is loaded on ``base`` with its learned vectors (``base.embeddings``)."""
    settings.check()  # before the VAE is read
    loop.check_model(settings, base)
    loop.note_merged(base)
    # the folder is this run's from its first read of it through its report (a second run there is refused)
    with loop.holding(settings, "ti", base), vae_swapped(base, settings.vae):  # --vae: for this run only
        return _train_ti(base, settings, callback)


def _train_ti(base, settings: TISettings, callback=None) -> Path:
    """The run itself, with its VAE in place."""
    check_new_token(base, settings)
    out = Path(settings.out)
    scan = scan_data(settings.data, default_caption=None, require_captions=False, all_lines=settings.wildcards)
    report_skipped(scan)
    templates = prompt_templates(scan, settings.token, settings.property)
    scan, held, held_out = validation.split(settings, scan, require_captions=False)
    loop.check_resume(base, settings, "ti", scan, validation.data_id(settings, held, held_out))  # before encoding
    data = training_set(base, settings, scan, templates)
    # validation images get the captions or templates their folder's rule gives (template i % n for image i)
    held_templates = prompt_templates(held, settings.token, settings.property) if settings.validation_dir else templates
    captions = [steady_caption(held_templates[i % len(held_templates)], settings) if held_templates else
                steady_caption(ex.caption or "", settings, ex.options) for i, ex in enumerate(held.examples)]
    checks = validation.build(base, settings, held, captions, held_out)
    prompts = first_prompts(steady_caption(t, settings) for t in templates) if templates else \
        first_prompts(steady_caption(ex.caption or "", settings, ex.options) for ex in scan.examples)

    embeddings = embedding_set(base)
    add_token(base, settings)
    # one trainable splice per text encoder (SDXL: clip_l and clip_g rows), each over its own token table
    splices: dict[str, tuple[nn.Module, nn.Embedding, SplicedEmbedding]] = {}
    for te, model, _ in base.text_encoders():
        ids = embeddings.ids(settings.token, te.embedding_key)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            embeddings.remove(settings.token)
            raise SdtuneError(f"--token {settings.token}: its ids {ids} are not consecutive; load it on a fresh model")
        table = model.get_input_embeddings()
        splices[te.embedding_key] = (model, table,
                                     SplicedEmbedding(table, ids[0], table.weight.detach()[ids]).to(table.weight.device))
    formats = ["diffusers"] + [f for f in settings.formats if f != "diffusers"]

    def learned(step: int) -> Embedding:
        parts = {key: spliced.rows.detach().float().cpu() for key, (_, _, spliced) in splices.items()}
        return Embedding.from_parts(settings.token, parts, str(out / DIFFUSERS_FILE), "diffusers",
                                    training_facts(base, settings, step))

    def save(step: int, final: bool) -> list[Path]:
        emb = learned(step)
        emb.metadata = modelspec.metadata(base.family, base.scheduler.config, "ti", title=settings.token,
                                          resolution=data.resolution, created=time.time(),
                                          clip_skip=kohya_clip_skip(base.family, settings.clip_skip),
                                          timesteps=settings.timestep_range(len(base.scheduler.alphas_cumprod)),
                                          trigger=settings.token, user=settings.user_metadata())
        suffix = "" if final else f"-step{step:06d}"
        paths = []
        for fmt in formats:
            name = f"learned_embeds{suffix}.safetensors" if fmt == "diffusers" else \
                f"{file_stem(settings.token)}{suffix}.pt"
            save_embedding(emb, out / name, format=fmt)
            paths.append(out / name)
        return paths

    def state() -> dict:
        return {_state_key(key): spliced.rows.detach().cpu().clone() for key, (_, _, spliced) in splices.items()}

    def load_state(saved: dict) -> None:
        mine = state()
        if set(saved) != set(mine) or any(tuple(saved[k].shape) != tuple(mine[k].shape) for k in mine):
            held = {k: tuple(v.shape) for k, v in saved.items()}
            wanted = {k: tuple(v.shape) for k, v in mine.items()}
            raise SdtuneError(f"{out / loop.STATE_FILE}: holds vectors {held}, this run trains {wanted}; use the "
                              f"same --num-vectors and model, or another --out")
        with torch.no_grad():
            for key, (_, _, spliced) in splices.items():
                spliced.rows.copy_(saved[_state_key(key)])

    def put_back() -> None:
        for model, table, _ in splices.values():
            model.set_input_embeddings(table)

    job = loop.Job(name="ti", param_groups=[{"params": [sp.rows for _, _, sp in splices.values()], "lr": settings.lr}],
                   state=state, load_state=load_state, save=save, text_trainable=True, expand=embeddings.expand,
                   sample_prompts=prompts, validation=checks)
    for model, _, spliced in splices.values():
        model.set_input_embeddings(spliced)
    try:
        record = loop.run(base, settings, job, data, callback)
    except BaseException:
        put_back()
        embeddings.remove(settings.token)  # the base goes back to how it was
        raise
    put_back()
    with torch.no_grad():
        for _, table, spliced in splices.values():
            table.weight[spliced.first:spliced.first + len(spliced.rows)] = spliced.rows.detach().to(table.weight.dtype)
    if settings.report and record.main:
        shown = samples.expand(settings.sample_prompts) or prompts
        report.write_report(base, settings, record, lambda: report.ti_grid(base, settings, record, shown),
                            "Each checkpoint on the sample prompts",
                            f"Seed {settings.seed}. The first row is the base model with the init text "
                            f"{settings.init_token!r} in place of {settings.token}.", shown, len(scan.examples))
    if record.main:
        print(f"sdtune train ti: {word_hint(settings.token, out, 'a1111' in settings.formats)}", file=sys.stderr)
    return out / DIFFUSERS_FILE


def word_hint(token: str, out: Path, with_pt: bool) -> str:
    """Which word to type where: the token in sdtune and diffusers; the file's name in A1111 and ComfyUI, which
    name an embedding by its file, so learned_embeds.safetensors would be the word "learned_embeds" there."""
    stem = file_stem(token)
    copy = f"{out / stem}.pt, written beside," if with_pt else f"a copy of {DIFFUSERS_FILE} named {stem}.safetensors"
    return (f"type {token} in sdtune (--embedding {out / DIFFUSERS_FILE}) and diffusers; A1111 and ComfyUI take the "
            f"file's name as the word: put {copy} in their embeddings folder and type {stem} (ComfyUI: "
            f"embedding:{stem})")
