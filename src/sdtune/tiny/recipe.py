"""The training recipe of the built-in models: VAE first, then UNet and text encoder together.

    python -m sdtune.tiny.recipe --out runs/tiny --vae src/sdtune/tiny/assets/model/vae.safetensors --install
                            # the shipped tiny, on the general VAE; --install copies the result into the package
    python -m sdtune.tiny.recipe --out runs/tiny0             # VAE first (world renders), then UNet: the first model
    python -m sdtune.tiny.recipe --arch sdxl --out runs/tiny-xl --install    # tiny-xl (needs tiny's weights,
                            # the shipped ones or --tiny FOLDER's: its first text encoder starts from tiny's)

The defaults (``--preset cpu``) are the shipped model's settings, sized for a 2-core CPU (the README has
the measured run). ``--preset large`` is the earlier recipe sized for one GPU (4x the samples, plain MSE).
Reproducible from a seed (per-step random draws); resumable (a checkpoint every 500 steps).
``sdtune eval-tiny --model runs/tiny/model`` judges an export before it is installed. Everything is trained on
renders of the shapes world; the diffusion model never sees a held-out concept (see ``world``). The VAE
this recipe trains knows only the world; a second stage, ``python -m sdtune.tiny.vae_recipe --start
runs/tiny0/model/vae.safetensors --install``, makes it a general codec (any colour, frames, text, photos)
while keeping the latents this UNet was trained on (see ``vae_recipe``). ``--vae PATH/vae.safetensors`` trains
on a VAE already made (the general one) instead of training one: tiny retrained on the new VAE.

``--arch sdxl`` trains ``tiny-xl``: the shipped tiny VAE stays as it is (frozen, shared); the first text encoder
starts as tiny's with a fourth layer that adds nothing (``config.XL_TEXT_ENCODER_1``) and learns at 0.5x the
rate; an SDXL-layout UNet learns with it and a second, projecting text encoder (``config.XL_*``), conditioned as
SDXL is: both encoders' penultimate layers, the second's pooled output and the size/crop time ids
(64, 64, 0, 0, 64, 64).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .. import safeio
from ..families import TINY, TINY_XL, Family
from ..generate import TextStack
from ..models import pick_device, tokenizer_for
from ..train.diffusion import min_snr_weights
from . import files, model, world

# "cpu": the shipped model, sized for 2 CPU cores. Min-SNR weighting (gamma 5) is what lets 216,000 samples
# do; LoRAs for this model train best with it too (see tests/test_train_quality.py).
# "large": the settings of the earlier GPU-trained model (864,000 samples, plain MSE, sized for one GPU);
# not rerun since the UNet's attention went to head size 32.
PRESETS = {
    "cpu": dict(vae_steps=1500, vae_batch=16, vae_images=16000, steps=9000, batch=24, lr=1e-3,
                images=16000, min_snr=5.0),
    "large": dict(vae_steps=3000, vae_batch=32, vae_images=32000, steps=9000, batch=96, lr=5e-4,
                  images=32000, min_snr=0.0),
    # tiny-xl trains no VAE (it shares tiny's); its first text encoder starts as tiny's
    "xl-cpu": dict(vae_steps=0, vae_batch=0, vae_images=0, steps=8000, batch=24, lr=1e-3, images=16000, min_snr=5.0),
}
DEFAULT_PRESET = {"sd1": "cpu", "sdxl": "xl-cpu"}


@dataclass(frozen=True)
class Arch:
    """What the recipe trains for one architecture."""
    family: Family
    learns: dict[str, str]  # checkpoint name -> component
    lr_scale: dict[str, float] = field(default_factory=dict)  # checkpoint name -> factor on the learning rate


# tiny-xl's first text encoder starts trained (tiny's) and follows at half the rate. The rate decides whether blue
# is drawn blue or cyan. Frozen, tiny-xl drew 69% of the held-in prompts right; at the full rate 100%, but a TI
# token learnt on it drew crosses and stripes instead of the concept (the TI quality test at 0%); at a tenth,
# held-in 91% (blue drawn cyan on white) with TI at 88%. At 0.3x: 100% from the first tiny on the first VAE, but
# 88% from the retrained tiny on the general one (the blue square 0/8; 95% and 89% from the first tiny's encoder,
# seeds 0 and 1). At 0.5x (shipped): 98%, TI learns the concept in 600 steps. At 0.3x with its token embedding
# frozen (tiny's, so the 6.3 MB table could be shared, own weights 12 MB): 97% (blue drawn cyan 2 in 8).
ARCHES = {"sd1": Arch(TINY, {"unet": "unet", "te": "text_encoder"}),
          "sdxl": Arch(TINY_XL, {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2"}, {"te": 0.5})}
TRAINED = {n: c for arch in ARCHES.values() for n, c in arch.learns.items()}  # every checkpoint name -> component
TIME_IDS = (64, 64, 0, 0, 64, 64)  # SDXL's (original size, crop top-left, target size) of every 64 px render


def _render_u8(scene) -> np.ndarray:
    return np.asarray(world.render(scene), dtype=np.uint8)


def render_pool(scenes, workers: int = 1) -> torch.Tensor:
    """uint8 [N, 3, 64, 64] renders; worker processes only split the work (same pixels for any count)."""
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            arrays = pool.map(_render_u8, scenes, chunksize=256)
    else:
        arrays = [_render_u8(s) for s in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def _save_ckpt(path: Path, modules: dict, opt, step: int, extra: dict | None = None) -> None:
    state = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    safeio.atomic_save_torch({"model": state, "opt": opt.state_dict(), "step": step, **(extra or {})}, path)


def _load_ckpt(path: Path, modules: dict, opt) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    for n, m in modules.items():
        m.load_state_dict({k[len(n) + 1:]: v for k, v in ck["model"].items() if k.startswith(n + ".")})
    opt.load_state_dict(ck["opt"])
    return ck


def train_vae(vae, pool: torch.Tensor, out: Path, steps: int, batch: int, seed: int, device, log,
              save_every: int = 500) -> float:
    """Reconstruction (L1 + MSE) with a light KL term, on batches drawn from ``pool`` (uint8 renders)."""
    ck_path = out / "vae_ckpt.pt"
    with torch.no_grad():  # start near-deterministic (posterior std ~0.05) so reconstruction learns fast
        vae.quant_conv.bias[vae.config.latent_channels:] = -6.0
    lr = 2e-3
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if ck_path.exists():
        start = _load_ckpt(ck_path, {"vae": vae}, opt)["step"]
    vae.train()
    t0 = time.time()
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 100003 + step)
        x = to_float(pool[torch.randint(0, len(pool), (batch,), generator=g)]).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / steps)) / 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            _save_ckpt(ck_path, {"vae": vae}, opt, step + 1)
    vae.eval()
    with torch.no_grad():  # SD-style scaling factor: make latents unit variance
        z = vae.encode(to_float(pool[:256]).to(device)).latent_dist.mean
    return float(1.0 / z.std())


def dataset_scenes(n: int, seed: int) -> tuple[list, list[str]]:
    """Held-in scenes with varied captions: the diffusion model's training set."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng, held_in_only=True) for _ in range(n)]
    return scenes, [world.caption(s, rng.randrange(world.n_templates())) for s in scenes]


