"""Training settings: one dataclass per kind of training, filled from a preset, a TOML file and flags.

Every field is a CLI option (``--lr`` sets ``lr``, ``--init-token`` sets ``init_token``) and a TOML key
(either spelling). ``load_settings(file, overrides, kind, family)`` starts from a preset (``--preset``, else
the base model family's own, see ``presets``), applies the file, then the flags the user actually gave: a
flag wins over the file, the file over the preset. ``to_toml`` writes settings back as a file that
``--config`` reads into the same settings (each run saves its own as ``settings.toml``).

    # lora.toml
    data = "images/"
    out = "out/style"
    rank = 8
    targets = "attn+ff"
    lr = 2e-4
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

from .. import families, modelspec
from ..console import note
from ..lora import algos
from ..model_names import known_family
from ..safeio import SdtuneError, input_path, is_safetensors, output_folder, read_metadata, read_toml
from ..samplers import MAX_SIDE
from ..ti.formats import TRAINING_METADATA, check_vectors
from . import kohya_config, kohya_dataset, logs, lr_classes, optimizers, presets, samples

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt")
# planned over the run's steps
SCHEDULES_OVER_RUN = ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr",
                      "warmup_stable_decay")
DECAYING = (*SCHEDULES_OVER_RUN, "inverse_sqrt")
TOKEN_LENGTHS = (75, 150, 225)  # a caption's tokens training reads: 1, 2 or 3 chunks of the encoders' window
LOSS_TYPES = ("l2", "huber", "smooth_l1")  # the error of a prediction (``diffusion.Loss``)
HUBER_SCHEDULES = ("constant", "exponential", "snr")  # how the Huber threshold follows the timestep
PRECISIONS = ("auto", "no", "fp16", "bf16")
LOGGERS = ("tensorboard", "wandb", "all")  # besides loss.csv (``logs.TrainLog``)
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
TARGETS = ("attn", "attn+ff", "all")
# the algorithms a run trains (each has a trainable layer)
LORA_ALGOS = ("lora", "loha", "lokr", "dora", "oft", "ia3", "full")
# those whose change kohya's max-norm can scale back (DoRA's layer computes with the whole weight, OFT's alpha bounds
# its rotation); every algorithm takes the rank and module dropouts
MAX_NORM_ALGOS = ("lora", "loha", "lokr", "ia3", "full")
UP_FACTOR_ALGOS = ("lora", "dora")  # those with an up factor, which LoRA+ gives its own rate
LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_te_lr_ratio")  # (kohya's three, its names)


def _not_used(keys: list[str]) -> str:
    """The note for a config's keys that sdtune reads and leaves: what it tells the user."""
    one = len(keys) == 1
    return f"{', '.join(keys)} change{'s' * one} nothing sdtune trains and {'is' if one else 'are'} not used"


