"""A1111's prompt syntax, as generation reads it: emphasis, BREAK and prompts longer than CLIP's 75 tokens.

- ``(text)`` multiplies the weight of its tokens by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)`` sets the
  factor; brackets nest (``((text))`` is 1.21). ``\\(`` ``\\)`` ``\\[`` ``\\]`` are the characters themselves; a
  closer without its opener is plain text, an opener never closed weights the rest of the prompt (as A1111).
- ``BREAK`` (capitals, a word of its own) ends the current chunk, inside brackets too (A1111 reads one inside
  ``( )`` or ``[ ]`` as the word "break" at a negative weight, which it cannot mean; sdtune breaks there).
- The tokens are cut into chunks of 75, each encoded as CLIP's 77 (start, 75, end or padding) and the chunks'
  features put one after the other, as A1111 does instead of cutting the prompt at 75 tokens; like A1111, a
  chunk ends at a comma up to 20 tokens back rather than in the middle of the words after it, and a
  multi-vector embedding is never split between two chunks. A batch's prompts
  get the same number of chunks (the shorter ones end in empty chunks), so that the prompt and the negative
  prompt line up.

Prompt editing and alternation (``schedule``) are read first, as A1111 reads them, giving the text of each
sampling step; each text is then read as above:

- ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to`` after
  ``when``, ``[from::when]`` drops ``from`` after it. A ``when`` with a decimal point is a fraction of the steps
  (``0.5``), one without is a step number (``10``).
- ``[a|b|c]`` takes ``a``, ``b``, ``c`` in turn, one per step.
- Steps are counted as A1111 counts them: the text scheduled "up to step N" is used by sampling steps 0 to N
  (A1111's denoiser starts at 0, its schedule at 1), so ``[a|b]`` runs a, a, b, a, b, …
- A bracket that fits neither form (``[word]``, ``[a:b]``) is text, left to the emphasis reading.

The weights are applied to the encoder's features (``weigh``): each token's features times its weight, A1111's
"No norm" emphasis. Its default, "Original", then rescales each chunk to its former mean; that mean is a
difference of near-equal sums wherever features come out of a layer norm (about 0.002 of their typical size on
the built-in model), so the rescale there swings by tens of percent for no reason in the prompt. A prompt without
emphasis, BREAK or more than 75 tokens is tokenized exactly as the tokenizer alone does it, and its features
are left untouched.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from .console import note
from .safeio import SdtuneError

CHUNK = 75  # tokens per chunk; with the start and end tokens, CLIP's 77 positions
EMPHASIS = 1.1
BREAK = "BREAK"
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: how far back a full chunk looks for a comma

_PIECES = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|]|\bBREAK\b|[^\\()\[\]:B]+|.",
                     re.DOTALL)


def parse(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs, in order; ``(BREAK, 0.0)`` marks a chunk break."""
    runs: list[list] = []
    open_round: list[int] = []  # where each open bracket's runs start
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _PIECES.finditer(prompt):
        piece, number = m.group(0), m.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            runs.append([piece[1], 1.0])
        elif piece == "\\":  # a backslash escaping nothing is dropped, as A1111's parser drops it
            continue
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif number is not None and open_round:
            scale(open_round.pop(), float(number))
        elif piece == ")" and open_round:
            scale(open_round.pop(), EMPHASIS)
        elif piece == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS)
        elif piece == BREAK:
            runs.append([BREAK, 0.0])
        else:
            runs.append([piece, 1.0])
    for start in open_round:
        scale(start, EMPHASIS)
    for start in open_square:
        scale(start, 1 / EMPHASIS)
    merged: list[tuple[str, float]] = []  # neighbours of one weight as one run: the tokenizer sees whole words
    for text, weight in runs:
        if merged and weight == merged[-1][1] and text != BREAK and merged[-1][0] != BREAK:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


def _units(tokenizer, ids: list[int]) -> list[list[int]]:
    """``ids`` in the groups a chunk must not split: each token alone, but a multi-vector embedding's tokens
    (``<tok> <tok>_1 <tok>_2``, as ``EmbeddingSet.expand`` spells them) together, as A1111 keeps an embedding
    whole in the next chunk when it does not fit in this one."""
    added = tokenizer.get_added_vocab()
    names = tokenizer.convert_ids_to_tokens(ids) if added else []
    units, i = [], 0
    while i < len(ids):
        n = 1
        if added and names[i] in added:
            while i + n < len(ids) and names[i + n] == f"{names[i]}_{n}":
                n += 1
        units.append(ids[i:i + n])
        i += n
    return units


