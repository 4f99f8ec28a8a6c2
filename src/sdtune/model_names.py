"""The models sdtune knows by name (the built-in ones, random-init ones of each family's architecture), and a
model's family where it is told without loading the model. Data and file headers only: a command line's
settings are checked against a model's family before diffusers is loaded, or without it."""

from __future__ import annotations

import json
from pathlib import Path

from . import families
from .checkpoints import checkpoint_header, header_family
from .safeio import SdtuneError, is_safetensors
from .tiny import files as tiny_files
from .tiny import sd1_config, xl_config


def small_sdxl_configs() -> dict:
    """The small random SDXL-architecture model (``sdxl-small-random``): see ``sdtune.tiny.xl_config``."""
    return {"unet": dict(xl_config.UNET), "vae": dict(xl_config.VAE), "text_encoder": dict(xl_config.TEXT_ENCODER),
            "text_encoder_2": dict(xl_config.TEXT_ENCODER_2),
            "scheduler": families.SDXL.component_configs()["scheduler"]}


def small_sd1_configs() -> dict:
    """The small random SD 1.x-architecture model (``sd1-small-random``): see ``sdtune.tiny.sd1_config``."""
    return {"unet": dict(sd1_config.UNET), "vae": dict(sd1_config.VAE), "text_encoder": dict(sd1_config.TEXT_ENCODER),
            "scheduler": families.SD1.component_configs()["scheduler"]}


TINY_SPECS = {"tiny": (False, True), "tiny-random": (False, False), "tiny-xl": (True, True),
              "tiny-xl-random": (True, False)}  # spec -> (SDXL architecture, trained weights)


# Random-init models of each family's real architecture (and a small SDXL one), for tests and benchmarks.
RANDOM_SPECS = {"sd15-random": (families.SD1, None), "sd1-random": (families.SD1, None),
                "sd2-random": (families.SD2, None), "sdxl-random": (families.SDXL, None),
                "sdxl-small-random": (families.SDXL, small_sdxl_configs),
                "sd1-small-random": (families.SD1, small_sd1_configs)}


def known_family(spec: str):
    """The family of ``spec`` where it is known without loading the weights: built-in and random-init models by
    name, a diffusers folder by its UNet config, a safetensors checkpoint by its header (sdtune's own metadata,
    else the cross-attention width). None where only loading tells (a .ckpt pickle, a hub id, a damaged file),
    and loading then says what is wrong."""
    if spec in TINY_SPECS:
        return families.TINY_XL if TINY_SPECS[spec][0] else families.TINY
    if spec in RANDOM_SPECS:
        return RANDOM_SPECS[spec][0]
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if tiny_files.is_xl_export(path):
                return families.TINY_XL
            if tiny_files.trained_weights_exist(path):
                return families.TINY
            config = json.loads((path / "unet" / "config.json").read_text())
            return families.by_cross_attention(config.get("cross_attention_dim"))
        if path.is_file() and is_safetensors(path):
            return header_family(*checkpoint_header(path))  # the header only: no tensor is read
    except (OSError, ValueError, SdtuneError, AttributeError):
        pass
    return None


def tiny_export(path: Path) -> bool:
    """Whether ``path`` is a folder the tiny recipe exported (``runs/tiny/model``), loaded as the built-in models are."""
    return path.is_dir() and (tiny_files.is_xl_export(path) or tiny_files.trained_weights_exist(path))
