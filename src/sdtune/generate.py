"""txt2img on a loaded base: schedulers, seeds, A1111-style PNG infotext, grids.

Reproducibility: image ``i`` of a call with seed ``s`` starts from noise drawn on the CPU with seed
``s + i`` (as A1111 does), so the same seed and settings give the same pixels; across different batch
sizes a few pixels may differ by 1/255 (CPU kernels round differently per batch shape).
"""

from __future__ import annotations

import functools
import glob
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import nn

from . import console
from . import prompts as prompts_syntax
from .safeio import SdtuneError, atomic_path, output_folder
from .samplers import SCHEDULE_TYPES, SCHEDULERS, check_scheduler, check_size, scheduler_available


def _rescales(cls_name: str) -> bool:
    """Whether diffusers' scheduler class builds the zero-terminal-SNR schedule (``rescale_betas_zero_snr``)."""
    cls = getattr(diffusers, cls_name)
    return "rescale_betas_zero_snr" in cls._get_init_keys(cls)


# A1111 runs these through k-diffusion, whose default ("Automatic", its "Uniform") schedule is t = linspace(999, 0,
# steps): the first step starts at the top noise level. Some configs (SDXL's) say "leading" (a 20-step run from
# t = 951), which A1111 keeps for its DDIM and PLMS only. A zero-terminal-SNR model's "trailing" (from 999 too) stays.
_K_DIFFUSION = {"euler", "euler_a", "dpmpp_2m", "heun", "lms"}


def make_scheduler(name: str, base_scheduler):
    name = check_scheduler(name)
    cls_name, extra, _ = SCHEDULERS[name]
    if name in _K_DIFFUSION and base_scheduler.config.get("timestep_spacing", "leading") == "leading":
        extra = {**extra, "timestep_spacing": "linspace"}
    cls = getattr(diffusers, cls_name)
    # a zero-terminal-SNR model (its ztsnr marker) samples on the rescaled schedule, which diffusers' Heun, LMS and
    # PNDM do not build: they would draw on the ordinary one, another image than the model was trained for
    if base_scheduler.config.get("rescale_betas_zero_snr") and not _rescales(cls_name):
        usable = [k for k, (c, _, _) in SCHEDULERS.items() if scheduler_available(k) and _rescales(c)]
        raise SdtuneError(f"--scheduler {name}: this is a zero-terminal-SNR model, whose noise schedule diffusers' "
                          f"{cls_name} does not build; use one of {', '.join(usable)}")
    return cls.from_config(base_scheduler.config, **extra)


def sampling_steps(name: str, scheduler, steps: int) -> dict:
    """The pipeline's step arguments for sampler ``name``: ``num_inference_steps``, or for DPM++ 2M on
    k-diffusion's levels the timesteps themselves. A1111's (Uniform) DPM++ 2M steps through t = linspace(999, 0):
    its last level before 0 is sigma(0) = 0.03, where diffusers' linspace spacing stops at t = 50 (sigma 0.22)."""
    if name != "dpmpp_2m" or scheduler.config.get("timestep_spacing") != "linspace":
        return {"num_inference_steps": steps}
    last = scheduler.config.num_train_timesteps - 1  # (DPMSolver takes whole timesteps: the nearest ones)
    return {"timesteps": np.linspace(last, 0, steps).round().astype(np.int64).tolist()}


@dataclass
class Generated:
    image: Image.Image
    seed: int
    infotext: str
    params: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return save_png(self.image, path, self.infotext)


def save_png(image: Image.Image, path: str | Path, infotext: str | None = None) -> Path:
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # where A1111 writes a JPEG's or WebP's parameters


def read_infotext(path: str | Path) -> str | None:
    """The A1111 ``parameters`` text of an image: a PNG's text chunk, or the EXIF UserComment A1111 writes into
    JPEG and WebP files (piexif's "UNICODE" form: UTF-16, big-endian as A1111 writes it, little-endian from
    some other tools). None where it has none."""
    with Image.open(path) as im:
        if im.info.get("parameters"):
            return im.info["parameters"]
        comment = im.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, str):
        return comment.strip("\0") or None
    if not comment:
        return None
    head, body = comment[:8], comment[8:]
    if head == b"UNICODE\0":
        text = body.decode("utf-16-le" if body[1:2] == b"\0" and body[:1] != b"\0" else "utf-16-be", "replace")
    else:  # "ASCII\0\0\0", or no prefix at all
        text = (body if head.rstrip(b"\0") in (b"ASCII", b"") else comment).decode("utf-8", "replace")
    return text.strip("\0") or None


