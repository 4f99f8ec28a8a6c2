"""The judge: reads a 64x64 shapes-world image and says which shape, colour, style and background it shows.

    from sdtune.tiny import judge
    judge.judge(images)                           # -> [Verdict(shape, colour, style, background, confidence)]
    judge.score(images, shape="star", colour="red")   # -> {"n": 8, "shape": .., "colour": .., "all": ..}

    python -m sdtune.tiny.judge --train           # reproduces the shipped weights (seed 0, one CPU thread)
    python -m sdtune.tiny.judge --eval            # accuracy on fresh renders, clean and blurred

How it decides: one small CNN (pure torch, about 250k parameters, shipped in fp16 as
``assets/judge.safetensors``) with four softmax heads: shape, colour, style, background. Colour is read by
the CNN too rather than analytically: a "dominant non-background hue" rule breaks on exactly the images the
judge exists for (outline and striped shapes are mostly background, blurred edges mix the two colours),
while a CNN trained with colour jitter learns where the shape is and what colour it has in one go.

How it was trained: on renders from ``world`` of every concept, held-out ones included (the judge must
recognise what TI and LoRA teach), with augmentations that imitate what a tiny diffusion model draws:
shifts, small scale and rotation changes, gaussian blur, down-and-up resampling (smoothing), colour and
brightness jitter, pixel noise and low-frequency blotches. Validation uses renders from other seeds.
Recipe: 10,000 renders, 800 AdamW steps of 48, cosine lr from 3e-3, on one CPU thread; the same seed gives
bit-identical weights. ``--eval`` scores it on fresh renders (held-out concepts included), clean and after
PIL GaussianBlur; the README has the figures, and tests/test_judge.py checks the accuracy on every run.

Input: PIL images or image files; numpy arrays channel-last, (H, W, 3) or (N, H, W, 3); torch tensors
channel-first, (3, H, W) or (N, 3, H, W) -- the layouts of diffusers' "np" and "pt" outputs. uint8 arrays are
0..255; float arrays are read in ``value_range`` (default 0..1; pass (-1, 1) for raw VAE decodes). Other sizes
are resized to 64x64.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from ..safeio import SdtuneError, atomic_save_safetensors, load_state
from . import world

WEIGHTS_PATH = Path(__file__).resolve().parent / "assets" / "judge.safetensors"
FORMAT = "sdtune-judge-1"
ATTRIBUTES: dict[str, list[str]] = {
    "shape": list(world.SHAPES),
    "colour": list(world.COLOURS),
    "style": list(world.STYLES),
    "background": list(world.BACKGROUNDS),
}
_SIZES = [len(v) for v in ATTRIBUTES.values()]


# --- the network --------------------------------------------------------------------------------

class JudgeNet(nn.Module):
    """Five 3x3 conv blocks (64 -> 4 px), avg+max pooled, one linear layer giving all four heads' logits."""

    WIDTHS = (16, 32, 64, 128, 128)

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for i, c_out in enumerate(self.WIDTHS):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            if i < len(self.WIDTHS) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c_in, sum(_SIZES))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (N, 3, 64, 64) in 0..1 -> one logits tensor per attribute, in ATTRIBUTES order."""
        h = self.features(x * 2 - 1)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return list(self.head(h).split(_SIZES, 1))


# --- input --------------------------------------------------------------------------------------

def to_batch(images, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Any supported image input (see the module doc) -> float (N, 3, 64, 64) in 0..1."""
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor, str, Path)):
        images = [images]
    try:
        images = list(images)
    except TypeError:
        images = [images]  # reported below as unreadable
    parts = [_one_or_batch(im, value_range) for im in images]
    if not parts:
        raise SdtuneError("judge: no images given; pass a PIL image, an array/tensor, or a non-empty list of them")
    x = torch.cat(parts)
    if x.shape[-2:] != (world.SIZE, world.SIZE):
        x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def _one_or_batch(im, value_range) -> torch.Tensor:
    if isinstance(im, (str, Path)):
        try:
            with Image.open(im) as opened:
                im = opened.convert("RGB")
        except OSError as e:
            raise SdtuneError(f"{im}: cannot open as an image ({e}); pass a PNG/JPEG file or an image object")
    if isinstance(im, Image.Image):
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None]
    if isinstance(im, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(im))
        if t.ndim not in (3, 4) or t.shape[-1] != 3:
            raise SdtuneError(f"judge: numpy image of shape {tuple(t.shape)}; numpy images must be channel-last "
                              "(H, W, 3) or (N, H, W, 3)")
        t = t.movedim(-1, -3)
    elif isinstance(im, torch.Tensor):
        t = im.detach().cpu()
        if t.ndim not in (3, 4) or t.shape[-3] != 3:
            raise SdtuneError(f"judge: tensor image of shape {tuple(t.shape)}; tensors must be channel-first "
                              "(3, H, W) or (N, 3, H, W)")
    else:
        raise SdtuneError(f"judge: cannot read an image from {type(im).__name__}; pass PIL images, numpy arrays "
                          "or torch tensors")
    t = t if t.ndim == 4 else t[None]
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        raise SdtuneError(f"judge: image tensor of dtype {t.dtype}; pass uint8 (0..255) or float values")
    lo, hi = value_range
    t = (t.float() - lo) / (hi - lo)
    if t.numel() and (t.min() < -0.05 or t.max() > 1.05):
        span = f"{float(t.min()) * (hi - lo) + lo:.2f}..{float(t.max()) * (hi - lo) + lo:.2f}"
        raise SdtuneError(f"judge: float image values span {span}, outside value_range={value_range}; "
                          "pass value_range=(-1, 1) for raw VAE output")
    return t


