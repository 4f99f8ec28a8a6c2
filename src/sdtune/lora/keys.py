"""LoRA module names -> model module paths, and checking a LoRA against a model before patching.

kohya/A1111 files name a module by its path with every dot turned into an underscore
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``), which is ambiguous on its own
(``to_out_0`` vs ``to.out.0``). ``NameResolver`` undoes it by looking the name up among the real module paths
of the model (or of the SD 1.5 reference structure), in diffusers naming and in the original LDM naming
(``input_blocks_4_1_...``, via ``sdtune.ldm``); names found nowhere get a best-effort dotted path so that the
matcher can still report them instead of dropping them.

``match`` then checks every adapter of a ``Lora`` against the model's layers (existence and shape), guesses
the base family the file was made for, and ``MatchReport.raise_if_bad`` turns a bad fit into one clear error.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .. import families
from ..safeio import SdtuneError
from .neutral import Adapter, Lora

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# Width of the text features the UNet cross-attends to, per family (attn2.to_k/to_v input width).
CONTEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Hidden width of a kohya ``lora_te_`` text encoder: SD 1.x CLIP-L 768, SD 2.x OpenCLIP-H 1024.
TEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 1280: "sdxl"}

UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
              "add_embedding", "class_embedding", "encoder_hid_proj")
LDM_UNET_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
TEXT_ROOTS = ("text_model", "encoder", "embeddings", "final_layer_norm")

# Attribute names that themselves contain underscores (diffusers, LDM and CLIP naming): an underscore inside
# one of these is not a path separator.
_COMPOUNDS = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "input_blocks", "middle_block", "output_blocks", "time_embed",
    "in_layers", "out_layers", "emb_layers", "skip_connection", "label_emb", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding", "text_projection", "add_k_proj", "add_v_proj", "norm_out",
}, key=lambda s: -s.count("_"))


def underscored(path: str) -> str:
    return path.replace(".", "_")


def dotted_guess(name: str) -> str:
    """Best-effort dotted path for an underscore name that matched no known module (for reports only)."""
    tokens = name.split("_")
    out, i = [], 0
    while i < len(tokens):
        for compound in _COMPOUNDS:
            parts = compound.split("_")
            if tokens[i:i + len(parts)] == parts:
                out.append(compound)
                i += len(parts)
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


# ---------------------------------------------------------------- reference structure (SD 1.5, meta device)

def weight_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    """{module path: weight shape} for every module of ``module`` that owns a ``weight`` tensor."""
    out = {}
    for name, sub in module.named_modules():
        w = getattr(sub, "weight", None)
        if name and isinstance(w, torch.Tensor):
            out[name] = tuple(w.shape)
    return out


@lru_cache(maxsize=1)
def sd15_reference() -> dict[str, dict[str, tuple]]:
    """{"unet" | "text_encoder": {module path: weight shape}} of the real SD 1.5 architecture.

    Built on the meta device (no memory, well under a second), so names can be resolved and files inspected
    without any model at hand.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(families.SD1.component_configs()["unet"])
        text = CLIPTextModel(CLIPTextConfig(**families.SD1.component_configs()["text_encoder"]))
    return {"unet": weight_shapes(unet), "text_encoder": weight_shapes(text)}


def model_keys_of(model_modules: dict) -> dict[str, set[str]]:
    """``model_keys`` (component -> set of module paths) from roots or from ``{component: {path: ...}}``."""
    return {c: set(_module_table(v)) for c, v in model_modules.items() if v is not None}


def _module_table(value) -> dict[str, tuple | None]:
    """{path: weight shape or None} from an ``nn.Module`` root, a {path: module|shape} dict, or a set of paths."""
    if isinstance(value, torch.nn.Module):
        return weight_shapes(value)
    if isinstance(value, dict):
        out = {}
        for path, v in value.items():
            if isinstance(v, torch.nn.Module):
                w = getattr(v, "weight", None)
                out[path] = tuple(w.shape) if isinstance(w, torch.Tensor) else None
            elif isinstance(v, torch.Tensor):
                out[path] = tuple(v.shape)
            else:
                out[path] = tuple(v) if v is not None else None
        return out
    return {p: None for p in value}


def _infer_unet_config(paths: set[str]) -> dict | None:
    """The block layout of a diffusers UNet from its module paths (enough for ``ldm.unet_module_map``).

    Widths are unknown from names alone; distinct made-up widths make the map include every possible
    shortcut conv, which is harmless: the map only translates names, existence is checked separately.
    """
    down = {int(m.group(1)) for p in paths if (m := re.match(r"down_blocks\.(\d+)\.", p))}
    if not down or "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" not in paths:
        return None
    n = max(down) + 1
    per_layer = len({m.group(1) for p in paths if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))})
    depth = 1 + max(int(m.group(1)) for p in paths if (m := re.search(r"transformer_blocks\.(\d+)\.", p)))
    has = lambda prefix: any(p.startswith(prefix) for p in paths)
    return {
        "block_out_channels": [10 * (b + 1) for b in range(n)],
        "layers_per_block": max(per_layer, 1),
        "transformer_layers_per_block": depth,
        "down_block_types": ["CrossAttnDownBlock2D" if has(f"down_blocks.{b}.attentions.") else "DownBlock2D"
                             for b in range(n)],
        "up_block_types": ["CrossAttnUpBlock2D" if has(f"up_blocks.{b}.attentions.") else "UpBlock2D"
                           for b in range(n)],
    }


