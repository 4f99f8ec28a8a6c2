"""The shapes world: a deterministic renderer of 64x64 images from a description, with captions.

Every image is one coloured shape on a plain background, drawn in a style. Because the ground truth is
known, a judge can score what a model generates, and training sets for any concept can be made on the
spot. Rendering is done at 4x and downsampled (anti-aliasing); the same (description, seed) always gives
the same pixels.

Held out of the base model's training (what TI and LoRA learn later):
- the shape ``heart`` (never shown to the diffusion model);
- the colour-on-shape pairs in ``HELD_OUT_PAIRS`` (each colour and shape is seen, never together);
- the style ``outline``.
The judge is trained on everything, held-out concepts included.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from ..safeio import atomic_path, atomic_write_text

SIZE = 64
_SS = 4  # supersampling factor

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart"]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 210, 30),
    "purple": (135, 45, 185),
    "orange": (245, 130, 20),
    "cyan": (30, 200, 215),
    "pink": (245, 125, 195),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
STYLES = ["flat", "striped", "outline"]

HELD_OUT_SHAPES = ["heart"]
HELD_OUT_STYLES = ["outline"]
HELD_OUT_PAIRS = [("purple", "star"), ("orange", "square"), ("cyan", "triangle")]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str = "white"
    style: str = "flat"
    size: float = 0.34  # radius as a fraction of the image side
    cx: float = 0.5
    cy: float = 0.5
    angle: float = 0.0  # small rotation in degrees

    def caption(self, template: int = 0) -> str:
        return caption(self, template)


def is_held_out(scene: Scene) -> bool:
    return (scene.shape in HELD_OUT_SHAPES or scene.style in HELD_OUT_STYLES
            or (scene.colour, scene.shape) in HELD_OUT_PAIRS)


def random_scene(rng: random.Random, shape=None, colour=None, background=None, style=None,
                 held_in_only: bool = False) -> Scene:
    """A scene with the given attributes and random jitter for the rest (held-in combos if asked)."""
    if held_in_only and (shape in HELD_OUT_SHAPES or style in HELD_OUT_STYLES or (colour, shape) in HELD_OUT_PAIRS):
        raise ValueError(f"held_in_only asks for held-in scenes, but {shape or ''} {colour or ''} {style or ''} "
                         "is held out")
    while True:
        s = Scene(
            shape=shape or rng.choice(SHAPES),
            colour=colour or rng.choice(list(COLOURS)),
            background=background or rng.choice(list(BACKGROUNDS)),
            style=style or rng.choice(STYLES),
            size=rng.uniform(0.27, 0.38),
            cx=0.5 + rng.uniform(-0.08, 0.08),
            cy=0.5 + rng.uniform(-0.08, 0.08),
            angle=rng.uniform(-12, 12),
        )
        if not held_in_only or not is_held_out(s):
            return s


# --- captions -----------------------------------------------------------------------------------

_TEMPLATES = [
    "a {c} {s} on a {b} background",
    "a {c} {s}",
    "a photo of a {c} {s}",
    "{c} {s}, {b} background",
    "a drawing of a {c} {s} on {b}",
]


def caption(scene: Scene, template: int = 0, with_style: bool = True) -> str:
    """Plain-English caption. Flat style is the default look, so its name is optional in captions."""
    text = _TEMPLATES[template % len(_TEMPLATES)].format(c=scene.colour, s=scene.shape, b=scene.background)
    if with_style and scene.style != "flat":
        text += f", {scene.style} style"
    return text


def n_templates() -> int:
    return len(_TEMPLATES)


# --- geometry -----------------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n, radius, start):
        return [(radius * math.cos(start + 2 * math.pi * i / n), radius * math.sin(start + 2 * math.pi * i / n))
                for i in range(n)]

    if shape == "square":
        pts = ring(4, r * 1.25, math.pi / 4)
    elif shape == "diamond":
        pts = [(0, -r * 1.15), (r * 0.75, 0), (0, r * 1.15), (-r * 0.75, 0)]
    elif shape == "triangle":
        pts = ring(3, r * 1.2, -math.pi / 2)
        pts = [(x, y + r * 0.15) for x, y in pts]
    elif shape == "hexagon":
        pts = ring(6, r * 1.05, 0)
    elif shape == "star":
        outer, inner = ring(5, r * 1.2, -math.pi / 2), ring(5, r * 0.5, -math.pi / 2 + math.pi / 5)
        pts = [p for pair in zip(outer, inner) for p in pair]
    elif shape == "cross":
        a, b = r * 1.05, r * 0.36
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]
    elif shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 14, y * r / 14 - r * 0.05))
    elif shape == "circle":
        pts = ring(64, r, 0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    rad = math.radians(angle)
    c, s = math.cos(rad), math.sin(rad)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64x64 RGB image (deterministic)."""
    big = SIZE * _SS
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    pts = _polygon(scene.shape, scene.cx * big, scene.cy * big, scene.size * big, scene.angle)
    colour = COLOURS[scene.colour]
    draw = ImageDraw.Draw(img)
    if scene.style == "flat":
        draw.polygon(pts, fill=colour)
    elif scene.style == "outline":
        width = int(0.045 * big)
        draw.line(pts + pts[:2], fill=colour, width=width, joint="curve")
    elif scene.style == "striped":
        mask = Image.new("L", (big, big), 0)
        ImageDraw.Draw(mask).polygon(pts, fill=255)
        stripes = Image.new("L", (big, big), 0)
        sd = ImageDraw.Draw(stripes)
        period = int(0.14 * big)
        for x in range(-big, 2 * big, period):  # diagonal bands
            sd.polygon([(x, 0), (x + period // 2, 0), (x + period // 2 + big, big), (x + big, big)], fill=255)
        fill = Image.new("RGB", (big, big), colour)
        img.paste(fill, (0, 0), ImageChops.multiply(mask, stripes))
        draw.line(pts + pts[:2], fill=colour, width=int(0.02 * big), joint="curve")
    else:
        raise ValueError(f"unknown style {scene.style!r}; known: {', '.join(STYLES)}")
    return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def write_dataset(out: str | Path, scenes: list[Scene], template: int | None = 0, with_style: bool = True,
                  seed: int = 0) -> Path:
    """Write scenes as a training folder: NNNN.png with a same-name .txt caption (sdtune's data layout).

    ``template=None`` picks a caption template per image from ``seed``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, scene in enumerate(scenes):
        with atomic_path(out / f"{i:04d}.png") as tmp:
            render(scene).save(tmp, format="PNG")
        t = rng.randrange(n_templates()) if template is None else template
        atomic_write_text(caption(scene, t, with_style) + "\n", out / f"{i:04d}.txt")
    return out


def concept_scenes(n: int, seed: int = 0, **fixed) -> list[Scene]:
    """n jittered scenes that share the fixed attributes (e.g. shape='star', colour='purple')."""
    rng = random.Random(seed)
    return [random_scene(rng, **fixed) for _ in range(n)]


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT_PAIRS",
    "HELD_OUT_SHAPES",
    "HELD_OUT_STYLES",
    "SHAPES",
    "STYLES",
    "Scene",
    "caption",
    "concept_scenes",
    "is_held_out",
    "random_scene",
    "render",
    "replace",
    "write_dataset",
]
