"""Training images: any file Pillow reads (RGBA, palette, grayscale, 16-bit, EXIF-rotated) as 8-bit RGB, transparency
composited on white; its upright size from the header; and the resizing, cropping, buckets and colour shifts that
training applies to it, with the size and crop time ids SDXL is conditioned on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff"}  # AVIF: Pillow 11.3+


def check_image(path: Path) -> str | None:
    """None if Pillow can decode ``path``, else the reason."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                return "empty image"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Grayscale of more than 8 bits (I;16*, I, F) as 8-bit L, scaled rather than clipped."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "F":
        arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
    elif arr.size and arr.max() > 255:  # "I": 16-bit data in a 32-bit container
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def open_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB, upright (EXIF orientation applied), transparency composited on white."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)
        has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the sides. Reads only the header."""
    return image_header(path)[0]


def image_header(path: Path) -> tuple[tuple[int, int], bool]:
    """(upright (width, height), whether the file is animated: GIF, APNG, WebP) from its header."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
        animated = bool(getattr(img, "is_animated", False))
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), animated


def cover_box(width: int, height: int, size: tuple[int, int], where: tuple[float, float] = (0.5, 0.5)
              ) -> tuple[int, int, int, int]:
    """What ``fit`` does to a ``width`` x ``height`` image: (resized width, resized height, crop left, crop top),
    the crop's corner in the resized image's pixels (what SDXL's crop time ids hold)."""
    w, h = size
    scale = max(w / width, h / height)
    nw, nh = max(w, round(width * scale)), max(h, round(height * scale))
    return nw, nh, round((nw - w) * where[0]), round((nh - h) * where[1])


def fit(img: Image.Image, size: tuple[int, int], where: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Resize to cover ``size`` (w, h) keeping the aspect ratio, then crop; ``where`` places the crop (0..1)."""
    w, h = size
    nw, nh, left, top = cover_box(img.width, img.height, size, where)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    return img.crop((left, top, left + w, top + h))


COLOR_AUG_TURN = 8 / 180  # kohya's color_aug: up to 8 of OpenCV's 180 hue steps either way


def shift_hue(img: Image.Image, turn: float) -> Image.Image:
    """``img`` with its hue turned by ``turn`` of the colour circle (kohya's color_aug, in Pillow's 256 steps)."""
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(turn * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def time_ids(original: tuple[int, int], box: tuple[int, int, int, int], size: tuple[int, int],
             flipped: bool = False) -> list[float]:
    """SDXL's size and crop conditioning of one training image: (original height, original width, crop top,
    crop left, target height, target width), as SDXL was trained. ``original``, ``size``: (w, h); ``box``: from
    ``cover_box``. A flipped image's crop is mirrored: its left edge is the distance from the right."""
    nw, _, left, top = box
    if flipped:
        left = nw - size[0] - left
    return [float(original[1]), float(original[0]), float(top), float(left), float(size[1]), float(size[0])]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def bucket_sizes(resolution: int, step: int, min_side: int | None = None, max_side: int | None = None
                 ) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of ``step``, of area at most resolution², sides within [min_side, max_side]."""
    min_side = min_side or max(step, (resolution // 2) // step * step)
    max_side = max_side or resolution * 2
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def own_bucket(size: tuple[int, int], step: int) -> tuple[int, int]:
    """An image's own size rounded down to multiples of ``step`` (at least one step a side)."""
    return max(step, size[0] - size[0] % step), max(step, size[1] - size[1] % step)


def pick_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The size whose aspect ratio is closest to the image's (ties: the larger area)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))
