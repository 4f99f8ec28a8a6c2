"""What a training step minimises: the diffusion loss of a batch (``Objective``), and the captions turned into what
it reads (``TextInput``: cached encoder outputs, or token ids for encoders that train).

    z_t  = sqrt(ᾱ_t) · z0 + sqrt(1 - ᾱ_t) · noise
    loss = mean_i  w_i · mean(m_i ⊙ (target_i − ε_θ(z_t, t, c)_i)²)    target = noise (ε) or v
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from torch import nn

from ..generate import TextStack
from ..safeio import SdtuneError
from . import shared_text
from .diffusion import Loss


def default_time_ids(latents: torch.Tensor, scale: int) -> torch.Tensor:
    """SDXL time ids of uncropped images at their training size: (h, w, 0, 0, h, w) per sample."""
    h, w = latents.shape[-2] * scale, latents.shape[-1] * scale
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=latents.device).expand(len(latents), 6)


class Objective(nn.Module):
    """The loss of one batch. It holds the UNet and the text encoders (a ``TextStack``), so the trainable
    parameters injected into them are its parameters (what DDP sees), while the frozen rest takes no part in
    the optimizer. ``added_conditioning``: the UNet also reads the pooled text embedding and SDXL's time ids
    (``Family.pooled_and_time_ids``)."""

    def __init__(self, unet, text: TextStack | None, scheduler, loss: Loss = Loss(),
                 text_trainable: bool = False, added_conditioning: bool = False, vae_scale: int = 8,
                 zero_terminal_snr: bool = False):
        """``zero_terminal_snr``: the scheduler's betas rescaled so that the last timestep is pure noise (kohya's
        --zero_terminal_snr, diffusers' rescale_betas_zero_snr)."""
        super().__init__()
        self.unet, self.text = unet, text
        acp = scheduler.alphas_cumprod
        if zero_terminal_snr and not scheduler.config.get("rescale_betas_zero_snr"):
            acp = torch.cumprod(1.0 - rescale_zero_terminal_snr(scheduler.betas.float()), dim=0)
        self.register_buffer("alphas_cumprod", acp.detach().float().clone(), persistent=False)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise SdtuneError(f"scheduler prediction type {self.prediction_type!r}: sdtune trains epsilon or "
                              f"v_prediction models")
        self.loss = loss
        self.text_trainable = text_trainable
        self.added_conditioning, self.vae_scale = added_conditioning, vae_scale
        # read once: diffusers' ``ModelMixin.dtype`` walks every submodule (hooks) on each call, 2% of a step
        self.unet_dtype = unet.dtype

    def errors(self, latents, noise, timesteps, input_ids=None, context=None, pooled=None, time_ids=None,
               mask=None, text_rows=None, input_noise=None, loss: Loss = Loss(), input_weights=None) -> torch.Tensor:
        """Each sample's prediction error under ``loss``: by default the plain squared error, what the validation
        loss averages. ``mask`` [b, 1, h, w] weights each latent pixel's error. ``text_rows``: sample i reads row
        ``text_rows[i]`` of ``context`` (the batch's distinct captions; ``shared_text``). ``input_noise``: what the
        noisy latent is made with where it is not the target ``noise`` (input perturbation). ``input_weights``: the
        ids' emphasis (--weighted-captions)."""
        if context is None:
            with torch.set_grad_enabled(self.text_trainable and torch.is_grad_enabled()):
                context, pooled = self.text(input_ids, input_weights)
        acp = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = acp.sqrt() * latents + (1 - acp).sqrt() * (noise if input_noise is None else input_noise)
        dtype = self.unet_dtype
        extra = {}
        if self.added_conditioning:
            if time_ids is None:
                time_ids = default_time_ids(latents, self.vae_scale)
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        if text_rows is not None:
            extra["cross_attention_kwargs"] = {"text_rows": text_rows}
        pred = self.unet(noisy.to(dtype), timesteps, context.to(dtype), **extra).sample
        target = noise if self.prediction_type == "epsilon" else acp.sqrt() * noise - (1 - acp).sqrt() * latents
        error = loss.elementwise(pred.float(), target.float(), timesteps, self.alphas_cumprod)
        if mask is not None:
            error = error * mask.to(error.device, error.dtype)
        return error.mean(dim=(1, 2, 3))

    def batch_loss(self, latents, noise, timesteps, input_ids=None, context=None, pooled=None, time_ids=None,
                   mask=None, text_rows=None, input_noise=None, input_weights=None) -> torch.Tensor:
        loss = self.errors(latents, noise, timesteps, input_ids, context, pooled, time_ids, mask, text_rows,
                           input_noise, self.loss, input_weights)
        weights = self.loss.weights(timesteps, self.alphas_cumprod, self.prediction_type)
        return (loss if weights is None else loss * weights).mean()

    def forward(self, latents, noise, timesteps, input_ids=None, context=None, pooled=None, time_ids=None,
                mask=None, text_rows=None, input_noise=None, prior=None, prior_weight: float = 0.0,
                input_weights=None):
        """The batch's loss, plus ``prior_weight`` x the loss of the class-image batch ``prior`` (the same
        arguments as a dict); one call, so that DDP sees one forward per backward."""
        loss = self.batch_loss(latents, noise, timesteps, input_ids, context, pooled, time_ids, mask, text_rows,
                               input_noise, input_weights)
        if prior is not None:
            loss = loss + prior_weight * self.batch_loss(**prior)
        return loss


class TextInput:
    """Captions -> what the objective takes: cached encoder outputs (per-token features and, for SDXL, the
    pooled embedding) when the text encoders are frozen and captions are fixed, else token ids for the
    encoders to run on. ``shared``: a batch's repeated captions become one row of the features and
    ``text_rows`` (for a UNet with ``shared_text``'s processor)."""

    def __init__(self, text: TextStack, device, expand=lambda p: p, cache_captions: list[str] | None = None,
                 shared: bool = False):
        self.text, self.device, self.expand, self.shared = text, device, expand, shared
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        if cache_captions is not None:
            self.cache = {}
            with torch.no_grad():
                for i in range(0, len(cache_captions), 32):
                    chunk = cache_captions[i:i + 32]
                    hidden, pooled = text(*self.tokens(chunk))
                    pooled = pooled if pooled is not None else [None] * len(chunk)
                    self.cache.update(zip(chunk, zip(hidden, pooled)))

    def tokens(self, captions: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """(ids, emphasis weights or None) of the captions, as ``TextStack.tokens`` reads them."""
        return self.text.tokens([self.expand(c) for c in captions], self.device)

    def _cached(self, captions: list[str]) -> dict:
        distinct, rows = shared_text.distinct_rows(captions) if self.shared else (captions, None)
        pooled = [self.cache[c][1] for c in captions]  # per sample: the UNet adds it to each one's time embedding
        out = {"context": torch.stack([self.cache[c][0] for c in distinct]),
               "pooled": None if pooled[0] is None else torch.stack(pooled)}
        if rows is not None:
            out["text_rows"] = rows.to(self.device)
        return out

    def __call__(self, captions: list[str]) -> dict:
        if self.cache is not None:
            return self._cached(captions)
        ids, weights = self.tokens(captions)
        return {"input_ids": ids} | ({"input_weights": weights} if weights is not None else {})

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict:
        """Encoder outputs for any captions (validation's need not be training captions), without gradients:
        the objective's ``context`` and ``pooled``."""
        if self.cache is not None and all(c in self.cache for c in captions):
            return self._cached(captions)
        context, pooled = self.text(*self.tokens(captions))
        return {"context": context, "pooled": pooled}