class NameResolver:
    """kohya underscore names -> module paths of one model (or of SD 1.5 when no model is given)."""

    def __init__(self, model_keys: dict | None = None):
        model_keys = model_keys_of(model_keys) if model_keys else {}
        unet_paths = set(model_keys.get("unet") or sd15_reference()["unet"])
        text_paths = {p.removeprefix("text_model.") for p in (model_keys.get("text_encoder")
                                                              or sd15_reference()["text_encoder"])}
        self.unet = {underscored(p): p for p in unet_paths}
        config = _infer_unet_config(unet_paths) or families.SD1.component_configs()["unet"]
        try:
            from ..ldm import unet_module_map

            ldm_map = unet_module_map(config)
        except (ImportError, SdtuneError, KeyError):  # no LDM names for this layout: diffusers names still work
            ldm_map = {}
        for ldm, diffusers in ldm_map.items():
            self.unet.setdefault(underscored(ldm), diffusers)
        self.text = {}
        for p in text_paths:
            self.text[underscored(p)] = p
            self.text[underscored("text_model." + p)] = p

    def kohya(self, component: str, name: str) -> str:
        """Module path for ``name`` (the part after ``lora_unet_`` / ``lora_te_``)."""
        if component == "unet":
            return self.unet.get(name) or dotted_guess(name)
        if component == "text_encoder":
            return self.text.get(name) or dotted_guess(name).removeprefix("text_model.")
        return dotted_guess(name).removeprefix("text_model.")


# ---------------------------------------------------------------- cloneofsimo order-indexed layout

_CLONEOFSIMO_UNET_ORDER = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_CLONEOFSIMO_TEXT_ORDER = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj")


def cloneofsimo_targets(component: str, paths) -> list[str]:
    """The modules ``lora_diffusion`` numbered, in its order (index N of ``unet:N:up`` is the N-th here).

    It walked the model's modules in registration order: UNet transformer blocks of down, up, then mid blocks
    (diffusers registers ``mid_block`` last), each as attn1 q/k/v/out, the GEGLU projection, attn2 q/k/v/out
    (the diffusers block order of late 2022); CLIP layers as k/v/q/out projections (transformers' order).
    """
    paths = set(paths)
    if component == "unet":
        blocks = {m.group(1) for p in paths if (m := re.match(r"(.*\.transformer_blocks\.\d+)\.", p))}

        def block_key(b: str):
            nums = [int(x) for x in re.findall(r"\.(\d+)(?=\.|$)", b)]
            rank = 0 if b.startswith("down_blocks") else 1 if b.startswith("up_blocks") else 2
            return rank, nums

        order = _CLONEOFSIMO_UNET_ORDER
    else:
        blocks = {m.group(0) for p in paths if (m := re.match(r"(text_model\.)?encoder\.layers\.\d+", p))}

        def block_key(b: str):
            return (int(b.rsplit(".", 1)[1]),)

        order = _CLONEOFSIMO_TEXT_ORDER
    return [f"{b}.{c}" for b in sorted(blocks, key=block_key) for c in order if f"{b}.{c}" in paths]


# ---------------------------------------------------------------- shapes and family

def adapter_io(ad: Adapter) -> tuple[int, int, tuple | None]:
    """(out features, in features flattened over the kernel, kernel size or None) of an adapter's ΔW."""
    t = ad.tensors
    if ad.kind == "lora":
        down = t["down"]
        kernel = tuple(t["mid"].shape[2:]) if "mid" in t else (tuple(down.shape[2:]) if down.dim() == 4 else None)
        inner = down.shape[1] * (math.prod(kernel) if "mid" in t else math.prod(down.shape[2:]))
        return t["up"].shape[0], inner, kernel
    if ad.kind == "loha":
        return t["w1a"].shape[0], t["w1b"].flatten(1).shape[1], None
    if ad.kind == "lokr":
        w1 = t["w1"].shape if "w1" in t else (t["w1a"].shape[0], t["w1b"].shape[1])
        w2 = t.get("w2")
        w2_out, w2_in = (w2.shape[0], w2.flatten(1).shape[1]) if w2 is not None else \
            (t["w2a"].shape[0], t["w2b"].flatten(1).shape[1])
        kernel = tuple(w2.shape[2:]) if w2 is not None and w2.dim() == 4 else None
        return w1[0] * w2_out, w1[1] * w2_in, kernel
    d = t["diff"]
    return d.shape[0], d[0].numel(), tuple(d.shape[2:]) if d.dim() == 4 else None