# --- loading ------------------------------------------------------------------------------------

def load_judge(path: str | Path | None = None) -> JudgeNet:
    """The judge network from ``path`` (default: the shipped weights), loaded once and cached, on CPU."""
    return _load_cached(str(Path(path).resolve()) if path else str(WEIGHTS_PATH))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> JudgeNet:
    if not Path(path).is_file():
        raise SdtuneError(f"{path}: judge weights missing; rebuild them with `python -m sdtune.tiny.judge --train`")
    state, meta = load_state(path)
    if meta.get("format") != FORMAT:
        raise SdtuneError(f"{path}: not sdtune judge weights (format {meta.get('format')!r}); "
                          "rebuild them with `python -m sdtune.tiny.judge --train`")
    trained_for = json.loads(meta.get("classes", "{}"))
    if trained_for != ATTRIBUTES:
        raise SdtuneError(f"{path}: judge weights were trained for other shapes/colours/styles than sdtune.tiny.world "
                          "has now; retrain with `python -m sdtune.tiny.judge --train`")
    net = JudgeNet()
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as e:
        raise SdtuneError(f"{path}: judge weights do not fit the judge network ({str(e).splitlines()[0]}); "
                          "retrain with `python -m sdtune.tiny.judge --train`")
    return net.eval()


# --- verdicts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    shape: str
    colour: str
    style: str
    background: str
    confidence: dict[str, float]  # attribute -> softmax probability of the class chosen

    def matches(self, **wanted: str | None) -> bool:
        """True when every given attribute (None = don't care) is what the judge saw."""
        return all(v is None or getattr(self, k) == v for k, v in wanted.items())


def probabilities(images, value_range=(0.0, 1.0), model: JudgeNet | None = None) -> dict[str, torch.Tensor]:
    """attribute -> (N, classes) softmax probabilities, classes in ATTRIBUTES order."""
    x = to_batch(images, value_range)
    net = model or load_judge()
    net.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in ATTRIBUTES]
    with torch.inference_mode():
        for chunk in x.split(256):
            for acc, logits in zip(outs, net(chunk)):
                acc.append(logits.softmax(1))
    return {name: torch.cat(acc) for name, acc in zip(ATTRIBUTES, outs)}


