"""Register textual-inversion tokens in a CLIP tokenizer + text encoder, and take them out again exactly.

Naming follows diffusers' ``load_textual_inversion``: an ``n``-vector embedding ``tok`` becomes the added
tokens ``tok tok_1 ... tok_{n-1}`` with consecutive ids after the vocabulary, and its rows are appended to
the token-embedding table in that order; prompts mention ``tok`` and ``expand`` spells out the sub-tokens.

Exact unloading. A transformers-5 ``CLIPTokenizer`` keeps all of its state in the Rust backend
(``tokenizer._tokenizer``), which can add tokens but never remove them. So the first ``add`` sets the pristine
backend aside and swaps in a deep copy; removing rebuilds a fresh copy holding only the tokens still loaded
(as if only they had been added, the same compaction diffusers' ``unload_textual_inversion`` does), and
removing the last one puts the pristine backend object itself back. The table keeps its first ``base_rows``
rows untouched (new rows are only appended), so cutting back to them restores shape and every value.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..console import note
from ..safeio import SdtuneError
from .formats import Embedding, check_token

MODEL_FAMILIES = {64: "the built-in tiny model", 768: "SD 1.x", 1024: "SD 2.x",
                  1280: "SDXL's second text encoder", 2048: "SDXL (both text encoders)"}
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".pti")


def model_family(width: int) -> str:
    return MODEL_FAMILIES.get(width, "an unknown model family")


def sub_tokens(token: str, num_vectors: int) -> list[str]:
    """The added tokens of an ``num_vectors``-vector embedding, as diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


@dataclass
class _Loaded:
    names: list[str]  # token, token_1, ...
    source: str
    format: str


