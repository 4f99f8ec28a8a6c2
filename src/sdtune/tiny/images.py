"""A broad synthetic image set at 64x64, by category: what the built-in VAE must encode besides the world.

Each category draws from its own deterministic generator: the same (category, seed) always gives the same
pixels. The VAE trains on one range of seeds and is measured on another (see ``vae_quality``).

Categories:
- ``world``: renders of the shapes world (what the diffusion model knows; kept close to the old codec);
- ``background``: a world shape on any flat background colour (pink, dark blue, ...), in any colour;
- ``gradient``: linear and radial gradients between random colours, sometimes with a shape;
- ``frame``: frames and borders of any thickness and colour around a scene, sometimes double;
- ``objects``: several filled shapes (ellipses, boxes, polygons) overlapping, in random colours;
- ``lines``: straight lines and polylines of 1-4 px on a flat background;
- ``texture``: checkerboards, stripes, dots and wave patterns (periods of 4 px and more);
- ``noise``: a scene with Gaussian pixel noise (sigma up to 10/255), or smooth cloud noise;
- ``text``: a few words of small text (9-16 px) in any colour;
- ``photo``: crops of the photographs matplotlib ships (its sample data; no download), at random scales.
"""

from __future__ import annotations

import math
import random
import string
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from . import world

SIZE = world.SIZE
_SS = 4  # supersampling for drawn shapes and lines, as in world.render

CATEGORIES = ("world", "background", "gradient", "frame", "objects", "lines", "texture", "noise", "text", "photo")


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def _canvas(rng: random.Random, colour=None) -> Image.Image:
    return Image.new("RGB", (SIZE * _SS, SIZE * _SS), colour or _colour(rng))


def _down(img: Image.Image) -> Image.Image:
    return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _shape_points(rng: random.Random, big: int) -> list[tuple[float, float]]:
    """A world shape's outline (any of them) at a random place and size, in supersampled pixels."""
    shape = rng.choice(world.SHAPES)
    r = rng.uniform(0.12, 0.38) * big
    return world._polygon(shape, rng.uniform(0.25, 0.75) * big, rng.uniform(0.25, 0.75) * big, r,
                          rng.uniform(-45, 45))


def _world(rng: random.Random) -> Image.Image:
    return world.render(world.random_scene(rng))


def _background(rng: random.Random) -> Image.Image:
    img = _canvas(rng)
    ImageDraw.Draw(img).polygon(_shape_points(rng, img.width), fill=_colour(rng))
    return _down(img)


