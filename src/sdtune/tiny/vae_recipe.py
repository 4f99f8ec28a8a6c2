"""Make the built-in VAE a general 64 px codec without moving the latents the tiny UNet was trained on.

    python -m sdtune.tiny.vae_recipe --out runs/vae --install   # after `python -m sdtune.tiny.recipe --out runs/tiny0`

The first recipe (``recipe``) trains its VAE on shapes-world renders only, then the UNet on that VAE's
latents. This second stage fine-tunes that VAE (encoder and decoder) on the broad set of ``images`` so it
reproduces any background colour, frame, line, texture, text or photo, and keeps the UNet working:

- anchoring: for world renders, the new encoder's posterior (mean and log-variance, in the UNet's scaled
  units) is pulled to the frozen old encoder's, so what the UNet learned to produce still means the same;
- half of the world renders are decoded from the old encoder's latents (sampled, as the UNet saw them), so
  the decoder keeps turning the UNet's latents into the same pictures even where the encoder drifts;
- reconstruction is L1 + MSE plus an L1 on image gradients (keeps thin lines, frames and text sharp).

``--decoder-only`` trains the decoder alone: the encoder (and quant_conv) stay as they are, so the latents of
every image stay bit for bit and no UNet trained on them is touched; the decoder learns to decode the start
VAE's latents. ``--widen`` first makes the start VAE twice as wide (``config.WIDE_VAE``; see ``widen``) with the
same function. ``--distil N`` also keeps the decoder decoding N latents that the built-in UNets sample as the
start VAE does (see ``unet_latents``): without it, a wide decoder trained on encoder latents alone took the tiny
model's eval-tiny held-in score from 100% to 91% (shifted colours); with it, 100%.

The shipped VAE took five runs (the README lists their commands, times and PSNR table): the defaults (both
halves at the first widths, anchored), then ``--widen --decoder-only``, then ``--decoder-only --distil 512``
from there, twice, then ``--distil 512`` with the wider encoder trained too (anchored: world latents moved
0.02 RMS). A widened encoder that is trained gets small random input weights for its new channels (see
``wake``), with ``--widen`` or later. The scaling factor stays the old one (the UNet's latents are in its
units). Reproducible from a seed (per-step random draws) where no ``--minutes`` budget cuts a run short;
resumable (a checkpoint every ``--save-every`` steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file

from .. import safeio
from ..generate import generate
from ..models import load_base, pick_device
from . import config, files, images, model, vae_quality, world
from .recipe import run_log

BROAD = [c for c in images.CATEGORIES if c != "world"]


def training_pool(per_category: int, seed: int) -> dict[str, torch.Tensor]:
    """uint8 [N, 3, 64, 64] per category, from seeds below ``vae_quality.HELD_OUT_SEED`` (never measured)."""
    start = seed * per_category
    if start + per_category > vae_quality.HELD_OUT_SEED:
        raise ValueError(f"seed {seed} x {per_category} images reaches the held-out seeds")
    seeds = range(start, start + per_category)
    return {c: torch.from_numpy(images.images(c, seeds)).permute(0, 3, 1, 2).contiguous() for c in images.CATEGORIES}


def _batch(pool: dict[str, torch.Tensor], n_world: int, n_broad: int, g: torch.Generator,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """n_world world renders first, then n_broad images of the other categories (uniform, or drawn with
    ``weights`` over BROAD), random flips."""
    if weights is None:
        cats = torch.randint(0, len(BROAD), (n_broad,), generator=g)
    else:
        cats = torch.multinomial(weights, n_broad, replacement=True, generator=g)
    parts = [pool["world"][torch.randint(0, len(pool["world"]), (n_world,), generator=g)]]
    for i in range(n_broad):
        src = pool[BROAD[int(cats[i])]]
        parts.append(src[torch.randint(0, len(src), (1,), generator=g)])
    x = torch.cat(parts).float() / 127.5 - 1.0
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def unet_latents(specs: list[str], n: int, seed: int, log) -> torch.Tensor:
    """About ``n`` latents that the built-in models' UNets sample for held-in world captions (eval-tiny's
    settings: 20 DDIM steps, guidance 5), as the decoder receives them (after the scaling factor).

    They are not quite the encoder's latents of any render, and a decoder trained on renders alone decodes them
    with shifted colours; ``--distil`` trains the decoder to decode these as the start VAE does."""
    rng, got = random.Random(seed), []
    per_caption = 8
    for spec in specs:
        base = load_base(spec, device="cpu", dtype=torch.float32)
        # the decoder's input is post_quant_conv's: catch it there whatever the pipeline does around decode
        hook = base.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: got.append(args[0].detach()))
        try:
            for i in range(max(1, n // len(specs) // per_caption)):
                scene = world.random_scene(rng, held_in_only=True)
                prompt = world.caption(scene, rng.randrange(world.n_templates()))
                generate(base, prompt, steps=20, guidance=5.0, seed=rng.randrange(2**31), num_images=per_caption,
                         batch_size=per_caption, progress=False)
        finally:
            hook.remove()
        log(f"distil: {sum(len(z) for z in got)} UNet latents after {spec}")
    return torch.cat(got)


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def finetune(vae, out: Path, pool: dict[str, torch.Tensor], steps: int, batch: int, world_share: float,
             lr: float, anchor: float, seed: int, device, log, save_every: int = 250, minutes: float = 0.0,
             teacher=None, distil: torch.Tensor | None = None, distil_batch: int = 8,
             weights: torch.Tensor | None = None) -> int:
    """Fine-tune ``vae`` in place (its scaling factor untouched); resumes from ``out/vae_ft_ckpt.pt``.

    The anchor pulls world latents to ``teacher``'s (default: ``vae`` as it is at the start). ``distil``
    (decoder inputs, see ``unet_latents``): each step ``distil_batch`` of them are decoded and pulled to what
    ``teacher`` decodes from them. ``weights``: how often each BROAD category is drawn (default: equally).

    ``minutes`` > 0 is a wall-clock budget for a shared machine: the learning-rate schedule runs on
    whichever is further along, steps or time, and training ends when either is used up (the run is then
    reproducible only up to the step it reached, which the log and the return value give)."""
    teacher = copy.deepcopy(teacher or vae).to(device).eval().requires_grad_(False)
    # --decoder-only (a frozen encoder): the decoder learns to decode the teacher's latents, the ones the UNets
    # learnt on; its own encoder computes the same (or, widened, the same up to rounding at four times the cost)
    decoder_only = not any(p.requires_grad for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()])
    sf = float(vae.config.scaling_factor)
    n_world = max(2, round(batch * world_share)) // 2 * 2
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ck_path, start, spent = out / "vae_ft_ckpt.pt", 0, 0.0
    if ck_path.exists():
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        start, spent = ck["step"], float(ck["seconds"])
    if distil is not None:  # the teacher's decodes of the fixed distil latents, once rather than every step
        with torch.no_grad():
            wanted = torch.cat([teacher.decode(z.to(device)).sample.cpu() for z in distil.split(64)])
    vae.to(device).train()
    t0, seen = time.time() - spent, dict.fromkeys(("rec", "anchor", "distil"), 0.0)
    step = start
    for step in range(start, steps):
        progress = max(step / steps, (time.time() - t0) / (minutes * 60) if minutes > 0 else 0.0)
        if progress >= 1.0:
            log(f"vae-ft: time budget of {minutes} min used up at step {step}")
            safeio.atomic_save_torch({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                      "seconds": time.time() - t0}, ck_path)
            break
        g = torch.Generator().manual_seed(seed * 1000003 + step)
        x = _batch(pool, n_world, batch - n_world, g, weights).to(device)
        eps = torch.randn((len(x), vae.config.latent_channels, x.shape[-2] // 4, x.shape[-1] // 4), generator=g)
        eps = eps.to(device)
        if decoder_only:
            with torch.no_grad():
                post = teacher.encode(x).latent_dist
            old = DiagonalGaussianDistribution(post.parameters[:n_world])
        else:
            post = vae.encode(x).latent_dist
            with torch.no_grad():
                old = teacher.encode(x[:n_world]).latent_dist
        z = post.mean + post.std * eps
        if not decoder_only:  # half of the world renders are decoded from the old encoder's latents
            half = n_world // 2
            z = torch.cat([old.mean[:half] + old.std[:half] * eps[:half], z[half:]])
        rec = vae.decode(z).sample
        loss_rec = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 0.5 * _grad_l1(rec, x)
        loss_anchor = (F.mse_loss(post.mean[:n_world] * sf, old.mean * sf)
                       + 0.1 * F.mse_loss(post.logvar[:n_world], old.logvar))
        kl = post.kl().mean() / x[0].numel()
        loss = loss_rec + anchor * loss_anchor + 1e-4 * kl
        if distil is not None:
            pick = torch.randint(0, len(distil), (distil_batch,), generator=g)
            got, want = vae.decode(distil[pick].to(device)).sample, wanted[pick].to(device)
            loss_distil = F.l1_loss(got, want) + F.mse_loss(got, want)
            loss = loss + loss_distil
            seen["distil"] += loss_distil.item()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * (1 + math.cos(math.pi * progress)) / 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        seen["rec"] += loss_rec.item()
        seen["anchor"] += loss_anchor.item()
        if (step + 1) % 50 == 0:
            distilled = f" distil {seen['distil'] / 50:.4f}" if distil is not None else ""
            log(f"vae-ft step {step + 1}/{steps} rec {seen['rec'] / 50:.4f} anchor {seen['anchor'] / 50:.5f}"
                f"{distilled} ({time.time() - t0:.0f}s)")
            seen = dict.fromkeys(seen, 0.0)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            safeio.atomic_save_torch({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                                      "seconds": time.time() - t0}, ck_path)
    else:
        step = steps
    vae.eval()
    return step


def widen(old: AutoencoderKL, seed: int = 0) -> AutoencoderKL:
    """``old`` at twice its widths (``config.WIDE_VAE``), computing what it computed, up to float rounding.

    Each layer's old channels come first, so every group norm group of the old model is a group of the new one.
    Weights from new channels into old ones are zero, so the old channels compute what they did whatever the new
    ones hold. The decoder's new channels get small random weights from the channels before them (see ``wake``);
    the encoder's stay zero until the encoder is trained (``main`` wakes them then).
    The mid-block attention has one head, whose 1/sqrt(width) scale halves as the width doubles: the old query
    weights are scaled to keep every score.
    """
    new = AutoencoderKL(**config.WIDE_VAE)
    new.register_to_config(scaling_factor=float(old.config.scaling_factor))
    olds, state = old.state_dict(), {}
    for key, shape in ((k, v.shape) for k, v in new.state_dict().items()):
        o, t = olds[key], torch.zeros(shape)
        if len(shape) == 1 and "norm" in key and key.endswith("weight"):
            t[:] = 1.0
        scale = math.sqrt(shape[0] / o.shape[0]) if ".to_q." in key else 1.0
        t[tuple(slice(0, n) for n in o.shape)] = o * scale
        state[key] = t
    new.load_state_dict(state)
    wake(new, old, ("decoder.",), seed)
    return new


@torch.no_grad()
def wake(wide: AutoencoderKL, narrow: AutoencoderKL, parts: tuple[str, ...], seed: int = 0) -> int:
    """Give the new channels of a widened VAE that are still all zero small random weights from the channels
    before them, in the parameters under ``parts`` (``"encoder."``, ``"decoder."``); returns how many tensors.

    A zero channel with zero weights in and out never gets a gradient, so training could not use it. Weights
    from new channels into old ones stay zero, so what the old channels compute is kept. New query rows of the
    mid-block attention stay zero: a query there would add to every score."""
    g = torch.Generator().manual_seed(seed)
    olds, woken = narrow.state_dict(), 0
    for key, t in wide.state_dict().items():
        o = olds[key]
        if not key.startswith(parts) or ".to_q." in key or t.dim() < 2 or t.shape[0] == o.shape[0]:
            continue
        rows = t[o.shape[0]:]
        if rows.count_nonzero() == 0:
            rows.copy_(torch.randn(rows.shape, generator=g) / math.sqrt(t[0].numel()))
            woken += 1
    return woken


def export(vae, path: Path) -> None:
    """fp16 safetensors with the scaling factor, the format ``model.load`` reads."""
    state = {k: v.detach().cpu().half().contiguous() for k, v in vae.state_dict().items()}
    state["scaling_factor"] = torch.tensor(float(vae.config.scaling_factor))
    safeio.atomic_save_safetensors(state, path)


def load_vae(path: Path):
    """A VAE of the tiny architecture with the weights (and scaling factor) of a ``vae.safetensors``."""
    state = load_file(path)
    vae = model.vae_for(state)
    vae.register_to_config(scaling_factor=float(state.pop("scaling_factor")))
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    return vae


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def category_weights(text: str) -> torch.Tensor | None:
    """``photo=2,lines=2`` -> a weight per BROAD category (1 for those not named); "" -> None (uniform)."""
    if not text:
        return None
    weights = dict.fromkeys(BROAD, 1.0)
    for item in text.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in weights or not _is_number(value):
            raise ValueError(f"--category-weights {text}: {item.strip()!r} needs CAT=W with CAT one of "
                             f"{', '.join(BROAD)} and W a number")
        weights[name] = float(value)
    return torch.tensor([weights[c] for c in BROAD])


def settings(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/vae")
    p.add_argument("--start", default="runs/tiny0/model/vae.safetensors",
                   help="the VAE the first tiny UNet was trained on (default: the first recipe's export)")
    p.add_argument("--init", help="weights to go on from, e.g. an earlier run's vae.safetensors (default: "
                   "--start); the anchor still pulls to --start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--world-share", type=float, default=0.25, help="share of each batch that is world renders")
    p.add_argument("--per-category", type=int, default=3000, help="training images per category")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--anchor", type=float, default=1.0, help="weight of the latent anchor on world renders")
    p.add_argument("--decoder-only", action="store_true",
                   help="train the decoder alone: every image's latents stay bit for bit")
    p.add_argument("--widen", action="store_true",
                   help="first widen --start to twice its widths (config.WIDE_VAE), keeping what it computes (see widen)")
    p.add_argument("--distil", type=int, default=0, metavar="N",
                   help="also keep decoding about N latents sampled by the built-in UNets as --start does "
                   "(see unet_latents; 0: off)")
    p.add_argument("--distil-from", default="tiny,tiny-xl", help="the built-in models whose UNets --distil samples")
    p.add_argument("--category-weights", default="", metavar="CAT=W,...",
                   help="draw these categories W times as often as the others, e.g. photo=2,lines=2")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core CPU)")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget (0: none; see finetune)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-per-category", type=int, default=32, help="held-out images per category measured")
    p.add_argument("--export-only", action="store_true", help="export the last checkpoint")
    p.add_argument("--install", action="store_true", help="copy the result into the package assets")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = settings(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = run_log(out)
    log(f"vae recipe {json.dumps(vars(a))} on {device}")
    t0 = time.time()
    if not Path(a.start).is_file():
        raise SystemExit(f"{a.start}: no VAE to start from; run `python -m sdtune.tiny.recipe --out runs/tiny0` first or give "
                         "--start PATH/vae.safetensors")
    old = load_vae(Path(a.start))
    vae = load_vae(Path(a.init)) if a.init else copy.deepcopy(old)
    try:  # before minutes of image generation and sampling
        weights = category_weights(a.category_weights)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if a.widen and not a.init:
        vae = widen(vae, a.seed)
    if not a.decoder_only and vae.config.block_out_channels != old.config.block_out_channels:
        wake(vae, old, ("encoder.",), a.seed)  # the encoder is trained: its new channels must not stay 0
    if a.export_only:
        ck = torch.load(out / "vae_ft_ckpt.pt", map_location="cpu", weights_only=True)
        vae.load_state_dict(ck["vae"])
        log(f"exporting step {ck['step']}")
    else:
        pool = training_pool(a.per_category, a.seed)
        log(f"generated {sum(len(p) for p in pool.values())} training images ({time.time() - t0:.0f}s)")
        distil = None
        if a.distil:
            cache = out / "distil_latents.pt"  # sampled once: a resumed run trains on the same ones
            if cache.exists():
                distil = torch.load(cache, map_location="cpu", weights_only=True)
            else:
                distil = unet_latents(a.distil_from.split(","), a.distil, a.seed, log)
                safeio.atomic_save_torch(distil, cache)
            log(f"distil: {len(distil)} UNet latents ({time.time() - t0:.0f}s)")
        if a.decoder_only:  # AdamW skips parameters that never get a gradient
            for frozen in (vae.encoder, vae.quant_conv):
                frozen.requires_grad_(False)
        done = finetune(vae, out, pool, a.steps, a.batch, a.world_share, a.lr, a.anchor, a.seed, device, log,
                        a.save_every, a.minutes, teacher=old, distil=distil,
                        weights=weights)
        log(f"trained {done} steps ({time.time() - t0:.0f}s)")
        del pool
    vae.cpu().eval()
    export(vae, out / "vae.safetensors")
    shipped = load_vae(out / "vae.safetensors")  # measure what is shipped: the fp16 weights
    test_set = vae_quality.held_out_set(a.eval_per_category)
    log(vae_quality.table({"old": vae_quality.category_psnr(old.eval(), test_set),
                           "new": vae_quality.category_psnr(shipped.eval(), test_set)}))
    log(f"exported {out / 'vae.safetensors'} ({time.time() - t0:.0f}s)")
    if a.install:
        shutil.copyfile(out / "vae.safetensors", files.WEIGHTS / "vae.safetensors")
        log(f"installed into {files.WEIGHTS}")


if __name__ == "__main__":
    main()
