"""Textual-inversion embedding files: read every common layout into one ``Embedding``, write them back.

Layouts read (all through ``safeio.load_state``, so nothing is ever unpickled unsafely):
- diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{token: [d] or [n, d]}``
- A1111 ``.pt``: ``{"string_to_param": {"*": [n, d]}, "name": token, "string_to_token", "step", ...}``
- kohya / A1111 safetensors: ``{"emb_params": [n, d]}``; the file carries no token, the file name is used
- a bare tensor ``[d]`` / ``[n, d]`` saved with ``torch.save``; the token must be given
- SDXL, one set of rows per text encoder, the token from the file name (or, in files sdtune wrote, from the
  ``sdtune.token`` metadata): ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``
  (A1111, ComfyUI, civitai), replicate/cog pivotal tuning's ``.pti`` (``text_encoders_0`` / ``text_encoders_1``)
  and XL-Textual-Inversion's ``{"emb": [768], "emb2": [1280]}``
The width says which model an embedding is for (768 SD 1.x, 1024 SD 2.x); the EmbeddingSet checks it fits.
The original textual_inversion pickle (a ``ParameterDict`` with numpy objects) is refused: it cannot be read
without executing code.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import families
from ..console import note
from ..safeio import SdtuneError, atomic_save_safetensors, atomic_save_torch, is_safetensors, load_state

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
A1111_PLACEHOLDER_ID = 265  # the CLIP id of "*", which A1111 writes as string_to_token["*"]
# Layouts holding rows for each of SDXL's text encoders: format -> the file's keys, in the family's encoder order.
SDXL_KEYS = tuple(te.embedding_key for te in families.SDXL.text_encoders)  # ("clip_l", "clip_g")
TOKEN_METADATA = "sdtune.token"  # safetensors metadata: the token of a layout that stores none (SDXL's)
# How a file sdtune trained was made (step, base model, its hash, the run's settings), as safetensors metadata
# "sdtune.<fact>"; an A1111 .pt holds the step and base model in its own fields, which A1111 shows and writes.
TRAINING_METADATA = "sdtune."
A1111_FACTS = {"step": "step", "sd_checkpoint": "base_model_hash", "sd_checkpoint_name": "base_model"}
SECOND_HALF = "learned_embeds_2"  # diffusers' textual_inversion_sdxl.py: the second text encoder's rows
MULTI_LAYOUTS = {"sdxl": SDXL_KEYS, "pti": ("text_encoders_0", "text_encoders_1"), "emb2": ("emb", "emb2")}
FORMATS = ("diffusers", "a1111", "kohya", "tensor", *MULTI_LAYOUTS)
SAVE_FORMATS = ("diffusers", "a1111")


@dataclass
class Embedding:
    token: str
    # [n, d] float32 on the CPU, one row per vector; for a model with several text encoders (SDXL) a dict
    # {embedding key ("clip_l", "clip_g"): [n, d]} holding the same number of rows for each
    vectors: torch.Tensor | dict[str, torch.Tensor]
    source: str  # where it came from (a path), for error messages
    format: str  # one of FORMATS
    # how it was trained, where the file says: {"step", "base_model", "base_model_hash", "settings"} (strings)
    training: dict[str, str] = field(default_factory=dict)
    stored_dtype: str = "float32"  # the file's (the vectors are float32 here)
    # other safetensors metadata a save writes as it is (ModelSpec's modelspec.* keys of a trained file); not read
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """Rows by text encoder's embedding key; a one-encoder embedding is ``{"": rows}``, the key such
        encoders have (``families.TextEncoder.embedding_key``)."""
        return dict(self.vectors) if isinstance(self.vectors, dict) else {"": self.vectors}

    @property
    def widths(self) -> dict[str, int]:
        return {key: rows.shape[1] for key, rows in self.parts.items()}

    @property
    def num_vectors(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    @property
    def width(self) -> int:
        """The width of a one-encoder embedding (``widths`` has each encoder's)."""
        if isinstance(self.vectors, dict):
            raise ValueError(f"{self.source}: a multi-encoder embedding has one width per encoder: {self.widths}")
        return self.vectors.shape[1]

    @staticmethod
    def from_parts(token: str, parts: dict[str, torch.Tensor], source: str, format: str,
                   training: dict[str, str] | None = None) -> Embedding:
        """The inverse of ``parts``: ``{"": rows}`` becomes plain rows."""
        vectors = parts[""] if list(parts) == [""] else dict(parts)
        return Embedding(token=token, vectors=vectors, source=source, format=format, training=dict(training or {}))


def fitting_families(widths: dict[str, int]) -> list:
    """The families whose text encoders these widths (by embedding key) fill exactly."""
    return [f for f in families.FAMILIES.values() if {te.embedding_key: te.width for te in f.text_encoders} == widths]


def made_for(widths: dict[str, int]) -> str:
    """The family whose text encoders these widths (by embedding key) fill, for messages: {"": 768} ->
    "SD 1.x", {"clip_l": 768, "clip_g": 1280} -> "SDXL"; by width alone when no family has exactly them."""
    titles = [f.title for f in fitting_families(widths)]
    if titles:
        return " or ".join(titles)
    return families.describe_width(widths[""]) if list(widths) == [""] else "an unknown model family"


def describe_widths(widths: dict[str, int]) -> str:
    """ "768 wide", or "clip_l 768 and clip_g 1280 wide"."""
    return " and ".join(f"{key} {w}".strip() for key, w in widths.items()) + " wide"


def load_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read an embedding file (or a folder holding ``learned_embeds.*``); ``token`` overrides the stored name.
    diffusers' SDXL training writes each encoder's rows to a file of its own: ``learned_embeds`` with a
    ``learned_embeds_2`` beside it is read as the two halves of one SDXL embedding."""
    path = _resolve_file(Path(path))
    second = path.with_name(SECOND_HALF + path.suffix)
    if path.stem == Path(DIFFUSERS_FILES[0]).stem and second.is_file():
        return _halves(load_embedding_file(path, token), load_embedding_file(second, token), path)
    return load_embedding_file(path, token)


def _halves(first: Embedding, second: Embedding, path: Path) -> Embedding:
    """One SDXL embedding ({clip_l, clip_g}) from diffusers' two files, which must name one token, one size."""
    if first.format != "diffusers" or second.format != "diffusers" or first.token != second.token or \
            first.vectors.shape[0] != second.vectors.shape[0]:
        raise SdtuneError(f"{path}: {path.name} and {SECOND_HALF}{path.suffix} are not the two halves of one "
                          f"embedding (diffusers' SDXL layout: one token, as many rows in each); load one file alone")
    return Embedding(first.token, {SDXL_KEYS[0]: first.vectors, SDXL_KEYS[1]: second.vectors}, str(path), "sdxl",
                     first.training, first.stored_dtype)


class OriginalTextualInversion(SdtuneError):
    """The original textual_inversion pickle: refused with its own name (the safe loader's message says only "a
    pickle with Python objects"), wherever a tool meets it."""


def load_embedding_file(path: Path, token: str | None = None) -> Embedding:
    """``load_embedding`` of one file."""
    try:
        state, metadata = load_state(path)
    except SdtuneError:
        if _is_original_textual_inversion(path):
            raise OriginalTextualInversion(
                f"{path}: an original textual_inversion embedding (a pickled ParameterDict with numpy objects), which "
                f"sdtune will not unpickle since that could run code; convert it to learned_embeds.safetensors "
                f"with a tool you trust") from None
        raise
    stored_token, vectors, fmt = _parse(state, path)
    if fmt in MULTI_LAYOUTS and metadata.get(TOKEN_METADATA):  # sdtune's own SDXL files name their token
        stored_token = metadata[TOKEN_METADATA]
    if token is None and stored_token is not None and not is_one_word(stored_token):
        token = file_token(path)
        note(f"{path}: its stored token {stored_token!r} is not one word, so it loads as {token!r} (its file or folder "
             f"name, as A1111 does); choose another name with {path}:TOKEN")
    token = token if token is not None else stored_token
    if token is None:
        raise SdtuneError(f"{path}: a bare tensor with no token name; give one as {path}:TOKEN")
    check_token(token, path)
    training = _training_facts(state, metadata)
    first = next(iter(vectors.values())) if isinstance(vectors, dict) else vectors
    stored = str(getattr(first, "dtype", "float32")).removeprefix("torch.")
    if isinstance(vectors, dict):
        return Embedding(token, _as_parts(vectors, path), str(path), fmt, training, stored)
    return Embedding(token, _as_rows(vectors, path), str(path), fmt, training, stored)


def _training_facts(state, metadata: dict) -> dict[str, str]:
    """How the file was trained: sdtune's ``sdtune.*`` metadata, else an A1111 .pt's own fields."""
    facts = {k.removeprefix(TRAINING_METADATA): v for k, v in metadata.items()
             if k.startswith(TRAINING_METADATA) and k != TOKEN_METADATA}
    if isinstance(state, dict) and "string_to_param" in state:
        for field_name, fact in A1111_FACTS.items():
            if isinstance(state.get(field_name), (str, int)) and str(state[field_name]):
                facts.setdefault(fact, str(state[field_name]))
    return facts


def a1111_word(emb: Embedding, path: str | Path) -> str | None:
    """The word A1111 and ComfyUI type for the file at ``path`` (its name) where the token it loads under in sdtune
    and diffusers (the name it stores) is another: a renamed download (nfixer.pt storing nfixer-271), an SDXL file
    sdtune wrote with its token in the metadata. diffusers' own files (learned_embeds) name the token typed."""
    word = file_token(Path(path))
    renamed = emb.format == "a1111" or (emb.format in MULTI_LAYOUTS and Path(emb.source).name not in DIFFUSERS_FILES)
    return word if renamed and file_stem(emb.token).lower() != word.lower() else None


def file_stem(token: str) -> str:
    """A file name for the token (A1111 uses the file name as the prompt word): <my-cat> -> my-cat."""
    return re.sub(r"[^\w.-]+", "_", token).strip("._") or "embedding"


def save_embedding(emb: Embedding, path: str | Path, format: str = "diffusers") -> None:
    """Write ``emb`` atomically: "diffusers" ``{token: [n, d]}`` (safetensors, or a torch pickle for .bin/.pt),
    or "a1111" ``.pt`` holding only tensors, dicts, str and int (loads with ``torch.load(weights_only=True)``).
    An SDXL embedding is written as ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` in either format: the one
    multi-encoder layout A1111 and ComfyUI read (diffusers has none: it loads each key into its encoder).
    ``emb.training`` goes along: as ``sdtune.*`` safetensors metadata, or in an A1111 .pt's own fields (which
    has no place for ``emb.metadata``)."""
    path = Path(path)
    if format not in SAVE_FORMATS:
        raise SdtuneError(f"{path}: unknown embedding format {format!r}; use 'diffusers' or 'a1111'")
    parts = {key: rows.detach().to("cpu", torch.float32).contiguous().clone() for key, rows in emb.parts.items()}
    metadata = {TRAINING_METADATA + k: str(v) for k, v in emb.training.items()} | emb.metadata
    if isinstance(emb.vectors, dict):  # the layout has no token: A1111 takes the file name, sdtune the metadata
        _save_dict(parts, path, {**metadata, TOKEN_METADATA: emb.token})
    elif format == "diffusers":
        _save_dict({emb.token: parts[""]}, path, metadata)
    else:
        facts = {name: emb.training[fact] for name, fact in A1111_FACTS.items() if fact in emb.training}
        atomic_save_torch({
            "string_to_token": {"*": A1111_PLACEHOLDER_ID},
            "string_to_param": {"*": parts[""]},
            "name": emb.token,
            **facts,
            "step": int(emb.training.get("step", 0)),  # A1111 reads an int
        }, path, legacy=True)


def _save_dict(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors, or a torch pickle for .bin/.pt names (which some tools expect)."""
    if path.suffix in (".bin", ".pt"):
        atomic_save_torch(tensors, path, legacy=True)  # as A1111's safe loader takes it
    else:
        atomic_save_safetensors(tensors, path, metadata=metadata or None)


def _resolve_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in DIFFUSERS_FILES:
        if (path / name).is_file():
            return path / name
    raise SdtuneError(f"{path}: a folder without {' or '.join(DIFFUSERS_FILES)}; point at the embedding file itself")


def _parse(state, path: Path) -> tuple[str | None, torch.Tensor | dict, str]:
    """(stored token or None, raw vectors (a dict by embedding key for SDXL layouts), format) from a loaded state."""
    if isinstance(state, torch.Tensor):
        return None, state, "tensor"
    if not isinstance(state, dict) or not state:
        raise SdtuneError(f"{path}: holds {type(state).__name__}, not an embedding; expected a textual-inversion file")
    for fmt, keys in MULTI_LAYOUTS.items():
        if all(k in state for k in keys):  # none of these layouts stores a token: A1111 uses the file name
            return file_token(path), dict(zip(SDXL_KEYS, (state[k] for k in keys))), fmt
    if "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise SdtuneError(f"{path}: A1111 embedding whose string_to_param does not hold exactly one tensor; "
                              f"re-export it from A1111")
        name = state.get("name")
        return (str(name) if name else file_token(path)), next(iter(params.values())), "a1111"
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for keys in (MULTI_LAYOUTS["sdxl"], MULTI_LAYOUTS["pti"]):  # one encoder's half: not a word named "clip_l"
        if set(keys) & set(state):
            raise SdtuneError(f"{path}: holds {' and '.join(k for k in keys if k in state)} but not "
                              f"{' and '.join(k for k in keys if k not in state)}; an SDXL embedding needs a row "
                              f"for each text encoder, re-export it")
    if len(state) == 1 and len(tensors) == 1:
        key, vectors = next(iter(tensors.items()))
        if key == "emb_params":
            return file_token(path), vectors, "kohya"
        return key, vectors, "diffusers"
    names = list(map(str, state))
    if any(re.search(r"lora|hada_w|lokr_w|oft_|^(unet|text_encoder):\d+:(up|down)$", k, re.I) for k in names):
        raise SdtuneError(f"{path}: this is a LoRA, not an embedding; give it with --lora (or <lora:NAME:1> in a "
                          f"prompt)")
    if any(k.startswith("model.diffusion_model.") for k in names):
        raise SdtuneError(f"{path}: this is a full Stable Diffusion checkpoint, not an embedding; give it as --model")
    raise SdtuneError(f"{path}: not a textual-inversion layout (keys: {', '.join(names[:6])}); expected one "
                      f"{{token: tensor}}, string_to_param or emb_params")


def _as_parts(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    """Rows for each encoder; every encoder needs as many, since one prompt word stands for all of them."""
    parts = {key: _as_rows(vectors, path) for key, vectors in raw.items()}
    counts = {key: rows.shape[0] for key, rows in parts.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{key} {n}" for key, n in counts.items())
        raise SdtuneError(f"{path}: the text encoders' vector counts differ ({shown}); re-export the embedding")
    return parts


def _as_rows(vectors, path: Path) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise SdtuneError(f"{path}: embedding of shape {shape}; expected [width] or [vectors, width]")
    rows = vectors.detach().to("cpu", torch.float32).reshape(-1, vectors.shape[-1]).clone()
    if not torch.isfinite(rows).all():
        raise SdtuneError(f"{path}: embedding holds NaN or infinite values; re-train or re-download it")
    return rows


def is_one_word(token: str) -> bool:
    return bool(token) and not any(c.isspace() for c in token)


def file_token(path: Path) -> str:
    """The name A1111 gives an embedding: its file name, or for diffusers' generic ``learned_embeds.*`` the
    folder it sits in (hub concepts are folders named after the concept); spaces become dashes."""
    name = path.parent.name if path.name in DIFFUSERS_FILES and path.parent.name else path.stem
    return "-".join(name.split())


MAX_VECTORS = 75  # tokens in one CLIP chunk: a multi-vector embedding is kept whole in one (A1111 too)


def check_vectors(flag: str, n: int) -> None:
    """A new word's vector count, as ``flag`` gave it: at least 1, at most a prompt chunk's tokens."""
    if not 1 <= n <= MAX_VECTORS:
        raise SdtuneError(f"{flag} {n}: must be from 1 to {MAX_VECTORS} (a prompt chunk's tokens)")


def check_token(token: str, path: Path) -> None:
    """A token must be one non-empty word: the tokenizer matches it as a unit and FILE:TOKEN can name it."""
    if not is_one_word(token):
        raise SdtuneError(f"{path}: token {token!r} is empty or has spaces; give a one-word token as {path}:TOKEN")


def _is_original_textual_inversion(path: Path) -> bool:
    """Whether a torch zip pickle names ParameterDict/numpy classes, read from its opcodes without running them."""
    if is_safetensors(path) or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return False
            names = [str(arg) for op, arg, _ in pickletools.genops(archive.read(name)) if op.name == "GLOBAL"]
    except Exception:  # noqa: BLE001 - a corrupt archive is simply "not recognised"
        return False
    return any("ParameterDict" in n or n.startswith("numpy") for n in names)