def _help(text: str, **kw):
    """A field with its ``--help`` text (the CLI shows it; other fields show only their default)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainSettings:
    """What every training run needs (the shared loop and data)."""

    data: str = _help("folder of images (+ same-name .txt/.caption captions or a metadata.jsonl; N_name subfolders "
                      "repeat N times). Or a kohya dataset config (.toml): its subsets' folders and options",
                      default="")
    out: str = _help("output folder: results, checkpoints, resume state, samples, report.html", default="")
    model: str = _help("the base model: tiny, a diffusers folder, a checkpoint file or a hub id", default="tiny")
    preset: str = _help("recommended settings to start from (--list-presets shows them); default: the base "
                        "model's own", default="")
    steps: int = _help("optimizer steps", default=1000)
    epochs: int = _help("when > 0: steps = epochs x batches per epoch (overrides steps)", default=0)
    lr: float = 1e-4
    batch_size: int = _help("images per micro-batch, per process (x --grad-accum per optimizer step)", default=1)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    resolution: int = _help("training image size in pixels; 0: the model's native size", default=0)
    seed: int = 0
    lr_scheduler: str = _help("constant | constant_with_warmup | linear | cosine (decay to 0) | cosine_with_restarts "
                              "(--lr-scheduler-num-cycles cosines) | polynomial ((1 - progress)^--lr-scheduler-power) | "
                              "cosine_with_min_lr (decay to --lr-scheduler-min-lr-ratio) | warmup_stable_decay (constant, "
                              "then a cosine to the min ratio over the last --lr-decay-steps) | inverse_sqrt "
                              "(1/sqrt(step) past the warm-up; transformers' schedules, as kohya offers them); or a "
                              "scheduler class, of torch.optim.lr_scheduler (CosineAnnealingWarmRestarts) or as "
                              "module.Class (kohya's --lr_scheduler_type)", default="constant")
    lr_scheduler_args: list[str] = _help("a scheduler class's keyword arguments, each as key=value (kohya's "
                                         "--lr_scheduler_args): e.g. T_0=100 eta_min=1e-6", default_factory=list)
    lr_warmup_steps: int = 0
    lr_warmup_ratio: float = _help("the warm-up as a share of the run's steps instead (kohya's lr_warmup_steps below "
                                   "1): int(share x steps)", default=0.0)
    lr_scheduler_num_cycles: int = _help("cosine_with_restarts: the number of cosines, each from the full rate to 0 "
                                         "(kohya's)", default=1)
    lr_scheduler_power: float = _help("polynomial: the power of the decay to 0 (1: linear; kohya's)", default=1.0)
    lr_scheduler_min_lr_ratio: float = _help("cosine_with_min_lr and warmup_stable_decay: the share of the rate they "
                                             "decay to (kohya's)", default=0.0)
    lr_decay_steps: int = _help("warmup_stable_decay: the last steps, over which the rate decays (kohya's)", default=0)
    lr_decay_ratio: float = _help("warmup_stable_decay: the decay as a share of the run's steps instead (kohya's "
                                  "lr_decay_steps below 1)", default=0.0)
    min_snr_gamma: float = _help("Min-SNR-γ loss weights; 0: off; 5 is the usual value", default=0.0)
    noise_offset: float = _help("a random constant per image and channel added to the noise (brighter brights, "
                                "darker darks; 0.05 to 0.1 usual)", default=0.0)
    noise_offset_random_strength: bool = _help("each batch's noise offset drawn uniformly from 0 to --noise-offset "
                                               "(kohya's)", default=False)
    adaptive_noise_scale: float = _help("kohya's: each image and channel's noise offset grows by this times the "
                                        "absolute mean of its latent (needs --noise-offset; 0: off)", default=0.0)
    multires_noise_iterations: int = _help("kohya's pyramid noise: layers of lower-resolution noise added to the "
                                           "noise (6 to 10 usual; 0: off)", default=0)
    multires_noise_discount: float = _help("each pyramid layer's weight is this to the power of its level (0.3 to "
                                           "0.8)", default=0.3)
    ip_noise_gamma: float = _help("input perturbation: the noisy image is made with noise + γ·N(0, I), the target "
                                  "stays the noise (0.1 usual; diffusers' --input_perturbation)", default=0.0)
    ip_noise_gamma_random_strength: bool = _help("each batch's input perturbation drawn uniformly from 0 to "
                                                 "--ip-noise-gamma (kohya's)", default=False)
    min_timestep: int = _help("train on timesteps from this one", default=0)
    max_timestep: int = _help("train on timesteps below this one; 0: the schedule's end (1000)", default=0)
    loss_type: str = _help("l2 | huber | smooth_l1 (pseudo-Huber: squared for small errors, linear for large "
                           "ones)", default="l2")
    huber_c: float = _help("the Huber threshold (at noisy timesteps, by --huber-schedule)", default=0.1)
    huber_schedule: str = _help("constant | exponential (from 1 at t=0 to --huber-c) | snr (1 at clean timesteps, "
                                "--huber-c at noisy ones)", default="snr")
    debiased_estimation: bool = _help("weight each sample's loss by 1/sqrt(SNR) (kohya's --debiased_estimation_loss)",
                                      default=False)
    zero_terminal_snr: bool = _help("train on the noise schedule rescaled to zero terminal SNR (Lin et al. 2023; "
                                    "kohya's): the last timestep is pure noise, as for NoobAI-style v-prediction "
                                    "models; a model that says it is so already needs no flag", default=False)
    v_pred_like_loss: float = _help("kohya's: add this times the loss weighted as a v-prediction loss, (SNR+1)/SNR "
                                    "(0: off; 0.1 usual)", default=0.0)
    scale_v_pred_loss_like_noise_pred: bool = _help("v-prediction models: weight each sample's loss by SNR/(SNR+1), "
                                                    "which makes it an ε-prediction loss (kohya's)", default=False)
    clip_skip: int = _help("the text-encoder layer the UNet reads, counted from the end as A1111's clip skip "
                           "(2 for anime SD 1.x models; SDXL reads its 2nd anyway); generate with the same",
                           default=1)
    vae: str = _help("a VAE file or folder to encode the images and draw the samples with instead of the model's "
                     "own (as generate --vae and kohya's --vae)", default="")
    max_grad_norm: float = _help("0: no clipping", default=1.0)
    weight_decay: float = 1e-2
    optimizer: str = _help("; ".join(f"{name}: {o.what}" for name, o in optimizers.OPTIMIZERS.items())
                           + "; or any torch optimizer class as module.Class (torch.optim.RAdam)",
                           default="adamw")
    optimizer_args: list[str] = _help("the optimizer's other keyword arguments, each as key=value (as kohya's "
                                      "--optimizer_args): e.g. betas=(0.9,0.99) d_coef=2", default_factory=list)
    gradient_checkpointing: bool = False
    fp8_base: bool = _help("the UNet's and text encoders' frozen layers in 8-bit floats while training, each cast "
                           "back as it computes (kohya's --fp8_base): half the GPU memory of fp16 weights (SDXL's "
                           "UNet: 2.6 GB), a LoRA or embedding trained around the base rounded to 8 bits",
                           default=False)
    fp8_base_unet: bool = _help("as --fp8-base for the UNet alone, the text encoders kept as they are (kohya's "
                                "--fp8_base_unet)", default=False)
    full_bf16: bool = _help("the trained weights, their gradients and the optimizer's state in bf16 too (kohya's "
                            "--full_bf16): half their memory, needs --mixed-precision bf16; an update below bf16's "
                            "precision of a weight (1/256 of it) rounds away, so mind a small --lr", default=False)
    channels_last: bool = _help("UNet convolutions in channels-last (NHWC) memory layout: the fast layout for "
                                "cuDNN in fp16/bf16; same math, other kernels (float rounding differs)",
                                default=False)
    flush_denormals: bool = _help("on the CPU, flush subnormal floats (below 1.2e-38) to zero while training: "
                                  "Adam's second moments of small LoRA gradients decay into them, and x86 CPUs "
                                  "compute with them many times slower", default=False)
    share_text: bool = _help("with frozen, cached text: a batch's repeated captions go through the UNet's "
                             "cross-attention text projections once (the same values; off: once per sample, "
                             "as diffusers' scripts do)", default=True)
    mixed_precision: str = _help("auto (fp16/bf16 when the model is loaded so on a GPU) | no | fp16 | bf16",
                                 default="auto")
    crop: str = _help("center | random (random crops are VAE-encoded every step)", default="center")
    cache_latents_to_disk: bool = _help("keep each image's encoding in DATA/.sdtune-latents (kohya's), found again by "
                                        "the image's bytes, its bucket and the VAE: a rerun, resume or queue on the "
                                        "same images skips the VAE", default=False)
    flip: bool = False
    color_aug: bool = _help("kohya's color augmentation: each image's hue turned by up to 8/180 of the circle either "
                            "way, drawn each step (so the images are VAE-encoded every step, as random crops are)",
                            default=False)
    buckets: bool = _help("aspect-ratio buckets for images of mixed sizes", default=False)
    bucket_step: int = _help("bucket sizes step in pixels; 0: the model's (64 for SD 1.x)", default=0)
    bucket_no_upscale: bool = _help("kohya's: an image of less than the training area is not upscaled; its bucket "
                                    "is its own size rounded down to the bucket step", default=False)
    min_bucket_reso: int = _help("smallest bucket side in pixels (kohya's); 0: half the training size", default=0)
    max_bucket_reso: int = _help("largest bucket side in pixels (kohya's); 0: twice the training size", default=0)
    shuffle_captions: bool = _help("shuffle comma-separated tags", default=False)
    keep_tokens: int = _help("tags kept in front when shuffling", default=0)
    caption_dropout: float = _help("probability of training a sample with an empty caption", default=0.0)
    token_warmup_steps: int = _help("kohya's token warm-up: over these first steps a caption's tags (those after "
                                    "--keep-tokens) grow from --token-warmup-min to all of them, the first ones "
                                    "first; 0: off", default=0)
    token_warmup_ratio: float = _help("the token warm-up as a share of the run's steps instead (kohya's "
                                      "token_warmup_step below 1)", default=0.0)
    token_warmup_min: int = _help("the tags a caption starts the token warm-up with (kohya's)", default=1)
    caption_dropout_every_epochs: int = _help("every Nth epoch trains with every caption empty (kohya's "
                                              "--caption_dropout_every_n_epochs; 0: never)", default=0)
    keep_tokens_separator: str = _help("in a caption holding it (kohya's, e.g. '|||'), the tags before it stay in "
                                       "front and those after a second one at the end; only the tags between are "
                                       "shuffled or dropped (--keep-tokens is not used for it); never trained on "
                                       "itself", default="")
    secondary_separator: str = _help("tags joined by it (kohya's, e.g. ';;;') are shuffled and dropped as one, "
                                     "trained joined by commas", default="")
    wildcards: bool = _help("kohya's enable_wildcard: a caption file's lines are alternatives, one drawn each time "
                            "the image is trained, and each {a|b|c} in a caption takes one of its options",
                            default=False)
    caption_prefix: str = _help("text put before every caption (kohya's; never shuffled or dropped)", default="")
    caption_suffix: str = _help("text put after every caption (kohya's; never shuffled or dropped)", default="")
    max_token_length: int = _help("caption tokens training reads: 75 (the text encoder's window), 150 or 225 (kohya's "
                                  "--max_token_length: chunks of 75 encoded apart and put one after the other, as "
                                  "A1111 reads a long prompt)", default=75)
    weighted_captions: bool = _help("kohya's: A1111's emphasis in captions, (word:1.2) and [word], weighs those "
                                    "tokens' text features as generation weighs a prompt's (no commas inside the "
                                    "brackets with shuffling or tag dropout)", default=False)
    caption_tag_dropout: float = _help("probability of leaving out each comma-separated tag of a caption (those "
                                       "--keep-tokens keeps in front stay)", default=0.0)
    default_caption: str | None = _help("caption of images without a caption file", default=None)
    save_every: int = _help("snapshot + resume state every N steps (0: only at the end)", default=0)
    save_every_epochs: int = _help("snapshot + resume state at the end of every N epochs too (kohya's "
                                   "--save_every_n_epochs; 0: none)", default=0)
    keep_last: int = _help("keep only the newest N snapshots (and the one with the best validation loss): an older "
                           "one's files are deleted once a newer one is written, its samples stay; the final files "
                           "always stay (diffusers' --checkpoints_total_limit; 0: keep every snapshot)", default=0)
    sample_every: int = _help("sample grid at step 0, every N steps and at the end (0: never)", default=0)
    sample_every_epochs: int = _help("sample grid at step 0, at the end of every N epochs and at the end too "
                                     "(kohya's --sample_every_n_epochs; 0: none)", default=0)
    sample_prompts: list[str] = _help("prompts of the sample grids and the report (default: the first captions), "
                                      "each with kohya's options if any (a castle --n blurry --w 768 --h 512 --d 1 "
                                      "--l 6 --s 30 --ss euler_a), or kohya's prompt file: .txt (one per line), "
                                      ".toml or .json",
                                      default_factory=list)
    sample_sampler: str = _help("the sampler of the sample grids and the report (kohya's --sample_sampler; "
                                "sdtune's, A1111's or kohya's name)", default="ddim")
    sample_images: int = _help("images per prompt in a grid", default=4)
    sample_steps: int = 20
    sample_guidance: float = 7.5
    validation_dir: str = _help("held-out images (captioned like --data) for the validation loss", default="")
    validation_split: float = _help("fraction of the --data images held out for the validation loss (0: none; "
                                    "the loss is then measured on up to 8 training images)", default=0.0)
    validation_every: int = _help("validation loss every N steps, besides step 0, each save and the end (0: only "
                                  "those)", default=0)
    masked_loss: bool = _help("weight the loss by a mask per image: its alpha channel, or NAME.mask.png beside "
                              "NAME.png (white: learn, black: ignore; resized to the latent grid). Off: masks are "
                              "not used and transparency is composited on white", default=False)
    report: bool = _help("write report.html at the end: loss curves, samples, a checkpoint grid, the best "
                         "checkpoint (copied to best.safetensors)", default=True)
    log_with: str = _help("where the losses, learning rates and sample grids are logged besides loss.csv: "
                          "tensorboard (OUT/tensorboard), wandb (Weights & Biases: pip install wandb; wandb login or "
                          "WANDB_API_KEY, or WANDB_MODE=offline to keep it in OUT/wandb) or all (kohya's --log_with, "
                          "diffusers' --report_to)", default="tensorboard")
    log_tracker_name: str = _help("wandb: the project the run is logged in (kohya's; default sdtune)", default="")
    wandb_run_name: str = _help("wandb: the run's name (kohya's; default: the --out folder's name)", default="")
    resume: bool = _help("continue from the resume state in --out if there is one", default=True)
    progress: bool = _help("progress bar", default=True)
    # what the trained files say of themselves in ModelSpec's keys (kohya's --metadata_* flags, under its names)
    metadata_title: str = _help("the files' title (modelspec.title; default: --name, or the token)", default="")
    metadata_author: str = _help("the files' author (modelspec.author)", default="")
    metadata_description: str = _help("what the files are and how to use them (modelspec.description)", default="")
    metadata_license: str = _help("the files' license (modelspec.license)", default="")
    metadata_tags: str = _help("comma-separated tags (modelspec.tags)", default="")

    kind = "train"

    def __post_init__(self):
        # kohya's spellings (AdamW8bit, Prodigy) are the same names; a module.Class keeps its own
        if isinstance(self.optimizer, str) and "." not in self.optimizer:
            self.optimizer = self.optimizer.lower()

    def check(self) -> None:
        """Refuse settings that cannot work, with the option to fix."""
        if not self.data:
            raise SdtuneError("no training data; pass --data DIR (a folder of images with .txt captions)")
        if not self.out:
            raise SdtuneError("no output folder; pass --out DIR")
        output_folder(self.out, create=False)
        out = Path(self.out).expanduser().resolve()
        data = [(f"--data {self.data}'s image_dir", s.image_dir) for s in kohya_dataset.read(self.data).subsets] \
            if kohya_dataset.is_dataset_file(self.data) else [("--data", self.data)]
        for option, given in (*data, ("--validation-dir", self.validation_dir)):
            folder = Path(given).expanduser().resolve() if given else None
            # the run's sample PNGs would become training images, and starting over would move the images aside
            if folder is not None and out.is_relative_to(folder):
                raise SdtuneError(f"--out {self.out} is {'' if out == folder else 'inside '}{option} {given}: the "
                                  f"run's sample images would be read as training images; give an --out outside it")
        if self.vae:
            input_path(self.vae, "VAE file or folder", "--vae")
        positive = dict(lr=self.lr, batch_size=self.batch_size, grad_accum=self.grad_accum,
                        lr_scheduler_num_cycles=self.lr_scheduler_num_cycles, lr_scheduler_power=self.lr_scheduler_power,
                        sample_images=self.sample_images, sample_steps=self.sample_steps, clip_skip=self.clip_skip)
        for name, value in positive.items():
            if not value > 0:
                raise SdtuneError(f"--{_flag(name)} {value}: must be greater than 0")
        non_negative = dict(steps=self.steps, epochs=self.epochs, resolution=self.resolution,
                            lr_warmup_steps=self.lr_warmup_steps, min_snr_gamma=self.min_snr_gamma,
                            noise_offset=self.noise_offset, max_grad_norm=self.max_grad_norm,
                            multires_noise_iterations=self.multires_noise_iterations,
                            ip_noise_gamma=self.ip_noise_gamma, min_timestep=self.min_timestep,
                            v_pred_like_loss=self.v_pred_like_loss,
                            max_timestep=self.max_timestep,
                            weight_decay=self.weight_decay, bucket_step=self.bucket_step,
                            min_bucket_reso=self.min_bucket_reso, max_bucket_reso=self.max_bucket_reso,
                            keep_tokens=self.keep_tokens, save_every=self.save_every, save_every_epochs=self.save_every_epochs,
                            keep_last=self.keep_last,
                            sample_every=self.sample_every, sample_every_epochs=self.sample_every_epochs,
                            caption_dropout_every_epochs=self.caption_dropout_every_epochs,
                            validation_every=self.validation_every)
        for name, value in non_negative.items():
            if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
                raise SdtuneError(f"--{_flag(name)} {value}: must be 0 or more")
        if not self.steps and not self.epochs:
            raise SdtuneError("--steps 0 and --epochs 0: give one of them")
        if not 0 <= self.seed < 2**63 - 64:  # the samples' seeds (seed + image) stay torch's and A1111's
            raise SdtuneError(f"--seed {self.seed}: must be from 0 to {2**63 - 65}")
        if self.resolution > MAX_SIDE:
            raise SdtuneError(f"--resolution {self.resolution}: at most {MAX_SIDE} pixels (SD 1.x trains at 512, "
                              f"SDXL at 1024)")
        for name in ("caption_dropout", "caption_tag_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise SdtuneError(f"--{_flag(name)} {getattr(self, name)}: must be in [0, 1)")
        if not 0 <= self.validation_split < 1:
            raise SdtuneError(f"--validation-split {self.validation_split}: must be in [0, 1), e.g. 0.1")
        if self.validation_split and self.validation_dir:
            raise SdtuneError("--validation-split and --validation-dir both given; hold out images one way")
        samples.check(self.sample_prompts)
        samples.sampler(self.sample_sampler)
        if lr_classes.is_class_name(self.lr_scheduler):
            lr_classes.check(self.lr_scheduler, self.lr_scheduler_args)
        else:
            _choice("lr_scheduler", self.lr_scheduler, [*SCHEDULES, "a scheduler class (module.Class)"])
            if self.lr_scheduler_args:
                raise SdtuneError(f"--lr-scheduler-args {' '.join(self.lr_scheduler_args)}: the arguments of a "
                                  f"scheduler class (--lr-scheduler module.Class); --lr-scheduler {self.lr_scheduler} "
                                  f"takes sdtune's own flags (--lr-scheduler-num-cycles, ...)")
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("max_token_length", self.max_token_length, TOKEN_LENGTHS)
        _choice("huber_schedule", self.huber_schedule, HUBER_SCHEDULES)
        if not 0 < self.multires_noise_discount <= 1:
            raise SdtuneError(f"--multires-noise-discount {self.multires_noise_discount}: must be in (0, 1], e.g. 0.3")
        if not 0 < self.huber_c <= 1:
            raise SdtuneError(f"--huber-c {self.huber_c}: must be in (0, 1], e.g. 0.1")
        if self.keep_tokens_separator and self.keep_tokens_separator == self.secondary_separator:
            raise SdtuneError(f"--keep-tokens-separator and --secondary-separator are both "
                              f"{self.keep_tokens_separator!r}; give them different strings")
        if self.cache_latents_to_disk and (self.crop == "random" or self.color_aug):
            given = "--crop random" if self.crop == "random" else "--color-aug"
            raise SdtuneError(f"--cache-latents-to-disk with {given}: its images are encoded every step, so there is "
                              f"nothing to cache; use one of them")
        for flag, of in (("noise_offset_random_strength", "noise_offset"),
                         ("ip_noise_gamma_random_strength", "ip_noise_gamma")):
            if getattr(self, flag) and not getattr(self, of):
                raise SdtuneError(f"--{_flag(flag)}: draws each batch's strength from 0 to --{_flag(of)}, which is "
                                  f"0; give --{_flag(of)} (e.g. 0.1)")
        if self.adaptive_noise_scale and not self.noise_offset:
            raise SdtuneError(f"--adaptive-noise-scale {self.adaptive_noise_scale}: adds to the noise offset, which "
                              f"is 0; give --noise-offset (e.g. 0.1)")
        if self.adaptive_noise_scale and self.multires_noise_iterations:
            raise SdtuneError("--adaptive-noise-scale with --multires-noise-iterations: the pyramid noise is scaled "
                              "over the whole batch before each image's latent is known; use one of them (kohya "
                              "uses the offset or the pyramid, not both)")
        if self.max_timestep and self.min_timestep >= self.max_timestep:
            raise SdtuneError(f"--min-timestep {self.min_timestep} --max-timestep {self.max_timestep}: the range is "
                              f"empty; give a min below the max")
        if not optimizers.known(self.optimizer):
            _choice("optimizer", self.optimizer, [*optimizers.OPTIMIZERS, "module.Class"])
        if optimizers.schedule_free(self.optimizer) and self.lr_scheduler in DECAYING:
            raise SdtuneError(f"--optimizer {self.optimizer} --lr-scheduler {self.lr_scheduler}: a schedule-free "
                              f"optimizer averages its steps instead of decaying the rate; use --lr-scheduler "
                              f"constant (or constant_with_warmup)")
        optimizers.check(self.optimizer, self.optimizer_args)
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("crop", self.crop, ("center", "random"))
        _choice("log_with", self.log_with, LOGGERS)
        if not 0 <= self.lr_warmup_ratio < 1:
            raise SdtuneError(f"--lr-warmup-ratio {self.lr_warmup_ratio}: a share of the run's steps, from 0 up to 1")
        if self.lr_warmup_ratio and self.lr_warmup_steps:
            raise SdtuneError(f"--lr-warmup-steps {self.lr_warmup_steps} and --lr-warmup-ratio "
                              f"{self.lr_warmup_ratio}: give one of them")
        if self.token_warmup_steps < 0 or self.token_warmup_min < 0:
            raise SdtuneError(f"--token-warmup-steps {self.token_warmup_steps} --token-warmup-min "
                              f"{self.token_warmup_min}: must be 0 or more")
        if self.token_warmup_ratio and self.token_warmup_steps:
            raise SdtuneError(f"--token-warmup-steps {self.token_warmup_steps} and --token-warmup-ratio "
                              f"{self.token_warmup_ratio}: give one of them")
        for name in ("lr_scheduler_min_lr_ratio", "lr_decay_ratio", "token_warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise SdtuneError(f"--{_flag(name)} {getattr(self, name)}: a share, from 0 up to 1")
        if self.lr_decay_steps < 0:
            raise SdtuneError(f"--lr-decay-steps {self.lr_decay_steps}: must be 0 or more")
        if self.lr_decay_ratio and self.lr_decay_steps:
            raise SdtuneError(f"--lr-decay-steps {self.lr_decay_steps} and --lr-decay-ratio {self.lr_decay_ratio}: "
                              f"give one of them")
        if self.lr_scheduler == "warmup_stable_decay" and not (self.lr_decay_steps or self.lr_decay_ratio):
            raise SdtuneError("--lr-scheduler warmup_stable_decay: decays over the run's last steps; give "
                              "--lr-decay-steps N (or --lr-decay-ratio, e.g. 0.2)")
        if self.log_with in ("wandb", "all"):
            logs.wandb_module()  # not installed: said before the run starts

    def warmup_steps(self, total: int) -> int:
        """The learning rate's warm-up steps in a run of ``total`` steps."""
        return self.lr_warmup_steps or int(self.lr_warmup_ratio * total)

    def token_warmup(self, total: int) -> int:
        """The token warm-up's steps in a run of ``total`` steps (0: none)."""
        return self.token_warmup_steps or int(self.token_warmup_ratio * total)

    def decay_steps(self, total: int) -> int:
        """warmup_stable_decay's decay steps in a run of ``total`` steps."""
        return self.lr_decay_steps or int(self.lr_decay_ratio * total)

    def wandb_run(self) -> dict:
        """``wandb.init``'s project, name and config for this run."""
        return {"project": self.log_tracker_name or "sdtune", "name": self.wandb_run_name or Path(self.out).name,
                "config": self.to_dict()}

    def user_metadata(self) -> dict[str, str]:
        """What the user said of the files (the metadata_* settings), by ModelSpec field."""
        return {name: getattr(self, f"metadata_{name}") for name in modelspec.USER_FIELDS}

    def timestep_range(self, num_timesteps: int) -> tuple[int, int] | None:
        """The timesteps trained on, (first, end), when not the whole schedule."""
        if not (self.min_timestep or self.max_timestep):
            return None
        return self.min_timestep, self.max_timestep or num_timesteps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TISettings(TrainSettings):
    """Textual Inversion: a new token whose vector(s) learn the concept; nothing else changes."""

    token: str = _help("the new word, e.g. '<my-cat>' (required)", default="")
    init_token: str = _help("a word (or a few) close to the concept, e.g. cat or 'red hexagon': the vectors start "
                            "from its CLIP tokens", default="")
    init_embedding: str = _help("an embedding file the new word starts from instead of --init-token's words "
                                "(kohya's --weights; A1111 trains on an embedding it made): its vectors in each text "
                                "encoder, --num-vectors of them", default="")
    num_vectors: int = _help("vectors of the new word. With an init text of T tokens: 1 starts from their mean; "
                             "N <= T splits them into N consecutive groups and starts each vector from its group's "
                             "mean (N = T: one token each); N > T spreads them, each token over N/T neighbouring "
                             "vectors (A1111's rule)", default=1)
    property: str = _help("object | style: which prompt templates (when images have no captions)", default="object")
    formats: list[str] = _help("diffusers and/or a1111", default_factory=lambda: ["diffusers"])
    steps: int = 1000
    lr: float = 5e-3
    batch_size: int = 4

    kind = "ti"

    def check(self) -> None:
        super().check()
        if not self.token:
            raise SdtuneError("no token; give --token '<name>' (the new word your prompts will use)")
        if len(self.token.split()) != 1:
            raise SdtuneError(f"--token {self.token!r}: must be one word without spaces, e.g. '<my-concept>'")
        if self.init_embedding:
            input_path(self.init_embedding, "embedding file", "--init-embedding")
        elif not self.init_token.strip():
            raise SdtuneError("no init token; pass --init-token WORD (an existing word close to the concept), or "
                              "--init-embedding FILE (an embedding to start from)")
        elif Path(self.init_token).suffix.lower() in (".safetensors", ".pt", ".bin", ".pti"):
            raise SdtuneError(f"--init-token {self.init_token}: a file's name; to start from an embedding give it as "
                              f"--init-embedding, else give words close to the concept (e.g. 'red square')")
        check_vectors("--num-vectors", self.num_vectors)
        _choice("property", self.property, ("object", "style"))
        for f in self.formats:
            _choice("formats", f, ("diffusers", "a1111"))


