"""Names of the original LDM single-file layout of SD 1.x, and their diffusers/transformers counterparts.

A1111, ComfyUI, kohya and civitai files use the LDM layout (``model.diffusion_model.input_blocks.4.1...``,
``first_stage_model.encoder.down.0.block.0...``, ``cond_stage_model.transformer.text_model...``); sdtune holds
models in diffusers/transformers-5 naming. The maps here are derived from the component configs, so they
cover any SD-1.x-shaped UNet/VAE (the real SD 1.5 and the tiny model alike), and every module that owns
parameters appears exactly once.
"""

from __future__ import annotations

import torch

from .safeio import SdtuneError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
TEXT_MODEL = "text_model."  # the extra level of transformers 4 / hub CLIP state dicts

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

# Top-level entries of LDM checkpoints that are not weights of the three models (schedules, EMA, loss).
_IGNORED_PREFIXES = ("model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus_",
                     "posterior_", "logvar", "lvlb_weights", "first_stage_model.loss.")


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
        raise SdtuneError("UNet configs with a different layers_per_block per block are not SD 1.x")
    depth = _per_block(cfg.get("transformer_layers_per_block", 1) or 1, n)
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    names = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
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
        raise SdtuneError(f"UNet mid block {mid_type} is not SD 1.x")
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


def text_encoder_key(key: str) -> str:
    """A CLIP text-encoder key or module path in transformers-5 naming, from LDM, hub/transformers-4 or 5 naming."""
    for prefix in ("cond_stage_model.transformer.", TEXT_MODEL):
        key = key.removeprefix(prefix)
    return key


def text_encoder_state(sd: dict) -> dict:
    """A CLIP text-encoder state dict in transformers-5 naming (accepts ``text_model.``-prefixed keys too)."""
    return {text_encoder_key(k): v for k, v in sd.items()}


def _is_vae_attention_linear(diffusers_module: str) -> bool:
    return ".mid_block.attentions." in diffusers_module and diffusers_module.endswith(_VAE_ATTENTION_LINEARS)


def _split_key(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _rename(sd: dict, module_map: dict[str, str], what: str) -> dict:
    out = {}
    for key, value in sd.items():
        module, param = _split_key(key)
        if module not in module_map:
            raise SdtuneError(f"{what} weight {key} has no counterpart in the model built from the config")
        out[f"{module_map[module]}.{param}"] = value
    return out


def to_ldm_state_dict(unet, vae, text_encoder) -> dict:
    """The three models' weights in the original LDM single-file layout (SD 1.x)."""
    out = {}
    inverse = {d: ldm for ldm, d in unet_module_map(unet.config).items()}
    for key, value in _rename(unet.state_dict(), inverse, "UNet").items():
        out[UNET_PREFIX + key] = value
    inverse = {d: ldm for ldm, d in vae_module_map(vae.config).items()}
    for key, value in vae.state_dict().items():
        module, param = _split_key(key)
        if module not in inverse:
            raise SdtuneError(f"VAE weight {key} has no LDM counterpart")
        if param == "weight" and _is_vae_attention_linear(module):
            value = value[:, :, None, None]  # LDM holds these as 1x1 convs
        out[f"{VAE_PREFIX}{inverse[module]}.{param}"] = value
    for key, value in text_encoder.state_dict().items():
        out[TEXT_PREFIX + text_encoder_key(key)] = value
    # Strict loaders of older transformers expect the position ids next to the embeddings.
    positions = text_encoder.config.max_position_embeddings
    out[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def split_ldm_keys(keys, unet_config, vae_config, strict: bool = True) -> dict[str, tuple[str, str, bool]]:
    """{LDM key: (part, key in diffusers/transformers-5 naming, squeeze)} for the model weights among ``keys``;
    part is "unet", "vae" or "text_encoder", squeeze marks a VAE attention weight that LDM holds as a 1x1 conv
    and diffusers as a linear (same bytes, two trailing dimensions fewer). Schedule buffers, EMA copies, the
    VAE training loss and the text encoder's position ids are left out; any other unknown key raises
    (``strict``) or is left out too."""
    unet_map, vae_map = unet_module_map(unet_config), vae_module_map(vae_config)
    plan: dict[str, tuple[str, str, bool]] = {}
    unknown = []
    for key in keys:
        if key.startswith(UNET_PREFIX):
            module, param = _split_key(key[len(UNET_PREFIX):])
            if module in unet_map:
                plan[key] = ("unet", f"{unet_map[module]}.{param}", False)
                continue
        elif key.startswith(VAE_PREFIX) and not key.startswith(VAE_PREFIX + "loss."):
            module, param = _split_key(key[len(VAE_PREFIX):])
            if module in vae_map:
                target = vae_map[module]
                plan[key] = ("vae", f"{target}.{param}", param == "weight" and _is_vae_attention_linear(target))
                continue
        elif key.startswith("cond_stage_model.transformer."):
            name = text_encoder_key(key)
            if name != "embeddings.position_ids":  # a buffer, rebuilt by the model
                plan[key] = ("text_encoder", name, False)
            continue
        elif key.startswith(_IGNORED_PREFIXES):
            continue
        unknown.append(key)
    if unknown and strict:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise SdtuneError(f"unexpected weight {unknown[0]}{more}: not an SD 1.x model of this architecture")
    return plan


def split_ldm_state_dict(sd: dict, unet_config, vae_config) -> dict[str, dict]:
    """An LDM single-file state dict -> {"unet", "vae", "text_encoder"} state dicts in diffusers/transformers-5
    naming. Schedule buffers, EMA copies and the VAE training loss are dropped; any other unknown key raises."""
    parts: dict[str, dict] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, (part, name, squeeze) in split_ldm_keys(sd, unet_config, vae_config).items():
        value = sd[key]
        parts[part][name] = value.reshape(value.shape[0], value.shape[1]) if squeeze and value.ndim > 2 else value
    return parts