def judge(images, value_range=(0.0, 1.0), model: JudgeNet | None = None) -> list[Verdict]:
    """One Verdict per image: the most probable shape, colour, style and background, with their probabilities."""
    probs = probabilities(images, value_range, model)
    best = {k: p.max(1) for k, p in probs.items()}
    n = next(iter(probs.values())).shape[0]
    return [Verdict(**{k: ATTRIBUTES[k][int(best[k].indices[i])] for k in ATTRIBUTES},
                    confidence={k: float(best[k].values[i]) for k in ATTRIBUTES}) for i in range(n)]


def score(images, shape: str | None = None, colour: str | None = None, style: str | None = None,
          background: str | None = None, value_range=(0.0, 1.0), model: JudgeNet | None = None) -> dict:
    """Fractions of images showing each given attribute, and all of them together ("all"); "n" = image count."""
    given = {"shape": shape, "colour": colour, "style": style, "background": background}
    wanted = {k: v for k, v in given.items() if v is not None}
    if not wanted:
        raise SdtuneError("judge.score: nothing to check; give at least one of shape=, colour=, style=, background=")
    for k, v in wanted.items():
        if v not in ATTRIBUTES[k]:
            raise SdtuneError(f"judge.score: unknown {k} {v!r}; known: {', '.join(ATTRIBUTES[k])}")
    verdicts = judge(images, value_range, model)
    n = len(verdicts)
    out: dict = {"n": n}
    for k, v in wanted.items():
        out[k] = sum(getattr(vd, k) == v for vd in verdicts) / n
    out["all"] = sum(vd.matches(**wanted) for vd in verdicts) / n
    return out


# --- training -----------------------------------------------------------------------------------

def _labels(scenes) -> torch.Tensor:
    return torch.tensor([[ATTRIBUTES[k].index(getattr(s, k)) for k in ATTRIBUTES] for s in scenes])


