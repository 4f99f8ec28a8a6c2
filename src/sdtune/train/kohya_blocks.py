"""kohya's block-wise LoRA arguments (``network_args`` of sd-scripts' ``networks.lora``: ``down_lr_weight``,
``mid_lr_weight``, ``up_lr_weight``, ``block_lr_zero_threshold``, ``block_dims``, ``block_alphas``,
``conv_block_dims``, ``conv_block_alphas``) as sdtune's ``--block-lr``, ``--block-ranks``, ``--block-alphas`` and
``--conv-rank``/``--conv-alpha``, whose vectors follow the lora-block-weight layout (``lora.blocks``).

sd-scripts counts the UNet's blocks as that layout does, less its BASE (the text encoders, which keep their own
rate and rank):

- SD 1.x/2.x: ``down_lr_weight`` and ``up_lr_weight`` are 12 numbers (IN00-IN11, OUT00-OUT11), ``mid_lr_weight``
  one (M00); ``block_dims`` are the 25 together.
- SDXL: 9 input and 9 output blocks (IN00-IN08, OUT00-OUT08) and the middle block in its 3 parts, which sdtune
  weighs as one (M00), so they must agree; ``block_dims`` are 23: the time embedding, those 21, and the out
  layers (the first and last hold no LoRA).

A down/up weight may be a preset (``sine``, ``cosine``, ``linear``, ``reverse_linear``, ``zeros``, with ``+X``
added to each); a short list is filled with 1, and a weight at or below ``block_lr_zero_threshold`` leaves its block
untrained, as in sd-scripts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..safeio import SdtuneError

LR_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIM_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
ARGS = (*LR_ARGS, "block_lr_zero_threshold", *DIM_ARGS)


@dataclass(frozen=True)
class Blocks:
    """How sd-scripts counts a family's UNet blocks."""
    side: int  # down (and up) blocks
    mid: int  # parts of the middle block
    ends: int  # block_dims' entries before the down blocks and after the up ones (SDXL's time embedding, out)

    @property
    def dims(self) -> int:
        return 2 * self.ends + 2 * self.side + self.mid


SD = Blocks(side=12, mid=1, ends=0)
XL = Blocks(side=9, mid=3, ends=1)
FAMILIES = {"sd1": SD, "sd2": SD, "sdxl": XL}


def translate(args: dict[str, str], family, sdxl_flag: bool, rank: float, alpha: float, where) -> dict:
    """sdtune's settings for the block arguments of ``args`` (network_args by name, as text): ``family`` the base
    model's where known, else guessed from the lists' lengths and sd-scripts' ``sdxl`` switch; ``rank`` and
    ``alpha``: network_dim and network_alpha, the text encoders' (the vectors' BASE)."""
    given = {k: args[k] for k in ARGS if k in args}
    if not given:
        return {}
    blocks = _blocks(given, family, sdxl_flag, where)
    out = {}
    if any(k in given for k in LR_ARGS):
        threshold = float(given.get("block_lr_zero_threshold", 0) or 0)
        weights = []
        for name, count in (("down_lr_weight", blocks.side), ("mid_lr_weight", blocks.mid),
                            ("up_lr_weight", blocks.side)):
            values = _weights(given, name, count, where)
            weights.append([0.0 if name in given and w <= threshold else w for w in values])
        down, mid, up = weights
        out["block_lr"] = _vector(1.0, down, _one_mid(mid, "mid_lr_weight", where), up)
    for name, setting, base in (("block_dims", "block_ranks", rank), ("block_alphas", "block_alphas", alpha)):
        if name in given:
            values = _numbers(given[name], name, where)
            if len(values) != blocks.dims:
                raise SdtuneError(f"{where}: network_args {name}: {len(values)} numbers; sd-scripts takes "
                                  f"{blocks.dims} for this model's blocks")
            inner = values[blocks.ends:len(values) - blocks.ends]
            down, mid, up = inner[:blocks.side], inner[blocks.side:blocks.side + blocks.mid], inner[-blocks.side:]
            out[setting] = _vector(base, down, _one_mid(mid, name, where), up)
    for name, setting in (("conv_block_dims", "conv_rank"), ("conv_block_alphas", "conv_alpha")):
        if name in given:  # sdtune's 3x3 convolutions take one rank and alpha
            values = set(_numbers(given[name], name, where))
            if len(values) != 1:
                raise SdtuneError(f"{where}: network_args {name}: sdtune trains the 3x3 convolutions at one "
                                  f"--{setting.replace('_', '-')}; give conv_dim and conv_alpha instead")
            value = values.pop()
            out[setting] = int(value) if setting == "conv_rank" else value
    return out