def _chunks(tokenizer, runs: list[tuple[str, float]]) -> list[tuple[list[int], list[float]]]:
    """(token ids, weights) per chunk of 75 tokens, without the start and end tokens, cut as A1111's
    ``tokenize_line`` cuts: a full chunk whose last comma is at most ``COMMA_BACKTRACK`` tokens back ends at that
    comma (the words after it start the next chunk), an embedding that does not fit starts the next chunk, and a
    BREAK at the end adds no empty chunk."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[tuple[list[int], list[float]]] = [([], [])]
    last_comma = -1  # where in the current chunk its last comma is
    for text, weight in runs:
        if text == BREAK:
            chunks.append(([], []))
            last_comma = -1
            continue
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        for unit in _units(tokenizer, ids):
            tokens, ws = chunks[-1]
            if unit == [comma]:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                chunks[-1] = (tokens[:cut], ws[:cut])
                chunks.append((tokens[cut:], ws[cut:]))
                last_comma = -1
            if len(chunks[-1][0]) + len(unit) > CHUNK and chunks[-1][0]:
                chunks.append(([], []))
                last_comma = -1
            chunks[-1][0].extend(unit)
            chunks[-1][1].extend([weight] * len(unit))
    if len(chunks) > 1 and not chunks[-1][0]:
        chunks.pop()
    return chunks


def chunk_count(tokenizers, prompt: str) -> int:
    """How many chunks of 75 tokens ``prompt`` takes (the most any of the tokenizers needs)."""
    runs = parse(prompt)
    return max(len(_chunks(tok, runs)) for tok in tokenizers)


def tokenize(tokenizers, prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per tokenizer: token ids [prompts, chunks, 77] and their weights (the same shape), every prompt with the
    same number of chunks."""
    parsed = [parse(p) for p in prompts]
    per_tok = [[_chunks(tok, runs) for runs in parsed] for tok in tokenizers]
    count = max(len(chunks) for table in per_tok for chunks in table)
    ids, weights = [], []
    for tok, table in zip(tokenizers, per_tok):
        length = tok.model_max_length
        start, end, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        rows_i, rows_w = [], []
        for chunks in table:
            chunks = chunks + [([], [])] * (count - len(chunks))
            for tokens, ws in chunks:
                fill = length - 2 - len(tokens)
                rows_i.append([start, *tokens, end] + [pad] * fill)
                rows_w.append([1.0, *ws, 1.0] + [1.0] * fill)
        ids.append(torch.tensor(rows_i).reshape(len(prompts), count, length))
        weights.append(torch.tensor(rows_w).reshape(len(prompts), count, length))
    return ids, weights