@dataclass
class LoraSettings(TrainSettings):
    """LoRA: low-rank updates of the UNet's (and optionally the text encoder's) layers."""

    rank: int = 16
    alpha: float = 8.0
    rs_lora: bool = _help("rank-stabilised scale alpha/sqrt(rank) instead of alpha/rank (rsLoRA, PEFT's use_rslora, "
                          "LyCORIS's rs_lora): high ranks learn as fast as low ones; the files keep the usual "
                          "alpha/rank form, each layer's alpha x sqrt(rank), so every loader reads them", default=False)
    algo: str = _help("lora (LoCon on convolutions; kohya's and diffusers' layouts) | loha | lokr (LyCORIS's) | "
                      "dora (LoRA with a learned magnitude per input column, kohya's DoRA) | oft (LyCORIS's "
                      "diag-oft: each layer's output turned by an orthogonal R in blocks, sized as LyCORIS "
                      "factorises the width at --rank; --alpha is its constraint, 0 none) | ia3 (LyCORIS's: a "
                      "learned scale per output row; no rank or alpha) | full (LyCORIS's: each layer's whole "
                      "change, weight and bias, as fine-tuning learns it, kept as a file; no rank or alpha): A1111 "
                      "and sdtune load all seven, ComfyUI all but ia3, diffusers lora only", default="lora")
    lokr_factor: int = _help("LoKr: the largest small factor of each width (LyCORIS's factor; -1: as square as "
                             "the width allows)", default=-1)
    lokr_full_matrix: bool = _help("LoKr: both Kronecker factors whole at any --rank (LyCORIS's full_matrix; no "
                                   "rank, scale 1)", default=False)
    lokr_decompose_both: bool = _help("LoKr: the small factor split at --rank too, where --rank is below half its "
                                      "larger side (LyCORIS's decompose_both)", default=False)
    lokr_unbalanced: bool = _help("LoKr: the output width's larger factor in the small-factor slot (LyCORIS's "
                                  "unbalanced_factorization)", default=False)
    ia3_on_input: bool = _help("IA3: a learned scale per input channel instead of per output row (LyCORIS's "
                               "train_on_input)", default=False)
    dora_wd_on_output: bool = _help("DoRA: the magnitude per output row (LyCORIS's wd_on_output; PEFT's and "
                                    "diffusers' DoRA, so --formats diffusers can hold it; A1111 reads only the "
                                    "default, per input column)", default=False)
    oft_rescaled: bool = _help("OFT: a learned factor per output row beside the rotation (LyCORIS's rescaled)",
                               default=False)
    oft_butterfly: bool = _help("OFT as LyCORIS's BOFT: the rotation a butterfly of log2(k) + 1 stages of k even "
                                "blocks, each block at most --rank wide (LyCORIS's algo=boft)", default=False)
    oft_blocks: int = _help("OFT: each layer's rotation in this many blocks of out/N rows, whatever the width "
                            "(kohya's networks.oft, whose network_dim counts blocks); 0: blocks sized from --rank, "
                            "as LyCORIS's diag-oft", default=0)
    tucker: bool = _help("lora, loha, lokr, dora: each 3x3 convolution's change through a Tucker core (LyCORIS's "
                         "use_tucker: a 1x1 down, a rank x rank core with the kernel, a 1x1 up), fewer numbers than "
                         "a factor spanning the kernel", default=False)
    scalar: bool = _help("lora, loha, lokr, dora: a learned factor on each layer's change, from 0, so that every factor "
                         "starts random (LyCORIS's use_scalar; saved folded into the factors)", default=False)
    train_norm: bool = _help("also learn a change to the UNet's norm layers' scale and bias, whole (LyCORIS's "
                             "train_norm: its w_norm/b_norm; the transformers' norms with attn+ff, the resnets' too "
                             "with all; any --algo)", default=False)
    network_weights: str = _help("a LoRA file to start from (kohya's --network_weights): each of its layers keeps "
                                 "its rank and alpha, the run's other layers start fresh", default="")
    targets: str = _help("attn | attn+ff (+ proj_in/out, kohya's default) | all (+ resnets and samplers)",
                         default="attn")
    block_lr: str = _help("a factor on the learning rate per block, in the lora-block-weight syntax (a vector "
                          "BASE,IN00,...,M00,...,OUT.. or a preset name, as lbw= takes; BASE: the text encoders); "
                          "a block at 0 is not trained, its layers left out of the file (kohya's "
                          "down/mid/up_lr_weight)", default="")
    block_ranks: str = _help("the rank per block of the linear and 1x1 layers, in the same syntax as --block-lr "
                             "(kohya's block_dims); a block at 0 is not trained; the 3x3 convolutions and layers "
                             "in no block keep --conv-rank and --rank", default="")
    block_alphas: str = _help("the alpha per block, as --block-ranks (kohya's block_alphas)", default="")
    exclude: list[str] = _help("layers left out of --targets: regular expressions searched in each layer's "
                               "COMPONENT.PATH (e.g. 'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k'"
                               "; 'attn2\\.to_[kv]$' leaves out the cross-attention's key and value)",
                               default_factory=list)
    text_encoder: bool = _help("also train LoRA on the text encoder(s) (SDXL: both)", default=False)
    unet: bool = _help("train LoRA on the UNet; --no-unet --text-encoder trains the text encoder(s) only (kohya's "
                       "--network_train_text_encoder_only)", default=True)
    te_lr: float | None = _help("text-encoder learning rate (None: lr)", default=None)
    te2_lr: float | None = _help("SDXL's second text encoder's learning rate (None: te_lr)", default=None)
    te_steps: int = _help("train the text encoder(s) only for the first N steps, then the UNet alone (diffusers' "
                          "--train_text_encoder_frac x steps, kohya's stop_text_encoder_training; 0: all steps)",
                          default=0)
    conv_rank: int = _help("rank of LoRA on 3x3 convs (0: none, unless targets=all, which uses rank)", default=0)
    conv_alpha: float | None = _help("None: conv_rank (with targets=all and no conv_rank: alpha)", default=None)
    lora_dropout: float = _help("dropout on each LoRA layer's input (PEFT's lora_dropout)", default=0.0)
    rank_dropout: float = _help("kohya's rank_dropout: each of a layer's r branch channels dropped per sample with "
                                "this probability, the branch scaled by 1/(1 - p); LoHa/LoKr: each output row of "
                                "the weight change, per step, as LyCORIS (not with --algo dora)", default=0.0)
    module_dropout: float = _help("kohya's module_dropout: a layer's whole change skipped in a step's forward with "
                                  "this probability (not with --algo dora)", default=0.0)
    loraplus_lr_ratio: float = _help("LoRA+ (kohya's loraplus_lr_ratio): each layer's up factor learns at this times "
                                     "the rate of its down factor (16 usual; 0: off; --algo lora or dora)",
                                     default=0.0)
    loraplus_unet_lr_ratio: float = _help("LoRA+ on the UNet's layers only (kohya's loraplus_unet_lr_ratio; 0: "
                                          "--loraplus-lr-ratio)", default=0.0)
    loraplus_te_lr_ratio: float = _help("LoRA+ on the text encoders' layers only (kohya's "
                                        "loraplus_text_encoder_lr_ratio; 0: --loraplus-lr-ratio)", default=0.0)
    scale_weight_norms: float = _help("kohya's max-norm regularisation: after each step, a layer whose weight change "
                                      "has a Frobenius norm above this is scaled back to it (1.0 usual; 0: off; "
                                      "not with --algo dora)", default=0.0)
    name: str = _help("output file name (without .safetensors)", default="lora")
    formats: list[str] = _help("kohya and/or diffusers", default_factory=lambda: ["kohya"])
    save_precision: str = _help("fp32 | fp16 | bf16: the saved files' weights (kohya's --save_precision; fp16 halves "
                                "the file, as most shared LoRAs are); training and its resume state stay fp32",
                                default="fp32")
    steps: int = 1000
    lr: float = 1e-4
    ti_token: str = _help("pivotal tuning: also train this new word (e.g. '<my-dog>') with the LoRA; put it in "
                          "the captions. Saved inside the LoRA file (A1111's bundle_emb layout) and beside it",
                          default="")
    ti_init: str = _help("pivotal tuning: a word (or a few) close to the concept; the new word's vectors start "
                         "from its tokens, as --init-token does for TI", default="")
    ti_vectors: int = _help("pivotal tuning: vectors of the new word (as TI's --num-vectors)", default=1)
    ti_lr: float = _help("pivotal tuning: learning rate of the new word's vectors (TI's usual 5e-3)", default=5e-3)
    ti_steps: int = _help("pivotal tuning: train the word only for the first N steps, then only the LoRA "
                          "(0: all steps)", default=0)
    reg_dir: str = _help("prior preservation: class images (captioned like --data); with --class-prompt, the "
                         "folder the generated ones are cached in", default="")
    class_prompt: str = _help("prior preservation: generate --num-class-images images of this prompt with the "
                              "base model once (cached in --reg-dir, else OUT/class_images) and train on them "
                              "beside your images", default="")
    num_class_images: int = _help("prior preservation: how many class images --class-prompt makes", default=100)
    prior_loss_weight: float = _help("prior preservation: loss = instance loss + this x class-image loss",
                                     default=1.0)

    kind = "lora"

    @property
    def pivotal(self) -> bool:
        return bool(self.ti_token)

    @property
    def prior(self) -> bool:
        return bool(self.reg_dir or self.class_prompt)

    def check(self) -> None:
        super().check()
        _choice("algo", self.algo, LORA_ALGOS)
        algo = algos.get(self.algo)
        if self.rank < 1:
            raise SdtuneError(f"--rank {self.rank}: must be at least 1")
        if algo.alpha_is_constraint and not self.alpha >= 0:
            raise SdtuneError(f"--alpha {self.alpha}: must be 0 or more (--algo {self.algo}: its constraint, 0 none)")
        if not algo.alpha_is_constraint and not self.alpha > 0:
            raise SdtuneError(f"--alpha {self.alpha}: must be greater than 0")
        if self.conv_rank < 0:
            raise SdtuneError(f"--conv-rank {self.conv_rank}: must be 0 or more")
        if not self.unet and not self.text_encoder:
            raise SdtuneError("--no-unet: leaves the LoRA nothing to train; add --text-encoder to train the text "
                              "encoder(s) only" + (", or use sdtune train ti for the word alone" if self.pivotal
                                                   else ""))
        for name in ("te_lr", "te2_lr"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise SdtuneError(f"--{_flag(name)} {value}: must be 0 or more")
        if self.te_steps < 0:
            raise SdtuneError(f"--te-steps {self.te_steps}: must be 0 (all steps) or more")
        for name in ("lora_dropout", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise SdtuneError(f"--{_flag(name)} {getattr(self, name)}: must be in [0, 1)")
        for name in LORAPLUS:
            ratio = getattr(self, name)
            if not ratio >= 0:
                raise SdtuneError(f"--{_flag(name)} {ratio}: must be 0 (off) or more, e.g. 16")
            if ratio and self.algo not in UP_FACTOR_ALGOS:
                raise SdtuneError(f"--algo {self.algo} --{_flag(name)}: LoRA+ speeds up a LoRA's up factor; "
                                  f"{self.algo} has none (use --algo {' or '.join(UP_FACTOR_ALGOS)})")
        if not self.scale_weight_norms >= 0:
            raise SdtuneError(f"--scale-weight-norms {self.scale_weight_norms}: must be 0 (off) or more, e.g. 1.0")
        if algo.alpha_is_constraint and self.scale_weight_norms:
            raise SdtuneError(f"--algo {self.algo} --scale-weight-norms: {algo.label}'s change is no product of "
                              f"factors that max-norm could scale back (its --alpha bounds it instead); use "
                              f"--scale-weight-norms 0")
        small = [f"--{_flag(n)} {getattr(self, n)}" for n in ("rank", "conv_rank")
                 if 0 < getattr(self, n) < algo.least_rank]
        if small:  # (OFT's only: its rank is a block size)
            raise SdtuneError(f"--algo {self.algo} {' '.join(small)}: {algo.label}'s blocks would be 1 x 1, which "
                              f"turn nothing; give {algo.least_rank} or more (the block size, as LyCORIS's lora_dim)")
        if not algo.uses_alpha and self.rs_lora:
            raise SdtuneError(f"--algo {self.algo} --rs-lora: {algo.label} has no alpha or rank for rsLoRA to "
                              f"change; leave --rs-lora off")
        if algo.alpha_is_constraint and self.rs_lora:
            raise SdtuneError(f"--algo {self.algo} --rs-lora: {algo.label}'s --alpha is its constraint, not a scale "
                              f"that rsLoRA could change; leave --rs-lora off")
        if self.scale_weight_norms and self.algo not in MAX_NORM_ALGOS:
            raise SdtuneError(f"--algo {self.algo} --scale-weight-norms: sdtune offers it with --algo "
                              f"{', '.join(MAX_NORM_ALGOS)} (DoRA's layer computes with the whole weight, its "
                              f"magnitude learned beside the factors)")
        _choice("targets", self.targets, TARGETS)
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise SdtuneError(f"--exclude {pattern!r}: not a regular expression ({e}); fix the pattern") from None
        if not self.name or "/" in self.name or "\\" in self.name:
            raise SdtuneError(f"--name {self.name!r}: must be a plain file name")
        for f in self.formats:
            _choice("formats", f, ("kohya", "diffusers"))
        _choice("save_precision", self.save_precision, SAVE_PRECISIONS)
        if self.network_weights:
            input_path(self.network_weights, "LoRA file", "--network-weights")
        # diffusers reads PEFT's per-row magnitude only
        if self.algo == "dora" and "diffusers" in self.formats and not self.dora_wd_on_output:
            raise SdtuneError("--algo dora --formats diffusers: sdtune trains kohya's DoRA (a magnitude per input "
                              "column, as A1111, ComfyUI and LyCORIS read it), which diffusers' layout cannot hold "
                              "(PEFT's is per output row); add --dora-wd-on-output, or use --formats kohya")

        if self.algo in ("loha", "lokr", "oft", "ia3", "full") and "diffusers" in self.formats:
            raise SdtuneError(f"--algo {self.algo} --formats diffusers: diffusers has no layout for LyCORIS's "
                              f"{algos.get(self.algo).label} (A1111, ComfyUI and sdtune read the kohya one); use "
                              f"--formats kohya")
        if self.train_norm and (self.targets == "attn" or not self.unet):
            raise SdtuneError(f"--train-norm: {'--targets attn' if self.unet else '--no-unet'} holds no norm layer of "
                              f"the UNet (the transformers' are in attn+ff, the resnets' in all); "
                              f"{'choose one of them' if self.unet else 'leave out --no-unet'}")
        if self.train_norm and "diffusers" in self.formats:
            raise SdtuneError("--train-norm --formats diffusers: diffusers has no layout for LyCORIS's norm-layer "
                              "changes (A1111, ComfyUI and sdtune read the kohya one); use --formats kohya")
        if self.algo == "dora" and self.lora_dropout:
            raise SdtuneError(f"--algo dora --lora-dropout {self.lora_dropout}: DoRA computes with the whole "
                              f"weight, which takes no dropout on the LoRA's input; use --lora-dropout 0")
        if self.oft_blocks and self.algo != "oft":
            raise SdtuneError(f"--oft-blocks {self.oft_blocks}: counts the blocks of an --algo oft run (kohya's "
                              f"networks.oft); leave it out or add --algo oft")
        if self.oft_blocks and self.oft_butterfly:
            raise SdtuneError(f"--oft-blocks {self.oft_blocks}: BOFT (--oft-butterfly) sizes its blocks from --rank; "
                              f"leave one out")
        if self.oft_blocks < 0 or self.oft_blocks == 1:
            raise SdtuneError(f"--oft-blocks {self.oft_blocks}: must be 2 or more (0: blocks sized from --rank)")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise SdtuneError(f"--lokr-factor {self.lokr_factor}: must be -1 (as square as possible) or at least 1")
        for name, switch in kohya_config.ALGO_SWITCHES.items():
            owners = switch.algos
            if getattr(self, name) and self.algo not in owners:
                whose = f" ({algos.get(owners[0]).label}'s)" if len(owners) == 1 else ""
                raise SdtuneError(f"--{_flag(name)}: an option of --algo {', '.join(owners[:-1]) or owners[0]}"
                                  f"{f' or {owners[-1]}' if len(owners) > 1 else ''}{whose}, and this run trains "
                                  f"--algo {self.algo}; add --algo {owners[0]} or leave it out")
        if self.tucker and not (self.conv_rank or self.targets == "all"):
            raise SdtuneError("--tucker: Tucker cores shape the 3x3 convolutions' change, and this run trains none; "
                              "add --conv-rank N (or --targets all)")
        if self.lokr_full_matrix and self.lokr_decompose_both:
            raise SdtuneError("--lokr-full-matrix --lokr-decompose-both: one keeps both factors whole, the other "
                              "splits the small one; choose one")
        self._check_pivotal()
        self._check_prior()

    def _check_pivotal(self) -> None:
        # the numbers are checked with or without a word: a value no run can use would otherwise be saved in
        # settings.toml, and refused only when that run is resumed with a word
        check_vectors("--ti-vectors", self.ti_vectors)
        if not self.ti_lr >= 0 or not math.isfinite(self.ti_lr):
            raise SdtuneError(f"--ti-lr {self.ti_lr}: must be 0 or more")
        if self.ti_steps < 0:
            raise SdtuneError(f"--ti-steps {self.ti_steps}: must be 0 or more")
        if not self.ti_token:
            if self.ti_init:
                raise SdtuneError("--ti-init without --ti-token; name the new word with --ti-token '<name>'")
            return
        if len(self.ti_token.split()) != 1 or "." in self.ti_token:
            raise SdtuneError(f"--ti-token {self.ti_token!r}: must be one word without spaces or dots, e.g. "
                              f"'<my-concept>'")
        if not self.ti_init.strip():
            raise SdtuneError("--ti-token needs --ti-init WORD (an existing word close to the concept)")

    def _check_prior(self) -> None:
        if self.class_prompt and self.num_class_images < 1:
            raise SdtuneError(f"--num-class-images {self.num_class_images}: must be at least 1 with --class-prompt")
        if not self.prior_loss_weight >= 0 or not math.isfinite(self.prior_loss_weight):
            raise SdtuneError(f"--prior-loss-weight {self.prior_loss_weight}: must be 0 or more")
        if self.reg_dir and not self.class_prompt:  # nothing will draw into it: it must be there (said before the
            input_path(self.reg_dir, "class-image folder", "--reg-dir")  # model loads and the images are encoded)
        if self.class_prompt and kohya_dataset.is_dataset_file(self.reg_dir):
            raise SdtuneError(f"--class-prompt draws class images into --reg-dir, and {self.reg_dir} is a dataset "
                              f"config (its is_reg subsets are the class images); give one or the other")


KINDS = {"ti": TISettings, "lora": LoraSettings}

# settings that change what a run shows or keeps (samples, checkpoints, its report, file formats and metadata), not
# the weights it trains: a resume may change them (loop.RESUMABLE_CHANGES), a queue keeps a finished run given new ones
OUTPUT_SETTINGS = frozenset({
    "save_every", "save_every_epochs", "keep_last", "sample_every", "sample_every_epochs", "cache_latents_to_disk",
    "sample_prompts", "sample_images", "sample_steps", "sample_guidance", "sample_sampler", "validation_every",
    "report", "formats", "log_with", "log_tracker_name", "wandb_run_name",
    *(f"metadata_{name}" for name in modelspec.USER_FIELDS)})

# --help's sections, in order: each setting's topic (every setting has one: tested), so that a hundred flags read
# as a few short lists; a kind shows the sections it has settings in
TOPICS = {
    "input and output": ("data", "out", "model", "vae", "preset", "name", "formats", "save_precision", "resume",
                         "progress", "report", "metadata_title", "metadata_author", "metadata_description",
                         "metadata_license", "metadata_tags"),
    "length and optimizer": ("steps", "epochs", "lr", "batch_size", "grad_accum", "seed", "lr_scheduler",
                             "lr_scheduler_args", "lr_warmup_steps", "lr_warmup_ratio", "lr_scheduler_num_cycles",
                             "lr_scheduler_power",
                             "lr_scheduler_min_lr_ratio", "lr_decay_steps", "lr_decay_ratio", "optimizer",
                             "optimizer_args", "max_grad_norm", "weight_decay"),
    "the new word (textual inversion)": ("token", "init_token", "init_embedding", "num_vectors", "property"),
    "the network (LoRA and LyCORIS)": ("algo", "rank", "alpha", "targets", "conv_rank", "conv_alpha", "lokr_factor",
                                       "lokr_full_matrix", "lokr_decompose_both", "lokr_unbalanced", "oft_rescaled",
                                       "oft_butterfly", "oft_blocks", "dora_wd_on_output", "ia3_on_input", "tucker",
                                       "scalar", "train_norm",
                                       "rs_lora", "exclude", "text_encoder", "unet", "te_lr", "te2_lr", "te_steps",
                                       "network_weights",
                                       "block_lr", "block_ranks", "block_alphas", "lora_dropout", "rank_dropout",
                                       "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                       "loraplus_te_lr_ratio", "scale_weight_norms"),
    "pivotal tuning (a new word beside the LoRA)": ("ti_token", "ti_init", "ti_vectors", "ti_lr", "ti_steps"),
    "prior preservation (DreamBooth's class images)": ("reg_dir", "class_prompt", "num_class_images",
                                                       "prior_loss_weight"),
    "images": ("resolution", "crop", "flip", "color_aug", "buckets", "bucket_step", "bucket_no_upscale",
               "min_bucket_reso", "max_bucket_reso", "masked_loss", "cache_latents_to_disk"),
    "captions": ("shuffle_captions", "keep_tokens", "keep_tokens_separator", "secondary_separator",
                 "caption_dropout", "caption_dropout_every_epochs", "caption_tag_dropout", "caption_prefix",
                 "caption_suffix", "default_caption", "wildcards", "weighted_captions", "max_token_length",
                 "clip_skip", "token_warmup_steps", "token_warmup_ratio", "token_warmup_min"),
    "noise, timesteps and loss": ("loss_type", "huber_c", "huber_schedule", "min_snr_gamma", "debiased_estimation",
                                  "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
                                  "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
                                  "ip_noise_gamma_random_strength",
                                  "min_timestep", "max_timestep", "zero_terminal_snr", "v_pred_like_loss",
                                  "scale_v_pred_loss_like_noise_pred"),
    "saves, samples, validation and logs": ("save_every", "save_every_epochs", "keep_last", "sample_every",
                                            "sample_every_epochs", "sample_prompts", "sample_sampler",
                                            "sample_images", "sample_steps", "sample_guidance", "validation_dir",
                                            "validation_split", "validation_every", "log_with", "log_tracker_name",
                                            "wandb_run_name"),
    "speed and memory": ("mixed_precision", "gradient_checkpointing", "fp8_base", "fp8_base_unet", "full_bf16",
                         "channels_last", "share_text", "flush_denormals"),
}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise SdtuneError(f"--{_flag(name)} {value!r}: choose one of {', '.join(map(str, allowed))}")


def setting_helps(cls) -> dict[str, str]:
    """{setting: its help text} (``_help``), over the class and its dataclass bases: a subclass that gives a
    setting another default without a text keeps its base's text."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            own = klass.__dict__.get("__annotations__", {})
            helps |= {name: klass.__dataclass_fields__[name].metadata["help"] for name in own
                      if "help" in klass.__dataclass_fields__[name].metadata}
    return helps


def setting_type(cls, name: str) -> tuple[type, bool]:
    """The type of setting ``name`` of ``cls`` (bool, int, float, str or list; lists hold strings) and whether
    it may be None: what a TOML value or a flag is checked against, and what kind of flag the CLI makes."""
    hint = get_type_hints(cls)[name]
    args = get_args(hint)
    nullable = type(None) in args
    if nullable:  # ``X | None``
        (hint,) = [a for a in args if a is not type(None)]
    return get_origin(hint) or hint, nullable  # list[str] -> list


def _coerce(cls, name: str, value, where: str):
    """``value`` checked against the field's type (ints are fine for floats, one string for a list)."""
    typ, nullable = setting_type(cls, name)
    if value is None:
        if nullable:
            return None
        raise SdtuneError(f"{where}: {name} cannot be empty")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SdtuneError(f"{where}: {name} = {value} is not a finite number; fix the value")
            return float(value)
    elif typ is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    elif typ is str and isinstance(value, str):
        return value
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a string or a list of strings"}.get(typ, typ.__name__)
    raise SdtuneError(f"{where}: {name} = {value!r} is not {kind}{' (or empty)' if nullable else ''}; fix the value")


# where the files sdtune trains keep their run's settings (as TOML): a LoRA's kohya metadata, an embedding's own
# (``Embedding.training["settings"]``, written with the sdtune. prefix)
LORA_SETTINGS_KEY = "ss_sdtune_settings"
SETTINGS_METADATA = (LORA_SETTINGS_KEY, TRAINING_METADATA + "settings")


def _settings_table(path: Path) -> dict:
    """``--config``'s table: a TOML file, or the settings stored in a LoRA or embedding sdtune trained."""
    if not is_safetensors(path):
        return read_toml(path)
    metadata = read_metadata(path)
    text = next((metadata[k] for k in SETTINGS_METADATA if k in metadata), None)
    if text is None:
        raise SdtuneError(f"{path}: holds no training settings (only files sdtune trained do); give a TOML file, "
                          f"such as a run's settings.toml")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SdtuneError(f"{path}: its stored settings are not valid TOML ({e}); give a TOML file") from None


# kohya sd-scripts' and diffusers' names for settings sdtune names otherwise (their config files and flags)
OTHER_TOOLS_NAMES = {
    "learning_rate": "lr", "unet_lr": "lr", "text_encoder_lr": "te_lr", "train_batch_size": "batch_size",
    "max_train_steps": "steps", "max_train_epochs": "epochs", "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "network_dim": "rank", "network_alpha": "alpha",
    "output_dir": "out", "train_data_dir": "data", "instance_data_dir": "data",
    "pretrained_model_name_or_path": "model", "save_every_n_steps": "save_every", "checkpointing_steps": "save_every",
    "checkpoints_total_limit": "keep_last",
    "save_every_n_epochs": "save_every_epochs", "sample_every_n_steps": "sample_every",
    "sample_every_n_epochs": "sample_every_epochs",
    "shuffle_caption": "shuffle_captions", "caption_dropout_rate": "caption_dropout", "output_name": "name",
    "snr_gamma": "min_snr_gamma", "lr_warmup": "lr_warmup_steps", "placeholder_token": "token",
    "initializer_token": "init_token", "validation_prompt": "sample_prompts", "instance_prompt": "default_caption",
    "network_dropout": "lora_dropout", "train_text_encoder": "text_encoder",
    "debiased_estimation_loss": "debiased_estimation", "input_perturbation": "ip_noise_gamma",
    "caption_tag_dropout_rate": "caption_tag_dropout", "block_dims": "block_ranks", "enable_wildcard": "wildcards",
    "caption_dropout_every_n_epochs": "caption_dropout_every_epochs", "bucket_reso_steps": "bucket_step",
    "enable_bucket": "buckets", "flip_aug": "flip", "optimizer_type": "optimizer", "max_resolution": "resolution",
    "report_to": "log_with", "tracker_project_name": "log_tracker_name"}


def likely_name(key: str, names) -> tuple[str | None, bool]:
    """(the setting among ``names`` an unknown ``key`` most likely means, whether it is another tool's name for
    it): kohya's/diffusers' name, else the closest spelling; (None, False) when nothing is close."""
    name = key.replace("-", "_")
    if OTHER_TOOLS_NAMES.get(name) in names:
        return OTHER_TOOLS_NAMES[name], True
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return (close[0] if close else None), False


def _unknown_setting(key: str, names: set[str]) -> str:
    """``key`` with the name sdtune gives it."""
    likely, other_tool = likely_name(key, names)
    if other_tool:
        return f"{key!r} (kohya's/diffusers' name; sdtune's is {likely!r})"
    return f"{key!r}" + (f" (did you mean {likely!r}?)" if likely else "")


def check_one_spelling(where, table: dict) -> None:
    """Refuse a setting written twice, once with '-' and once with '_' (TOML takes both as keys): one would
    silently win."""
    seen: dict[str, str] = {}
    for key in table:
        other = seen.setdefault(key.replace("-", "_"), key)
        if other != key:
            raise SdtuneError(f"{where}: {other} and {key} are the same setting; keep one")


def read_settings(toml_path: str | Path | None = None, overrides: dict | None = None, kind: str = "lora",
                  family=None) -> dict:
    """The settings a user gave for ``kind`` training: the TOML file's, then ``overrides`` (the flags given on the
    command line; ``None`` values mean "not given" and are skipped), each checked against its field's type.
    ``family``: the base model's, where known (a kohya config counts clip skip by it)."""
    if kind not in KINDS:
        raise SdtuneError(f"unknown training kind {kind!r}; use ti or lora")
    cls = KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if toml_path is not None:
        path = Path(toml_path)
        table = _settings_table(path)
        others = [k for k in KINDS if k != kind and isinstance(table.get(k), dict)]
        mine = isinstance(table.get(kind), dict) or any(not isinstance(v, dict) for v in table.values())
        if others and not mine:  # only the other kind's section: e.g. a LoRA run's settings given to train ti
            raise SdtuneError(f"{path}: holds [{others[0]}] settings, not [{kind}]; use sdtune train {others[0]}, "
                              f"or add a [{kind}] section")
        table = table.get(kind, table) if isinstance(table.get(kind), dict) else table  # [lora] / [ti] section
        if kohya_dataset.is_dataset(table):  # sd-scripts' dataset config given as the settings: the data
            table = {"data": str(path.resolve())}
        if kohya_config.is_kohya(table):  # sd-scripts' config file, read as it reads it
            table, unused = kohya_config.translate(table, path, kind, family)
            if unused:
                note(f"{path}: read as a kohya sd-scripts config; {_not_used(unused)}")
        unknown = [key for key, value in table.items() if not isinstance(value, dict)  # dicts: the other kind's
                   and key.replace("-", "_") not in names]
        if unknown:  # all of them at once, each with its likely name
            raise SdtuneError(f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} for {kind} training: "
                              + "; ".join(_unknown_setting(key, names) for key in unknown))
        check_one_spelling(path, table)
        for key, value in table.items():
            if not isinstance(value, dict):
                values[key.replace("-", "_")] = _coerce(cls, key.replace("-", "_"), value, str(path))
    for key, value in (overrides or {}).items():
        name = key.replace("-", "_")
        if value is None:
            continue
        if name not in names:
            raise SdtuneError(f"unknown option --{_flag(name)} for {kind} training")
        values[name] = _coerce(cls, name, value, f"--{_flag(name)}")
    if values.get("data") and kohya_dataset.is_dataset_file(values["data"]):
        flags = {key.replace("-", "_") for key, value in (overrides or {}).items() if value is not None}
        values = _dataset_values(values["data"], kind, family, names, values, flags) | values
    if values.get("log_with") in ("wandb", "all"):
        logs.wandb_module()  # not installed: said before the model loads
    return values


def _dataset_values(path: str, kind: str, family, names: set[str], given: dict, flags: set[str]) -> dict:
    """The settings a kohya dataset config given as --data holds (its caption and bucket options, its class
    images), under those the --config file and the flags give (``given``); an option its subsets each give their own
    of (a caption option, a resolution) cannot also be given as a flag (``flags``: their names), which would change
    nothing; where only some give it, the others take the given one. (A --config file's value of it is the run's
    own: a run's settings.toml holds every setting.)"""
    dataset = kohya_dataset.read(path)
    for key in dataset.varying:
        name = kohya_dataset.VARYING[key]
        if name in flags and dataset.every_own(key):
            raise SdtuneError(f"--{_flag(name)} {given[name]!r}: {path} gives each of its subsets its own {key}, so "
                              f"this would change nothing; leave --{_flag(name)} out, or give {key} once in the "
                              f"file's [general]")
    for subset in dataset.images(reg=True):  # the class images' own keys: a typo there is refused as elsewhere
        unknown = sorted(k for k in kohya_config.subset_settings(subset, path, family) if k not in names)
        if unknown:
            raise SdtuneError(f"{path}: the subset of {subset.image_dir}: unknown setting"
                              f"{'s' if len(unknown) > 1 else ''} for {kind} training: "
                              + "; ".join(_unknown_setting(key, names) for key in unknown))
    table, unused = kohya_config.dataset_settings(dataset, kind, family)
    if unused:
        note(f"{path}: {_not_used(unused)}")
    unknown = [key for key in table if key not in names]
    if unknown:
        raise SdtuneError(f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} for {kind} training: "
                          + "; ".join(_unknown_setting(key, names) for key in unknown))
    return {key: _coerce(KINDS[kind], key, value, path) for key, value in table.items()}


def load_settings(toml_path: str | Path | None = None, overrides: dict | None = None, kind: str = "lora",
                  family=None):
    """Settings of ``kind`` ("ti" | "lora"): a preset (``preset`` from the file or flags, else the one of
    ``family``, the base model's ``Family`` or its name; with neither, the dataclass defaults), then the TOML
    file, then ``overrides``. The preset used is recorded in ``settings.preset``."""
    known = families.FAMILIES.get(family) if isinstance(family, str) else family
    given = read_settings(toml_path, overrides, kind, known)
    if "preset" in given:  # named in the file or a flag; "" names none (a run's settings.toml of a preset-less run)
        preset = presets.get(kind, given["preset"]) if given["preset"] else None
    else:
        preset = presets.for_family(kind, family)
    _note_other_family_preset(preset, toml_path, overrides, kind, family)
    values = preset.for_algo(given.get("algo", preset.values.get("algo", "")), bool(given.get("oft_butterfly"))) \
        if preset else {}
    if "validation_dir" in given and "validation_split" not in given:
        values.pop("validation_split", None)  # held-out images given: the preset's split gives way
    values.update(given)
    values["preset"] = preset.name if preset else ""
    if optimizers.finds_step(str(values.get("optimizer", "")).lower()):  # its rates: factors on the step it finds
        names = {f.name for f in dataclasses.fields(KINDS[kind])}
        values |= {key: 1.0 for key in ("lr", "ti_lr") if key in names and key not in given}
    if preset and {"rank", "alpha"} <= preset.values.keys() and "rank" in given and "alpha" not in given \
            and values["rank"] > 0:  # (a rank below 1 is refused by check())
        was, now = preset.values["alpha"] / preset.values["rank"], values["alpha"] / values["rank"]
        if now != was:  # the LoRA's scale: kohya's default alpha is 1 and diffusers' the rank, so say which it is
            note(f"--rank {values['rank']} with preset {preset.name}'s alpha {values['alpha']:g}: the LoRA's scale "
                 f"alpha/rank is {now:g} (the preset's {was:g}); give --alpha to choose it")
    return KINDS[kind](**values)


def _note_other_family_preset(preset, toml_path, overrides, kind: str, family) -> None:
    """A --config file (another run's settings.toml) naming the preset of another model family: its settings were
    chosen for that model (size, steps, learning rate), so say so, as the user asked for this model's."""
    own = presets.for_family(kind, family)
    if preset is None or own is None or preset.name == own.name or (overrides or {}).get("preset") is not None:
        return
    other = next((f for f, name in presets.FAMILY_DEFAULTS.items() if name == preset.name), None)
    if other:  # (a preset of no family's, such as tiny-quick, is a choice, not another model's)
        mine = families.FAMILIES[getattr(family, "name", family)].title
        note(f"{toml_path}: its preset {preset.name!r} is {families.FAMILIES[other].title}'s, and this model is "
             f"{mine}, which starts from {own.name!r}; give --preset {own.name} to train with its own")


def check_given(settings, toml_path: str | Path | None = None, overrides: dict | None = None) -> None:
    """``settings.check()``, its refusal naming a setting the ``--config`` file gave (and no flag overrode) by its
    key in that file: ``save_every (in run.toml) -5``, not ``--save-every -5``, a flag the user did not type."""
    try:
        settings.check()
    except SdtuneError as e:
        if toml_path is None:
            raise
        flags = {k for k, v in (overrides or {}).items() if v is not None}
        from_file = set(read_settings(toml_path, None, settings.kind)) - flags
        raise SdtuneError(as_keys(str(e), from_file, f" (in {toml_path})")) from None


def as_keys(message: str, keys, suffix: str = "") -> str:
    """``message`` with the flags of settings ``keys`` named as the file gave them: ``--save-every`` ->
    ``save_every`` + ``suffix``."""
    def named(m: re.Match) -> str:
        key = m.group(1).replace("-", "_")
        return f"{key}{suffix}" if key in keys else m.group(0)
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", named, message)


def settings_for(base, kind: str, toml_path: str | Path | None = None, **given):
    """Settings for training ``base`` (a loaded model): its family's preset, the file, then ``given``
    (``settings_for(base, "lora", data="imgs", out="runs/a")``); ``model`` defaults to the base's name."""
    if "model" not in read_settings(toml_path, given, kind):
        given["model"] = getattr(base, "name", None)
    return load_settings(toml_path, given, kind, family=base.family)


# ---------------------------------------------------------------- writing them back

def toml_value(value) -> str:
    """``value`` (bool, number, string, list, or a dict as an inline table) as TOML that reads back equal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise SdtuneError(f"{value}: a setting must be a finite number")
    if isinstance(value, (int, float)):
        return repr(value)  # repr keeps every digit of a float (1e-05, 0.1): read back, it is the same number
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):  # a sweep = {lr = [...]} table
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    # a JSON string is a TOML basic string, except that TOML wants DEL escaped too
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _recorded(settings: TrainSettings) -> list[tuple[str, object]]:
    """The settings a run records and prints: all but the terminal's progress bar, which is how one session
    chose to watch, not part of what was trained (a ``--config`` rerun elsewhere should not inherit it)."""
    return [(name, value) for name, value in settings.to_dict().items() if name != "progress"]


def planned_settings(kind: str, toml_path, overrides: dict, model: str) -> str:
    """The settings a ``kind`` run on ``model`` would use, as the TOML ``--config`` reads, without loading the
    model: its family's preset where the family is known from the name, folder or file header (``known_family``),
    then the file, then ``overrides``; checked as the run checks them."""
    family = known_family(model)
    settings = load_settings(toml_path, overrides, kind, family=family)
    check_given(settings, toml_path, overrides)
    unknown = ("" if family is not None or settings.preset else
               f"# {model}: its family is known only once it loads, so its preset is not applied here\n")
    return unknown + to_toml(settings)


def to_toml(settings: TrainSettings) -> str:
    """The settings as a TOML file (``[lora]`` or ``[ti]``) that ``load_settings`` reads back into equal
    settings; unset optional values (None, which TOML cannot write) are comments."""
    lines = [f"# sdtune train {settings.kind} --config THIS_FILE reruns it; flags still override single settings",
             f"[{settings.kind}]"]
    for name, value in _recorded(settings):
        lines.append(f"# {name} = (unset)" if value is None else f"{name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def summary(settings: TrainSettings, width: int = 110) -> str:
    """The settings as a few wrapped ``name=value`` lines, for the terminal."""
    lines = [""]
    for name, value in _recorded(settings):
        word = f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"
        if lines[-1] and len(lines[-1]) + 2 + len(word) > width:
            lines.append("")
        lines[-1] += ("  " if lines[-1] else "") + word
    return "\n".join("  " + line for line in lines)
