"""Names of the original single-file layouts, and their diffusers/transformers counterparts.

A1111, ComfyUI, kohya and civitai files use the layouts of the original code: LDM for SD 1.x/2.x
(``model.diffusion_model.input_blocks.4.1...``, ``first_stage_model.encoder.down.0.block.0...``,
``cond_stage_model.transformer.text_model...`` or ``cond_stage_model.model.transformer.resblocks...``) and SGM
for SDXL, which keeps the UNet and VAE names and files its text encoders under ``conditioner.embedders.N``.
sdtune holds models in diffusers/transformers-5 naming.

The UNet and VAE maps are derived from the component configs, so they cover any UNet/VAE of these shapes (the
real models, the tiny model and small test models alike), and every module that owns parameters appears
exactly once. Where each text encoder sits and whether it uses OpenCLIP names is the family's data
(``TextEncoder.single_file_prefix``/``openclip``); the layer count comes from the model itself.
"""

from __future__ import annotations

import re
from functools import cache
from typing import NamedTuple

import torch

from . import families
from .families import TEXT_MODEL, Family, TextEncoder
from .safeio import SdtuneError

UNET_PREFIX = "model.diffusion_model."
# a key of any adapter layout sdtune reads or writes (LoRA, LoHa, LoKr, OFT, a bundled embedding): what tells an
# adapter file from a model
ADAPTER_KEY = re.compile(r"lora|hada_|lokr_|oft_|bundle_emb", re.I)
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = families.SD1.text_encoders[0].single_file_prefix + TEXT_MODEL  # SD 1.x's text encoder

# LDM ResBlock children -> diffusers ResnetBlock2D children (UNet); the VAE ResnetBlock names match diffusers
# except for the shortcut.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
}
# LDM AttnBlock (VAE) children -> diffusers Attention children; q/k/v/proj_out are 1x1 convs in LDM.
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")

# SDXL's added conditioning (pooled text + size/crop ids) is LDM's label_emb: Sequential(Sequential(Linear,
# SiLU, Linear)).
_ADDED_EMBEDDINGS = {"text_time": {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}}

# Top-level entries of LDM/SGM checkpoints that are not weights of the models (schedules, EMA, loss, and the
# v_pred/ztsnr flags, which checkpoints.file_sampling reads).
_IGNORED_PREFIXES = ("model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus_",
                     "posterior_", "logvar", "lvlb_weights", "first_stage_model.loss.", "denoiser.", "v_pred", "ztsnr")


def _config(obj) -> dict:
    """A config dict from a dict, a diffusers FrozenDict, or a model carrying ``.config``."""
    return dict(getattr(obj, "config", obj))


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _unet_resnet(ldm: str, diffusers: str, in_channels: int, out_channels: int) -> dict[str, str]:
    names = {f"{ldm}.{a}": f"{diffusers}.{b}" for a, b in _UNET_RESNET.items()}
    if in_channels != out_channels:  # diffusers adds the 1x1 shortcut exactly when the width changes
        names[f"{ldm}.skip_connection"] = f"{diffusers}.conv_shortcut"
    return names