def model_label(name: str) -> str:
    """The model as A1111's infotext names a checkpoint: a file by its name without the suffix, a folder by its
    name (a PNG shared carries no local path); a hub id or a built-in model's name as it is."""
    path = Path(name).expanduser()
    return path.stem if path.is_file() else path.name if path.is_dir() else name


def infotext(prompt: str, negative: str, params: dict) -> str:
    """The A1111 ``parameters`` text: prompt, 'Negative prompt:' line, then 'Key: value, ...'."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")

    def fmt(v):  # A1111's quote(): JSON string quoting, so quotes and backslashes inside survive the round trip
        v = str(v)
        return json.dumps(v, ensure_ascii=False) if ("," in v or ":" in v or "\n" in v) else v

    lines.append(", ".join(f"{k}: {fmt(v)}" for k, v in params.items() if v not in (None, "")))
    return "\n".join(lines)


_PARAM = re.compile(r'\s*([\w \-/]+): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')  # Key: value, or Key: "JSON string"


def parse_infotext(text: str) -> dict:
    """Inverse of ``infotext``, read as A1111 reads it: prompt lines, then the lines from 'Negative prompt:' on,
    then the last line's 'Key: value' pairs (a value in double quotes is a JSON string)."""
    lines = text.strip().split("\n")
    # the last line holds the parameters when it reads as three or more pairs (A1111's test; the prompt may be empty)
    params = lines.pop() if len(_PARAM.findall(lines[-1])) >= 3 else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for m in _PARAM.finditer(params):
        value = m.group(2)
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value.strip('"')
        out[m.group(1).strip()] = value
    return out


def default_size(base) -> int:
    scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    return int(base.unet.config.sample_size) * scale


@dataclass
class PromptEmbeds:
    """What the UNet is conditioned on: per-token features, and for SDXL the pooled text embedding."""

    hidden: torch.Tensor  # [batch, 77 per chunk of the prompt, cross-attention width]
    pooled: torch.Tensor | None = None  # [batch, width of the projecting encoder] (SDXL), else None

    def chunk(self, n: int) -> list[PromptEmbeds]:
        pooled = self.pooled.chunk(n) if self.pooled is not None else [None] * n
        return [PromptEmbeds(h, p) for h, p in zip(self.hidden.chunk(n), pooled)]

    def repeat(self, n: int) -> PromptEmbeds:
        return PromptEmbeds(self.hidden.expand(n, -1, -1),
                            self.pooled.expand(n, -1) if self.pooled is not None else None)


def check_text(name: str, text) -> None:
    """A prompt as a Python caller may pass it: one str (a list of prompts was a TypeError deep inside)."""
    if not isinstance(text, str):
        raise SdtuneError(f"{name}: one text (a str), not a {type(text).__name__}; for several images of one "
                          f"prompt use num_images, for several prompts call once per prompt")


def _check_types(prompt, negative_prompt, guidance, **whole) -> None:
    """What a Python caller may pass that the command line never does: a float step count, a str seed..."""
    check_text("prompt", prompt)
    check_text("negative_prompt", negative_prompt)
    for name, value in whole.items():  # seed may be None (random)
        if not (isinstance(value, int) and not isinstance(value, bool)) and not (name == "seed" and value is None):
            raise SdtuneError(f"{name}={value!r}: must be a whole number")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise SdtuneError(f"guidance={guidance!r}: must be a number")


def check_clip_skip(clip_skip: int) -> None:
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise SdtuneError(f"--clip-skip {clip_skip}: must be a whole number from 1 (the default: no skip); "
                          f"2 is what anime SD 1.x models expect")


def note_deep_clip_skip(family, clip_skip: int, so: str) -> None:
    """A1111 reads an OpenCLIP encoder (SD 2.x's, SDXL's second) at its own layer whatever the clip skip; the
    first two skips are these families' own layer anyway, a deeper one is ComfyUI's reading alone: said, with
    what ``so`` follows from it."""
    if clip_skip > 2 and family is not None and any(te.openclip for te in family.text_encoders):
        console.note(f"clip skip {clip_skip}: read as ComfyUI reads it; A1111 ignores clip skip on {family.title}, "
                     f"so {so}")


