"""LoRA module names -> model module paths, and checking a LoRA against a model before patching.

kohya/A1111 files name a module by its path with every dot turned into an underscore
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``), which is ambiguous on its own
(``to_out_0`` vs ``to.out.0``). ``NameResolver`` undoes it by looking the name up among the real module paths
of the model (or of its family's reference structure), in diffusers naming and in the original LDM/SGM naming
(``input_blocks_4_1_...``, via ``sdtune.ldm``); names found nowhere get a best-effort dotted path so that the
matcher can still report them instead of dropping them.

``match`` then checks every adapter of a ``Lora`` against the model's layers (existence and shape), guesses
the base family the file was made for (``guess_family``: from the widths of its layers, asked of
``sdtune.families``), and ``MatchReport.raise_if_bad`` turns a bad fit into one clear error.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from functools import cache

import torch

from .. import families
from ..families import Family
from ..ldm import unet_module_map
from ..safeio import SdtuneError
from . import algos
from .neutral import TEXT_COMPONENTS, Adapter, Lora, text_path, text_paths

UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
              "add_embedding", "class_embedding", "encoder_hid_proj")
LDM_UNET_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
TEXT_ROOTS = ("text_model", "encoder", "embeddings", "final_layer_norm", "text_projection")

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


# ---------------------------------------------------------------- reference structures

def weight_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    """{module path: weight shape} for every module of ``module`` that owns a ``weight`` tensor."""
    out = {}
    for name, sub in module.named_modules():
        w = getattr(sub, "weight", None)
        if name and isinstance(w, torch.Tensor):
            out[name] = tuple(w.shape)
    return out


def reference(family: Family) -> dict[str, dict[str, tuple]]:
    """{component: {module path: weight shape}} of ``family``'s real architecture (unet and text encoders), so
    names can be resolved and files inspected without any model at hand (``Family.modules``: shipped data)."""
    return family.modules()


def kernel_of(comp: str, path: str, ad: Adapter, family: Family | None) -> tuple | None:
    """A layer's kernel (None: a linear layer): as the adapter's factors say, or for LoHa/LoKr, whose factors are
    flattened, as the family's architecture says (SD 1.x's when the family is unknown)."""
    kernel = ad.io().kernel
    if kernel is None:
        shape = reference(family or families.SD1).get(comp, {}).get(path)
        kernel = tuple(shape[2:]) if shape and len(shape) == 4 else None
    return kernel


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
    Transformer depth is read per level (SDXL: 1, 2, 10), since the LDM block numbering does not depend on it
    but the names inside each block do.
    """
    down = {int(m.group(1)) for p in paths if (m := re.match(r"down_blocks\.(\d+)\.", p))}
    if not down or "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" not in paths:
        return None
    n = max(down) + 1
    per_layer = len({m.group(1) for p in paths if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))})
    has = lambda prefix: any(p.startswith(prefix) for p in paths)

    def depth(prefix: str) -> int:
        found = [int(m.group(1)) for p in paths if p.startswith(prefix)
                 and (m := re.search(r"transformer_blocks\.(\d+)\.", p))]
        return 1 + max(found, default=0)

    return {
        "block_out_channels": [10 * (b + 1) for b in range(n)],
        "layers_per_block": max(per_layer, 1),
        "transformer_layers_per_block": [depth(f"down_blocks.{b}.") for b in range(n - 1)] + [depth("mid_block.")],
        "down_block_types": ["CrossAttnDownBlock2D" if has(f"down_blocks.{b}.attentions.") else "DownBlock2D"
                             for b in range(n)],
        "up_block_types": ["CrossAttnUpBlock2D" if has(f"up_blocks.{b}.attentions.") else "UpBlock2D"
                           for b in range(n)],
        # SDXL's pooled text + time ids: LDM's label_emb
        "addition_embed_type": "text_time" if has("add_embedding.") else None,
    }


def _unet_config(root, paths: set[str], family: Family) -> dict:
    """The UNet config behind the LDM/SGM names: the model's own, else read off its paths, else the family's."""
    config = getattr(root, "config", None)
    if config is not None and "block_out_channels" in config:
        return dict(config)
    return (_infer_unet_config(paths) if root is not None else None) or family.component_configs()["unet"]


