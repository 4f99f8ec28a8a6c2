"""The diffusion objective's pieces: what a step draws (noise, timesteps) and how a prediction's error becomes its
loss (per element, then weighted per sample).

The default is the plain DDPM objective: Gaussian noise, timesteps uniform over the schedule, squared error,
every sample weighted 1. The options are kohya sd-scripts', under its names (where sdtune's differ, a --config file
with kohya's is told sdtune's), each off by default:

- ``noise_offset``: a per-channel constant added to the noise (darker darks, brighter brights);
  ``noise_offset_random_strength``: its strength drawn per batch from 0 to the value; ``adaptive_noise_scale``:
  each image and channel's strength grows by this times the absolute mean of its latent (``Draws.adapted``);
- ``multires_noise_iterations`` / ``_discount``: "pyramid" noise, lower-resolution noise layers added on top and
  the sum rescaled to unit variance (low-frequency colour and composition learned sooner);
- ``ip_noise_gamma``: input perturbation (Ning et al. 2023): the noisy latent is made with noise + γ·ξ while the
  target stays the noise (diffusers' ``--input_perturbation``); ``ip_noise_gamma_random_strength``: γ drawn per
  batch from 0 to the value;
- ``min_timestep`` / ``max_timestep``: timesteps drawn from that range only;
- ``loss_type`` huber or smooth_l1: the pseudo-Huber error 2c(√(d² + c²) − c) (× 1/c for smooth_l1), squared for
  small d and linear for large, less pulled by outlying pixels; c per sample by ``huber_schedule``;
- ``min_snr_gamma`` (Min-SNR-γ, Hang et al. 2023), ``debiased_estimation`` (1/√SNR), ``v_pred_like_loss`` (1 + v ·
  (SNR+1)/SNR) and ``scale_v_pred_loss_like_noise_pred`` (SNR/(SNR+1), v-prediction models): weights per sample,
  multiplied together as kohya applies them one after the other.

Every draw comes from one generator seeded per global batch, so a resumed or multi-process run repeats the
single-process run exactly; an option that is off draws nothing, so a default run's draws do not move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..safeio import SdtuneError
from .data import seed_for

DEBIASED_SNR_CAP = 1000.0  # kohya's: the SNR of t=0 is near infinite, so 1/sqrt(SNR) is taken at most at this SNR


@dataclass(frozen=True)
class Noise:
    """How a step's noise and timesteps are drawn."""

    offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_gamma: float = 0.0
    min_timestep: int = 0
    max_timestep: int = 0  # 0: the schedule's end
    offset_random: bool = False  # each batch's offset strength uniform in [0, offset)
    ip_gamma_random: bool = False  # each batch's γ uniform in [0, ip_gamma)
    adaptive_scale: float = 0.0  # the offset's growth per unit of |latent mean| (kohya's adaptive_noise_scale)

    @classmethod
    def of(cls, settings) -> Noise:
        return cls(settings.noise_offset, settings.multires_noise_iterations, settings.multires_noise_discount,
                   settings.ip_noise_gamma, settings.min_timestep, settings.max_timestep,
                   settings.noise_offset_random_strength, settings.ip_noise_gamma_random_strength,
                   settings.adaptive_noise_scale)

    def check(self, num_timesteps: int) -> None:
        """The timestep range against the model's schedule (``TrainSettings.check`` checked the rest)."""
        if self.max_timestep > num_timesteps or self.min_timestep >= num_timesteps:
            raise SdtuneError(f"--min-timestep {self.min_timestep} --max-timestep {self.max_timestep}: this model's "
                              f"schedule has timesteps 0 to {num_timesteps - 1}; give a range inside it (a max of "
                              f"at most {num_timesteps})")