def weigh(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Emphasis on one encoder's features [rows, 77, width] with weights [rows, 77]: each token's features times
    its weight."""
    return features * weights.to(features)[..., None]


# --- prompt editing and alternation ----------------------------------------------------------------------

class _Edit(NamedTuple):
    """``[before:after:when]``: ``before`` up to step ``when``, then ``after`` (each a parsed text)."""
    before: list
    after: list
    when: str  # as written: a decimal point makes it a fraction of the steps


class _Turns(NamedTuple):
    """``[a|b|…]``: one option per step, in turn."""
    options: list


_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")  # lark's SIGNED_NUMBER, as A1111's grammar


# Deeper brackets than this are refused: A1111 reads none so deep either, and each level is a recursion here.
MAX_NESTING = 100


def _closings(text: str) -> dict[int, int]:
    """Where each ``[`` (escapes skipped) that is closed has its ``]``, found in one pass (one never closed is text)."""
    opened, closing, i = [], {}, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            opened.append(i)
        elif c == "]" and opened:
            closing[opened.pop()] = i
        i += 1
    depth = deepest = 0
    for i in sorted([*closing, *closing.values()]):
        depth += 1 if i in closing else -1
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise SdtuneError(f"the prompt nests [ ] {deepest} deep; write at most {MAX_NESTING} levels")
    return closing


def _split_top(text: str, lo: int, hi: int, sep: str) -> list[tuple[int, int]]:
    """The spans of ``text[lo:hi]`` between each ``sep`` outside brackets of either kind (a colon inside
    ``(word:1.2)`` stays)."""
    parts, depth, last, i = [], 0, lo, lo
    while i < hi:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif c == sep and depth == 0:
            parts.append((last, i))
            last = i + 1
        i += 1
    return parts + [(last, hi)]


def _edits(text: str, lo: int, hi: int, closing: dict[int, int]) -> list:
    """``text[lo:hi]`` as a list of plain strings, ``_Edit`` and ``_Turns``."""
    out: list = []
    i = lo
    while i < hi:
        c = text[i]
        end = closing.get(i, hi) if c == "[" else hi
        if end >= hi:  # not an opener, or one closed only beyond this part
            out.append(text[i:min(i + 2, hi)] if c == "\\" else c)
            i += 2 if c == "\\" else 1
            continue
        turns, parts = _split_top(text, i + 1, end, "|"), _split_top(text, i + 1, end, ":")
        when = text[parts[-1][0]:parts[-1][1]]
        if len(turns) > 1 and len(parts) == 1:
            out.append(_Turns([_edits(text, a, b, closing) for a, b in turns]))
        elif len(parts) in (2, 3) and _NUMBER.fullmatch(when) and len(turns) == 1:
            before = _edits(text, *parts[0], closing) if len(parts) == 3 else []
            out.append(_Edit(before, _edits(text, *parts[-2], closing), when.strip()))
        else:  # emphasis, or text: the brackets stay for ``parse``, what is inside may still hold edits
            out += ["[", *_edits(text, i + 1, end, closing), "]"]
        i = end + 1
    return out


def _turns_read(tree: list) -> int:
    """How many ``|`` the tree's alternations read as separators."""
    count = 0
    for node in tree:
        if isinstance(node, _Edit):
            count += _turns_read(node.before) + _turns_read(node.after)
        elif isinstance(node, _Turns):
            count += len(node.options) - 1 + sum(_turns_read(option) for option in node.options)
    return count


def _a1111_rejects(prompt: str, tree: list) -> bool:
    """Whether A1111's prompt-editing grammar fails on the prompt, which then gets no editing in A1111 (its
    emphasis reading still applies): a ``|`` that separates no ``[a|b]`` alternation, or a ``\\`` that escapes
    nothing at the end."""
    escaped = re.sub(r"\\.", "", prompt, flags=re.S)  # escape pairs out, so what is left is unescaped
    return escaped.endswith("\\") or escaped.count("|") != _turns_read(tree)


def _when(when: str, steps: int) -> int:
    """The step an edit switches after, as A1111 reckons it: a fraction of the steps when written with a point."""
    value = float(when) * steps if "." in when else float(when)
    return min(steps, int(value))


def _switches(tree: list, steps: int) -> set[int]:
    found: set[int] = set()
    for node in tree:
        if isinstance(node, _Edit):
            when = _when(node.when, steps)
            found |= ({when} if when >= 1 else set()) | _switches(node.before, steps) | _switches(node.after, steps)
        elif isinstance(node, _Turns):
            found |= set(range(1, steps + 1))
            for option in node.options:
                found |= _switches(option, steps)
    return found


def _text_at(tree: list, step: int, steps: int) -> str:
    out = []
    for node in tree:
        if isinstance(node, _Edit):
            out.append(_text_at(node.before if step <= _when(node.when, steps) else node.after, step, steps))
        elif isinstance(node, _Turns):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(node)
    return "".join(out)


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt editing and alternation: (last schedule step, text) pairs in order, the last ending at
    ``steps``; a prompt without them is one pair holding it unchanged. ``text_at`` picks a sampling step's."""
    if "[" not in prompt:
        return [(steps, prompt)]
    tree = _edits(prompt, 0, len(prompt), _closings(prompt))
    if _a1111_rejects(prompt, tree):
        if any(isinstance(node, (_Edit, _Turns)) for node in tree):  # what A1111 would not edit
            note("prompt: a '|' outside an [a|b] alternation (or a lone '\\' at its end) makes A1111 read no prompt "
                 "editing in it, so neither does sdtune; write \\| for the character")
        return [(steps, prompt)]
    out: list[tuple[int, str]] = []
    for step in sorted(_switches(tree, steps) | {steps}):
        text = _text_at(tree, step, steps)
        if out and out[-1][1] == text:
            out[-1] = (step, text)
        else:
            out.append((step, text))
    return out


def text_at(plan: list[tuple[int, str]], step: int) -> str:
    """The text sampling step ``step`` (from 0) reads: the first whose schedule step is not before it (A1111's
    ``reconstruct_cond_batch``)."""
    return next((text for end, text in plan if step <= end), plan[-1][1])