def _ldm_names(config: dict) -> dict[str, str]:
    """LDM/SGM module path -> diffusers path for a UNet of this config ({} where the layout has no LDM names)."""
    try:
        return unet_module_map(config)  # SDXL's label_emb (add_embedding) included
    except (SdtuneError, KeyError):  # not an SD-shaped UNet: its diffusers names still resolve
        return {}


class NameResolver:
    """kohya underscore names -> module paths of one model, or of a family's reference structure.

    ``model_keys``: {component: root module, {path: ...} or set of paths}; a component it lacks is taken from
    ``family``'s reference (SD 1.x by default), so that names of every component still read.
    """

    def __init__(self, model_keys: dict | None = None, family: Family | None = None):
        family = family or families.SD1
        model_keys = {c: v for c, v in (model_keys or {}).items() if v is not None}
        given = model_keys_of(model_keys)
        table = lambda c: given.get(c) or set(reference(family).get(c, ()))
        unet_paths = table("unet")
        self.unet = {underscored(p): p for p in unet_paths}
        ldm_map = _ldm_names(_unet_config(model_keys.get("unet"), unet_paths, family))
        for ldm, diffusers in ldm_map.items():
            self.unet.setdefault(underscored(ldm), diffusers)
        self.text: dict[str, dict[str, str]] = {}
        for comp in TEXT_COMPONENTS:
            names = self.text[comp] = {}
            for p in table(comp):
                for spelling in text_paths(p):
                    names[underscored(spelling)] = text_path(p)

    def kohya(self, component: str, name: str) -> str:
        """Module path for ``name`` (the part after ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``)."""
        if component == "unet":
            return self.unet.get(name) or dotted_guess(name)
        return self.text.get(component, {}).get(name) or text_path(dotted_guess(name))


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
    """(out features, in features flattened over the kernel, kernel size or None) of an adapter's ΔW: its
    algorithm's ``io``."""
    return ad.io()


