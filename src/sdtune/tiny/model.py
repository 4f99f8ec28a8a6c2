"""Build the built-in models' components, random-init or from the shipped weights: ``tiny`` (SD 1.x
architecture) and ``tiny-xl`` (SDXL architecture; it ships its UNet and text encoders and takes the VAE from
``tiny``)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import config
from .files import TOKENIZER, WEIGHTS, XL_WEIGHTS, is_xl_export, trained_weights_exist, weight_files


def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER)


def vae_for(state: dict) -> AutoencoderKL:
    """A random VAE of the widths a state dict holds (the shipped VAE's, or twice those: ``vae_recipe --widen``)."""
    factor = state["encoder.conv_in.weight"].shape[0] // config.VAE["block_out_channels"][0]
    return AutoencoderKL(**config.vae_widened(factor))


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


def build_xl(seed: int = 0) -> dict:
    """Random-init tiny-xl components: tiny's VAE, a first text encoder one layer deeper than tiny's (see
    ``config.XL_TEXT_ENCODER_1``), an SDXL-layout UNet and a second, projecting text encoder (tokenizers are the
    caller's: ``models.tokenizer_for`` pads each as it was trained)."""
    parts = build(seed)
    del parts["tokenizer"]
    torch.manual_seed(seed + 1)
    parts["unet"] = UNet2DConditionModel(**config.XL_UNET)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**config.XL_TEXT_ENCODER_1))
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**config.XL_TEXT_ENCODER_2))
    return parts


def _fill(parts: dict, files: list[Path]) -> dict:
    for path in files:
        state = load_file(path)
        if path.stem == "vae":  # its widths as in the file (``vae_recipe --widen`` makes them twice as wide)
            parts["vae"] = vae_for(state)
            parts["vae"].register_to_config(scaling_factor=float(state.pop("scaling_factor")))
        parts[path.stem].load_state_dict({k: v.float() for k, v in state.items()})
    return parts


def load_xl(folder: Path = XL_WEIGHTS) -> dict:
    """Trained tiny-xl; random init (same architecture) if no weights are shipped."""
    if not (is_xl_export(folder) and trained_weights_exist(WEIGHTS)):
        return build_xl()
    return _fill(build_xl(), weight_files(folder, xl=True))


def load(folder: Path = WEIGHTS) -> dict:
    """The trained tiny model; falls back to random init (same architecture) if no weights are shipped."""
    parts = build()
    if not trained_weights_exist(folder):
        return parts
    return _fill(parts, weight_files(folder, xl=False))
