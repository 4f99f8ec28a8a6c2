"""The training recipe of the built-in tiny model: VAE first, then UNet and text encoder together.

    python -m sdtune.tiny.recipe --out runs/tiny        # then copies the result into the package

Reproducible from a seed; resumable (a checkpoint every few hundred steps). Everything is trained on
renders of the shapes world; the diffusion model never sees a held-out concept (see ``world``). The VAE,
like SD's, is a generic image codec and sees every kind of image.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import safeio
from . import model, world


def to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def render_batch(scenes) -> torch.Tensor:
    return torch.stack([to_tensor(world.render(s)) for s in scenes])


def _save_ckpt(path: Path, modules: dict, opt, step: int, extra: dict | None = None) -> None:
    state = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    safeio.atomic_save_torch({"model": state, "opt": opt.state_dict(), "step": step, **(extra or {})}, path)


def _load_ckpt(path: Path, modules: dict, opt) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    for n, m in modules.items():
        m.load_state_dict({k[len(n) + 1:]: v for k, v in ck["model"].items() if k.startswith(n + ".")})
    opt.load_state_dict(ck["opt"])
    return ck


def train_vae(vae, out: Path, steps: int, batch: int, seed: int, log) -> float:
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
        rng = random.Random(seed * 100003 + step)
        x = render_batch([world.random_scene(rng) for _ in range(batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / steps)) / 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            _save_ckpt(ck_path, {"vae": vae}, opt, step + 1)
    vae.eval()
    with torch.no_grad():  # SD-style scaling factor: make latents unit variance
        rng = random.Random(seed + 7)
        z = vae.encode(render_batch([world.random_scene(rng) for _ in range(256)])).latent_dist.mean
    return float(1.0 / z.std())


@torch.no_grad()
def encode_dataset(vae, scaling: float, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Held-in scenes with varied captions, encoded once (mean and std of the latent distribution)."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng, held_in_only=True) for _ in range(n)]
    captions = [world.caption(s, rng.randrange(world.n_templates())) for s in scenes]
    stats = []
    for i in range(0, n, 256):
        d = vae.encode(render_batch(scenes[i:i + 256])).latent_dist
        stats.append(torch.cat([d.mean, d.std], 1) * scaling)
    return torch.cat(stats), captions


def train_diffusion(parts: dict, latents, captions, out: Path, steps: int, batch: int, lr: float, seed: int,
                    log) -> None:
    unet, te, tok, sched = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    ids_all = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in (("unet", unet), ("te", te))}
    ck_path, start = out / "diffusion_ckpt.pt", 0
    if ck_path.exists():
        ck = _load_ckpt(ck_path, {"unet": unet, "te": te}, opt)
        start = ck["step"]
        for n in ema:
            ema[n] = {k[len(n) + 5:]: v for k, v in ck["model_ema"].items() if k.startswith(n + ".ema.")}
    acp = sched.alphas_cumprod
    unet.train()
    te.train()
    t0 = time.time()
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 1000003 + step)
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        mean, std = latents[idx].chunk(2, 1)
        z0 = mean + std * torch.randn(mean.shape, generator=g)
        ids = ids_all[idx].clone()
        ids[torch.rand(batch, generator=g) < 0.1] = empty  # caption dropout for classifier-free guidance
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, te(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:  # warm-up then cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 200) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for n, m in (("unet", unet), ("te", te)):
                for k, v in m.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[n][k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        if (step + 1) % 50 == 0:
            log(f"diffusion step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            flat = {f"{n}.ema.{k}": v for n, d in ema.items() for k, v in d.items()}
            _save_ckpt(ck_path, {"unet": unet, "te": te}, opt, step + 1, {"model_ema": flat})
    unet.load_state_dict(ema["unet"])
    te.load_state_dict(ema["te"])


def export(parts: dict, scaling: float, folder: Path) -> None:
    """fp16 safetensors, one file per component (the package ships these)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in model.COMPONENTS:
        state = {k: v.detach().half().contiguous() for k, v in parts[name].state_dict().items()}
        if name == "vae":
            state["scaling_factor"] = torch.tensor(scaling)
        save_file(state, folder / f"{name}.safetensors")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--images", type=int, default=24000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--install", action="store_true", help="copy the result into the package assets")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"recipe {json.dumps(vars(a))}")
    parts = model.build(a.seed)
    vae_done = out / "vae.safetensors"
    if vae_done.exists():
        state = load_file(vae_done)
        scaling = float(state.pop("scaling_factor"))
        parts["vae"].load_state_dict(state)
    else:
        scaling = train_vae(parts["vae"], out, a.vae_steps, a.vae_batch, a.seed, log)
        save_file({**parts["vae"].state_dict(), "scaling_factor": torch.tensor(scaling)}, vae_done)
    log(f"vae scaling factor {scaling:.4f}")
    parts["vae"].eval().requires_grad_(False)
    cache = out / "latents.safetensors"
    if cache.exists():
        latents = load_file(cache)["latents"]
        captions = json.loads((out / "captions.json").read_text())
    else:
        latents, captions = encode_dataset(parts["vae"], scaling, a.images, a.seed + 1)
        save_file({"latents": latents.contiguous()}, cache)
        (out / "captions.json").write_text(json.dumps(captions))
    log(f"{len(captions)} encoded training images")
    train_diffusion(parts, latents, captions, out, a.steps, a.batch, a.lr, a.seed, log)
    export(parts, scaling, out / "model")
    log(f"exported to {out / 'model'}")
    if a.install:
        shutil.copytree(out / "model", model.WEIGHTS, dirs_exist_ok=True)
        log(f"installed into {model.WEIGHTS}")


if __name__ == "__main__":
    main()