def adapter_shape(ad: Adapter) -> tuple:
    """The ΔW shape as the file implies it: (out, in) or (out, in, kh, kw) when the kernel is known."""
    out, inner, kernel = adapter_io(ad)
    if ad.algo.vector:
        return (out,)
    if kernel and inner is not None:
        return (out, inner // math.prod(kernel), *kernel)
    return (out, inner)


def fits(ad: Adapter, shape: tuple) -> bool:
    """Whether ΔW reshapes onto a weight of ``shape`` (a 1x1 conv and a linear layer are interchangeable; a
    norm adapter's vector onto a norm layer's)."""
    if ad.algo.vector or len(shape) < 2:
        return ad.algo.vector and tuple(shape) == adapter_shape(ad)
    out, inner, kernel = adapter_io(ad)
    if (out is not None and out != shape[0]) or (inner is not None and inner != math.prod(shape[1:])):  # None: any
        return False
    if not ad.algo.fits(ad.tensors, shape):
        return False
    return kernel is None or math.prod(kernel) == 1 or tuple(shape[2:]) == kernel


# Layers whose widths tell the family, in dotted or in kohya underscore spelling (guessing runs before kohya
# names are resolved, since the resolution needs the family's structure).
_CROSS_ATTENTION = re.compile(r"attn2[._]to_[kv]$")
_TRANSFORMER_INDEX = re.compile(r"transformer_blocks[._](\d+)[._]")
TEXT_ATTENTION = re.compile(r"self_attn[._](q|k|v|out)_proj$")


@cache
def _transformer_depth(family: Family) -> int:
    """The most transformer blocks any attention of the family's UNet stacks (SD 1.x/2.x: 1, SDXL: 10)."""
    depth = family.component_configs()["unet"].get("transformer_layers_per_block") or 1
    return max(depth) if isinstance(depth, (list, tuple)) else depth


def _layer_evidence(comp: str, path: str, out: int, inner: int) -> list[set[Family]]:
    """The families each fact about one layer allows: an empty set means no known family has such a layer."""
    allowed = []
    if comp in TEXT_COMPONENTS:
        allowed.append({f for f in families.FAMILIES.values() if comp in (te.component for te in f.text_encoders)})
        width = out or inner  # PEFT OFT tells only its input width
        if TEXT_ATTENTION.search(path) and width:  # the attention projections map the encoder's width onto itself
            allowed.append({f for f, te in families.by_text_width(width) if te.component == comp})
    elif comp == "unet":
        if _CROSS_ATTENTION.search(path) and inner:  # attn2.to_k/to_v read the text features
            family = families.by_cross_attention(inner)
            allowed.append({family} if family else set())
        if m := _TRANSFORMER_INDEX.search(path):
            allowed.append({f for f in families.FAMILIES.values() if _transformer_depth(f) > int(m.group(1))})
    return allowed


def text_component(width: int) -> str | None:
    """The text-encoder component (text_encoder, text_encoder_2) every family with an encoder this wide calls
    it; None when they differ (768 is SD 1.x's only encoder and SDXL's first alike) or none is this wide."""
    components = {te.component for _, te in families.by_text_width(width)}
    return components.pop() if len(components) == 1 else None


def _pick_family(evidence: list[set[Family]], hint: Family | None) -> Family | None:
    """The one family every piece of evidence allows; ties go to ``hint`` (the file's own claim), then to the
    family with the fewest text encoders (a file without te2 keys is no SDXL evidence), then FAMILIES order."""
    everything = set(families.FAMILIES.values())
    evidence = [e for e in evidence if e != everything]
    if not evidence:
        return hint
    common = set.intersection(*evidence)
    if not common:  # contradictory, or widths no known family has
        return None
    if hint in common:
        return hint
    # a family of the same base version as the claim (the built-in tiny-xl where a file says sdxl_base_v1-0 and
    # has tiny widths; its name was not kept): the tiny model, which the widths allow too, has one encoder only
    claimed = {f for f in common if hint is not None and f.base_model_version == hint.base_model_version}
    common = claimed or common
    order = list(families.FAMILIES.values())
    return min(common, key=lambda f: (len(f.text_encoders), order.index(f)))


def guess_family(lora: Lora) -> Family | None:
    """The family the file was made for, from its layer widths (cross-attention 768/1024/2048, text-encoder
    widths, transformer depth), whether it has te2 layers, and its embeddings' widths; None if they do not say."""
    evidence = []
    for comp, path, ad in lora.items():
        out, inner, _ = adapter_io(ad)
        evidence += _layer_evidence(comp, path, out, inner)
    for emb in lora.embeddings.values():
        evidence.append({f for f, _ in families.by_text_width(emb.shape[-1])})
    return _pick_family(evidence, claimed_family(lora))


def cross_attention_width(lora: Lora) -> int | None:
    """The text width the LoRA's UNet cross-attention layers read (its attn2.to_k input), if it has such a layer."""
    return next((adapter_io(ad)[1] for c, p, ad in lora.items() if c == "unet" and p.endswith("attn2.to_k")), None)


def claimed_family(lora: Lora) -> Family | None:
    """The family a file's metadata names: the model it was trained on where that is a family's name (the built-in
    tiny-xl, whose files say sdxl_base_v1-0 so that A1111 reads them as SDXL), else its kohya base model version,
    else its ModelSpec architecture."""
    meta = lora.metadata
    return (families.FAMILIES.get(meta.get("ss_sd_model_name", ""))
            or families.by_base_model_version(meta.get("ss_base_model_version"))
            or families.by_modelspec_architecture(meta.get("modelspec.architecture")))


def model_family(tables: dict[str, dict]) -> Family | None:
    """The family of a model from its layers' shapes ({component: {path: shape}}), as ``guess_family`` reads files."""
    evidence = []
    for comp, table in tables.items():
        for path, shape in table.items():
            if shape and len(shape) >= 2:
                evidence += _layer_evidence(comp, path, shape[0], math.prod(shape[1:]))
    return _pick_family(evidence, None)


# ---------------------------------------------------------------- matching

@dataclass
class MatchReport:
    """How a LoRA fits a model: what matched, what did not, and the likely reason."""

    matched: list[tuple[str, str]] = field(default_factory=list)  # (component, module path)
    unmatched: list[str] = field(default_factory=list)  # "component:path" with no such layer
    unread: list[str] = field(default_factory=list)  # file keys no reader understood (``Lora.unknown``)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (component:path, lora, model)
    family_guess: Family | None = None  # what the file looks made for
    model_family: Family | None = None  # what the model looks like (None: widths of no known family)
    lora_cross_width: int | None = None  # the text width the LoRA's cross-attention reads (names a refiner's)

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.shape_mismatch and not self.unread

    def summary(self) -> str:
        bad = len(self.unmatched) + len(self.shape_mismatch) + len(self.unread)
        parts = []
        what = algos.not_read(self.unread)
        if what:  # a known type sdtune does not apply: its name says more than "no such layer"
            parts.append(f"{len(self.unread)} that are {what}, which sdtune does not apply "
                         f"(e.g. {', '.join(self.unread[:2])})")
        # keys of no known form are most often another model's layer names
        no_layer = self.unmatched + ([] if what else self.unread)
        if no_layer:
            parts.append(f"{len(no_layer)} with no such layer (e.g. {', '.join(no_layer[:3])})")
        if self.shape_mismatch:
            eg = "; ".join(f"{p} {tuple(a)} vs model {tuple(b)}" for p, a, b in self.shape_mismatch[:2])
            parts.append(f"{len(self.shape_mismatch)} with another shape (e.g. {eg})")
        return f"{bad} of {bad + len(self.matched)} LoRA entries do not fit this model: {'; '.join(parts)}"

    def cause(self) -> str:
        guess, model = self.family_guess, self.model_family
        if guess and model and guess != model:
            return f"this LoRA is for {guess.title}; the model is {model.title}. "
        if guess is None and self.lora_cross_width == families.SDXL_REFINER_CROSS_WIDTH:
            return (f"this LoRA is for SDXL's refiner (its cross-attention reads {self.lora_cross_width}-wide text), "
                    f"an img2img model sdtune does not load. ")
        return ""

    def raise_if_bad(self, allow_partial: bool = False, source: str = "") -> None:
        if self.ok:
            return
        where = f"{source}: " if source else ""
        message = f"{where}{self.cause()}{self.summary()}"
        if allow_partial and self.matched:
            warnings.warn(f"{message}; applying only the {len(self.matched)} that fit", stacklevel=2)
            return
        # partial loading is worth offering for a LoRA of this model's family, not for the few layers another
        # family's file happens to share in name and shape
        if algos.not_read(self.unread) and not self.unmatched and not self.shape_mismatch:
            fix = ("allow partial loading (--allow-partial) to apply the rest without them" if self.matched else
                   f"sdtune reads {algos.READ}")
        else:
            fix = ("use a LoRA made for this base model" if not self.matched or self.cause() else
                   "use a LoRA made for this base model, or allow partial loading (--allow-partial) to apply the "
                   "rest")
        raise SdtuneError(f"{message}; {fix}")


def match(lora: Lora, model_modules: dict) -> MatchReport:
    """Check every adapter of ``lora`` against ``model_modules``.

    ``model_modules``: {component: {module path: nn.Module or weight shape}}, or {component: root nn.Module}.
    Text-encoder paths are looked up with and without ``text_model.``.
    """
    tables = {c: _module_table(v) for c, v in model_modules.items() if v is not None}
    report = MatchReport(family_guess=guess_family(lora), model_family=model_family(tables),
                         lora_cross_width=cross_attention_width(lora))
    for comp, path, ad in lora.items():
        table = tables.get(comp, {})
        found = next((p for p in _candidates(comp, path) if p in table), None)
        if found is None or table[found] is None:
            report.unmatched.append(f"{comp}:{path}")
        elif not fits(ad, table[found]):
            report.shape_mismatch.append((f"{comp}:{path}", adapter_shape(ad), tuple(table[found])))
        else:
            report.matched.append((comp, path))
    report.unread = list(getattr(lora, "unknown", []) or [])
    return report


def _candidates(comp: str, path: str) -> tuple[str, ...]:
    return text_paths(path) if comp in TEXT_COMPONENTS else (path,)