def adapter_shape(ad: Adapter) -> tuple:
    """The ΔW shape as the file implies it: (out, in) or (out, in, kh, kw) when the kernel is known."""
    out, inner, kernel = adapter_io(ad)
    if kernel:
        return (out, inner // math.prod(kernel), *kernel)
    return (out, inner)


def fits(ad: Adapter, shape: tuple) -> bool:
    """Whether ΔW reshapes onto a weight of ``shape`` (a 1x1 conv and a linear layer are interchangeable)."""
    if len(shape) < 2:
        return False
    out, inner, kernel = adapter_io(ad)
    if out != shape[0] or inner != math.prod(shape[1:]):
        return False
    return kernel is None or math.prod(kernel) == 1 or tuple(shape[2:]) == kernel


def guess_family(lora: Lora) -> str | None:
    """"sd1" | "sd2" | "sdxl" | None: the base the file was made for, from names and layer widths."""
    votes = set()
    for comp, path, ad in lora.items():
        if comp == "text_encoder_2":
            votes.add("sdxl")
            continue
        if comp == "unet":
            m = re.search(r"transformer_blocks\.(\d+)\.", path)
            if m and int(m.group(1)) >= 1:  # SD 1.x/2.x have one transformer block per attention
                votes.add("sdxl")
            if path.endswith(("attn2.to_k", "attn2.to_v")):
                votes.add(CONTEXT_WIDTH_FAMILY.get(adapter_io(ad)[1]))
        elif comp == "text_encoder" and path.endswith("self_attn.q_proj"):
            votes.add(TEXT_WIDTH_FAMILY.get(adapter_io(ad)[1]))
    for emb in lora.embeddings.values():
        votes.add({1024: "sd2", 1280: "sdxl"}.get(emb.shape[-1]))
    votes.discard(None)
    for family in ("sdxl", "sd2", "sd1"):
        if family in votes:
            return family
    return None


def model_family(tables: dict[str, dict]) -> str | None:
    for path, shape in tables.get("unet", {}).items():
        if path.endswith("attn2.to_k") and shape:
            return CONTEXT_WIDTH_FAMILY.get(shape[1])
    return None


# ---------------------------------------------------------------- matching

@dataclass
class MatchReport:
    """How a LoRA fits a model: what matched, what did not, and the likely reason."""

    matched: list[tuple[str, str]] = field(default_factory=list)  # (component, module path)
    unmatched: list[str] = field(default_factory=list)  # "component:path" with no such layer, or unread file keys
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (component:path, lora, model)
    family_guess: str | None = None  # what the file looks made for
    model_family: str | None = None  # what the model looks like (None: SD 1.x-shaped but unrecognised width)

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.shape_mismatch

    def summary(self) -> str:
        bad = len(self.unmatched) + len(self.shape_mismatch)
        parts = []
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} with no such layer (e.g. {', '.join(self.unmatched[:3])})")
        if self.shape_mismatch:
            eg = "; ".join(f"{p} {tuple(a)} vs model {tuple(b)}" for p, a, b in self.shape_mismatch[:2])
            parts.append(f"{len(self.shape_mismatch)} with another shape (e.g. {eg})")
        return f"{bad} of {bad + len(self.matched)} LoRA entries do not fit this model: {'; '.join(parts)}"

    def cause(self) -> str:
        model = FAMILY_NAMES.get(self.model_family or "sd1")
        if self.family_guess and self.family_guess != (self.model_family or "sd1"):
            return f"this LoRA is for {FAMILY_NAMES[self.family_guess]}; the model is {model}. "
        return ""

    def raise_if_bad(self, allow_partial: bool = False, source: str = "") -> None:
        if self.ok:
            return
        where = f"{source}: " if source else ""
        message = f"{where}{self.cause()}{self.summary()}"
        if allow_partial and self.matched:
            warnings.warn(f"{message}; applying only the {len(self.matched)} that fit", stacklevel=2)
            return
        fix = ("use a LoRA made for this base model" if not self.matched else
               "use a LoRA made for this base model, or allow partial loading (--allow-partial) to apply the rest")
        raise SdtuneError(f"{message}; {fix}")


def match(lora: Lora, model_modules: dict) -> MatchReport:
    """Check every adapter of ``lora`` against ``model_modules``.

    ``model_modules``: {component: {module path: nn.Module or weight shape}}, or {component: root nn.Module}.
    Text-encoder paths are looked up with and without ``text_model.``.
    """
    tables = {c: _module_table(v) for c, v in model_modules.items() if v is not None}
    report = MatchReport(family_guess=guess_family(lora), model_family=model_family(tables))
    for comp, path, ad in lora.items():
        table = tables.get(comp, {})
        found = next((p for p in _candidates(comp, path) if p in table), None)
        if found is None or table[found] is None:
            report.unmatched.append(f"{comp}:{path}")
        elif not fits(ad, table[found]):
            report.shape_mismatch.append((f"{comp}:{path}", adapter_shape(ad), tuple(table[found])))
        else:
            report.matched.append((comp, path))
    report.unmatched.extend(getattr(lora, "unknown", []) or [])
    return report


def _candidates(comp: str, path: str) -> list[str]:
    if comp != "text_encoder":
        return [path]
    bare = path.removeprefix("text_model.")
    return [bare, "text_model." + bare]