def read_layer(te, model, clip_skip: int = 1) -> tuple[int, bool]:
    """(hidden state index, whether the final layer norm follows) of what the UNet reads from encoder ``te`` at
    clip skip N, as A1111 and ComfyUI count it: the Nth layer from the end of the encoder as published (SD 2.x's
    OpenCLIP with the last layer diffusers drops), never shallower than the family's own (SDXL reads the
    penultimate: its clip skip 1 and 2 are the same). An encoder whose own is its last applies the final norm
    to an earlier layer too (A1111 does; diffusers' ``clip_skip`` is A1111's minus one)."""
    check_clip_skip(clip_skip)
    dropped = 1 if te.pretrained_layers else 0  # SD 2.x's diffusers encoder lacks OpenCLIP's last layer
    depth = max(-te.hidden_layer, clip_skip - dropped)
    layers = model.config.num_hidden_layers
    if depth > layers:
        raise SdtuneError(f"--clip-skip {clip_skip}: {te.component} has only {layers} layers; use a smaller skip")
    return (-1, False) if depth == 1 else (-depth, te.hidden_layer == -1)


def _final_norm(model) -> nn.Module:
    return model.final_layer_norm if hasattr(model, "final_layer_norm") else model.text_model.final_layer_norm


class TextStack(nn.Module):
    """A family's text encoders as its UNet reads them (``families.TextEncoder``): each encoder's chosen hidden
    layer (SD 1.x/2.x: the last; SDXL: the penultimate of both; deeper with a clip skip, ``read_layer``),
    concatenated, and the pooled output of an encoder that projects it (SDXL's second). Training runs it with
    gradients, ``encode_prompt`` without.

    ``chunks`` > 1 (training's --max-token-length 150 or 225): a text's first 75 x chunks tokens, each 75 encoded
    apart between their own start and end tokens (a chunk past the text's end is an empty one) and put one after
    the other, as A1111 encodes a long prompt; the pooled embedding is the first chunk's, as ``encode_prompt``'s.
    ``weighted`` (training's --weighted-captions): ``tokens`` reads A1111's emphasis as ``encode_prompt`` does, and
    ``forward`` weighs each encoder's features by it."""

    def __init__(self, encoders, clip_skip: int = 1, chunks: int = 1, weighted: bool = False):
        super().__init__()
        encoders = list(encoders)  # (TextEncoder, model, tokenizer) as ``Base.text_encoders()`` gives them
        self.specs = [te for te, _, _ in encoders]
        self.tokenizers = [tok for _, _, tok in encoders]
        self.models = nn.ModuleList([model for _, model, _ in encoders])
        self.layers = [read_layer(te, model, clip_skip) for te, model, _ in encoders]
        self.chunks, self.weighted = chunks, weighted

    @classmethod
    def of(cls, base, clip_skip: int = 1, chunks: int = 1, weighted: bool = False) -> TextStack:
        return cls(base.text_encoders(), clip_skip, chunks, weighted)

    def tokens(self, texts: list[str], device) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """(ids, weights): ``ids``' token ids, or with ``weighted`` A1111's prompt syntax read from the texts (its
        brackets out of the ids, (word:1.2) and [word] as each token's weight, [texts, chunks, 77] per encoder, cut
        or filled with empty chunks to ``chunks``); weights None where every one is 1."""
        if not self.weighted:
            return self.ids(texts, device), None
        ids, weights = prompts_syntax.tokenize(self.tokenizers, texts)
        fitted_ids, fitted_weights = [], []
        for tok, i, w in zip(self.tokenizers, ids, weights):
            if i.shape[1] < self.chunks:  # empty chunks after the text, as ``_chunked`` fills them
                empty = torch.full((i.shape[0], self.chunks - i.shape[1], i.shape[2]), tok.pad_token_id)
                empty[..., 0], empty[..., 1] = tok.bos_token_id, tok.eos_token_id
                i, w = torch.cat([i, empty], 1), torch.cat([w, torch.ones(empty.shape)], 1)
            fitted_ids.append(i[:, :self.chunks].to(device))
            fitted_weights.append(w[:, :self.chunks].to(device))
        emphasis = any(bool((w != 1).any()) for w in fitted_weights)
        return fitted_ids, fitted_weights if emphasis else None

    def ids(self, texts: list[str], device) -> list[torch.Tensor]:
        """Token ids of ``texts`` in each encoder's tokenizer (SDXL's pad differently): [texts, 77], or
        [texts, chunks, 77] with chunks."""
        if self.chunks == 1:
            return [tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                        return_tensors="pt").input_ids.to(device) for tok in self.tokenizers]
        return [self._chunked(tok, texts).to(device) for tok in self.tokenizers]

    def _chunked(self, tok, texts: list[str]) -> torch.Tensor:
        window = tok.model_max_length - 2  # a chunk's tokens between its start and end token
        out = torch.full((len(texts), self.chunks, window + 2), tok.pad_token_id, dtype=torch.long)
        # (verbose=False: transformers logs every text longer than the window otherwise)
        for i, body in enumerate(tok(texts, add_special_tokens=False, verbose=False).input_ids):
            for c in range(self.chunks):
                row = [tok.bos_token_id, *body[c * window:(c + 1) * window], tok.eos_token_id]
                out[i, c, :len(row)] = torch.tensor(row)
        return out

    def forward(self, ids: list[torch.Tensor], weights: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features [rows, tokens, width], pooled embedding or None) of each encoder's ``ids``; ``weights`` (of the
        ids' shape, per encoder): A1111's emphasis, each token's features times its weight."""
        rows = ids[0].shape[0]
        hidden, pooled = [], None
        for k, ((layer, norm), model, x) in enumerate(zip(self.layers, self.models, ids)):
            out = model(x.reshape(-1, x.shape[-1]), output_hidden_states=layer != -1)
            h = out[0] if layer == -1 else out.hidden_states[layer]
            h = _final_norm(model)(h) if norm else h
            if weights is not None:
                h = prompts_syntax.weigh(h, weights[k].reshape(-1, weights[k].shape[-1]))
            hidden.append(h.reshape(rows, -1, h.shape[-1]))
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds.reshape(rows, -1, out.text_embeds.shape[-1])[:, 0]
        return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_prompt(base, prompts: list[str], clip_skip: int = 1) -> PromptEmbeds:
    """Text features as the base's family reads them (``TextStack``), in the base's dtype, with A1111's prompt
    syntax (``prompts``: emphasis, BREAK, chunks of 75 tokens put one after the other; SDXL's pooled embedding is
    the first chunk's). sdtune encodes prompts itself so that its own multi-vector token expansion is what the
    model sees."""
    text = TextStack.of(base, clip_skip)
    ids, weights = prompts_syntax.tokenize(text.tokenizers, prompts)
    rows, chunks, length = ids[0].shape
    emphasis = any(bool((w != 1).any()) for w in weights)  # each encoder's emphasis on its own features
    hidden, pooled = text([i.reshape(rows * chunks, length).to(base.device) for i in ids],
                          [w.to(base.device) for w in weights] if emphasis else None)
    hidden = hidden.reshape(rows, chunks * length, -1)
    if pooled is not None:
        pooled = pooled.reshape(rows, chunks, -1)[:, 0]
    return PromptEmbeds(hidden.to(base.dtype), pooled.to(base.dtype) if pooled is not None else None)


