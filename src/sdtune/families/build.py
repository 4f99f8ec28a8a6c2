"""A family's components as diffusers/transformers modules, built from config dicts.

Below ``models`` (which loads weights into them) and ``lora.bake``; ``module_table`` is what the shipped module
tables (``Family.modules``) are written from and checked against.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from . import TEXT_MODEL, Family, TextEncoder

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


def module_table(family: Family) -> dict[str, dict[str, list[int]]]:
    """{component: {module path: weight shape}} for every module that owns a weight, built on the meta device
    from the family's configs; text-encoder paths without ``text_model.``, whichever transformers built them."""
    with init_empty_weights():
        parts = build_parts(family)
    table = {}
    for component in ("unet", *(te.component for te in family.text_encoders)):
        strip = component != "unet"
        table[component] = {(name.removeprefix(TEXT_MODEL) if strip else name): list(sub.weight.shape)
                            for name, sub in parts[component].named_modules()
                            if name and isinstance(getattr(sub, "weight", None), torch.Tensor)}
    return table
