"""How well a VAE reproduces images: PSNR by category of ``images``, on seeds the VAE never trained on.

The VAE recipe draws its training images from seeds below ``HELD_OUT_SEED``; the measurement uses seeds from
there up, so every measured image is one the VAE has not seen (photo crops come from the same two
photographs, at other places and scales).
"""

from __future__ import annotations

import numpy as np
import torch

from . import images

HELD_OUT_SEED = 1_000_000


@torch.no_grad()
def reconstruct(vae, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 reconstructions, through the posterior mean (no sampling noise)."""
    out = []
    param = next(vae.parameters())
    for i in range(0, len(pixels), batch):
        x = torch.from_numpy(pixels[i:i + batch]).permute(0, 3, 1, 2).to(param.device, param.dtype) / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((rec.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 [N, H, W, 3] arrays (capped at 60 dB for identical images)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 255.0 ** 2 * 1e-6))


def held_out_set(per_category: int, categories=images.CATEGORIES) -> dict[str, np.ndarray]:
    seeds = range(HELD_OUT_SEED, HELD_OUT_SEED + per_category)
    return {c: images.images(c, seeds) for c in categories}


def category_psnr(vae, test_set: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean PSNR per category, plus ``mean`` (over categories, each weighted the same)."""
    scores = {c: float(psnr(px, reconstruct(vae, px)).mean()) for c, px in test_set.items()}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def table(columns: dict[str, dict[str, float]]) -> str:
    """A text table: one row per category, one column per VAE (e.g. {"old": ..., "new": ...})."""
    names = list(columns)
    rows = list(next(iter(columns.values())))
    lines = [f"{'category':<12}" + "".join(f"{n:>10}" for n in names), "-" * (12 + 10 * len(names))]
    for r in rows:
        lines.append(f"{r:<12}" + "".join(f"{columns[n][r]:>10.1f}" for n in names))
    return "\n".join(lines)