@torch.no_grad()
def generate(
    base,
    prompt: str,
    negative_prompt: str = "",
    steps: int = 25,
    guidance: float = 7.5,
    seed: int | None = None,
    scheduler: str = "ddim",
    clip_skip: int = 1,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    batch_size: int = 4,
    progress: bool = True,
    extra_info: dict | None = None,
    on_step=None,
    on_batch=None,
) -> list[Generated]:
    """Generate ``num_images`` images; adapters already applied to ``base`` are used as they are. ``on_step(done,
    total)`` is called after each denoising step (of all batches together); an exception it raises stops here.
    ``on_batch(images)`` gets each batch's images as soon as they are done (to save them before the next batch)."""
    _check_types(prompt, negative_prompt, guidance, steps=steps, num_images=num_images, batch_size=batch_size,
                 seed=seed)
    width = width or default_size(base)
    height = height or default_size(base)
    check_size(width, height)
    if steps < 1:
        raise SdtuneError(f"--steps {steps}: must be at least 1")
    levels = base.scheduler.config.num_train_timesteps
    if steps > levels:  # a sampler cannot take more steps than the noise levels the model was trained on
        raise SdtuneError(f"--steps {steps}: at most {levels} for this model (its noise levels); 20 to 50 is usual")
    if num_images < 1:
        raise SdtuneError(f"--num-images {num_images}: must be at least 1")
    check_clip_skip(clip_skip)
    family = getattr(base, "family", None)
    note_deep_clip_skip(family, clip_skip, "it draws this PNG's settings with the default")
    scheduler = check_scheduler(scheduler)
    if not math.isfinite(guidance):
        raise SdtuneError(f"--guidance {guidance}: must be a finite number, e.g. 7.5")
    if seed is not None and (seed < -1 or seed + num_images > 2**63):  # -5 is a typo, not a wish for random
        raise SdtuneError(f"--seed {seed}: must be from -1 (random) to {2**63 - 1 - num_images}")
    if seed is None or seed == -1:
        # not torch's global generator: loading a built-in model seeds it, so every first "random" seed was equal
        seed = secrets.randbelow(2**31 - 1)
    prompt_text, negative_text = prompt, negative_prompt  # as typed: the PNG must reproduce the image
    expand = getattr(getattr(base, "embeddings", None), "expand", None)
    if expand is not None:  # multi-vector embeddings become their sub-tokens
        prompt, negative_prompt = expand(prompt), expand(negative_prompt)
    pipe = base.pipeline(make_scheduler(scheduler, base.scheduler))
    # on a terminal only: in a log file each batch's redraws are noise (a grid or a run says how far it is)
    pipe.set_progress_bar_config(disable=not (progress and console.on_terminal()), leave=False, desc="denoising")
    scale = pipe.vae_scale_factor
    out: list[Generated] = []
    total = steps * -(-num_images // batch_size)

    # A1111's prompt editing and alternation: the (negative, prompt) texts of each UNet call, all encoded once,
    # with as many chunks each (the UNet's input keeps one length); most prompts have one pair. A1111 counts its
    # schedule in model calls over twice the steps for a second-order sampler (Heun: 2 steps - 1 calls, as
    # diffusers'), so an edit at step 3 switches after the 2nd Heun step; PLMS's extra first call counts as one.
    calls = steps * 2 if pipe.scheduler.order == 2 else steps
    plans = [prompts_syntax.schedule(p, calls) for p in (negative_prompt, prompt)]
    pairs = [tuple(prompts_syntax.text_at(plan, i) for plan in plans) for i in range(calls + 1)]
    texts = list(pairs[0])  # (negative, prompt) first, as a prompt without edits is encoded
    texts += [t for t in dict.fromkeys(t for pair in pairs for t in pair) if t not in texts]
    encoded = dict(zip(texts, encode_prompt(base, texts, clip_skip).chunk(len(texts))))
    zero_empty = getattr(pipe.config, "force_zeros_for_empty_prompt", False)

    def conditions(pair: tuple[str, str], n: int) -> tuple[PromptEmbeds, PromptEmbeds]:
        uncond, cond = (encoded[t].repeat(n) for t in pair)
        # SDXL's pipeline conditions an empty negative prompt on zeros, not on the encoded ""; A1111 a negative
        # that is empty at this step too (prompt editing: [blurry::5])
        if zero_empty and pair[0] == "":
            uncond = PromptEmbeds(torch.zeros_like(uncond.hidden), torch.zeros_like(uncond.pooled))
        return uncond, cond

    def step_end(pipe, i, t, tensors, start=0, shown=None):  # diffusers' callback_on_step_end, after UNet call i
        if on_step is not None:  # user steps done (a 2nd-order sampler calls twice a step)
            on_step(start // batch_size * steps + (i + 1) * steps // pipe.num_timesteps, total)
        after = pairs[min(i + 1, calls)]
        if i + 1 < pipe.num_timesteps and after != shown[0]:  # the next call reads another text: swap the conditions
            shown[0] = after
            cfg = pipe.do_classifier_free_guidance  # then the pipeline's embeddings are [negative; prompt]
            uncond, cond = conditions(after, len(tensors["prompt_embeds"]) // (1 + cfg))
            both = (uncond, cond) if cfg else (cond,)
            tensors["prompt_embeds"] = torch.cat([e.hidden for e in both])
            if "add_text_embeds" in tensors:
                tensors["add_text_embeds"] = torch.cat([e.pooled for e in both])
        return tensors

    edited = len(set(pairs)) > 1
    swapped = ["prompt_embeds", "add_text_embeds"] if base.family.pooled_and_time_ids else ["prompt_embeds"]
    # an empty negative conditioned on zeros pads to any length alike (zero keys and values): A1111 told to pad
    # conds would pad it with the encoded "", so it is left out of the chunk counts
    negatives = {pair[0] for pair in pairs}
    reading = _how_read(base, [t for t in texts if not (zero_empty and t == "" and "" in negatives)], scheduler)
    model = model_label(getattr(base, "name", ""))  # a file's stem: one look at the disk, not one per image
    for start in range(0, num_images, batch_size):
        seeds = [seed + i for i in range(start, min(num_images, start + batch_size))]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        shape = (1, base.unet.config.in_channels, height // scale, width // scale)
        latents = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(base.device, base.dtype)
        uncond, cond = conditions(pairs[0], len(seeds))
        pooled = {"pooled_prompt_embeds": cond.pooled, "negative_pooled_prompt_embeds": uncond.pooled}
        images = pipe(
            prompt_embeds=cond.hidden,
            negative_prompt_embeds=uncond.hidden,
            **(pooled if base.family.pooled_and_time_ids else {}),
            **sampling_steps(scheduler, pipe.scheduler, steps),
            guidance_scale=guidance,
            latents=latents,
            generator=gens,
            height=height,
            width=width,
            callback_on_step_end=functools.partial(step_end, start=start, shown=[pairs[0]])
            if on_step is not None or edited else None,
            callback_on_step_end_tensor_inputs=swapped if edited else ["latents"],
            output_type="np",  # floats in [0, 1]: checked below, then made PIL images as diffusers makes them
        ).images
        broken = [s for s, a in zip(seeds, images) if not np.isfinite(a).all()]
        if broken:  # numpy's cast would warn in words no user can act on, and the image would be noise
            console.note(f"seed {', '.join(map(str, broken))}: the model's output is not a number (NaN), drawn black; "
                         f"a LoRA weight far too large, or fp16 overflow (try --dtype fp32)")
        images = [Image.fromarray((np.nan_to_num(a) * 255).round().astype("uint8")) for a in images]
        batch = []
        for s, img in zip(seeds, images):
            params = {
                "Steps": steps,
                "Sampler": SCHEDULERS[scheduler][2],
                "CFG scale": guidance,
                "Seed": s,
                "Size": f"{width}x{height}",
                "Model hash": getattr(base, "model_hash", ""),
                "Model": model,
                "VAE hash": getattr(base, "vae_hash", "") or None,  # A1111's pair, for a VAE given apart
                "VAE": getattr(base, "vae_name", "") or None,
                "Clip skip": clip_skip if clip_skip > 1 else None,  # A1111 writes it only when set
                **(extra_info or {}),
            }
            params.update(reading)
            batch.append(Generated(img, s, infotext(prompt_text, negative_text, params), params))
        if on_batch is not None:
            on_batch(batch)
        out += batch
    return out


def _how_read(base, texts: list[str], scheduler: str) -> dict:
    """The infotext fields by which A1111 reads a PNG back as sdtune drew it, where A1111's defaults differ:
    ``Schedule type`` (its DPM++ 2M is Karras unless told), ``Emphasis`` (sdtune's "No norm", written as A1111
    writes it: for prompts with brackets once edited), ``Pad conds`` (a negative prompt of fewer chunks than the
    prompt is padded with empty ones, as are the texts of a prompt edited at some step; A1111 runs the two apart
    unless told) and ``RNG`` (the initial noise is drawn on the CPU; A1111 takes a PNG without the field as GPU
    noise)."""
    fields = {"Schedule type": SCHEDULE_TYPES.get(scheduler), "RNG": "CPU"}
    if any(c in text for text in texts for c in "(["):  # A1111's test: brackets left after prompt editing
        fields["Emphasis"] = "No norm"
    tokenizers = [tok for _, _, tok in base.text_encoders()]
    if len({prompts_syntax.chunk_count(tokenizers, p) for p in texts}) > 1:
        fields["Pad conds"] = "True"
    return {k: v for k, v in fields.items() if v is not None}


# --- grids --------------------------------------------------------------------------------------


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the width gets a line of its own)."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def draw_grid(rows: list[list[Image.Image | None]], row_labels: list[str] | None = None,
              col_labels: list[str] | None = None, *, cell: int | None = None, gap: int = 0, margin: int = 3,
              font_size: int | None = None) -> Image.Image:
    """The one grid drawer (batch grids, contact sheets, X/Y plots): ``rows`` of images (``None`` leaves a
    place white), column labels on top and row labels on the left, each wrapped to fit.

    Every image is drawn at the first one's size; small images are scaled up (nearest neighbour: the pixels
    stay what the model made) to ``cell`` pixels wide. Cell (r, c) starts at (left + c * (w + gap),
    top + r * (h + gap)). Labels sit ``margin`` pixels from the images (row labels twice that from either
    side); ``font_size`` defaults to one that grows with the cell width (11 to 16)."""
    w, h = rows[0][0].size
    if cell and cell > w:
        h, w = cell * h // w, cell
    font = _font(font_size or max(11, min(16, w // 9)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.size * 1.25) if hasattr(font, "size") else 14
    col_lines = [_wrap(lbl, font, w - 6, probe) for lbl in col_labels or []]
    pad_top = 2 * margin + line_h * max(len(lines) for lines in col_lines) if col_lines else 0
    pad_left, row_lines = 0, []
    if row_labels:
        row_lines = [_wrap(lbl, font, max(w, 160), probe) for lbl in row_labels]
        widest = max(probe.textlength(line, font=font) for lines in row_lines for line in lines)
        pad_left = int(widest) + 4 * margin
    n_cols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (pad_left + n_cols * (w + gap) - gap, pad_top + len(rows) * (h + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            if im is None:
                continue
            im = im.convert("RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(im, (pad_left + c * (w + gap), pad_top + r * (h + gap)))
    for c, lines in enumerate(col_lines):
        y0 = pad_top - margin - line_h * len(lines)
        for k, line in enumerate(lines):
            draw.text((pad_left + c * (w + gap) + w // 2, y0 + k * line_h), line, fill="black", font=font,
                      anchor="ma")
    for r, lines in enumerate(row_lines):
        y0 = pad_top + r * (h + gap) + (h - line_h * len(lines)) // 2
        for k, line in enumerate(lines):
            draw.text((2 * margin, y0 + k * line_h), line, fill="black", font=font, anchor="la")
    return canvas


def grid(
    images: list[Image.Image],
    cols: int | None = None,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell: int | None = None,
) -> Image.Image:
    """Images in a grid (row-major, no gaps); labels drawn on the left and on top when given."""
    if not images:
        raise ValueError("grid needs at least one image")
    cols = cols or (len(col_labels) if col_labels else min(len(images), 4))
    places = images + [None] * (-len(images) % cols)  # the last row's empty places stay white
    width = max(cell or 0, images[0].width)  # the drawn cell width (small images are scaled up to cell)
    return draw_grid([places[i:i + cols] for i in range(0, len(places), cols)], row_labels, col_labels, cell=cell,
                     margin=6, font_size=max(10, min(18, width // 8)))


class ImageWriter:
    """Writes a call's images into ``out_dir`` as NNNNN-SEED.png (with infotext) batch by batch, as they are done,
    so that a Ctrl-C keeps the finished ones; ``finish`` adds grid-NNNNN.png when there were several."""

    def __init__(self, out_dir: str | Path, prefix: str = ""):
        self.out_dir, self.prefix = output_folder(out_dir), prefix
        # after the highest number in use, as A1111 numbers them: a count would reuse a deleted file's number and
        # overwrite the images after it
        used = [int(m.group(1)) for p in self.out_dir.glob(f"{glob.escape(prefix)}*.png")
                if (m := re.match(re.escape(prefix) + r"(?:grid-)?(\d{5,})", p.name))]
        self.start = max(used, default=-1) + 1
        self.written: list[Generated] = []

    def add(self, batch: list[Generated]) -> list[Path]:
        first = self.start + len(self.written)
        paths = [r.save(self.out_dir / f"{self.prefix}{first + i:05d}-{r.seed}.png") for i, r in enumerate(batch)]
        self.written += batch
        return paths

    def finish(self) -> Path | None:
        if len(self.written) < 2:
            return None
        return save_png(grid([r.image for r in self.written]), self.out_dir / f"{self.prefix}grid-{self.start:05d}.png",
                        self.written[0].infotext)


def save_batch(results: list[Generated], out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Write each image as NNNNN-SEED.png (with infotext), plus grid-NNNNN.png when there are several."""
    writer = ImageWriter(out_dir, prefix)
    paths = writer.add(results)
    grid_path = writer.finish()
    return paths + ([grid_path] if grid_path else [])
