"""Block weights: a LoRA's strength set per UNet block, in the A1111 lora-block-weight extension's syntax.

A vector gives one weight per block, ``BASE`` (every text-encoder layer) first, then the UNet's blocks in the
original (LDM) numbering: ``IN00`` … the input blocks, ``M00`` the middle block, ``OUT00`` … the output blocks.
Each layer's strength is the adapter's weight for its component times its block's weight.

The layouts are the extension's, as data per family (``LAYOUTS``, by family name):

- SD 1.x/2.x: 26 weights (BASE, IN00-IN11, M00, OUT00-OUT11), or 17 (BASE, IN01, IN02, IN04, IN05, IN07, IN08,
  M00, OUT03-OUT11: the blocks with attention, where a plain LoRA has layers);
- SDXL: 20 weights (BASE, IN00-IN08, M00, OUT00-OUT08), or 12 (BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05);
- the built-in tiny model (SD 1.x's names, three levels of one resnet each): 14 weights (BASE, IN00-IN05, M00,
  OUT00-OUT05), or 8 (BASE, IN01, IN03, M00, OUT02-OUT05: its blocks with attention), sdtune's own by the
  extension's rules, so that block weights run on it as on SD 1.5. (tiny-xl has SDXL's blocks.)

As in the extension, a short vector gives the blocks it leaves out weight 0 (they hold only LoCon convolutions:
``conv_in``, the down/upsamplers, SD 1.x's last down and first up level), and a layer in no block at all
(``time_embedding``, SDXL's ``add_embedding``, ``conv_out``) keeps the adapter's weight. A diffusers module path
is put in a block through its LDM name (``ldm.unet_module_map``), the names the extension matches.

Presets: the extension's own for SD 1.x/2.x (17 weights: NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL,
ALL0.5). The extension ships none for SDXL; sdtune's SDXL presets of those names (12 weights) weight the same
parts: INS/IND the shallow/deep input blocks, OUTD/OUTS the deep/shallow output blocks, MIDD the deep ones on
both sides and the middle; so do the tiny model's (8 weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .. import ldm
from ..families import Family
from ..safeio import SdtuneError
from .neutral import TEXT_COMPONENTS

BASE = "BASE"
LBW = "lbw="  # the option's prefix in prompts and specs, as the extension writes it

LayerKey = tuple[str, str]  # (component, module path)


@dataclass(frozen=True)
class Layout:
    """One family's blocks: the full vector's block ids, the shorter vectors it accepts and its presets."""

    blocks: tuple[str, ...]  # every block id, in the full vector's order (BASE first)
    vectors: dict[int, tuple[str, ...]]  # number of weights -> the block ids they are for, in order
    presets: dict[str, str]  # name -> weights, as the extension's preset file writes them


def _ids(prefix: str, numbers: Iterable[int]) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in numbers)


_SD_BLOCKS = (BASE, *_ids("IN", range(12)), "M00", *_ids("OUT", range(12)))
_SD_17 = (BASE, *_ids("IN", (1, 2, 4, 5, 7, 8)), "M00", *_ids("OUT", range(3, 12)))
_XL_BLOCKS = (BASE, *_ids("IN", range(9)), "M00", *_ids("OUT", range(9)))
_XL_12 = (BASE, *_ids("IN", (4, 5, 7, 8)), "M00", *_ids("OUT", range(6)))
_TINY_BLOCKS = (BASE, *_ids("IN", range(6)), "M00", *_ids("OUT", range(6)))
_TINY_8 = (BASE, *_ids("IN", (1, 3)), "M00", *_ids("OUT", range(2, 6)))

SD = Layout(_SD_BLOCKS, {26: _SD_BLOCKS, 17: _SD_17}, {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
})

XL = Layout(_XL_BLOCKS, {20: _XL_BLOCKS, 12: _XL_12}, {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
})

TINY = Layout(_TINY_BLOCKS, {14: _TINY_BLOCKS, 8: _TINY_8}, {
    "NONE": "0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1",
    "INS": "1,1,0,0,0,0,0,0",
    "IND": "1,0,1,0,0,0,0,0",
    "INALL": "1,1,1,0,0,0,0,0",
    "MIDD": "1,0,1,1,1,1,0,0",
    "OUTD": "1,0,0,0,1,1,0,0",
    "OUTS": "1,0,0,0,0,0,1,1",
    "OUTALL": "1,0,0,0,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
})

# family name -> its layout (tiny-xl has SDXL's blocks)
LAYOUTS = {"sd1": SD, "sd2": SD, "sdxl": XL, "tiny": TINY, "tiny-xl": XL}


def layout(family: Family | None) -> Layout:
    found = LAYOUTS.get(family.name) if family is not None else None
    if found is None:
        what = family.title if family is not None else "a model of unknown family"
        raise SdtuneError(f"block weights (lbw=) are defined for SD 1.x, SD 2.x, SDXL and the built-in models (the "
                          f"lora-block-weight layouts); {what} has none. Give the LoRA a plain weight")
    return found


def parse(spec: str | Sequence[float], family: Family | None, said: str = LBW) -> dict[str, float]:
    """{block id: weight} over every block of the family's layout, from a preset name, ``"1,0,0.5,…"`` or a
    sequence of numbers; blocks a short vector leaves out get 0, as in the extension. ``said``: how the user
    gave it, for the message (``lbw=``, or a flag and a space)."""
    lay = layout(family)
    counts = " or ".join(str(n) for n in sorted(lay.vectors))
    text = spec if isinstance(spec, str) else ",".join(str(v) for v in spec)
    text = lay.presets.get(text.strip(), text)
    bad = SdtuneError(f"{said}{spec if isinstance(spec, str) else text}: {family.title} takes {counts} "
                      f"comma-separated block weights, or a preset: {', '.join(lay.presets)}")
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise bad from None
    ids = lay.vectors.get(len(values))
    if ids is None:
        raise bad
    return dict.fromkeys(lay.blocks, 0.0) | dict(zip(ids, values))


def _ldm_block(ldm_path: str) -> str | None:
    """The extension's block id of an LDM UNet module path (``input_blocks.4.1.proj_in`` -> IN04)."""
    parts = ldm_path.split(".")
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 1:
        return _ids("IN" if parts[0] == "input_blocks" else "OUT", (int(parts[1]),))[0]
    return None  # time_embed, label_emb, out: in no block