@dataclass
class Draws:
    """One global batch's draws: ``noise`` is the target (ε), ``input_noise`` what the noisy latent is made with
    (the same tensor unless input perturbation is on)."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    input_noise: torch.Tensor
    # the noise offset's draw (batch, channels, 1, 1) and the strength it was added with, kept only for
    # ``adapted`` (None otherwise)
    offset_noise: torch.Tensor | None = None
    offset: float = 0.0

    def rows(self, rows: slice) -> Draws:
        noise = self.noise[rows]
        return Draws(noise, self.timesteps[rows], noise if self.input_noise is self.noise else self.input_noise[rows],
                     None if self.offset_noise is None else self.offset_noise[rows], self.offset)

    def adapted(self, latents: torch.Tensor, scale: float) -> Draws:
        """kohya's adaptive noise scale on these rows' ``latents``: each image and channel's offset strength is
        the drawn one plus ``scale`` × |the latent's mean over its pixels|, floored at 0 (a negative scale may take
        it below). Per row, so each process adapts its own slice of the global batch."""
        strength = (self.offset + scale * latents.float().mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
        extra = (strength - self.offset) * self.offset_noise
        noise = self.noise + extra
        input_noise = noise if self.input_noise is self.noise else self.input_noise + extra
        return Draws(noise, self.timesteps, input_noise, self.offset_noise, self.offset)


def diffusion_draws(seed: int, number: int, shape: tuple, num_timesteps: int, noise: Noise = Noise()) -> Draws:
    """The draws of global batch ``number`` (``shape``: the global batch's latent shape)."""
    g = torch.Generator().manual_seed(seed_for(seed, "noise", number))
    eps = torch.randn(shape, generator=g)
    timesteps = torch.randint(noise.min_timestep, noise.max_timestep or num_timesteps, (shape[0],), generator=g)
    offset_noise, strength = None, 0.0
    if noise.offset:
        strength = noise.offset * torch.rand((), generator=g).item() if noise.offset_random else noise.offset
        offset_noise = torch.randn((shape[0], shape[1], 1, 1), generator=g)
        eps = eps + strength * offset_noise
    if noise.multires_iterations:
        eps = pyramid_noise(eps, noise.multires_iterations, noise.multires_discount, g)
    perturbed = eps
    if noise.ip_gamma:
        gamma = noise.ip_gamma * torch.rand((), generator=g).item() if noise.ip_gamma_random else noise.ip_gamma
        perturbed = eps + gamma * torch.randn(shape, generator=g)
    if not noise.adaptive_scale:
        offset_noise = None
    return Draws(eps, timesteps, perturbed, offset_noise, strength)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, g: torch.Generator) -> torch.Tensor:
    """``noise`` plus ``iterations`` layers of Gaussian noise, layer i drawn at the size divided by r^i (r uniform
    in [2, 4) per layer, as kohya's) and upsampled bilinearly, weighted discount^i; the layers stop at a 1-pixel
    side. The sum is divided by its standard deviation over the whole global batch, as kohya's (one scale for the
    batch keeps a multi-process run equal to one process)."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=g).item()
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        layer = torch.randn((b, c, hn, wn), generator=g)
        out += F.interpolate(layer, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ_t / (1 − ᾱ_t) of each sample."""
    acp = alphas_cumprod[timesteps].float()
    return acp / (1 - acp)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ) / SNR for ε, / (SNR + 1) for v. A zero-terminal-
    SNR schedule's last timestep (SNR 0) weighs 1 for ε, the limit of min(SNR, γ) / SNR, not 0/0."""
    ratio = snr(timesteps, alphas_cumprod)
    clipped = ratio.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return torch.where(ratio > 0, clipped / ratio, torch.ones_like(ratio))


def debiased_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                     prediction_type: str = "epsilon") -> torch.Tensor:
    """Debiased estimation (kohya's ``--debiased_estimation_loss``): 1/√SNR for ε, 1/(SNR + 1) for v, with the SNR
    capped at 1000. A zero-terminal-SNR schedule's last timestep (SNR 0) is capped the other way, at weight 1000
    for ε (1/√SNR has no limit there)."""
    ratio = snr(timesteps, alphas_cumprod).clamp(max=DEBIASED_SNR_CAP)
    if prediction_type == "v_prediction":
        return 1 / (ratio + 1)
    return 1 / ratio.clamp(min=1 / DEBIASED_SNR_CAP ** 2).sqrt()


