"""Where the built-in models' weights are shipped, and whether a folder holds them: paths only, so that a model's
family is told (``model_names.known_family``) without loading diffusers."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "model"
TOKENIZER = ASSETS / "tokenizer"
COMPONENTS = ("unet", "vae", "text_encoder")
XL_WEIGHTS = ASSETS / "model-xl"
XL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # tiny-xl's own; the VAE is tiny's


def trained_weights_exist(folder: Path = WEIGHTS, components=COMPONENTS) -> bool:
    return all((folder / f"{c}.safetensors").is_file() for c in components)


def is_xl_export(folder: Path) -> bool:
    """A folder of tiny-xl weights (its own components; an export of the recipe also holds the shared ones)."""
    return trained_weights_exist(folder, XL_COMPONENTS)


def weight_files(folder: Path, xl: bool) -> list[Path]:
    """The files a model is loaded from: tiny-xl takes its own components from ``folder``, and the VAE from
    there too where an export holds one, else from the shipped tiny model."""
    if not xl:
        return [folder / f"{c}.safetensors" for c in COMPONENTS]
    vae = folder / "vae.safetensors"
    return [folder / f"{c}.safetensors" for c in XL_COMPONENTS] + [vae if vae.is_file() else WEIGHTS / vae.name]
