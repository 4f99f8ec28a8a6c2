"""Training data: the scanned images (``scan``) in buckets, cached latents and per-step batches out.

The folder is read by ``scan``, each image opened, resized and cropped by ``images``, each caption processed by
``captions``; this module puts them together (``training_set``, from a run's settings).

Each image is resized to cover its bucket (one square size, or with bucketing the size whose aspect ratio
is closest) and cropped. With a center crop it is encoded once by the frozen VAE and the latent
distribution kept (mean and std), so every step draws a fresh sample from it at no VAE cost; flipped
copies are encoded too when flipping is on. A random crop changes every step, so those images are kept as
pixels and encoded per step.

Each image's upright size and its crop (the corner cut from the resized image, mirrored when flipped) are
kept: SDXL's UNet is conditioned on them (``time_ids``: original size, crop top-left, target size), as it
was trained, so a batch carries one row of time ids per image.

Batches are a pure function of (seed, batch number): epoch e shuffles every bucket with seed (seed, e),
chunks it into global batches (the last one filled by wrapping around) and shuffles the batch order. That
makes resuming exact, and lets each of several processes take its slice of the same global batch.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .. import console
from ..console import note
from ..safeio import SdtuneError
from . import masks
from .captions import CAPTION_SETTINGS, caption_options, has_wildcards, process_caption
from .config import TOKEN_LENGTHS
from .images import (
    COLOR_AUG_TURN,
    IMAGE_SUFFIXES,
    bucket_sizes,
    cover_box,
    fit,
    image_header,
    open_rgb,
    own_bucket,
    pick_bucket,
    shift_hue,
    time_ids,
    to_tensor,
)
from .latent_cache import LatentCache
from .scan import Scan


def seed_for(*parts) -> int:
    """A 63-bit seed from any parts (seed, step, purpose...); the same in every process and Python run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _note_image_sizes(scan: Scan, sizes: list[tuple[int, int]], buckets: list[tuple[int, int]],
                      animated: list[bool]) -> None:
    """What training does to an image that the user may not expect: an animated one trains on its first frame,
    and one far smaller than its training size is upscaled (so it trains blurred)."""
    moving = [ex.path for ex, a in zip(scan.examples, animated) if a]
    if moving:
        note(f"{moving[0]}" + (f" and {len(moving) - 1} more" if len(moving) > 1 else "") + ": animated; only the "
             "first frame is trained on")
    small = [(ex.path, wh, b) for ex, wh, b in zip(scan.examples, sizes, buckets)
             if wh[0] * 2 <= b[0] or wh[1] * 2 <= b[1]]
    if small:
        path, (w, h), (bw, bh) = small[0]
        note(f"{path}" + (f" and {len(small) - 1} more" if len(small) > 1 else "") + f": {w}x{h}, at most half "
             f"the {bw}x{bh} it is trained at; it is upscaled, so it trains blurred (use larger images, or a "
             f"smaller --resolution)")


# ---------------------------------------------------------------- latents

