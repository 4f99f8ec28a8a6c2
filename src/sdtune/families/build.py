"""A family's components as diffusers/transformers modules, built from config dicts.

Below ``models`` (which loads weights into them) and ``lora.keys`` (which reads module names and shapes from
them on the meta device), so both can build a family's structure.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from . import Family, TextEncoder

TEXT_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def text_model(te: TextEncoder, config: dict) -> torch.nn.Module:
    """A random-init text encoder of the class the family names, from a transformers config dict."""
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    return TEXT_CLASSES[te.model_class](CLIPTextConfig(**config))


def build_parts(family: Family, configs: dict | None = None) -> dict[str, torch.nn.Module]:
    """{"unet", "vae", text encoder components} built from configs (random init; under init_empty_weights
    for shapes only). ``configs`` defaults to the family's shipped ones."""
    configs = configs or family.component_configs()
    parts = {"unet": UNet2DConditionModel(**configs["unet"]), "vae": AutoencoderKL(**configs["vae"])}
    for te in family.text_encoders:
        parts[te.component] = text_model(te, configs[te.component])
    return parts