def _gradient_array(rng: random.Random) -> np.ndarray:
    """float [64, 64, 3] in 0..255: a linear or radial blend of two or three colours."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    if rng.random() < 0.6:
        a = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a)
    else:
        t = np.hypot(xx - rng.uniform(0, 1), yy - rng.uniform(0, 1))
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    stops = [np.array(_colour(rng), np.float32) for _ in range(rng.choice((2, 2, 3)))]
    if len(stops) == 2:
        return stops[0] * (1 - t[..., None]) + stops[1] * t[..., None]
    lo = np.clip(t * 2, 0, 1)[..., None]
    hi = np.clip(t * 2 - 1, 0, 1)[..., None]
    return np.where(t[..., None] < 0.5, stops[0] * (1 - lo) + stops[1] * lo, stops[1] * (1 - hi) + stops[2] * hi)


def _from_array(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _gradient(rng: random.Random) -> Image.Image:
    img = _from_array(_gradient_array(rng))
    if rng.random() < 0.4:
        big = img.resize((SIZE * _SS,) * 2, Image.Resampling.BILINEAR)
        ImageDraw.Draw(big).polygon(_shape_points(rng, big.width), fill=_colour(rng))
        img = _down(big)
    return img


def _frame(rng: random.Random) -> Image.Image:
    inner = rng.choice((_world, _background, _gradient))(rng)
    big = inner.resize((SIZE * _SS,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    edge = 0
    for _ in range(rng.choice((1, 1, 2))):
        width = rng.randint(1, 10) * _SS
        draw.rectangle([edge, edge, big.width - 1 - edge, big.height - 1 - edge], outline=_colour(rng), width=width)
        edge += width + rng.randint(0, 4) * _SS
    return _down(big)


def _objects(rng: random.Random) -> Image.Image:
    img = _canvas(rng) if rng.random() < 0.7 else _gradient(rng).resize((SIZE * _SS,) * 2)
    draw = ImageDraw.Draw(img)
    big = img.width
    for _ in range(rng.randint(2, 6)):
        kind = rng.choice(("ellipse", "box", "polygon", "shape"))
        x0, y0 = rng.uniform(-0.1, 0.8) * big, rng.uniform(-0.1, 0.8) * big
        w, h = rng.uniform(0.1, 0.5) * big, rng.uniform(0.1, 0.5) * big
        fill = _colour(rng)
        if kind == "ellipse":
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == "box":
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == "polygon":
            draw.polygon([(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(rng.randint(3, 6))],
                         fill=fill)
        else:
            draw.polygon(_shape_points(rng, big), fill=fill)
    return _down(img)


def _lines(rng: random.Random) -> Image.Image:
    img = _canvas(rng)
    draw = ImageDraw.Draw(img)
    big = img.width
    for _ in range(rng.randint(2, 8)):
        pts = [(rng.uniform(0, big), rng.uniform(0, big)) for _ in range(rng.choice((2, 2, 3, 4)))]
        draw.line(pts, fill=_colour(rng), width=int(rng.uniform(1, 4) * _SS), joint="curve")
    return _down(img)


def _texture(rng: random.Random) -> Image.Image:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    kind = rng.choice(("checker", "stripes", "dots", "waves"))
    period = rng.uniform(4, 16)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "checker":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "stripes":
        t = (np.floor(u / period) % 2).astype(np.float32)
    elif kind == "dots":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        t = (np.hypot(du, dv) < period * rng.uniform(0.2, 0.4)).astype(np.float32)
    else:
        t = 0.5 + 0.25 * np.sin(2 * math.pi * u / period) + 0.25 * np.sin(2 * math.pi * v / rng.uniform(4, 24))
    # box-filter the hard patterns at 2x so edges are anti-aliased like the drawn categories
    img = _from_array(a * (1 - t[..., None]) + b * t[..., None])
    return img.filter(ImageFilter.GaussianBlur(0.4)) if kind != "waves" else img


def _noise(rng: random.Random) -> Image.Image:
    nrng = np.random.default_rng(rng.randrange(2**32))
    if rng.random() < 0.35:  # smooth "cloud" noise: random values on a coarse grid, upsampled
        cells = rng.choice((4, 8, 16))
        coarse = nrng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float32)
        mix = rng.uniform(0.3, 1.0)
        base = base * mix + np.array(_colour(rng), np.float32) * (1 - mix)
    else:
        base = np.asarray(rng.choice((_world, _background, _gradient, _objects))(rng), np.float32)
    sigma = rng.uniform(2, 10)
    return _from_array(base + nrng.normal(0, sigma, base.shape))


_WORDS = ["sale", "open", "menu", "cafe", "stop", "hello", "new", "info", "exit", "tiny", "shop", "top", "art",
          "map", "news", "play", "free", "home", "park", "book"]


def _text(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), _colour(rng)) if rng.random() < 0.7 else _gradient(rng)
    draw = ImageDraw.Draw(img)
    bg = np.asarray(img, np.float32).mean((0, 1))
    for _ in range(rng.randint(1, 3)):
        word = rng.choice(_WORDS) if rng.random() < 0.7 else "".join(
            rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(2, 5)))
        font = ImageFont.load_default(size=rng.randint(9, 16))
        fg = _colour(rng)
        while np.abs(np.array(fg, np.float32) - bg).sum() < 150:  # readable: far enough from the background
            fg = _colour(rng)
        draw.text((rng.uniform(0, 0.6) * SIZE, rng.uniform(0, 0.8) * SIZE), word, fill=fg, font=font)
    return img


def _photo_sources() -> list[Path]:
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [folder / "grace_hopper.jpg"]


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    """The photographs at hand: matplotlib's Grace Hopper portrait and a hill-shaded elevation map."""
    photos = [Image.open(p).convert("RGB") for p in _photo_sources() if p.is_file()]
    dem = Path(matplotlib.get_data_path()) / "sample_data" / "jacksboro_fault_dem.npz"
    if dem.is_file():
        with np.load(dem) as d:
            z = d["elevation"].astype(np.float32)
        gy, gx = np.gradient(z)
        shade = np.clip(0.5 + (gx - gy) / (np.abs(gx).max() + np.abs(gy).max()) * 4, 0, 1)
        h = (z - z.min()) / (z.max() - z.min())
        rgb = np.stack([0.3 + 0.6 * h, 0.45 + 0.35 * h, 0.25 + 0.2 * h], -1) * (0.4 + 0.6 * shade[..., None])
        photos.append(Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)))
    return tuple(photos)


def _photo(rng: random.Random) -> Image.Image:
    photos = _photos()
    if not photos:  # no sample data installed: fall back to objects on a gradient (still photo-like)
        return _objects(rng)
    src = photos[rng.randrange(len(photos))]
    side = int(min(src.size) * rng.uniform(0.25, 1.0))
    x, y = rng.randint(0, src.width - side), rng.randint(0, src.height - side)
    crop = src.crop((x, y, x + side, y + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


_MAKERS = {"world": _world, "background": _background, "gradient": _gradient, "frame": _frame,
           "objects": _objects, "lines": _lines, "texture": _texture, "noise": _noise, "text": _text,
           "photo": _photo}


def image(category: str, seed: int) -> Image.Image:
    """One 64x64 RGB image of a category; the same (category, seed) always gives the same pixels."""
    if category not in _MAKERS:
        raise ValueError(f"unknown image category {category!r}; known: {', '.join(CATEGORIES)}")
    return _MAKERS[category](random.Random(f"{category}:{seed}"))


def images(category: str, seeds) -> np.ndarray:
    """uint8 [N, 64, 64, 3] images of one category."""
    return np.stack([np.asarray(image(category, s), dtype=np.uint8) for s in seeds])


__all__ = ["CATEGORIES", "image", "images"]