def _render_pool(n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [world.random_scene(rng) for _ in range(n)]  # every concept, held-out ones included
    pixels = np.stack([np.asarray(world.render(s)) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), _labels(scenes)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Separable gaussian blur with one sigma per image (sigma ~0 leaves the image unchanged)."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-2) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make clean renders look like what a tiny diffusion model draws (x: (N, 3, 64, 64) in 0..1)."""
    n, size = x.shape[0], x.shape[-1]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(shape or (n,), generator=g)

    def some(p):  # which images get an augmentation, as a (N, 1, 1, 1) 0/1 mask
        return (torch.rand(n, generator=g) < p).float()[:, None, None, None]

    # geometry: shift, scale, small rotation; border pixels are background, so "border" padding extends it
    ang, scale = torch.deg2rad(u(-10, 10)), u(0.87, 1.15)
    theta = torch.stack([torch.stack([scale * ang.cos(), -scale * ang.sin(), u(-0.12, 0.12)], 1),
                         torch.stack([scale * ang.sin(), scale * ang.cos(), u(-0.12, 0.12)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    m = some(0.7)
    x = m * warped + (1 - m) * x
    # smoothing: down to a random coarser size and back up
    small = int(torch.randint(24, 49, (1,), generator=g))
    coarse = F.interpolate(F.interpolate(x, size=small, mode="area"), size=size, mode="bilinear", align_corners=False)
    m = some(0.25)
    x = m * coarse + (1 - m) * x
    # gaussian blur, sigma up to 1.6 px
    x = _blur(x, u(0.0, 1.6) * some(0.5).flatten())
    # colour: brightness, per-channel gain, contrast, offset
    gain = u(0.85, 1.15)[:, None, None, None] * u(0.92, 1.08, n, 3)[:, :, None, None]
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = u(0.85, 1.15)[:, None, None, None]
    x = (x - mean) * contrast + mean
    x = x * gain + u(-0.05, 0.05, n, 1)[:, :, None, None]
    # noise: per-pixel, and low-frequency blotches
    x = x + torch.randn(x.shape, generator=g) * u(0, 0.06)[:, None, None, None] * some(0.5)
    blotch = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=size, mode="bilinear", align_corners=False)
    x = x + blotch * u(0, 0.04)[:, None, None, None] * some(0.4)
    return x.clamp(0, 1)


def train(out: str | Path | None = WEIGHTS_PATH, seed: int = 0, steps: int = 800, batch: int = 48,
          pool: int = 10000, lr: float = 3e-3, log=print) -> JudgeNet:
    """The recipe of the shipped judge: renders of every concept, augmented; one CPU thread, a few minutes.

    Deterministic for a given seed on a given torch build. Writes fp16 safetensors to ``out`` (None: don't)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared with long training jobs; the judge must stay cheap
    try:
        t0 = time.time()
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        images, labels = _render_pool(pool, random.Random(f"judge-train:{seed}"))
        log(f"judge: rendered {pool} training images in {time.time() - t0:.0f}s")
        net = JudgeNet()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        net.train()
        for step in range(steps):
            idx = torch.randint(0, pool, (batch,), generator=g)
            x = augment(images[idx].float() / 255.0, g)
            y = labels[idx]
            loss = sum(F.cross_entropy(logits, y[:, j]) for j, logits in enumerate(net(x)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (step + 1) % 100 == 0 or step + 1 == steps:
                log(f"judge: step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
        net.eval()
        if out is not None:
            meta = {"format": FORMAT, "classes": json.dumps(ATTRIBUTES), "seed": str(seed), "steps": str(steps),
                    "batch": str(batch), "pool": str(pool)}  # no timings: same seed, same bytes
            atomic_save_safetensors({k: v.half() if v.is_floating_point() else v
                                     for k, v in net.state_dict().items()}, out, meta)
            _load_cached.cache_clear()
            log(f"judge: wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB) after {time.time() - t0:.0f}s")
        return net
    finally:
        torch.set_num_threads(threads)


# --- evaluation ---------------------------------------------------------------------------------

def fresh_renders(n: int, seed: int = 12345, blur: float = 0.0):
    """n renders from a seed the trainer never uses (held-out concepts included), optionally PIL-blurred."""
    rng = random.Random(f"judge-eval:{seed}")
    scenes = [world.random_scene(rng) for _ in range(n)]
    images = [world.render(s) for s in scenes]
    if blur:
        images = [im.filter(ImageFilter.GaussianBlur(blur)) for im in images]
    return scenes, images


def accuracy(scenes, images, model: JudgeNet | None = None) -> dict[str, float]:
    """attribute -> fraction of images judged correctly, plus "all" (every attribute right)."""
    verdicts = judge(images, model=model)
    right = {k: [getattr(v, k) == getattr(s, k) for v, s in zip(verdicts, scenes)] for k in ATTRIBUTES}
    out = {k: sum(r) / len(r) for k, r in right.items()}
    out["all"] = sum(all(r) for r in zip(*right.values())) / len(scenes)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdtune.tiny.judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", action="store_true", help="train the judge and write its weights")
    p.add_argument("--eval", action="store_true", help="print accuracy on fresh renders (clean and blurred)")
    p.add_argument("--weights", default=str(WEIGHTS_PATH), help="weights file to write/read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--n", type=int, default=2000, help="images per evaluation")
    a = p.parse_args(argv)
    if not (a.train or a.eval):
        p.error("give --train and/or --eval")
    if a.train:
        train(a.weights, seed=a.seed, steps=a.steps)
    if a.train or a.eval:
        net = load_judge(a.weights)
        for blur in (0.0, 1.0, 2.0):
            scenes, images = fresh_renders(a.n, blur=blur)
            acc = accuracy(scenes, images, net)
            held = [i for i, s in enumerate(scenes) if world.is_held_out(s)]
            acc_held = accuracy([scenes[i] for i in held], [images[i] for i in held], net)
            print(f"blur {blur:3.1f}: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
                  + f"   | held-out scenes ({len(held)}): " + "  ".join(f"{k} {v:.3f}" for k, v in acc_held.items()))


if __name__ == "__main__":
    main()