@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 2C, h, w]: mean and std of the scaled latent distribution of ``pixels`` ([N, 3, H, W], [-1, 1]).

    A VAE whose config asks for it (``force_upcast``, diffusers' default, which SDXL's states: its VAE overflows to
    NaN in fp16) encodes in fp32, as diffusers' SDXL pipeline and training scripts do: only the parts encoding
    uses (the encoder and its quant conv, under half the VAE: with ``--crop random`` this runs every step), their
    fp16 weights put back exactly afterwards."""
    param = next(vae.parameters())
    upcast = param.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    parts = [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None] if upcast else []
    for part in parts:  # plain modules: no diffusers warning about fp32-only modules, as ModelMixin.to gives
        part.to(torch.float32)
    try:
        dist = vae.encode(pixels.to(param.device, torch.float32 if upcast else param.dtype)).latent_dist
    finally:
        for part in parts:
            part.to(torch.float16)
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return torch.cat([(dist.mean - shift) * scale, dist.std * scale], 1).float().cpu()


@dataclass
class Batch:
    latents: torch.Tensor  # [b, C, h, w] a sample of each image's latent distribution (this process's slice)
    captions: list[str]
    size: tuple[int, int]  # (w, h) in pixels
    time_ids: torch.Tensor  # [b, 6] SDXL's (original h, w, crop top, left, target h, w) of each image (``time_ids``)
    mask: torch.Tensor | None = None  # [b, 1, h, w] loss weights per latent pixel (``masks``), with --masked-loss


class TrainingSet:
    """The scanned images resized into buckets, encoded once, and served as reproducible batches."""

    def __init__(self, scan: Scan, vae, resolution: int, seed: int, *, bucket_step: int = 64, buckets: bool = False,
                 min_bucket_reso: int = 0, max_bucket_reso: int = 0, no_upscale: bool = False, crop: str = "center",
                 cache=None, flip: bool = False, captions: dict | None = None, empty_every: int = 0,
                 templates: list[str] | None = None, encode_batch: int = 8, progress: bool = False,
                 masked: bool = False, color_aug: bool = False, note_sizes: bool = True):
        """``captions``: the ``process_caption`` options (``caption_options``), an example's own ``options`` over
        them (a dataset config's subset may give its own); ``empty_every``: every Nth epoch
        trains with empty captions (kohya's caption_dropout_every_n_epochs); ``cache``: a ``LatentCache`` that
        keeps the encodings on disk; ``color_aug``: kohya's hue shifts (``shift_hue``), drawn per image and step."""
        if crop not in ("center", "random"):
            raise SdtuneError(f"--crop {crop!r}: use center or random")
        # each image's training size: the run's, or its dataset's where a dataset config gives several
        sides = [ex.options.get("resolution", resolution) for ex in scan.examples]
        for side in sorted({resolution, *sides}):
            what = "--resolution" if side == resolution else "a dataset's resolution"
            if side % bucket_step:
                raise SdtuneError(f"{what} {side}: must be a multiple of {bucket_step} for this model")
            if buckets and (min_bucket_reso > side or (max_bucket_reso and max_bucket_reso < side)):
                raise SdtuneError(f"{what} {side}: outside --min-bucket-reso {min_bucket_reso} .. --max-bucket-reso "
                                  f"{max_bucket_reso}; widen them, or leave them out (half to twice each size)")
        self.scan, self.vae, self.seed, self.resolution = scan, vae, seed, resolution
        # each image's crop and colour shift (a dataset config's subset may give its own); random crops and colour
        # shifts change every step: where any image has one, the images are kept as pixels and encoded per batch,
        # and its draws made for every image (the same draws as a run where all have it)
        self.crops = [ex.options.get("crop", crop) for ex in scan.examples]
        self.color_augs = [bool(ex.options.get("color_aug", color_aug)) for ex in scan.examples]
        self.crop = "random" if "random" in self.crops else "center"
        self.color_aug = any(self.color_augs)
        self.per_step = self.crop == "random" or self.color_aug
        # each image's flip_aug (a dataset config's subset may give its own); mirrored copies are encoded where any
        # image flips, and its draws are made for every image then (the same draws as a run where all flip)
        self.flips = [bool(ex.options.get("flip", flip)) for ex in scan.examples]
        self.flip = flip = any(self.flips)
        self.caption_opts = dict(captions or {})
        # each example's: the run's, its own caption settings over them
        self.example_opts = [self.caption_opts | {option: ex.options[name] for option, name in CAPTION_SETTINGS.items()
                                                  if name in ex.options} for ex in scan.examples]
        self.empty_every = empty_every
        self.templates = templates
        # kohya's token warm-up: (steps, least tags, micro-batches a step), set by ``warm_tokens``
        self.token_warmup: tuple[int, int, int] | None = None
        sizes = {side: bucket_sizes(side, bucket_step, min_bucket_reso or None, max_bucket_reso or None) if buckets
                 else [(side, side)] for side in set(sides)}
        # each image's bucket, from its upright size (no decoding); then one bucket at a time, in chunks, so
        # only ``encode_batch`` decoded images are held at once
        # each image's upright size, kept for SDXL's time ids (what the image was before resizing and cropping)
        headers = [image_header(ex.path) for ex in scan.examples]
        self.original_size = [wh for wh, _ in headers]
        # kohya's bucket_no_upscale: an image of less than the training area keeps its size (rounded down to the step)
        self.bucket_of = [own_bucket(wh, bucket_step) if no_upscale and wh[0] * wh[1] <= side ** 2
                          else pick_bucket(*wh, sizes[side]) for wh, side in zip(self.original_size, sides)]
        self.resolutions = sorted(set(sides))  # (one: the run's; several: a dataset config's)
        if note_sizes:  # (off where these images were noted already: the training set standing in for validation)
            _note_image_sizes(scan, self.original_size, self.bucket_of, [a for _, a in headers])
        members: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.bucket_of):
            members.setdefault(size, []).append(i)
        self.row_of = [0] * len(scan.examples)
        for ids in members.values():
            for row, i in enumerate(ids):
                self.row_of[i] = row
        self.sizes = sorted(members)
        # per bucket: latents [n, 2C, h, w] (and flipped) when cached, else cover-resized images (random crop)
        self.latents: dict[tuple[int, int], torch.Tensor] = {}
        self.flipped: dict[tuple[int, int], torch.Tensor] = {}
        self.pixels: dict[tuple[int, int], list[Image.Image]] = {}
        # with ``masked``: per bucket the loss masks on the latent grid [n, 1, h, w] (cached latents), or the
        # cover-resized mask images (random crop; None: no mask), cropped like their images every step
        self.masked = masked
        self.masks: dict[tuple[int, int], torch.Tensor] = {}
        self.mask_pixels: dict[tuple[int, int], list[Image.Image | None]] = {}
        bar = console.progress(len(scan.examples), "encoding images", "img", enabled=progress, leave=False)
        for size, ids in members.items():
            paths = [scan.examples[i].path for i in ids]
            if self.per_step:
                self.pixels[size] = [_cover_resize(open_rgb(path), size) for path in paths]
                if masked:
                    self.mask_pixels[size] = [None if m is None else _cover_resize(m, size)
                                              for m in (masks.open_mask(path, IMAGE_SUFFIXES) for path in paths)]
                bar.update(len(paths))
                continue
            plain, flipped, marks = [], [], []
            for k in range(0, len(paths), encode_batch):
                chunk = paths[k:k + encode_batch]
                found = [cache.get(path, size, flip) if cache is not None else None for path in chunk]
                todo = [i for i, entry in enumerate(found) if entry is None]
                if todo:  # the images not cached, encoded together
                    x = torch.stack([to_tensor(fit(open_rgb(chunk[i]), size)) for i in todo])
                    latents = encode(vae, x)
                    mirrored = encode(vae, x.flip(-1)) if flip else None
                    for j, i in enumerate(todo):
                        found[i] = (latents[j], mirrored[j] if flip else None)
                        if cache is not None:
                            cache.put(chunk[i], size, *found[i])
                plain.append(torch.stack([entry[0] for entry in found]))
                if flip:
                    flipped.append(torch.stack([entry[1] for entry in found]))
                if masked:
                    grid = tuple(plain[-1].shape[-2:])
                    marks.append(torch.stack([masks.to_latent(_fitted_mask(path, size), grid) for path in chunk]))
                bar.update(len(chunk))
            self.latents[size] = torch.cat(plain)
            if masked:
                self.masks[size] = torch.cat(marks)
            if flip:
                self.flipped[size] = torch.cat(flipped)
        bar.close()
        self.entries = [i for i, ex in enumerate(scan.examples) for _ in range(ex.repeats)]
        self.counts = {size: sum(1 for i in self.entries if self.bucket_of[i] == size) for size in self.sizes}
        self._plan_cache: tuple[int, int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def warm_tokens(self, steps: int, least: int, grad_accum: int) -> None:
        """kohya's token warm-up: over the first ``steps`` optimizer steps (of ``grad_accum`` batches each) the
        captions grow from ``least`` tags to all of them (``process_caption``'s ``warm``); 0 steps: none."""
        self.token_warmup = (steps, least, grad_accum) if steps else None

    @property
    def captions_vary(self) -> bool:
        """Whether a caption can differ from step to step (text-encoder outputs can't be cached then)."""
        if self.token_warmup is not None:
            return True
        for opts, texts in self._texts():
            if opts.get("wildcards") and any(has_wildcards(t) for t in texts):
                return True
            if opts.get("shuffle", False) or opts.get("tag_dropout", 0) > 0:
                return True
        return False

    def _texts(self) -> list[tuple[dict, set[str]]]:
        """The texts a batch draws from, each set with the caption options they are read with."""
        if self.templates is not None:  # (prompt templates: the run's options)
            return [(self.caption_opts, set(self.templates))]
        by_opts: dict[str, tuple[dict, set[str]]] = {}
        for ex, opts in zip(self.scan.examples, self.example_opts):
            by_opts.setdefault(repr(sorted(opts.items())), (opts, set()))[1].add(ex.caption or "")
        return list(by_opts.values())

    def possible_captions(self) -> list[str]:
        """Every caption a batch can hold (when they don't vary), for caching text-encoder outputs."""
        found = set()
        for opts, texts in self._texts():  # (they do not vary: no shuffling, tag dropout or wildcards)
            found |= {process_caption(t, random.Random(0), **(opts | dict(dropout=0.0))) for t in texts}
            if opts.get("dropout", 0) > 0:
                found.add("")
        if self.empty_every:
            found.add("")
        return sorted(found)

    def time_ids(self, i: int, flipped: bool = False, where: tuple[float, float] = (0.5, 0.5)) -> list[float]:
        """SDXL time ids of image ``i`` cropped at ``where`` (center crops: the middle), flipped or not."""
        size = self.bucket_of[i]
        if self.per_step:  # cut from the cover-resized image: the same box as from the original
            img = self.pixels[size][self.row_of[i]]
            box = cover_box(img.width, img.height, size, where)
        else:
            box = cover_box(*self.original_size[i], size, where)
        return time_ids(self.original_size[i], box, size, flipped)

    def batches_per_epoch(self, global_batch: int) -> int:
        return sum(math.ceil(n / global_batch) for n in self.counts.values())

    def plan(self, epoch: int, global_batch: int) -> list[list[int]]:
        """The epoch's global batches (example indices), each from one bucket and exactly ``global_batch`` long."""
        if self._plan_cache and self._plan_cache[:2] == (epoch, global_batch):
            return self._plan_cache[2]
        rng = random.Random(seed_for(self.seed, "epoch", epoch))
        batches = []
        for size in self.sizes:
            ids = [i for i in self.entries if self.bucket_of[i] == size]
            rng.shuffle(ids)
            n = math.ceil(len(ids) / global_batch) * global_batch
            ids = [ids[k % len(ids)] for k in range(n)]  # fill the last batch by wrapping around
            batches += [ids[k:k + global_batch] for k in range(0, n, global_batch)]
        rng.shuffle(batches)
        self._plan_cache = (epoch, global_batch, batches)
        return batches

    def batch(self, number: int, global_batch: int, rank: int = 0, world: int = 1) -> Batch:
        """Global batch ``number`` (counting from 0 over the whole run), this process's slice of it."""
        per_epoch = self.batches_per_epoch(global_batch)
        ids = self.plan(number // per_epoch, global_batch)[number % per_epoch]
        size = self.bucket_of[ids[0]]
        g = torch.Generator().manual_seed(seed_for(self.seed, "batch", number))
        rng = random.Random(seed_for(self.seed, "captions", number))
        drawn = (torch.rand(len(ids), generator=g) < 0.5).tolist() if self.flip else [False] * len(ids)
        flips = [f and self.flips[i] for f, i in zip(drawn, ids)]
        per = global_batch // world
        part = slice(rank * per, (rank + 1) * per)
        if self.per_step:  # only this process's images are encoded; the draws cover the global batch
            where = torch.rand(len(ids), 2, generator=g).tolist() if self.crop == "random" else [(0.5, 0.5)] * len(ids)
            where = [w if self.crops[i] == "random" else (0.5, 0.5) for w, i in zip(where, ids)]
            hues = (torch.rand(len(ids), generator=g) * 2 - 1).tolist() if self.color_aug else [0.0] * len(ids)
            hues = [h if self.color_augs[i] else 0.0 for h, i in zip(hues, ids)]
            conditions = [self.time_ids(i, f, tuple(w)) for i, f, w in list(zip(ids, flips, where))[part]]
            x = []
            for i, f, (fx, fy), hue in list(zip(ids, flips, where, hues))[part]:
                img = fit(self.pixels[size][self.row_of[i]], size, (fx, fy))
                img = shift_hue(img, hue * COLOR_AUG_TURN) if hue else img
                x.append(to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else img))
            mean, std = encode(self.vae, torch.stack(x)).chunk(2, 1)
            eps = torch.randn((len(ids), *mean.shape[1:]), generator=g)[part]
            mask = None
            if self.masked:
                grid = tuple(mean.shape[-2:])
                mask = torch.stack([masks.to_latent(_crop_mask(self.mask_pixels[size][self.row_of[i]], size, (fx, fy),
                                                               f), grid)
                                    for i, f, (fx, fy) in list(zip(ids, flips, where))[part]])
        else:
            conditions = [self.time_ids(i, f) for i, f in list(zip(ids, flips))[part]]
            stats = torch.stack([(self.flipped if f else self.latents)[size][self.row_of[i]]
                                 for i, f in list(zip(ids, flips))[part]])
            mean, std = stats.chunk(2, 1)
            eps = torch.randn((len(ids), *mean.shape[1:]), generator=g)[part]
            mask = None
            if self.masked:
                mask = torch.stack([self.masks[size][self.row_of[i]].flip(-1) if f else self.masks[size][self.row_of[i]]
                                    for i, f in list(zip(ids, flips))[part]])
        latents = mean + std * eps
        captions = []
        empty = bool(self.empty_every) and (number // per_epoch + 1) % self.empty_every == 0  # kohya counts from 1
        warm = None
        if self.token_warmup is not None:  # (the optimizer steps done before this batch's, as kohya counts them)
            steps, least, grad_accum = self.token_warmup
            warm = (number // grad_accum, least, steps)
        for i in ids:
            text = rng.choice(self.templates) if self.templates is not None else (self.scan.examples[i].caption or "")
            opts = self.caption_opts if self.templates is not None else self.example_opts[i]
            captions.append("" if empty else process_caption(text, rng, **opts, warm=warm))
        return Batch(latents, captions[part], size, torch.tensor(conditions, dtype=torch.float32), mask)


def _fitted_mask(path: Path, size: tuple[int, int]) -> Image.Image | None:
    """The image's mask resized and center-cropped as ``fit`` does the image; None: it has none."""
    mask = masks.open_mask(path, IMAGE_SUFFIXES)
    return None if mask is None else fit(mask, size)


def _crop_mask(mask: Image.Image | None, size: tuple[int, int], where: tuple[float, float], flipped: bool):
    """A random crop's mask: cut where its image was cut, flipped with it."""
    if mask is None:
        return None
    mask = fit(mask, size, where)
    return mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else mask


def _cover_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` resized to just cover ``size`` (random crops are cut from it per step)."""
    scale = max(size[0] / img.width, size[1] / img.height)
    return fit(img, (max(size[0], round(img.width * scale)), max(size[1], round(img.height * scale))))


# ---------------------------------------------------------------- from settings

def vae_scale(base) -> int:
    """Pixels per latent pixel along each side (8 for SD's VAE)."""
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


def model_steps(base) -> tuple[int, int]:
    """(native resolution, size granularity): images must be multiples of VAE x UNet downsampling."""
    return config_steps(base.unet.config, base.vae.config)


def config_steps(unet_config, vae_config) -> tuple[int, int]:
    """``model_steps`` from the UNet's and the VAE's configs (a family's shipped ones, before a model loads)."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(unet_config["block_out_channels"]) - 1)
    return int(unet_config["sample_size"]) * vae_factor, vae_factor * unet_factor


BATCH_REPEATS = 16  # the most times a batch may hold each training image over (see training_set)


def bucket_options(base, settings) -> dict:
    """The training size and the ``TrainingSet`` bucket arguments of a run's settings (the training set's and the
    validation images', which must fall in the same buckets), checked against the model."""
    native, step = model_steps(base)
    size = settings.resolution or native
    if settings.bucket_step and size % settings.bucket_step:  # said by its own flag
        raise SdtuneError(f"--bucket-step {settings.bucket_step}: the training size {size} must be a multiple of it; "
                          f"use a divisor of it such as {step}")
    step = settings.bucket_step or step
    sides = dict(min_bucket_reso=settings.min_bucket_reso, max_bucket_reso=settings.max_bucket_reso)
    if settings.bucket_no_upscale and not settings.buckets:
        raise SdtuneError("--bucket-no-upscale: keeps small images at their own size in buckets, and buckets are off; "
                          "add --buckets")
    for name, side in sides.items():
        if side and not settings.buckets:
            raise SdtuneError(f"--{name.replace('_', '-')} {side}: sets the buckets' sides, and buckets are off; "
                              f"add --buckets")
        if side % step or (side and (side > size if name.startswith("min") else side < size)):
            raise SdtuneError(f"--{name.replace('_', '-')} {side}: must be a multiple of {step} (the bucket step) "
                              f"and {'at most' if name.startswith('min') else 'at least'} the training size {size}")
    return dict(resolution=size, bucket_step=step, buckets=settings.buckets, **sides,
                no_upscale=settings.bucket_no_upscale)


def latent_cache(base, settings) -> LatentCache | None:
    """--cache-latents-to-disk: the run's cache of encodings, in its data folder (None without the option)."""
    return LatentCache.at(settings.data, base.vae) if getattr(settings, "cache_latents_to_disk", False) else None


def training_set(base, settings, scan: Scan, templates: list[str] | None, seed: int | None = None) -> TrainingSet:
    """The images of ``scan`` ready to train on, with the settings' size, crops, flips, captions and masks
    (``seed``: the batches' seed when not the run's, e.g. the class images' of prior preservation)."""
    sizing = bucket_options(base, settings)
    masked = getattr(settings, "masked_loss", False)
    images = sum(ex.repeats for ex in scan.examples)
    # A batch past the images repeats them (a preset's batch of 8 on 4 images is fine); far past them, it takes the
    # memory of many images for the use of a few, and a typo (100000) was killed by the system with no word
    if settings.batch_size > BATCH_REPEATS * images and seed is None:
        raise SdtuneError(f"--batch-size {settings.batch_size}: far more than the {images} training image(s) of "
                          f"{settings.data}" + (" (with their repeats)" if images > len(scan.examples) else "")
                          + f", which each batch would repeat; use at most {images}")
    if masked and seed is None:
        files, alpha = masks.count([ex.path for ex in scan.examples], IMAGE_SUFFIXES)
        if not files and not alpha:
            note(f"{settings.data}: no image has a NAME.mask.png or transparency, so --masked-loss has nothing to "
                 f"mask: the whole of each image is learned")
    if not masked:
        files, alpha = masks.count([ex.path for ex in scan.examples], IMAGE_SUFFIXES)
        if files or alpha:
            found = " and ".join(f"{n} {what}" for n, what in ((files, "with a NAME.mask file"),
                                                              (alpha, "with transparency")) if n)
            folder = os.path.commonpath([str(ex.path.parent) for ex in scan.examples])
            note(f"{folder}: {found} of {len(scan.examples)} images; --masked-loss would train only where "
                 f"their masks are white (now the whole image is learned, transparency on white)")
    _note_long_captions(base.tokenizer, scan, settings.max_token_length // 75)
    return TrainingSet(scan, base.vae, seed=seed if seed is not None else settings.seed, **sizing, crop=settings.crop,
                       cache=latent_cache(base, settings),
                       flip=settings.flip, color_aug=settings.color_aug, captions=caption_options(settings),
                       empty_every=settings.caption_dropout_every_epochs, templates=templates,
                       progress=settings.progress, masked=masked)


def _note_long_captions(tokenizer, scan: Scan, chunks: int = 1) -> None:
    """Training reads a caption's first 75 tokens (the text encoder's window, as kohya's default), or 75 x
    ``chunks`` (--max-token-length): say so for the captions it cuts, which samples and the report still draw
    whole, in A1111's 75-token chunks."""
    window = (tokenizer.model_max_length - 2) * chunks  # less each chunk's start and end tokens
    # (verbose=False: transformers logs every over-long text otherwise)
    long = [ex for ex in scan.examples if ex.caption and any(  # (--wildcards: each line is a caption)
        len(tokenizer(line, verbose=False).input_ids) - 2 > window for line in ex.caption.splitlines())]
    if long:
        longer = [str(n) for n in TOKEN_LENGTHS if n > window]
        more = f", or --max-token-length {' or '.join(longer)}" if longer else ""
        note(f"{long[0].path}" + (f" and {len(long) - 1} more" if len(long) > 1 else "") + f": caption longer than "
             f"the {window} tokens training reads; the rest is not learned (shorten it, or put what matters first"
             f"{more})")
