"""The validation loss: one steady number per evaluation, to compare checkpoints and runs.

The training loss of a step depends on that step's random images, timesteps and noise, so it jumps around
and no two runs see the same draws. The validation loss fixes all three: each validation image (its latent
mean, no sampling) is noised at the same ``TIMESTEPS`` with noise drawn from its file name alone, never from
``--seed``, and the model's plain error (the MSE of the ε or v prediction, without Min-SNR weights, which
differ between runs; with ``--masked-loss`` weighted by the images' masks, as in training) is averaged over
every image and timestep. The same images then give the same number
for the same weights, in any run: two runs with the same seed print it to the last digit (on one machine),
and runs with different settings are comparable.

The images are held out from training (``--validation-dir``, or ``--validation-split`` of ``--data``); with
neither, up to ``FALLBACK_IMAGES`` training images stand in, which still tracks training steadily but cannot
show over-fitting (the report says which it was).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..safeio import SdtuneError
from . import presets
from .data import TrainingSet, bucket_options, latent_cache, seed_for
from .scan import Scan, fingerprint, held_out_order, scan_folder, shared_images, split_validation

TIMESTEPS = 5  # evenly spaced over the schedule: (k + 0.5) / 5 of the way, k = 0..4
FALLBACK_IMAGES = 8
CHUNK = 32  # (image, timestep) pairs per forward pass


@dataclass
class Batch:
    latents: torch.Tensor  # [n, C, h, w]
    noise: torch.Tensor
    timesteps: torch.Tensor  # [n]
    captions: list[str]
    time_ids: torch.Tensor  # [n, 6] SDXL's size and crop conditioning of each image (center crop, no flip)
    mask: torch.Tensor | None = None  # [n, 1, h, w] with --masked-loss: the images' loss masks


@dataclass
class ValidationSet:
    batches: list[Batch]
    images: int
    held_out: bool  # False: training images stand in
    data_id: dict | None = None  # the held-out images' fingerprint (``scan.fingerprint``), for resumes

    @property
    def description(self) -> str:
        if self.held_out:
            return f"{self.images} held-out image(s)"
        return (f"{self.images} training image(s): nothing was held out (--validation-split or --validation-dir), "
                f"so this tracks training but cannot show over-fitting")


def split(settings, scan: Scan, require_captions: bool) -> tuple[Scan, Scan, bool]:
    """(training images, validation images, held out?) from the settings' --validation-dir/--validation-split."""
    if settings.validation_dir:
        held = scan_folder(settings.validation_dir, require_captions=require_captions,  # as --data
                           default_caption=settings.default_caption if require_captions else None,
                           option="--validation-dir", all_lines=settings.wildcards)
        _check_apart(settings.validation_dir, held, scan)
        return scan, held, True
    if settings.validation_split:
        preset = presets.get(settings.kind, settings.preset).values if settings.preset else {}
        origin = (f"the {settings.preset} preset's " if preset.get("validation_split") == settings.validation_split
                  else "")
        train, held = split_validation(scan, settings.validation_split, settings.data, origin)
        return train, held, True
    chosen = held_out_order(scan)[:FALLBACK_IMAGES]
    return scan, Scan(chosen), False


def _check_apart(folder: str, held: Scan, scan: Scan) -> None:
    """Refuse held-out images that are training images too (--validation-dir being --data, or a subfolder of it,
    which --data reads too): the curve and the best checkpoint would rest on images the run learns."""
    shared = shared_images(held, scan)
    if shared:
        raise SdtuneError(f"--validation-dir {folder}: {len(shared)} of its {len(held.examples)} image(s) are "
                          f"training images too ({shared[0]}, read from --data); held-out images must be kept "
                          f"apart: give a folder outside --data, or --validation-split to hold some out")


def data_id(settings, held: Scan, held_out: bool) -> dict | None:
    """What identifies the held-out images for a resume (a run resumed on other ones would go on measuring its
    curve on other data); None where training images stand in (the training data's fingerprint covers them)."""
    if not held_out or not held.examples:
        return None
    return fingerprint(held, settings.validation_dir or settings.data)


def build(base, settings, scan: Scan, captions: list[str], held_out: bool) -> ValidationSet:
    """The fixed (latent, noise, timestep, caption) batches of ``scan``'s images; ``captions[i]`` is image i's."""
    # center crops, no flips: the latents' means are the images
    masked = getattr(settings, "masked_loss", False)  # masked training is validated on the same masked errors
    images = TrainingSet(scan, base.vae, seed=0, **bucket_options(base, settings), masked=masked,
                         cache=latent_cache(base, settings), note_sizes=held_out)
    num_timesteps = len(base.scheduler.alphas_cumprod)
    timesteps = [int((k + 0.5) * num_timesteps / TIMESTEPS) for k in range(TIMESTEPS)]
    pairs: dict[tuple[int, int], list] = {}  # per bucket: (latent, noise, t, caption), images in scan order
    for i, ex in enumerate(scan.examples):
        size = images.bucket_of[i]
        mean = images.latents[size][images.row_of[i]].chunk(2)[0]
        mask = images.masks[size][images.row_of[i]] if masked else None
        g = torch.Generator().manual_seed(seed_for("validation", ex.path.name))
        noise = torch.randn((TIMESTEPS, *mean.shape), generator=g)
        ids = images.time_ids(i)
        pairs.setdefault(size, []).extend((mean, noise[k], t, captions[i], ids, mask)
                                          for k, t in enumerate(timesteps))
    batches = []
    for size in sorted(pairs):
        group = pairs[size]
        for k in range(0, len(group), CHUNK):
            part = group[k:k + CHUNK]
            batches.append(Batch(torch.stack([p[0] for p in part]), torch.stack([p[1] for p in part]),
                                 torch.tensor([p[2] for p in part]), [p[3] for p in part],
                                 torch.tensor([p[4] for p in part], dtype=torch.float32),
                                 torch.stack([p[5] for p in part]) if masked else None))
    return ValidationSet(batches, len(scan.examples), held_out, data_id(settings, scan, held_out))


@torch.no_grad()
def validation_loss(objective, text, vset: ValidationSet, device) -> float:
    """The mean plain error over every (image, timestep) pair; summed in float64 in a fixed order."""
    total, count = 0.0, 0
    for b in vset.batches:
        errors = objective.errors(b.latents.to(device), b.noise.to(device), b.timesteps.to(device),
                                  **text.encode(b.captions), time_ids=b.time_ids.to(device),
                                  mask=b.mask.to(device) if b.mask is not None else None)
        total += float(errors.double().sum())
        count += len(errors)
    return total / count