@torch.no_grad()
def encode_dataset(vae, scaling: float, pixels: torch.Tensor, device) -> torch.Tensor:
    """Each image encoded once: mean and std of its latent distribution, scaled (kept on the CPU)."""
    stats = []
    for i in range(0, len(pixels), 256):
        d = vae.encode(to_float(pixels[i:i + 256]).to(device)).latent_dist
        stats.append((torch.cat([d.mean, d.std], 1) * scaling).cpu())
    return torch.cat(stats)


def train_diffusion(parts: dict, latents, captions, out: Path, steps: int, batch: int, lr: float, seed: int,
                    device, log, save_every: int = 500, min_snr: float = 0.0) -> None:
    """UNet and text encoder together on the epsilon loss, with caption dropout and an EMA of the weights.

    ``parts``: "unet", "scheduler", "text" (a ``TextStack`` of the family's encoders, as the UNet reads them) and
    "trained" ({checkpoint name: module} of what learns; a text encoder not in it stays frozen).
    ``min_snr`` > 0 weights each sample's loss by min(SNR, gamma) / SNR (Min-SNR weighting): the nearly clean
    timesteps, which only polish pixels, stop dominating the gradient, and shape and colour are learnt sooner.
    The random draws come from a CPU generator seeded per step, so a resumed run repeats the same steps.
    """
    unet, text, sched, trained = parts["unet"], parts["text"], parts["scheduler"], parts["trained"]
    ids_all, empty = text.ids(captions, "cpu"), text.ids([""], "cpu")
    params = [p for m in trained.values() for p in m.parameters()]
    scale = parts.get("lr_scale", {})
    opt = torch.optim.AdamW([{"params": list(m.parameters()), "scale": scale.get(n, 1.0)} for n, m in trained.items()],
                            lr=lr, weight_decay=1e-2, fused=True)
    ema = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in trained.items()}
    ck_path, start = out / "diffusion_ckpt.pt", 0
    if ck_path.exists():
        ck = _load_ckpt(ck_path, trained, opt)
        start = ck["step"]
        for n in ema:
            ema[n] = {k[len(n) + 5:]: v.to(device) for k, v in ck["model_ema"].items() if k.startswith(n + ".ema.")}
    live = [v for m in trained.values() for v in m.state_dict().values() if v.dtype.is_floating_point]
    shadow = [ema[n][k] for n, m in trained.items() for k, v in m.state_dict().items() if v.dtype.is_floating_point]
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32, device=device).expand(batch, -1)
    acp = sched.alphas_cumprod
    for m in trained.values():
        m.train()
    t0 = time.time()
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 1000003 + step)
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        mean, std = latents[idx].chunk(2, 1)
        z0 = mean + std * torch.randn(mean.shape, generator=g)
        ids = [x[idx].clone() for x in ids_all]
        drop = torch.rand(batch, generator=g) < 0.1  # caption dropout for classifier-free guidance
        for x, e in zip(ids, empty):
            x[drop] = e[0]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        w = min_snr_weights(t, acp, min_snr).to(device) if min_snr > 0 else None  # from the CPU t: no sync
        zt, t, noise = zt.to(device), t.to(device), noise.to(device)
        hidden, pooled = text([x.to(device) for x in ids])
        added = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        pred = unet(zt, t, hidden, **added).sample
        if w is not None:
            loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * w).mean()
        else:
            loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:  # warm-up then cosine decay
            group["lr"] = group["scale"] * lr * min(1.0, (step + 1) / 200) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(shadow, live, 1 - decay)
        if (step + 1) % 100 == 0:
            log(f"diffusion step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            flat = {f"{n}.ema.{k}": v for n, d in ema.items() for k, v in d.items()}
            _save_ckpt(ck_path, trained, opt, step + 1, {"model_ema": flat})
    for n, m in trained.items():
        m.load_state_dict(ema[n])


def load_ema(parts: dict, out: Path) -> int:
    """Put the EMA weights of the last diffusion checkpoint into ``parts``; returns its step."""
    ck = torch.load(out / "diffusion_ckpt.pt", map_location="cpu", weights_only=True)
    for n, name in TRAINED.items():
        state = {k[len(n) + 5:]: v for k, v in ck["model_ema"].items() if k.startswith(n + ".ema.")}
        if state:
            parts[name].load_state_dict(state)
    return ck["step"]


def diffusion_parts(parts: dict, arch: str) -> dict:
    """What ``train_diffusion`` takes: the text encoders as the family's UNet reads them, and what learns."""
    family, learns = ARCHES[arch].family, ARCHES[arch].learns
    tokenizers = {"tokenizer": parts["tokenizer"]} if "tokenizer" in parts else {}
    encoders = [(te, parts[te.component], tokenizers.get(te.tokenizer) or tokenizer_for(te))
                for te in family.text_encoders]
    for te in family.text_encoders:
        if te.component not in learns.values():
            parts[te.component].eval().requires_grad_(False)
    trained = {n: parts[c] for n, c in learns.items()}
    return {"unet": parts["unet"], "scheduler": parts["scheduler"], "text": TextStack(encoders), "trained": trained,
            "lr_scale": ARCHES[arch].lr_scale}


def export(parts: dict, scaling: float, folder: Path) -> None:
    """fp16 safetensors, one file per component (the package ships these; tiny-xl all but the VAE)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*files.COMPONENTS, "text_encoder_2"):
        if name not in parts:
            continue
        state = {k: v.detach().cpu().half().contiguous() for k, v in parts[name].state_dict().items()}
        if name == "vae":
            state["scaling_factor"] = torch.tensor(scaling)
        safeio.atomic_save_safetensors(state, folder / f"{name}.safetensors")


def settings(argv=None) -> argparse.Namespace:
    """The command line, with the chosen preset filling every size not given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(DEFAULT_PRESET), default="sd1",
                   help="sd1: the tiny model (default); sdxl: tiny-xl, on tiny's VAE, from tiny's text encoder")
    p.add_argument("--out", help="run folder (default runs/tiny, or runs/tiny-xl with --arch sdxl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the settings below, unless given: cpu (the shipped tiny), xl-cpu (the shipped tiny-xl; "
                        "the default with --arch sdxl) or large")
    p.add_argument("--vae", help="train on this vae.safetensors instead of training a VAE first (tiny-xl: "
                   "default the shipped tiny VAE), e.g. the general VAE of vae_recipe")
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--vae-batch", type=int)
    p.add_argument("--vae-images", type=int, help="renders the VAE trains on (all kinds)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-snr", type=float, help="Min-SNR loss weighting gamma (0: plain MSE)")
    p.add_argument("--images", type=int, help="held-in training images of the diffusion model")
    p.add_argument("--tiny", metavar="FOLDER",
                   help="tiny-xl: the tiny model (an export of this recipe) whose text encoder its first one starts "
                        "from (default: the shipped tiny)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="render processes (0: one per CPU core)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint interval in steps")
    p.add_argument("--export-only", action="store_true", help="export the EMA weights of the last checkpoint")
    p.add_argument("--install", action="store_true", help="copy the result into the package assets")
    a = p.parse_args(argv)
    a.out = a.out or ("runs/tiny-xl" if a.arch == "sdxl" else "runs/tiny")
    a.preset = a.preset or DEFAULT_PRESET[a.arch]
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def run_log(out: Path):
    """A function that prints a line and appends it to ``out/log.txt`` (kept across resumed runs)."""
    logf = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()
    return log


def main(argv=None) -> None:
    a = settings(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes throughout
    workers = a.workers or os.cpu_count() or 1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = run_log(out)
    log(f"recipe {json.dumps(vars(a))} on {device}")
    t0 = time.time()
    xl = a.arch == "sdxl"
    parts = model.build_xl(a.seed) if xl else model.build(a.seed)
    vae_done = out / "vae.safetensors"
    if xl:  # tiny's VAE as shipped; the first text encoder starts from tiny's, its extra last layer adding nothing
        tiny = Path(a.tiny) if a.tiny else files.WEIGHTS
        if not files.trained_weights_exist(tiny, ("text_encoder",)):  # only its text encoder is read
            raise SystemExit(f"{tiny}: no trained tiny text encoder (text_encoder.safetensors) to build tiny-xl on; "
                             + ("give --tiny an export folder of tiny's recipe" if a.tiny else "train tiny first"))
        start = {k: v.float() for k, v in load_file(tiny / "text_encoder.safetensors").items()}
        missing, unexpected = parts["text_encoder"].load_state_dict(start, strict=False)
        added = f".layers.{model.config.TEXT_ENCODER['num_hidden_layers']}."
        assert not unexpected and all(added in k for k in missing), (missing, unexpected)
        with torch.no_grad():  # the extra layer adds nothing: the last hidden state is the penultimate too
            for name, param in parts["text_encoder"].named_parameters():
                if added in name and ("out_proj" in name or "fc2" in name):
                    param.zero_()
    given = Path(a.vae) if a.vae else (files.WEIGHTS / "vae.safetensors" if xl else None)  # None: train one
    if given is not None and not vae_done.exists():  # a resumed run keeps the VAE it started on
        if not given.is_file():
            raise SystemExit(f"{given}: no such VAE file; give --vae PATH/vae.safetensors")
        shutil.copyfile(given, vae_done)
    if vae_done.exists():
        state = load_file(vae_done)
        scaling = float(state.pop("scaling_factor"))
        parts["vae"] = model.vae_for(state)  # its widths as in the file (a widened VAE is twice as wide)
        parts["vae"].load_state_dict(state)
    elif a.export_only:
        raise SystemExit(f"{out}: no trained VAE yet; run the recipe without --export-only first")
    if a.export_only:
        log(f"exporting the EMA weights of step {load_ema(parts, out)}")
    else:
        cache = out / "latents.safetensors"
        scenes = captions = pixels = None
        if not cache.exists():  # render before CUDA starts (worker processes are forked)
            scenes, captions = dataset_scenes(a.images, a.seed + 1)
            pixels = render_pool(scenes, workers)
            log(f"rendered {len(scenes)} training images ({time.time() - t0:.0f}s)")
        if not vae_done.exists():
            rng = random.Random(a.seed)
            pool = render_pool([world.random_scene(rng) for _ in range(a.vae_images)], workers)
            log(f"rendered {len(pool)} VAE images ({time.time() - t0:.0f}s)")
            scaling = train_vae(parts["vae"].to(device), pool, out, a.vae_steps, a.vae_batch, a.seed, device, log,
                                a.save_every)
            del pool
            state = {k: v.cpu() for k, v in parts["vae"].state_dict().items()}
            safeio.atomic_save_safetensors({**state, "scaling_factor": torch.tensor(scaling)}, vae_done)
        log(f"vae scaling factor {scaling:.4f}")
        parts["vae"].to(device).eval().requires_grad_(False)
        if cache.exists():
            latents = load_file(cache)["latents"]
            captions = json.loads((out / "captions.json").read_text())
        else:
            latents = encode_dataset(parts["vae"], scaling, pixels, device)
            safeio.atomic_write_text(json.dumps(captions), out / "captions.json")
            safeio.atomic_save_safetensors({"latents": latents.contiguous()}, cache)
        log(f"{len(captions)} encoded training images ({time.time() - t0:.0f}s)")
        for name in ("unet", "text_encoder", "text_encoder_2"):
            if name in parts:
                parts[name].to(device)
        train_diffusion(diffusion_parts(parts, a.arch), latents, captions, out, a.steps, a.batch, a.lr, a.seed,
                        device, log, a.save_every, a.min_snr)
    export(parts, scaling, out / "model")
    log(f"exported to {out / 'model'} ({time.time() - t0:.0f}s)")
    if a.install:  # tiny-xl ships its own components (not the VAE)
        dest, names = (files.XL_WEIGHTS, files.XL_COMPONENTS) if xl else (files.WEIGHTS, files.COMPONENTS)
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(out / "model" / f"{name}.safetensors", dest / f"{name}.safetensors")
        log(f"installed into {dest}")


if __name__ == "__main__":
    main()