def unet_blocks(unet_config) -> dict[str, str | None]:
    """diffusers UNet module path -> block id (None: in no block), for a UNet of this config."""
    return {diffusers: _ldm_block(ldm_path) for ldm_path, diffusers in ldm.unet_module_map(unet_config).items()}


def block_of(component: str, path: str, unet: dict[str, str | None]) -> str | None:
    """The block a layer is in: BASE for text-encoder layers; a UNet layer's from ``unet`` (``unet_blocks``),
    looked up by its module path or, for a path the map does not name, its closest named parent."""
    if component in TEXT_COMPONENTS:
        return BASE
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in unet:
            return unet[prefix]
    return None


def layer_factors(weights: dict[str, float], layers: Iterable[LayerKey], unet_config) -> dict[LayerKey, float]:
    """Each layer's block weight (1 for a layer in no block): what its strength is multiplied by."""
    unet = unet_blocks(unet_config)
    out = {}
    for comp, path in layers:
        block = block_of(comp, path, unet)
        out[(comp, path)] = 1.0 if block is None else weights[block]
    return out


def split_spec(spec: str) -> tuple[str, str | None]:
    """'SOURCE[:WEIGHT]:lbw=WEIGHTS' -> ('SOURCE[:WEIGHT]', 'WEIGHTS'); a spec without ``lbw=`` is left whole."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.startswith(LBW):
        return head, tail[len(LBW):]
    return spec, None
