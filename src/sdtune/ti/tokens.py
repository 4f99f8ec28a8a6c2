"""Register textual-inversion tokens in a model's CLIP tokenizers + text encoders, and take them out again exactly.

Naming follows diffusers' ``load_textual_inversion``: an ``n``-vector embedding ``tok`` becomes the added
tokens ``tok tok_1 ... tok_{n-1}`` with consecutive ids after the vocabulary, and its rows are appended to
the token-embedding table in that order; prompts mention ``tok`` and ``expand`` spells out the sub-tokens.
A model with two text encoders (SDXL) gets the same names in both tokenizers, each encoder its own rows
(``clip_l`` into text_encoder, ``clip_g`` into text_encoder_2), so one expanded prompt serves both.

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
from transformers import AddedToken

from ..console import note
from ..safeio import SdtuneError
from .formats import MAX_VECTORS, Embedding, check_token, check_vectors, describe_widths, made_for

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".pti")


def sub_tokens(token: str, num_vectors: int) -> list[str]:
    """The added tokens of an ``num_vectors``-vector embedding, as diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


@dataclass
class _Loaded:
    names: list[str]  # token, token_1, ...
    source: str
    format: str


class _Table:
    """One tokenizer + text encoder pair, and what puts it back exactly: its pristine tokenizer backend (set
    aside while anything is loaded), its row count and its config's vocab_size before the first add."""

    def __init__(self, key: str, tokenizer, text_encoder):
        self.key = key  # the embedding key its rows come under: "" (one encoder), "clip_l", "clip_g"
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.pristine_backend = None
        self.base_rows = 0
        self.base_config_vocab = None

    @property
    def weight(self) -> nn.Parameter:
        return self.text_encoder.get_input_embeddings().weight

    def ids(self, names: list[str]) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(n) for n in names]

    def rows(self, names: list[str]) -> torch.Tensor:
        return self.weight.detach()[self.ids(names)].clone()

    def append(self, names: list[str], rows: torch.Tensor) -> None:
        if self.pristine_backend is None:
            self.take_pristine()
        self.add_names(names, first_id=len(self.tokenizer))
        weight = self.weight.detach()
        self.set_rows(torch.cat([weight, rows.to(device=weight.device, dtype=weight.dtype)]))

    def take_pristine(self) -> None:
        self.pristine_backend = self.tokenizer._tokenizer
        self.base_rows = self.weight.shape[0]
        self.base_config_vocab = getattr(self.text_encoder.config, "vocab_size", None)
        self.install_backend(copy.deepcopy(self.pristine_backend))

    def install_backend(self, backend) -> None:
        self.tokenizer._tokenizer = backend
        # CLIPTokenizer patches its backend's decode (drops "</w>"); a copy loses the patch, so re-apply it
        if backend is not self.pristine_backend and "decode" in vars(self.pristine_backend):
            rewrap = getattr(self.tokenizer, "_wrap_decode_method_backend_tokenizer", None)
            if rewrap is not None:
                rewrap()

    def add_names(self, names: list[str], first_id: int) -> None:
        for offset, name in enumerate(names):
            # a word of its own, as A1111 matches an embedding (its name's tokens, never inside a longer word:
            # "filename" does not use "filenames"); diffusers' default would match inside words too
            self.tokenizer.add_tokens(AddedToken(name, single_word=True))
            got = self.tokenizer.convert_tokens_to_ids(name)
            if got != first_id + offset:
                raise SdtuneError(f"token {name!r} got id {got}, expected {first_id + offset}; the tokenizer "
                                  f"was changed outside sdtune")

    def set_rows(self, weight: torch.Tensor) -> None:
        table = self.text_encoder.get_input_embeddings()
        table.weight = nn.Parameter(weight, requires_grad=table.weight.requires_grad)
        table.num_embeddings = weight.shape[0]
        if self.base_config_vocab is not None:
            self.text_encoder.config.vocab_size = weight.shape[0]

    def rebuild(self, names_in_order: list[list[str]], rows_in_order: list[torch.Tensor]) -> None:
        """Tokenizer and table holding exactly these tokens (in load order) with these rows; none: pristine."""
        if self.pristine_backend is None:
            return
        base = self.weight.detach()[: self.base_rows]
        if not names_in_order:
            self.set_rows(base.clone())
            if self.base_config_vocab is not None:
                self.text_encoder.config.vocab_size = self.base_config_vocab
            self.install_backend(self.pristine_backend)
            self.pristine_backend = None
            return
        self.install_backend(copy.deepcopy(self.pristine_backend))
        next_id = self.base_rows
        for names in names_in_order:
            self.add_names(names, first_id=next_id)
            next_id += len(names)
        self.set_rows(torch.cat([base, *rows_in_order]))