def _spatial_transformer(ldm: str, diffusers: str, depth: int) -> dict[str, str]:
    names = {f"{ldm}.{n}": f"{diffusers}.{n}" for n in ("norm", "proj_in", "proj_out")}
    children = ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"]
    children += [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    for t in range(depth):
        for c in children:
            names[f"{ldm}.transformer_blocks.{t}.{c}"] = f"{diffusers}.transformer_blocks.{t}.{c}"
    return names


def unet_module_map(unet_config) -> dict[str, str]:
    """LDM module path (no ``model.diffusion_model.`` prefix) -> diffusers UNet2DConditionModel module path."""
    cfg = _config(unet_config)
    widths = list(cfg["block_out_channels"])
    n = len(widths)
    per_layer = cfg["layers_per_block"]
    if not isinstance(per_layer, int):
        raise SdtuneError("UNet configs with a different layers_per_block per block are not Stable Diffusion")
    added = cfg.get("addition_embed_type")
    if added not in (None, *_ADDED_EMBEDDINGS) or cfg.get("class_embed_type") or cfg.get("num_class_embeds"):
        raise SdtuneError(f"UNet class/added embedding {added or cfg.get('class_embed_type')} is not SD 1.x, SD 2.x "
                          "or SDXL")
    depth = _per_block(cfg.get("transformer_layers_per_block", 1) or 1, n)
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    names = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    } | _ADDED_EMBEDDINGS.get(added, {})
    # Down path: input_blocks.0 is conv_in; each block contributes layers_per_block (resnet, attention?) entries,
    # then one downsampler entry except the last block.
    index = 1
    for b in range(n):
        for j in range(per_layer):
            in_ch = widths[max(b - 1, 0)] if j == 0 else widths[b]
            names |= _unet_resnet(f"input_blocks.{index}.0", f"down_blocks.{b}.resnets.{j}", in_ch, widths[b])
            if down_attn[b]:
                names |= _spatial_transformer(f"input_blocks.{index}.1", f"down_blocks.{b}.attentions.{j}", depth[b])
            index += 1
        if b < n - 1:
            names[f"input_blocks.{index}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            index += 1
    # Middle: resnet, transformer, resnet.
    mid_type = cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise SdtuneError(f"UNet mid block {mid_type} is not SD 1.x, SD 2.x or SDXL")
    names |= _unet_resnet("middle_block.0", "mid_block.resnets.0", widths[-1], widths[-1])
    names |= _spatial_transformer("middle_block.1", "mid_block.attentions.0", depth[-1])
    names |= _unet_resnet("middle_block.2", "mid_block.resnets.1", widths[-1], widths[-1])
    # Up path: each block has layers_per_block + 1 entries; resnets take the matching down-path skip.
    rev = widths[::-1]
    rev_depth = depth[::-1]
    skips = [widths[0]] + [w for b, w in enumerate(widths) for _ in range(per_layer + (b < n - 1))]
    index = 0
    for b in range(n):
        prev = rev[max(b - 1, 0)]
        for j in range(per_layer + 1):
            skip = skips.pop()
            in_ch = (prev if j == 0 else rev[b]) + skip
            names |= _unet_resnet(f"output_blocks.{index}.0", f"up_blocks.{b}.resnets.{j}", in_ch, rev[b])
            if up_attn[b]:
                names |= _spatial_transformer(f"output_blocks.{index}.1", f"up_blocks.{b}.attentions.{j}", rev_depth[b])
            if j == per_layer and b < n - 1:
                slot = 2 if up_attn[b] else 1
                names[f"output_blocks.{index}.{slot}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
            index += 1
    return names


def _vae_resnet(ldm: str, diffusers: str, in_channels: int, out_channels: int) -> dict[str, str]:
    names = {f"{ldm}.{c}": f"{diffusers}.{c}" for c in ("norm1", "conv1", "norm2", "conv2")}
    if in_channels != out_channels:
        names[f"{ldm}.nin_shortcut"] = f"{diffusers}.conv_shortcut"
    return names


def _vae_mid(side: str, width: int, attention: bool) -> dict[str, str]:
    names = _vae_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", width, width)
    if attention:
        names |= {f"{side}.mid.attn_1.{a}": f"{side}.mid_block.attentions.0.{b}" for a, b in _VAE_ATTENTION.items()}
    names |= _vae_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", width, width)
    return names


def vae_module_map(vae_config) -> dict[str, str]:
    """LDM module path (no ``first_stage_model.`` prefix) -> diffusers AutoencoderKL module path."""
    cfg = _config(vae_config)
    widths = list(cfg["block_out_channels"])
    n = len(widths)
    per_layer = cfg["layers_per_block"]
    attention = cfg.get("mid_block_add_attention", True)
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        names |= {f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                  f"{side}.norm_out": f"{side}.conv_norm_out"}
        names |= _vae_mid(side, widths[-1], attention)
    for b in range(n):
        for j in range(per_layer):
            in_ch = widths[max(b - 1, 0)] if j == 0 else widths[b]
            names |= _vae_resnet(f"encoder.down.{b}.block.{j}", f"encoder.down_blocks.{b}.resnets.{j}",
                                 in_ch, widths[b])
        if b < n - 1:
            names[f"encoder.down.{b}.downsample.conv"] = f"encoder.down_blocks.{b}.downsamplers.0.conv"
    # The LDM decoder numbers its up levels from the highest resolution, diffusers from the lowest.
    rev = widths[::-1]
    for b in range(n):
        level = n - 1 - b
        for j in range(per_layer + 1):
            in_ch = rev[max(b - 1, 0)] if j == 0 else rev[b]
            names |= _vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}", in_ch, rev[b])
        if b < n - 1:
            names[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{b}.upsamplers.0.conv"
    return names


# ---------------------------------------------------------------- text encoders

# Prefixes of text encoders stored in transformers' CLIP naming (SD 1.x, SDXL's first encoder).
_CLIP_PREFIXES = tuple(dict.fromkeys(te.single_file_prefix for f in families.FAMILIES.values()
                                     for te in f.text_encoders if not te.openclip))
POSITION_IDS = "embeddings.position_ids"  # a buffer of transformers' CLIP, rebuilt by the model

# OpenCLIP's text transformer (SD 2.x, SDXL's second encoder) -> transformers' CLIP, without the text_model.
# level. The top-level tensors are named one by one; each resblock's children by module.
_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
                 "text_projection": "text_projection.weight"}
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# OpenCLIP applies the projection as x @ P with P of shape [width, projection]; a Linear holds P.T.
_OPENCLIP_TRANSPOSED = {"text_projection"}
# CLIP's contrastive temperature: trained with the image tower, no part of the text encoder.
_OPENCLIP_DROPPED = {"logit_scale"}
_PROJECTION = _OPENCLIP_TOP["text_projection"]
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def text_encoder_key(key: str) -> str:
    """A CLIP text-encoder key or module path in transformers-5 naming, from LDM, SGM, hub/transformers-4 or 5
    naming (transformers-naming encoders only; OpenCLIP names go through ``openclip_names``)."""
    for prefix in _CLIP_PREFIXES:
        key = key.removeprefix(prefix)
    return key.removeprefix(TEXT_MODEL)


def text_encoder_state(sd: dict) -> dict:
    """A CLIP text-encoder state dict in transformers-5 naming (accepts ``text_model.``-prefixed keys too)."""
    return {text_encoder_key(k): v for k, v in sd.items()}


def openclip_names(layers: int) -> dict[str, str | tuple[str, str, str]]:
    """OpenCLIP tensor name -> transformers CLIP name (no ``text_model.`` level) for a text transformer of
    ``layers`` blocks. The fused attention input projection maps to the (q, k, v) triple it stacks."""
    names: dict[str, str | tuple[str, str, str]] = dict(_OPENCLIP_TOP)
    for n in range(layers):
        block, layer = f"transformer.resblocks.{n}", f"encoder.layers.{n}"
        for param in ("weight", "bias"):
            names |= {f"{block}.{a}.{param}": f"{layer}.{b}.{param}" for a, b in _OPENCLIP_BLOCK.items()}
            names[f"{block}.attn.in_proj_{param}"] = tuple(f"{layer}.self_attn.{p}_proj.{param}" for p in "qkv")
    return names


_openclip_names = cache(openclip_names)  # asked once per tensor by single_file_plan


def _module_key(name: str, module_keys) -> str | None:
    """The model's own key for a CLIP name: transformers 5 flattened CLIPTextModel but CLIPTextModelWithProjection
    keeps its ``text_model.`` level, so ask the model rather than the class name."""
    return next((k for k in (name, TEXT_MODEL + name) if k in module_keys), None)


def _carried_only(te: TextEncoder, name: str, layers: int) -> bool:
    """Tensors single files carry that the diffusers model does not hold. SD 2.x files have the 24 blocks of
    OpenCLIP ViT-H; SD 2.x reads the penultimate block's output, so diffusers' encoder keeps 23. CLIP's
    contrastive temperature was trained with the image tower. Position ids are a buffer the model rebuilds."""
    if not te.openclip:
        return text_encoder_key(name) == POSITION_IDS
    block = _RESBLOCK.match(name)
    if block:
        return layers <= int(block.group(1)) < te.pretrained_layers
    return name in _OPENCLIP_DROPPED


def _read_text_encoder(sub: dict, te: TextEncoder, module) -> tuple[dict, list[str]]:
    """(state dict in the module's own naming, names with no counterpart) from one encoder's file tensors."""
    keys = set(module.state_dict())
    layers = module.config.num_hidden_layers
    names = openclip_names(layers) if te.openclip else {}
    out, unknown = {}, []
    for name, value in sub.items():
        if _carried_only(te, name, layers):
            continue
        target = names.get(name) if te.openclip else text_encoder_key(name)
        if target is None:
            unknown.append(name)
            continue
        if te.openclip and name in _OPENCLIP_TRANSPOSED:
            value = value.T.contiguous()
        targets = zip(target, value.chunk(3)) if isinstance(target, tuple) else [(target, value)]
        for clip_name, tensor in targets:
            key = _module_key(clip_name, keys)
            if key is not None:
                out[key] = tensor
            elif clip_name != _PROJECTION:  # the projection serves the pooled output; SD 2.x's encoder has none
                unknown.append(name)
    return out, unknown


def _write_text_encoder(te: TextEncoder, module) -> dict:
    """One text encoder's tensors in its single-file naming, prefix included."""
    state = {text_encoder_key(k): v for k, v in module.state_dict().items()}
    if not te.openclip:
        out = {f"{te.single_file_prefix}{TEXT_MODEL}{k}": v for k, v in state.items()}
        # Strict loaders of older transformers expect the position ids next to the embeddings.
        positions = module.config.max_position_embeddings
        out[f"{te.single_file_prefix}{TEXT_MODEL}{POSITION_IDS}"] = torch.arange(positions, dtype=torch.int64)[None]
        return out
    # SD 2.x: the 23 blocks the model holds, not the 24 of the original files (see _carried_only). diffusers'
    # from_single_file skips block 23 only when present and loads such a file (tests/test_single_file_families);
    # A1111 and ComfyUI (not run here) load OpenCLIP weights non-strictly and take the penultimate block's output,
    # so the missing last block's weights are never used. Writing a made-up block 23 would put weights in the file that no model has.
    out = {}
    for name, target in openclip_names(module.config.num_hidden_layers).items():
        if isinstance(target, tuple):
            value = torch.cat([state.pop(t) for t in target])
        elif target in state:
            value = state.pop(target)
            value = value.T.contiguous() if name in _OPENCLIP_TRANSPOSED else value
        else:
            continue  # no projection (SD 2.x)
        out[te.single_file_prefix + name] = value
    if state:
        raise SdtuneError(f"{te.component} weight {next(iter(state))} has no OpenCLIP counterpart")
    return out


# ---------------------------------------------------------------- UNet and VAE

def _is_vae_attention_linear(diffusers_module: str) -> bool:
    return ".mid_block.attentions." in diffusers_module and diffusers_module.endswith(_VAE_ATTENTION_LINEARS)


def _split_key(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _read_renamed(sub: dict, names: dict[str, str], vae: bool) -> tuple[dict, list[str]]:
    """(state dict in diffusers naming, keys with no counterpart) from a UNet's or VAE's file tensors."""
    out, unknown = {}, []
    for key, value in sub.items():
        name, param = _split_key(key)
        if name not in names:
            unknown.append(key)
            continue
        target = names[name]
        if vae and param == "weight" and _is_vae_attention_linear(target) and value.ndim > 2:
            value = value.reshape(value.shape[0], value.shape[1])  # LDM holds these as 1x1 convs
        out[f"{target}.{param}"] = value
    return out, unknown


def _write_renamed(module, names: dict[str, str], prefix: str, vae: bool) -> dict:
    """A UNet's or VAE's tensors in LDM naming, prefix included."""
    inverse = {d: ldm for ldm, d in names.items()}
    out = {}
    for key, value in module.state_dict().items():
        name, param = _split_key(key)
        if name not in inverse:
            raise SdtuneError(f"{'VAE' if vae else 'UNet'} weight {key} has no LDM counterpart")
        if vae and param == "weight" and _is_vae_attention_linear(name):
            value = value[:, :, None, None]  # LDM holds these as 1x1 convs
        out[f"{prefix}{inverse[name]}.{param}"] = value
    return out


def _unexpected(unknown: list[str], what: str) -> SdtuneError:
    """The one line for file tensors that have no place in ``what``: the first named, the rest counted."""
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    return SdtuneError(f"unexpected weight {unknown[0]}{more}: not {what}")


def read_vae(sd: dict, vae) -> dict:
    """A standalone VAE file's tensors (A1111's VAE files: LDM names, with or without ``first_stage_model.``;
    or diffusers' AutoencoderKL names) -> a state dict for ``vae``. Raises one ``SdtuneError`` for a tensor that
    is not a VAE's. A whole checkpoint gives its own VAE (its ``first_stage_model.`` part)."""
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in sd):
        raise SdtuneError("this is a LoRA, not a VAE; give it with --lora")
    if any(k.startswith(VAE_PREFIX) for k in sd):  # a checkpoint, or a VAE saved with the prefix: its VAE only
        sd = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    sd = {k.removeprefix(VAE_PREFIX): v for k, v in sd.items() if not k.startswith(("loss.", "model_ema.",
                                                                                    VAE_PREFIX + "loss."))}
    sd.pop("scaling_factor", None)  # the built-in models' VAE files state it; the family's scaling is kept
    if any(k.startswith("encoder.down_blocks.") for k in sd):  # already diffusers' names
        return sd
    state, unknown = _read_renamed(sd, vae_module_map(vae.config), vae=True)
    if unknown:
        raise _unexpected(unknown, "a Stable Diffusion VAE")
    return state


# ---------------------------------------------------------------- whole checkpoints

def component_prefixes(family: Family) -> dict[str, str]:
    """{component: where its weights sit in a single file of this family}."""
    return {"unet": UNET_PREFIX, "vae": VAE_PREFIX, **{te.component: te.single_file_prefix for te in family.text_encoders}}


def _group(sd: dict, family: Family) -> tuple[dict[str, dict], list[str]]:
    """File tensors by component (prefix removed), and the keys that belong to none. Schedules, EMA copies and
    the VAE's training loss are dropped."""
    prefixes = component_prefixes(family)
    groups: dict[str, dict] = {component: {} for component in prefixes}
    unknown = []
    for key, value in sd.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        component = next((c for c, p in prefixes.items() if key.startswith(p)), None)
        if component is None:
            unknown.append(key)
        else:
            groups[component][key[len(prefixes[component]):]] = value
    return groups, unknown


def split_single_file(sd: dict, family: Family, modules: dict, optional=()) -> dict[str, dict]:
    """A single-file checkpoint of ``family`` -> {component: state dict in the naming of ``modules``} (the
    components it fills, built from their configs; under ``init_empty_weights`` is enough). Raises one
    ``SdtuneError`` for a tensor with no counterpart or a component with no weights (one in ``optional``: empty)."""
    groups, unknown = _group(sd, family)
    prefixes = component_prefixes(family)
    readers = {"unet": lambda sub: _read_renamed(sub, unet_module_map(modules["unet"].config), vae=False),
               "vae": lambda sub: _read_renamed(sub, vae_module_map(modules["vae"].config), vae=True)}
    for te in family.text_encoders:
        readers[te.component] = lambda sub, te=te: _read_text_encoder(sub, te, modules[te.component])
    parts = {}
    for component, read in readers.items():
        parts[component], missed = read(groups[component])
        unknown += [prefixes[component] + name for name in missed]
    if unknown:
        raise _unexpected(unknown, f"a {family.title} model of this architecture")
    for component, state in parts.items():
        if not state and component not in optional:
            also = " (or give a VAE with --vae)" if component == "vae" else ""
            raise SdtuneError(f"has no {component} weights ({prefixes[component]}*); pass a full checkpoint of "
                              f"{family.title} that includes them{also}")
    return parts


def to_single_file(modules: dict, family: Family) -> dict:
    """{component: module} of a ``family`` model -> its single-file state dict (LDM or SGM layout: the UNet and
    VAE names are the same in both, the text encoders sit where the family says)."""
    unet, vae = modules["unet"], modules["vae"]
    out = _write_renamed(unet, unet_module_map(unet.config), UNET_PREFIX, vae=False)
    out |= _write_renamed(vae, vae_module_map(vae.config), VAE_PREFIX, vae=True)
    for te in family.text_encoders:
        out |= _write_text_encoder(te, modules[te.component])
    return out


def to_ldm_state_dict(unet, vae, text_encoder) -> dict:
    """The three models' weights in the LDM single-file layout of SD 1.x."""
    return to_single_file({"unet": unet, "vae": vae, "text_encoder": text_encoder}, families.SD1)


class Target(NamedTuple):
    """One model tensor that a single-file tensor holds."""

    component: str  # unet, vae, text_encoder, text_encoder_2
    name: str  # its key in the component's own state dict (diffusers, or transformers as installed)
    chunk: int | None = None  # OpenCLIP's fused attn.in_proj: which third of its rows (0 q, 1 k, 2 v)
    transposed: bool = False  # OpenCLIP's text_projection: the transpose of the Linear weight (applied as x @ P)
    squeeze: bool = False  # a VAE attention weight that LDM holds as a 1x1 conv (two trailing dimensions of 1)


def _renamed_targets(component: str, name: str, names: dict[str, str]) -> list[Target] | None:
    module, param = _split_key(name)
    if module not in names:
        return None
    target = names[module]
    squeeze = component == "vae" and param == "weight" and _is_vae_attention_linear(target)
    return [Target(component, f"{target}.{param}", squeeze=squeeze)]


def _text_targets(te: TextEncoder, module_keys: set[str], layers: int, name: str) -> list[Target] | None:
    """What ``_read_text_encoder`` makes of one file tensor, as names ([]: a tensor only files carry)."""
    if _carried_only(te, name, layers):
        return []
    target = _openclip_names(layers).get(name) if te.openclip else text_encoder_key(name)
    if target is None:
        return None
    if isinstance(target, tuple):
        found = [_module_key(clip_name, module_keys) for clip_name in target]
        return None if None in found else [Target(te.component, k, chunk=i) for i, k in enumerate(found)]
    key = _module_key(target, module_keys)
    if key is None:  # the projection serves the pooled output; SD 2.x's encoder has none
        return [] if target == _PROJECTION else None
    return [Target(te.component, key, transposed=te.openclip and name in _OPENCLIP_TRANSPOSED)]


def single_file_plan(keys, family: Family, modules: dict, strict: bool = True) -> dict[str, list[Target]]:
    """{file key: the model tensors it holds} for a single file of ``family``, from the key names alone: what
    ``split_single_file`` does to the tensors, as a plan that a streamed merge follows tensor by tensor.

    ``modules``: the components built from their configs (under ``init_empty_weights``). Keys that hold no
    model tensor (schedules, EMA, the VAE's loss, position ids, SD 2.x's last OpenCLIP block and projection,
    CLIP's temperature) map to []. Any other unknown key raises ``SdtuneError`` (``strict``) or is left out.
    """
    prefixes = component_prefixes(family)
    names = {"unet": unet_module_map(modules["unet"].config), "vae": vae_module_map(modules["vae"].config)}
    encoders = {te.component: (te, set(modules[te.component].state_dict()), modules[te.component].config.num_hidden_layers)
                for te in family.text_encoders}

    def targets(key: str) -> list[Target] | None:
        if key.startswith(_IGNORED_PREFIXES):
            return []
        component = next((c for c, p in prefixes.items() if key.startswith(p)), None)
        if component is None:
            return None
        name = key[len(prefixes[component]):]
        if component in names:
            return _renamed_targets(component, name, names[component])
        return _text_targets(*encoders[component], name)

    plan, unknown = {}, []
    for key in keys:
        found = targets(key)
        if found is None:
            unknown.append(key)
        else:
            plan[key] = found
    if unknown and strict:
        raise _unexpected(unknown, f"a {family.title} model of this architecture")
    return plan