def v_like_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(SNR+1)/SNR, the weight that makes an ε-prediction error a v-prediction one (kohya's ``--v_pred_like_loss``
    adds v times the loss so weighted), with the SNR capped at 1000 as kohya's, and at 1/1000² from below, as the
    debiased weights are: a zero-terminal-SNR schedule's last timestep (SNR 0) weighs about 10⁶, where kohya's
    is infinite (SD's own last timestep, SNR 4·10⁻⁵, is above the floor)."""
    ratio = snr(timesteps, alphas_cumprod).clamp(min=1 / DEBIASED_SNR_CAP ** 2, max=DEBIASED_SNR_CAP)
    return (ratio + 1) / ratio


@dataclass(frozen=True)
class Loss:
    """How a prediction's error becomes the training loss (the validation loss stays the plain squared error, so
    curves of runs with different losses compare)."""

    kind: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    min_snr_gamma: float = 0.0
    debiased: bool = False
    v_pred_like: float = 0.0
    v_like_eps: bool = False  # kohya's scale_v_pred_loss_like_noise_pred (v-prediction models)

    @classmethod
    def of(cls, settings) -> Loss:
        return cls(settings.loss_type, settings.huber_c, settings.huber_schedule, settings.min_snr_gamma,
                   settings.debiased_estimation, settings.v_pred_like_loss, settings.scale_v_pred_loss_like_noise_pred)

    def check(self, prediction_type: str) -> None:
        """The options that need a model's prediction type (``TrainSettings.check`` checked the rest)."""
        if self.v_like_eps and prediction_type != "v_prediction":
            raise SdtuneError("--scale-v-pred-loss-like-noise-pred: weights a v-prediction model's loss as an "
                              "ε-prediction one; this model predicts ε already (leave the flag out)")

    def thresholds(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """The Huber threshold c of each sample: constant; exponential, from 1 at t=0 down to huber_c at the
        schedule's end; or snr, (1 − huber_c)/(1 + σ_t)² + huber_c with σ_t = √((1 − ᾱ_t)/ᾱ_t), near 1 at
        nearly clean timesteps and near huber_c at noisy ones (kohya's three schedules)."""
        t = timesteps.float()
        if self.huber_schedule == "exponential":
            return torch.exp(math.log(self.huber_c) * t / len(alphas_cumprod))
        if self.huber_schedule == "snr":
            acp = alphas_cumprod[timesteps].float()
            sigma = ((1 - acp) / acp).sqrt()
            return (1 - self.huber_c) / (1 + sigma) ** 2 + self.huber_c
        return torch.full_like(t, self.huber_c)

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """The loss of each element: the squared error, or the pseudo-Huber error."""
        if self.kind == "l2":
            return F.mse_loss(pred, target, reduction="none")
        c = self.thresholds(timesteps, alphas_cumprod).to(pred.device).view(-1, *[1] * (pred.dim() - 1))
        squared = (pred - target) ** 2
        # 2(√(d² + c²) − c) written as 2d² / (√(d² + c²) + c): the same value without the cancellation that loses
        # float32's digits where d is far below c
        huber = 2 * squared / ((squared + c ** 2).sqrt() + c)
        return huber * c if self.kind == "huber" else huber

    def weights(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                prediction_type: str) -> torch.Tensor | None:
        """Each sample's weight, or None for all 1."""
        parts = []
        if self.min_snr_gamma:
            parts.append(min_snr_weights(timesteps, alphas_cumprod, self.min_snr_gamma, prediction_type))
        if self.v_like_eps:
            ratio = snr(timesteps, alphas_cumprod).clamp(max=DEBIASED_SNR_CAP)
            parts.append(ratio / (ratio + 1))
        if self.v_pred_like:
            parts.append(1 + self.v_pred_like * v_like_weights(timesteps, alphas_cumprod))
        if self.debiased:
            parts.append(debiased_weights(timesteps, alphas_cumprod, prediction_type))
        if not parts:
            return None
        w = parts[0]
        for part in parts[1:]:
            w = w * part
        return w