class EmbeddingSet:
    """The embeddings loaded into one tokenizer + text encoder pair.

    Make one per pair and add tokens only through it: unloading restores the state it saw before its first add.
    Prompts for a diffusers pipeline: encode ``expand(prompt)`` yourself and pass ``prompt_embeds``; diffusers'
    own rewrite of multi-vector tokens (``maybe_convert_prompt``) would expand an expanded prompt again."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._loaded: dict[str, _Loaded] = {}  # by token, in load order
        self._pristine_backend = None  # the tokenizer's own backend while anything is loaded
        self._base_rows = 0
        self._base_config_vocab = None
        self._pattern = None  # cached prompt matcher for expand()

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        return list(self._loaded)

    def __contains__(self, token: str) -> bool:
        return token in self._loaded

    def ids(self, token: str) -> list[int]:
        """Token ids of ``token`` and its sub-tokens, in vector order."""
        return [self.tokenizer.convert_tokens_to_ids(n) for n in self._entry(token).names]

    def get(self, token: str) -> Embedding:
        """The current vectors of a loaded token (e.g. after training), as an ``Embedding`` ready to save."""
        entry = self._entry(token)
        rows = self._table().weight.detach()[self.ids(token)].to("cpu", torch.float32).clone()
        return Embedding(token=entry.names[0], vectors=rows, source=entry.source, format=entry.format)

    # ---- loading -------------------------------------------------------------------------------------------
    def add(self, emb: Embedding) -> list[str]:
        """Register ``emb``: add its token(s), append its rows; returns the added token names."""
        width = self._table().weight.shape[1]
        if emb.width != width:
            raise SdtuneError(
                f"{emb.source}: embedding is {emb.width} wide (made for {model_family(emb.width)}), but this text "
                f"encoder is {width} wide ({model_family(width)}); use an embedding made for this model")
        check_token(emb.token, Path(emb.source))
        names = sub_tokens(emb.token, emb.num_vectors)
        self._check_free(names, emb)
        rows_before, vocab_before = self._table().weight.shape[0], len(self.tokenizer)
        if rows_before != vocab_before:
            raise SdtuneError(
                f"{emb.source}: the tokenizer has {vocab_before} tokens but the text encoder's table {rows_before} "
                f"rows; load embeddings only through one EmbeddingSet on an unmodified model")
        if self._pristine_backend is None:
            self._take_pristine()
        try:
            self._add_names(names, first_id=vocab_before)
            self._set_rows(torch.cat([self._table().weight.detach(), self._cast(emb.vectors)]))
        except BaseException:
            self._rebuild([self._current_rows(t) for t in self._loaded])  # back to the state before this add
            raise
        self._loaded[emb.token] = _Loaded(names, emb.source, emb.format)
        self._pattern = None
        return names

    def add_placeholder(self, token: str, init_token: str, num_vectors: int = 1) -> list[int]:
        """A new trainable token, each of its rows a copy of ``init_token``'s (one token); returns the new ids."""
        if num_vectors < 1:
            raise SdtuneError(f"--num-vectors {num_vectors}: must be at least 1")
        if not token or any(c.isspace() for c in token):
            raise SdtuneError(f"--token {token!r}: must be one word without spaces, e.g. '<my-concept>'")
        pieces = self.tokenizer.encode(init_token, add_special_tokens=False)
        if len(pieces) != 1:
            shown = " ".join(self.tokenizer.convert_ids_to_tokens(pieces))
            raise SdtuneError(
                f"--init-token {init_token!r} is {len(pieces)} tokens ({shown or 'none'}), not one; choose a single "
                f"common word close to the concept (e.g. 'dog', 'painting')")
        init_row = self._table().weight.detach()[pieces[0]].to("cpu", torch.float32)
        rows = init_row.unsqueeze(0).repeat(num_vectors, 1)
        self.add(Embedding(token=token, vectors=rows, source=f"placeholder {token}", format="diffusers"))
        return self.ids(token)

    # ---- prompts -------------------------------------------------------------------------------------------
    def expand(self, prompt: str) -> str:
        """Write each multi-vector token as its sub-tokens (every occurrence; idempotent)."""
        multi = {t: e.names for t, e in self._loaded.items() if len(e.names) > 1}
        if not multi:
            return prompt
        if self._pattern is None:
            self._pattern = _matcher(self._loaded, multi)
        pattern, spelled_by_form = self._pattern

        def spell(match: re.Match) -> str:
            form = " ".join(match.group(0).split()).lower()
            return spelled_by_form.get(form, match.group(0))  # single-vector names and typed sub-tokens stay

        return pattern.sub(spell, prompt)

    # ---- unloading -----------------------------------------------------------------------------------------
    def remove(self, token: str) -> None:
        """Unload one token (with its sub-tokens); the others keep working under compacted ids."""
        entry = self._entry(token)
        keep = [t for t in self._loaded if self._loaded[t] is not entry]
        rows = [self._current_rows(t) for t in keep]
        self._loaded = {t: self._loaded[t] for t in keep}
        self._rebuild(rows)
        self._pattern = None

    def remove_all(self) -> None:
        """Unload everything: tokenizer and table return exactly to their state before the first add."""
        self._loaded = {}
        self._rebuild([])
        self._pattern = None

    # ---- internals -----------------------------------------------------------------------------------------
    def _entry(self, token: str) -> _Loaded:
        if token in self._loaded:
            return self._loaded[token]
        for name, entry in self._loaded.items():
            if name.lower() == token.lower():
                return entry
        shown = ", ".join(self._loaded) or "none"
        raise SdtuneError(f"embedding token {token!r} is not loaded (loaded: {shown}); check its spelling")

    def _table(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def _cast(self, rows: torch.Tensor) -> torch.Tensor:
        weight = self._table().weight
        return rows.to(device=weight.device, dtype=weight.dtype)

    def _current_rows(self, token: str) -> torch.Tensor:
        return self._table().weight.detach()[self.ids(token)].clone()

    def _check_free(self, names: list[str], emb: Embedding) -> None:
        fix = f"load it under another name: {emb.source}:NEWTOKEN"
        if emb.token in self._loaded or emb.token.lower() in {t.lower() for t in self._loaded}:
            raise SdtuneError(f"{emb.source}: token {emb.token!r} is already loaded (from "
                              f"{self._entry(emb.token).source}); {fix}")
        vocab = self.tokenizer.get_vocab()
        added = {t.lower() for t in self.tokenizer.get_added_vocab()}
        for name in names:
            # the CLIP tokenizer lowercases prompts, so a token differing only in case would collide too
            if name in vocab or name.lower() in vocab or name.lower() in added:
                what = "token" if name == emb.token else f"sub-token {name!r} of the {len(names)}-vector token"
                raise SdtuneError(f"{emb.source}: {what} {emb.token!r} is already in the tokenizer's vocabulary; "
                                  f"{fix}")

    def _take_pristine(self) -> None:
        self._pristine_backend = self.tokenizer._tokenizer
        self._base_rows = self._table().weight.shape[0]
        self._base_config_vocab = getattr(self.text_encoder.config, "vocab_size", None)
        self._install_backend(copy.deepcopy(self._pristine_backend))

    def _install_backend(self, backend) -> None:
        self.tokenizer._tokenizer = backend
        # CLIPTokenizer patches its backend's decode (drops "</w>"); a copy loses the patch, so re-apply it
        if backend is not self._pristine_backend and "decode" in vars(self._pristine_backend):
            rewrap = getattr(self.tokenizer, "_wrap_decode_method_backend_tokenizer", None)
            if rewrap is not None:
                rewrap()

    def _add_names(self, names: list[str], first_id: int) -> None:
        for offset, name in enumerate(names):
            self.tokenizer.add_tokens(name)
            got = self.tokenizer.convert_tokens_to_ids(name)
            if got != first_id + offset:
                raise SdtuneError(f"token {name!r} got id {got}, expected {first_id + offset}; the tokenizer "
                                  f"was changed outside sdtune")

    def _set_rows(self, weight: torch.Tensor) -> None:
        table = self._table()
        table.weight = nn.Parameter(weight, requires_grad=table.weight.requires_grad)
        table.num_embeddings = weight.shape[0]
        if self._base_config_vocab is not None:
            self.text_encoder.config.vocab_size = weight.shape[0]

    def _rebuild(self, rows_in_order: list[torch.Tensor]) -> None:
        """Tokenizer and table holding exactly the loaded tokens (in load order) with ``rows_in_order``."""
        if self._pristine_backend is None:
            return
        base = self._table().weight.detach()[: self._base_rows]
        if not self._loaded:
            self._set_rows(base.clone())
            if self._base_config_vocab is not None:
                self.text_encoder.config.vocab_size = self._base_config_vocab
            self._install_backend(self._pristine_backend)
            self._pristine_backend = None
            return
        self._install_backend(copy.deepcopy(self._pristine_backend))
        next_id = self._base_rows
        for entry in self._loaded.values():
            self._add_names(entry.names, first_id=next_id)
            next_id += len(entry.names)
        self._set_rows(torch.cat([base, *rows_in_order]))


def _matcher(loaded: dict[str, _Loaded], multi: dict[str, list[str]]):
    """A regex finding every loaded name leftmost-longest, as the tokenizer's added-token matcher does (so a
    typed-out ``tok_1`` is never split), case-insensitively (CLIP lowercases prompts); a multi-vector token
    already followed by its sub-tokens matches as a whole, which keeps ``expand`` idempotent."""
    alternatives = []
    for token, entry in loaded.items():
        for name in entry.names:
            alternatives.append((len(name), re.escape(name)))
        if token in multi:
            spelled = r"\s+".join(re.escape(n) for n in multi[token])
            alternatives.append((len(" ".join(multi[token])), spelled))
    alternatives.sort(key=lambda a: -a[0])
    pattern = re.compile("|".join(p for _, p in alternatives), re.IGNORECASE)
    spelled_by_form = {}
    for names in multi.values():
        spelled = " ".join(names)
        spelled_by_form[names[0].lower()] = spelled_by_form[spelled.lower()] = spelled
    return pattern, spelled_by_form


# ---- A1111-style embedding folders -------------------------------------------------------------------------
def scan_dir(folder: str | Path) -> dict[str, Path]:
    """Embedding files under ``folder`` (recursively) by file stem, the name A1111 prompts use."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SdtuneError(f"{folder}: --embedding-dir is not a folder; check the path")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in EMBEDDING_SUFFIXES and not path.name.startswith("."):
            if path.stem in found:  # one clash must not hide the rest of the folder
                note(f"{path}: same name as {found[path.stem]}, which is the one used; rename one of them")
                continue
            found[path.stem] = path
    return found


def find_in_dir(folder: str | Path, name: str) -> Path | None:
    """The embedding file named ``name`` (its stem; exact, else case-insensitive) under ``folder``, or None."""
    files = scan_dir(folder)
    if name in files:
        return files[name]
    matches = [p for stem, p in files.items() if stem.lower() == name.lower()]
    if len(matches) > 1:
        raise SdtuneError(f"{folder}: {name!r} matches {', '.join(map(str, matches))}; rename so names differ "
                          f"by more than case")
    return matches[0] if matches else None


def find_in_prompt(folder: str | Path, prompt: str) -> dict[str, Path]:
    """The embedding files under ``folder`` whose names appear as words in ``prompt`` (case-insensitive);
    load each with ``load_embedding(path, token=name)``, since A1111 prompts use the file name."""
    found = {}
    for name, path in scan_dir(folder).items():
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", prompt, re.IGNORECASE):
            found[name] = path
    return found
