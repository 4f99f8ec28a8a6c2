"""Caption processing as kohya's sd-scripts does it: shuffling, kept tokens, dropouts, separators, wildcards, the
token warm-up, prefix and suffix; and the steady caption (less its random parts) that samples and reports use;
the suffixes of caption files."""

from __future__ import annotations

import math
import random
import re

# the caption file beside an image: NAME.txt, else NAME.caption (kohya's two)
CAPTION_SUFFIXES = (".txt", ".caption")


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")  # {a|b|c}: one of the options (kohya's enable_wildcard)


def pick_wildcards(text: str, rng: random.Random | None) -> str:
    """One of the caption's lines (--wildcards: each line an alternative) and one option of each ``{a|b|c}`` in
    it, drawn from ``rng``; with ``rng`` None the first of each (the steady caption samples read)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [""]
    line = lines[0] if rng is None or len(lines) == 1 else rng.choice(lines)

    def option(match: re.Match) -> str:
        options = match.group(1).split("|")
        return options[0] if rng is None else rng.choice(options)
    return WILDCARD.sub(option, line)


def has_wildcards(text: str) -> bool:
    return "\n" in text or WILDCARD.search(text) is not None


def process_caption(text: str, rng: random.Random, shuffle: bool = False, keep_tokens: int = 0,
                    dropout: float = 0.0, tag_dropout: float = 0.0, separator: str = "", group: str = "",
                    prefix: str = "", suffix: str = "", wildcards: bool = False,
                    warm: tuple[int, int, int] | None = None) -> str:
    """kohya's caption options: drop the whole caption with probability ``dropout``; shuffle the
    comma-separated tags, the first ``keep_tokens`` staying in front; then drop each of the others with
    probability ``tag_dropout``. In a caption holding ``separator`` (kohya's keep_tokens_separator) the tags
    before it stay in front and those after its last one at the end, instead of ``keep_tokens``; tags joined
    by ``group`` (kohya's secondary_separator) move and drop as one; ``prefix`` and ``suffix`` are put around
    what is left, joined by a space as kohya joins them. ``wildcards``: one line of the text and one option of each
    {a|b|c} first (``pick_wildcards``). ``warm``: (step, least, steps) of kohya's token warm-up: before ``steps``,
    only the first ``least`` + step x (n − ``least``) / ``steps`` of the n tags that may move are kept (before
    the shuffle)."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if wildcards:
        text = pick_wildcards(text, rng)
    held = bool(separator) and separator in text
    warming = warm is not None and warm[0] < warm[2]
    if shuffle or tag_dropout > 0 or held or warming:
        if held:
            parts = text.split(separator)
            head, end = _tags(parts[0]), _tags(parts[-1]) if len(parts) > 2 else []
            tail = _tags(",".join(parts[1:-1] if len(parts) > 2 else parts[1:]))
        else:
            tags = _tags(text)
            head, tail, end = tags[:keep_tokens], tags[keep_tokens:], []
        if warming:  # (kohya's count, floored)
            step, least, steps = warm
            tail = tail[:max(0, math.floor(step * (len(tail) - least) / steps) + least)]
        if shuffle:
            rng.shuffle(tail)
        if tag_dropout > 0:
            tail = [t for t in tail if rng.random() >= tag_dropout]
        text = ", ".join(head + tail + end)
    if group:
        text = ", ".join(_tags(text.replace(group, ",")))
    if prefix or suffix:
        text = " ".join(t for t in (prefix, text, suffix) if t)
    return text


# ``process_caption``'s options -> the settings that give them
CAPTION_SETTINGS = {"shuffle": "shuffle_captions", "keep_tokens": "keep_tokens", "dropout": "caption_dropout",
                    "tag_dropout": "caption_tag_dropout", "separator": "keep_tokens_separator",
                    "group": "secondary_separator", "prefix": "caption_prefix", "suffix": "caption_suffix",
                    "wildcards": "wildcards"}


def caption_options(settings, own: dict | None = None) -> dict:
    """The ``process_caption`` options of a run's settings, ``own`` (an example's ``options``) over them."""
    own = own or {}
    return {option: own.get(name, getattr(settings, name)) for option, name in CAPTION_SETTINGS.items()}


def steady_caption(text: str, settings, own: dict | None = None) -> str:
    """A caption as training reads it less its random parts (dropouts, shuffling): separators out, prefix and
    suffix on (``own``: an example's own caption settings). What the samples, the report and the validation loss
    use."""
    opts = caption_options(settings, own) | dict(shuffle=False, dropout=0.0, tag_dropout=0.0, wildcards=False)
    return process_caption(pick_wildcards(text, None) if settings.wildcards else text, random.Random(0), **opts)