def _blocks(given: dict, family, sdxl_flag: bool, where) -> Blocks:
    if family is not None:
        found = FAMILIES.get(family.name)
        if found is None:
            raise SdtuneError(f"{where}: network_args {', '.join(given)}: sd-scripts' block lists are SD 1.x/2.x's "
                              f"and SDXL's, and this model is {family.title}; give --block-lr, --block-ranks in the "
                              f"lora-block-weight layout")
        return found
    lengths = {k: len(str(v).split(",")) for k, v in given.items() if k in DIM_ARGS or "," in str(v)}
    guess_xl = sdxl_flag or lengths.get("mid_lr_weight", 1) > 1 or XL.dims in lengths.values() \
        or lengths.get("down_lr_weight") == XL.side or lengths.get("up_lr_weight") == XL.side
    return XL if guess_xl else SD


def _numbers(text: str, name: str, where) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SdtuneError(f"{where}: network_args {name}={text}: not comma-separated numbers") from None


def _weights(given: dict, name: str, count: int, where) -> list[float]:
    """A down/mid/up weight list as sd-scripts reads it: a preset (down/up), numbers filled to ``count`` with 1,
    or all 1 when not given; a longer list is refused (sd-scripts drops its tail)."""
    if name not in given:
        return [1.0] * count
    text = str(given[name]).strip()
    preset, _, plus = text.partition("+")
    if name != "mid_lr_weight" and preset in PRESETS:
        try:
            extra = float(plus) if plus else 0.0
        except ValueError:
            raise SdtuneError(f"{where}: network_args {name}={text}: the number after + is not one") from None
        return [w + extra for w in PRESETS[preset](count)]
    values = _numbers(text, name, where)
    if len(values) > count:
        raise SdtuneError(f"{where}: network_args {name}: {len(values)} numbers, and this model has {count} such "
                          f"block(s); give at most {count}")
    return values + [1.0] * (count - len(values))


def _one_mid(values: list[float], name: str, where) -> float:
    if len(set(values)) != 1:
        raise SdtuneError(f"{where}: network_args {name}: SDXL's middle block in parts of {values}; sdtune weighs "
                          f"the middle block as one (M00): give its parts one value")
    return values[0]


def _vector(base: float, down: list[float], mid: float, up: list[float]) -> str:
    """The lora-block-weight vector BASE,IN..,M00,OUT.. as --block-lr and --block-ranks read it."""
    return ",".join(str(int(v)) if float(v).is_integer() else repr(float(v)) for v in (base, *down, mid, *up))


def _ramp(n: int) -> list[float]:
    return [i / (n - 1) for i in range(n)]


# sd-scripts' presets for down/up, shallow to deep: a quarter sine or a line from 0 to 1, or the reverse
PRESETS = {
    "sine": lambda n: [math.sin(math.pi * x / 2) for x in _ramp(n)],
    "cosine": lambda n: [math.sin(math.pi * x / 2) for x in reversed(_ramp(n))],
    "linear": _ramp,
    "reverse_linear": lambda n: list(reversed(_ramp(n))),
    "zeros": lambda n: [0.0] * n,
}
