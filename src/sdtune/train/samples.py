"""The prompts of a run's sample grids and report, read as kohya sd-scripts reads its --sample_prompts.

A prompt may carry kohya's options after its text: ``a castle --n blurry --w 768 --h 512 --d 42 --l 6 --s 30 --ss
euler_a`` (negative prompt, width, height, seed, guidance, steps, sampler); an option it lacks takes the run's
setting. An entry of ``--sample-prompts`` naming a prompt file stands for its prompts, as kohya's prompt files are: a
``.txt`` file one per line (empty lines and ``#`` comments skipped); a ``.toml`` file a ``[prompt]`` table of
defaults and its ``[[prompt.subset]]`` entries; a ``.json`` file a list of entries (or of lines as a ``.txt`` file
has them). An entry's keys are kohya's: prompt, negative_prompt, width, height, seed, scale, sample_steps,
sample_sampler.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..safeio import SdtuneError
from ..samplers import MAX_SIDE, check_scheduler

# kohya's sampler names sdtune reads under its own (its others, ddim, euler, euler_a, heun, lms, pndm, are sdtune's)
KOHYA_SAMPLERS = {"k_euler": "euler", "k_euler_a": "euler_a", "k_lms": "lms", "dpmsolver++": "dpmpp_2m"}
OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "guidance", "s": "steps", "ss": "sampler"}
# a .toml/.json prompt file's keys, as the options they are on a prompt line
FILE_KEYS = {"negative_prompt": "n", "width": "w", "height": "h", "seed": "d", "scale": "l", "sample_steps": "s",
             "sample_sampler": "ss"}


@dataclass(frozen=True)
class SamplePrompt:
    text: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    sampler: str | None = None


def sampler(name: str) -> str:
    """sdtune's sampler key for a name in sdtune's, A1111's or kohya's spelling; one line for an unknown one."""
    return check_scheduler(KOHYA_SAMPLERS.get(name.lower(), name))


def parse(prompt: str) -> SamplePrompt:
    """A prompt with kohya's options split off its text; one line naming an option sdtune does not read or a value
    it cannot use."""
    text, *options = re.split(r"\s--(?=[A-Za-z])", prompt.strip())
    values: dict = {}
    for option in options:
        key, _, value = option.partition(" ")
        field = OPTIONS.get(key.lower())
        if field is None:
            raise SdtuneError(f"sample prompt {prompt!r}: --{key} is not an option sdtune reads; use kohya's --n "
                              f"(negative prompt), --w, --h, --d (seed), --l (guidance), --s (steps), --ss (sampler)")
        value = value.strip()
        try:
            if field in ("width", "height", "seed", "steps"):
                values[field] = int(value)
            elif field == "guidance":
                values[field] = float(value)
            elif field == "sampler":
                values[field] = sampler(value)
            else:
                values[field] = value
        except ValueError:
            raise SdtuneError(f"sample prompt {prompt!r}: --{key} {value!r} is not a number") from None
        if wrong := _out_of_range(field, values[field]):  # said now, not by the sampler after the run's steps
            raise SdtuneError(f"sample prompt {prompt!r}: --{key} {value}: {wrong}")
    return SamplePrompt(text.strip(), **values)


def _out_of_range(field: str, value) -> str:
    """Why an option's value cannot draw (as generation would refuse it), or ""."""
    if field in ("width", "height") and (value <= 0 or value % 8):
        return f"the {field} must be a positive multiple of 8, e.g. {max(8, round(value / 8) * 8)}"
    if field in ("width", "height") and value > MAX_SIDE:  # (generation's cap, ``check_size``)
        return f"the {field} must be at most {MAX_SIDE} pixels"
    if field == "steps" and value < 1:
        return "the sampling steps must be at least 1"
    if field == "seed" and value < -1:
        return "the seed must be -1 (random) or more"
    if field == "guidance" and not math.isfinite(value):
        return "the guidance must be a finite number, e.g. 7.5"
    return ""


def expand(entries: list[str]) -> list[str]:
    """``--sample-prompts`` with each ``.txt`` file named among them replaced by its prompts."""
    prompts = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.suffix.lower() == ".txt" and path.is_file():
            prompts += _lines(path.read_text(encoding="utf-8-sig").splitlines())
        elif path.suffix.lower() in (".toml", ".json") and path.is_file():
            prompts += [entry if isinstance(entry, str) else _line(entry, path) for entry in _entries(path)]
        elif path.suffix.lower() in (".txt", ".toml", ".json") and " " not in entry.strip():
            raise SdtuneError(f"{entry}: no such prompt file; check --sample-prompts")
        else:
            prompts.append(entry)
    return prompts


def check(entries: list[str]) -> None:
    """Every prompt of ``--sample-prompts`` parses (before the run starts)."""
    for prompt in expand(entries):
        parse(prompt)


def _lines(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _entries(path: Path) -> list:
    """A .toml or .json prompt file's entries: dicts, or (a .json list's) prompt lines."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix.lower() == ".toml":
            table = tomllib.loads(text).get("prompt")
            if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
                raise SdtuneError(f"{path}: no [[prompt.subset]] entries; write each prompt as kohya's prompt files "
                                  f"do: [prompt] defaults, then [[prompt.subset]] prompt = \"...\"")
            defaults = {k: v for k, v in table.items() if k != "subset"}
            return [{**defaults, **entry} for entry in table["subset"]]
        entries = json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise SdtuneError(f"{path}: not valid {path.suffix[1:].upper()} ({e}); fix the file") from None
    if not isinstance(entries, list) or not all(isinstance(e, (str, dict)) for e in entries):
        raise SdtuneError(f"{path}: a .json prompt file is a list of entries ({{\"prompt\": \"...\", \"seed\": 1}}) "
                          f"or of prompt lines; write it so")
    return [e if isinstance(e, dict) else e.strip() for e in entries if isinstance(e, dict) or _lines([e])]


def _line(entry: dict, path: Path) -> str:
    """A prompt file's entry as the prompt line with kohya's options that says the same."""
    unknown = sorted(set(entry) - {"prompt", *FILE_KEYS})
    if unknown or not isinstance(entry.get("prompt"), str):
        what = f"{', '.join(unknown)} is not a key sdtune reads" if unknown else "an entry without a prompt"
        raise SdtuneError(f"{path}: {what}; an entry has prompt and any of {', '.join(FILE_KEYS)}")
    options = [f"--{FILE_KEYS[key]} {value}" for key, value in entry.items()
               if key in FILE_KEYS and value not in ("", None)]
    return " ".join([entry["prompt"].strip(), *options])
