"""Loss masks: which parts of a training image the loss learns from (``--masked-loss``).

A mask is a grey image the size of its training image: white learns fully, black not at all, grey in
between. It comes from ``NAME.mask.png`` beside ``NAME.png`` (any image suffix; mask files are never taken
as training images), else from the image's own alpha channel, else the image has none (all white). The mask
goes through the same resize, crop and flip as its image and is then averaged down to the latent grid (one
value per latent pixel, VAE factor 8 on SD), where it multiplies the squared error before the mean, as
sd-scripts' ``--masked_loss`` does: a masked-out region adds nothing to the loss or its gradient, and an
image with little white counts for less in its batch (the loss is not renormalised by the mask's area).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..safeio import SdtuneError

MASK_TAG = ".mask"  # NAME.mask.png is the mask of NAME.png


def is_mask_file(path: Path) -> bool:
    """``x.mask.png`` and the like: a mask, not a training image."""
    return Path(path).stem.lower().endswith(MASK_TAG)


def mask_file(image: Path, suffixes) -> Path | None:
    """The ``NAME.mask.*`` file beside ``image``, if there is one."""
    for suffix in (".png", *sorted(s for s in suffixes if s != ".png")):
        for candidate in (image.with_name(image.stem + MASK_TAG + suffix),
                          image.with_name(image.stem + MASK_TAG + suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def open_mask(image: Path, suffixes) -> Image.Image | None:
    """The mask of ``image`` as an 8-bit grey image of the image's upright size, or None (no mask). A mask
    file counts by its grey value, whatever its mode."""
    path = mask_file(image, suffixes)
    with Image.open(image) as img:
        upright = ImageOps.exif_transpose(img)
        if path is None:
            return upright.convert("RGBA").getchannel("A") if has_alpha(img) else None
        size = upright.size
    try:
        with Image.open(path) as m:
            mask = ImageOps.exif_transpose(m).convert("L")
    except OSError as e:
        raise SdtuneError(f"{path}: unreadable mask ({e}); fix or remove it") from None
    if mask.size != size:  # a mask drawn at another scale: stretched onto its image
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def to_latent(mask: Image.Image | None, latent_size: tuple[int, int]) -> torch.Tensor:
    """[1, h, w] weights in [0, 1]: the (already resized and cropped) mask averaged over each latent pixel's
    block of pixels; all ones without a mask."""
    h, w = latent_size
    if mask is None:
        return torch.ones(1, h, w)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(pixels, size=(h, w), mode="area")[0]


def count(paths: list[Path], suffixes) -> tuple[int, int]:
    """(images with a NAME.mask file, images with an alpha channel) among ``paths``: for the note that masks
    are there but ``--masked-loss`` is off."""
    files = alpha = 0
    for p in paths:
        if mask_file(p, suffixes) is not None:
            files += 1
            continue
        with Image.open(p) as img:
            alpha += has_alpha(img)
    return files, alpha
