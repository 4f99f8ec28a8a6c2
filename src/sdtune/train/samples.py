"""The prompts of a run's sample grids and report, read as kohya sd-scripts reads its --sample_prompts.

A prompt may carry kohya's options after its text: ``a castle --n blurry --w 768 --h 512 --d 42 --l 6 --s 30 --ss
euler_a`` (negative prompt, width, height, seed, guidance, steps, sampler); an option it lacks takes the run's
setting. An entry of ``--sample-prompts`` naming a ``.txt`` file stands for the file's prompts, one per line (empty
lines and ``#`` comments skipped), as kohya's prompt files are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..generate import check_scheduler
from ..safeio import SdtuneError

# kohya's sampler names sdtune reads under its own (its others, ddim, euler, euler_a, heun, lms, pndm, are sdtune's)
KOHYA_SAMPLERS = {"k_euler": "euler", "k_euler_a": "euler_a", "k_lms": "lms", "dpmsolver++": "dpmpp_2m"}
OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "guidance", "s": "steps", "ss": "sampler"}


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
    return SamplePrompt(text.strip(), **values)


def expand(entries: list[str]) -> list[str]:
    """``--sample-prompts`` with each ``.txt`` file named among them replaced by its prompts."""
    prompts = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.suffix.lower() == ".txt" and path.is_file():
            lines = path.read_text(encoding="utf-8-sig").splitlines()
            prompts += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        elif path.suffix.lower() in (".toml", ".json") and path.is_file():
            raise SdtuneError(f"{path}: sdtune reads kohya's prompt files as .txt, one prompt per line with its "
                              f"options (--n ... --w ...); write the prompts so")
        elif path.suffix.lower() in (".txt", ".toml", ".json") and " " not in entry.strip():
            raise SdtuneError(f"{entry}: no such prompt file; check --sample-prompts")
        else:
            prompts.append(entry)
    return prompts


def check(entries: list[str]) -> None:
    """Every prompt of ``--sample-prompts`` parses (before the run starts)."""
    for prompt in expand(entries):
        parse(prompt)
