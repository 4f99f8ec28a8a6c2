"""Build the tiny model's components, random-init or from the shipped weights."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import config

ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "model"
TOKENIZER = ASSETS / "tokenizer"
COMPONENTS = ("unet", "vae", "text_encoder")


def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER)


def build(seed: int = 0) -> dict:
    """Random-init components of the tiny architecture (deterministic for a seed)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config.VAE)
    vae.register_to_config(scaling_factor=1.0)
    return {
        "unet": UNet2DConditionModel(**config.UNET),
        "vae": vae,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**config.TEXT_ENCODER)),
        "tokenizer": tokenizer(),
        "scheduler": DDIMScheduler(**config.SCHEDULER),
    }


def trained_weights_exist(folder: Path = WEIGHTS) -> bool:
    return all((folder / f"{c}.safetensors").is_file() for c in COMPONENTS)


def load(folder: Path = WEIGHTS) -> dict:
    """The trained tiny model; falls back to random init (same architecture) if no weights are shipped."""
    parts = build()
    if not trained_weights_exist(folder):
        return parts
    for name in COMPONENTS:
        state = load_file(folder / f"{name}.safetensors")
        module = parts[name]
        if name == "vae":
            module.register_to_config(scaling_factor=float(state.pop("scaling_factor")))
        module.load_state_dict({k: v.float() for k, v in state.items()})
    return parts