class EmbeddingSet:
    """The embeddings loaded into one model: ``EmbeddingSet(tokenizer, text_encoder)`` for one pair, or
    ``EmbeddingSet.for_base(base)`` for every text encoder of its family (SDXL: both, each its own rows).

    Make one per model and add tokens only through it: unloading restores the state it saw before its first
    add. Prompts for a diffusers pipeline: encode ``expand(prompt)`` with each tokenizer yourself and pass
    ``prompt_embeds``; diffusers' own rewrite of multi-vector tokens (``maybe_convert_prompt``) would expand an
    expanded prompt again."""

    def __init__(self, tokenizer, text_encoder):
        self._tables = [_Table("", tokenizer, text_encoder)]
        self._loaded: dict[str, _Loaded] = {}  # by token, in load order
        self._pattern = None  # cached prompt matcher for expand()

    @classmethod
    def for_base(cls, base) -> EmbeddingSet:
        """One set over all of ``base``'s text encoders, each taking the rows under its ``embedding_key``."""
        encoders = base.text_encoders()
        made = cls(encoders[0][2], encoders[0][1])
        made._tables = [_Table(te.embedding_key, tokenizer, model) for te, model, tokenizer in encoders]
        return made

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tables[0].tokenizer

    @property
    def text_encoder(self):
        return self._tables[0].text_encoder

    @property
    def tokens(self) -> list[str]:
        return list(self._loaded)

    def __contains__(self, token: str) -> bool:
        return token in self._loaded

    def ids(self, token: str, key: str | None = None) -> list[int]:
        """Token ids of ``token`` and its sub-tokens, in vector order, in the first tokenizer or in the one
        whose encoder takes the rows under ``key`` ("clip_g": SDXL's tokenizer_2)."""
        return self._table(key).ids(self._entry(token).names)

    def source(self, token: str) -> str:
        """Where a loaded token came from (its file, or what made it), without copying its rows."""
        return self._entry(token).source

    def get(self, token: str) -> Embedding:
        """The current vectors of a loaded token (e.g. after training), as an ``Embedding`` ready to save."""
        entry = self._entry(token)
        parts = {t.key: t.rows(entry.names).to("cpu", torch.float32) for t in self._tables}
        return Embedding.from_parts(entry.names[0], parts, entry.source, entry.format)

    # ---- loading -------------------------------------------------------------------------------------------
    def add(self, emb: Embedding) -> list[str]:
        """Register ``emb``: add its token(s), append its rows to each text encoder; returns the added names."""
        self.check_fits(emb)
        check_token(emb.token, Path(emb.source))
        names = sub_tokens(emb.token, emb.num_vectors)
        self._check_intact()
        self._check_free(names, emb)
        parts = emb.parts
        try:
            for table in self._tables:
                table.append(names, parts[table.key])
        except BaseException:
            self._rebuild(check=False)  # back to the state before this add, in every table
            raise
        self._loaded[emb.token] = _Loaded(names, emb.source, emb.format)
        self._pattern = None
        return names

    def add_placeholder(self, token: str, init_token: str, num_vectors: int = 1) -> list[int]:
        """A new trainable token, each of its rows a copy of ``init_token``'s (one token); returns the new ids."""
        check_vectors("--num-vectors", num_vectors)
        if not token or any(c.isspace() for c in token):
            raise SdtuneError(f"--token {token!r}: must be one word without spaces, e.g. '<my-concept>'")
        parts = {}
        for table in self._tables:
            pieces = table.tokenizer.encode(init_token, add_special_tokens=False)
            if len(pieces) != 1:
                shown = " ".join(table.tokenizer.convert_ids_to_tokens(pieces))
                raise SdtuneError(
                    f"--init-token {init_token!r} is {len(pieces)} tokens ({shown or 'none'}), not one; choose a "
                    f"single common word close to the concept (e.g. 'dog', 'painting')")
            parts[table.key] = table.weight.detach()[pieces[0]].to("cpu", torch.float32).repeat(num_vectors, 1)
        self.add(Embedding.from_parts(token, parts, f"placeholder {token}", "diffusers"))
        return self.ids(token)

    # ---- prompts -------------------------------------------------------------------------------------------
    def expand(self, prompt: str) -> str:
        """Write each multi-vector token as its sub-tokens (every occurrence; idempotent). The names are the
        same in every tokenizer of the model, so the expanded prompt is what each of them encodes."""
        if self._loaded:
            self._check_intact()
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
        self._rebuild(keep=[t for t in self._loaded if self._loaded[t] is not entry])
        self._pattern = None

    def remove_all(self) -> None:
        """Unload everything: tokenizers and tables return exactly to their state before the first add."""
        self._rebuild(keep=[])
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

    def _table(self, key: str | None) -> _Table:
        if key is None:
            return self._tables[0]
        for table in self._tables:
            if table.key == key:
                return table
        raise SdtuneError(f"this model has no text encoder for embedding key {key!r} "
                          f"(it has: {', '.join(repr(t.key) for t in self._tables)})")

    def _check_intact(self) -> None:
        """The tokenizers and tables hold exactly what this set put there: another loader (diffusers'
        ``load_textual_inversion`` / ``unload_textual_inversion``) adding or cutting tokens would make a rebuild
        drop its tokens, or this set's ids name other words."""
        loaded = sum(len(e.names) for e in self._loaded.values())
        for table in self._tables:
            if table.pristine_backend is None:
                continue
            if len(table.tokenizer) != table.base_rows + loaded or table.weight.shape[0] != table.base_rows + loaded:
                raise SdtuneError(
                    f"the tokenizer or the text encoder's table was changed outside sdtune's embeddings (it has "
                    f"{len(table.tokenizer)} tokens, {table.weight.shape[0]} rows; sdtune loaded {loaded} on "
                    f"{table.base_rows}), e.g. by diffusers' load_textual_inversion or unload_textual_inversion; "
                    f"load and unload every embedding through one of the two")

    def _rebuild(self, keep: list[str] | None = None, check: bool = True) -> None:
        """Every table holding exactly the loaded tokens named in ``keep`` (default: all), in load order
        (``check``: first that nothing else changed them; off to undo a half-done add)."""
        if check:
            self._check_intact()
        keep = list(self._loaded) if keep is None else keep
        names = [self._loaded[t].names for t in keep]
        rows = {table.key: [table.rows(n) for n in names] for table in self._tables}  # read before any rebuild
        self._loaded = {t: self._loaded[t] for t in keep}
        for table in self._tables:
            table.rebuild(names, rows[table.key])

    def check_fits(self, emb: Embedding) -> None:
        """The embedding has rows, of the right width, for exactly this model's text encoders, and no more than a
        prompt chunk holds."""
        if emb.num_vectors > MAX_VECTORS:
            raise SdtuneError(f"{emb.source}: {emb.num_vectors} vectors; a prompt chunk holds {MAX_VECTORS} tokens and "
                              f"an embedding must fit in one (as in A1111); use an embedding of at most {MAX_VECTORS}")
        # the model is named by its widths, not its Base's family: a test may swap in a wider text encoder
        model = {table.key: table.weight.shape[1] for table in self._tables}
        if emb.widths != model:
            raise SdtuneError(
                f"{emb.source}: embedding made for {made_for(emb.widths)} ({describe_widths(emb.widths)}), but this "
                f"model is {made_for(model)} ({describe_widths(model)}); use an embedding made for this model")

    def _check_free(self, names: list[str], emb: Embedding) -> None:
        fix = f"load it under another name: {emb.source}:NEWTOKEN"
        if emb.token in self._loaded or emb.token.lower() in {t.lower() for t in self._loaded}:
            raise TokenTaken(f"{emb.source}: token {emb.token!r} is already loaded (from "
                             f"{self._entry(emb.token).source}); {fix}")
        for table in self._tables:
            rows, vocab_size = table.weight.shape[0], len(table.tokenizer)
            if rows != vocab_size:
                raise SdtuneError(
                    f"{emb.source}: the tokenizer has {vocab_size} tokens but the text encoder's table {rows} rows; "
                    f"load embeddings only through one EmbeddingSet on an unmodified model")
            vocab = table.tokenizer.get_vocab()
            added = {t.lower() for t in table.tokenizer.get_added_vocab()}
            for name in names:
                # the CLIP tokenizer lowercases prompts, so a token differing only in case would collide too
                if name in vocab or name.lower() in vocab or name.lower() in added:
                    what = "token" if name == emb.token else f"sub-token {name!r} of the {len(names)}-vector token"
                    raise TokenTaken(f"{emb.source}: {what} {emb.token!r} is already in the tokenizer's "
                                     f"vocabulary; {fix}")


class TokenTaken(SdtuneError):
    """An embedding whose word the model already has (loaded, or in the tokenizer's vocabulary): a name clash,
    which another name mends."""


def _matcher(loaded: dict[str, _Loaded], multi: dict[str, list[str]]):
    """A regex finding every loaded name as a whole word, leftmost-longest, as the tokenizer's added-token matcher
    does (so a typed-out ``tok_1`` is never split), case-insensitively (CLIP lowercases prompts); a multi-vector
    token already followed by its sub-tokens matches as a whole, which keeps ``expand`` idempotent."""
    alternatives = []
    for token, entry in loaded.items():
        for name in entry.names:
            alternatives.append((len(name), re.escape(name)))
        if token in multi:
            spelled = r"\s+".join(re.escape(n) for n in multi[token])
            alternatives.append((len(" ".join(multi[token])), spelled))
    alternatives.sort(key=lambda a: -a[0])
    # a whole word only, as the tokenizer matches a single_word token: "zqxy" or "<cat>s" hold no "zqx" / "<cat>"
    # (spelled out there, the sub-tokens would be found as words of their own: vectors the prompt never asked for)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(p for _, p in alternatives) + r")(?!\w)", re.IGNORECASE)
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
