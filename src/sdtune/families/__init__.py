"""Model families as data: what sdtune needs to know about SD 1.x, SD 2.x and SDXL, in one place each.

Code asks the family (``base.family.text_encoders``, ``family.kohya_prefix``...) and never compares family
names. A family says:

- its components: the UNet's cross-attention width, and each text encoder with its width, its kohya LoRA
  prefix, its key in SDXL-style embedding files and its single-file prefix and naming;
- the diffusers configs shipped for offline loading (``configs/<name>/``);
- the single-file layout (LDM for SD 1.x/2.x, SGM for SDXL), the pipeline class and the prediction type;
- how prompts are encoded (which hidden layer, whether the pooled output and SDXL's size/crop time ids
  condition the UNet);
- the ``ss_base_model_version`` value kohya writes, and how kohya names UNet modules in LoRA keys.

Adding a family (an SD 1.x inpainting UNet, say) is one new ``Family`` in ``FAMILIES`` and its configs.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..tiny import config as tiny_config

CONFIGS = Path(__file__).parent / "configs"
# Each family's module table (see Family.modules), written by tools/module_tables.py from the configs above.
MODULES = Path(__file__).parent / "modules"
# The level transformers 4 (and CLIPTextModelWithProjection in 5) put around a CLIP text encoder's layers, which
# hub and single-file state dicts keep; transformers 5's CLIPTextModel drops it. Module tables go without it.
TEXT_MODEL = "text_model."


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family, with everything files name it by."""

    component: str  # attribute on Base and subfolder in a diffusers folder: "text_encoder", "text_encoder_2"
    tokenizer: str  # its tokenizer's attribute/subfolder: "tokenizer", "tokenizer_2"
    width: int  # hidden size: 768 CLIP ViT-L, 1024 OpenCLIP ViT-H, 1280 OpenCLIP ViT-bigG (64: the tiny model)
    kohya_prefix: str  # LoRA keys: "lora_te_" (one encoder) or "lora_te1_"/"lora_te2_" (SDXL)
    embedding_key: str  # key of its vectors in multi-encoder embedding files ("clip_l", "clip_g"); "" if alone
    single_file_prefix: str  # where its weights sit in a single-file checkpoint
    openclip: bool  # single-file weights in OpenCLIP naming (resblocks, in_proj) rather than transformers'
    model_class: str  # transformers class: "CLIPTextModel" or "CLIPTextModelWithProjection" (pooled output)
    hidden_layer: int  # hidden state the UNet sees: -1 the last (after the final norm), -2 the penultimate
    pad_token: str  # the tokenizer's padding: "<|endoftext|>" for OpenAI CLIP, "!" for OpenCLIP-trained ones
    pretrained_layers: int = 0  # OpenCLIP layers in single files when the diffusers model drops some (SD 2.x)


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2" | "sdxl" | "tiny" | "tiny-xl"
    title: str  # for messages: "SD 1.x"
    cross_attention_width: int  # what the UNet's attn2.to_k reads: the text features' width
    text_encoders: tuple[TextEncoder, ...]
    configs: str  # folder under families/configs ("" for the tiny models, whose configs are Python)
    single_file_layout: str  # "ldm" (SD 1.x/2.x) | "sgm" (SDXL: conditioner.embedders.N)
    pipeline: str  # diffusers pipeline class name
    scheduler: str  # diffusers scheduler class the published model ships with
    prediction_type: str  # what the UNet predicts by default: "epsilon" | "v_prediction"
    pooled_and_time_ids: bool  # SDXL: pooled text embedding + (original size, crop, target size) condition
    base_model_version: str  # kohya ss_base_model_version written for LoRAs of this family
    # ModelSpec's architecture id (modelspec.architecture, before "/lora"), as sd-scripts writes it
    modelspec: str
    # UNet module names in kohya LoRA keys: "diffusers" (``lora_unet_down_blocks_0_…``: sd-scripts trains SD 1.x/2.x
    # on diffusers' UNet) or "sgm" (``lora_unet_input_blocks_4_1_…``: it trains SDXL on its own SGM-layout UNet)
    kohya_unet_names: str = "diffusers"
    # ModelSpec's id for the family's v-prediction models where it names them apart (SD 2.x 768-v); "": modelspec
    modelspec_v: str = ""
    # A single-file weight whose spread tells this family's v-prediction models from its noise-prediction ones when
    # the file does not say which it is (see checkpoints.file_sampling); "" where the file must say.
    prediction_probe: str = ""
    # The UNet sample size of this family's noise-prediction models where the shipped config is another's (SD 2.x
    # ships 768-v's 96; its 512-px "base" models are 64): what a single file without sdtune's configs is given.
    epsilon_sample_size: int = 0
    # Well-known fine-tunes of this family, (a word in a model's file name, what it is): their LoRAs are made for
    # them (Pony's tags, Illustrious's danbooru prompts) and often draw poorly on the base model, so inspect says so.
    fine_tunes: tuple[tuple[str, str], ...] = ()

    def fine_tune_named(self, model_name: str) -> str | None:
        """The fine-tune ``model_name`` (a file name, as ``ss_sd_model_name`` keeps it) is, if a known one."""
        name = model_name.lower()
        return next((title for word, title in self.fine_tunes if word in name), None)

    @property
    def text_widths(self) -> tuple[int, ...]:
        return tuple(te.width for te in self.text_encoders)

    def text_encoder(self, component: str) -> TextEncoder:
        for te in self.text_encoders:
            if te.component == component:
                return te
        raise KeyError(f"{self.title} has no {component}")

    def modules(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """{component: {module path: weight shape}} of the UNet and text encoders, as diffusers and transformers
        build them from the shipped configs (text-encoder paths without ``text_model.``). Read from data
        (``modules/``), so that tools which only need names (inspect, convert) import neither library."""
        return _read_modules(self.name)

    def component_configs(self) -> dict[str, dict]:
        """The shipped diffusers/transformers config of each component (a fresh copy, safe to edit)."""
        return json.loads(json.dumps(_read_configs(self.name)))


def _clip_l(component="text_encoder", tokenizer="tokenizer", prefix="lora_te_", key="", single="", width=768,
            layer=-1) -> TextEncoder:
    return TextEncoder(component, tokenizer, width, prefix, key, single, openclip=False, model_class="CLIPTextModel",
                       hidden_layer=layer, pad_token="<|endoftext|>")


SD1 = Family(
    name="sd1", title="SD 1.x", cross_attention_width=768,
    text_encoders=(_clip_l(single="cond_stage_model.transformer."),),
    configs="sd1", single_file_layout="ldm", pipeline="StableDiffusionPipeline", scheduler="PNDMScheduler",
    prediction_type="epsilon", pooled_and_time_ids=False, base_model_version="sd_v1", modelspec="stable-diffusion-v1")

SD2 = Family(
    name="sd2", title="SD 2.x", cross_attention_width=1024,
    text_encoders=(TextEncoder("text_encoder", "tokenizer", 1024, "lora_te_", "", "cond_stage_model.model.",
                               openclip=True, model_class="CLIPTextModel", hidden_layer=-1, pad_token="!",
                               pretrained_layers=24),),
    configs="sd2", single_file_layout="ldm", pipeline="StableDiffusionPipeline", scheduler="DDIMScheduler",
    prediction_type="v_prediction",
    pooled_and_time_ids=False, base_model_version="sd_v2", modelspec="stable-diffusion-v2-512",
    modelspec_v="stable-diffusion-v2-768-v",
    # SD 2.x ships 768-v models and 512-px "base" ones with the same architecture; ComfyUI tells them apart by
    # this bias, whose standard deviation is above 0.09 in the v-prediction ones
    prediction_probe="model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias",
    epsilon_sample_size=64)

SDXL = Family(
    name="sdxl", title="SDXL", cross_attention_width=2048,
    text_encoders=(
        _clip_l(prefix="lora_te1_", key="clip_l", single="conditioner.embedders.0.transformer.", layer=-2),
        TextEncoder("text_encoder_2", "tokenizer_2", 1280, "lora_te2_", "clip_g", "conditioner.embedders.1.model.",
                    openclip=True, model_class="CLIPTextModelWithProjection", hidden_layer=-2, pad_token="!"),
    ),
    configs="sdxl", single_file_layout="sgm", pipeline="StableDiffusionXLPipeline", scheduler="EulerDiscreteScheduler",
    prediction_type="epsilon",
    pooled_and_time_ids=True, base_model_version="sdxl_base_v1-0", kohya_unet_names="sgm",
    modelspec="stable-diffusion-xl-v1-base",
    fine_tunes=(("pony", "Pony Diffusion"), ("noob", "NoobAI (an Illustrious fine-tune)"),
                ("illustrious", "Illustrious"), ("animagine", "Animagine XL")))

# The built-in tiny model: the SD 1.x architecture at small widths (see sdtune.tiny); its files use SD 1.x names.
TINY = Family(
    name="tiny", title="the built-in tiny model", cross_attention_width=tiny_config.TEXT_WIDTH,
    text_encoders=(_clip_l(single="cond_stage_model.transformer.", width=tiny_config.TEXT_WIDTH),),
    configs="", single_file_layout="ldm", pipeline="StableDiffusionPipeline", scheduler="DDIMScheduler",
    prediction_type="epsilon",
    # ModelSpec: its own id (SD 1.x's would send its LoRAs to SD 1.x models, whose widths they do not fit)
    pooled_and_time_ids=False, base_model_version="sd_v1", modelspec="sdtune-tiny")

# tiny-xl: the SDXL architecture at small widths (see sdtune.tiny.config), on tiny's VAE; its first text encoder is
# tiny's width (an embedding for one fits the other's clip_l).
TINY_XL = Family(
    name="tiny-xl", title="the built-in tiny SDXL model", cross_attention_width=tiny_config.XL_UNET["cross_attention_dim"],
    text_encoders=(
        _clip_l(prefix="lora_te1_", key="clip_l", single="conditioner.embedders.0.transformer.",
                width=tiny_config.TEXT_WIDTH, layer=-2),
        TextEncoder("text_encoder_2", "tokenizer_2", tiny_config.XL_TEXT_WIDTH_2, "lora_te2_", "clip_g",
                    "conditioner.embedders.1.model.", openclip=True, model_class="CLIPTextModelWithProjection",
                    hidden_layer=-2, pad_token="!"),
    ),
    configs="", single_file_layout="sgm", pipeline="StableDiffusionXLPipeline", scheduler="DDIMScheduler",
    prediction_type="epsilon", pooled_and_time_ids=True, base_model_version="sdxl_base_v1-0", kohya_unet_names="sgm",
    modelspec="sdtune-tiny-xl")

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL, TINY, TINY_XL)}
_TINY_ARCH = {"tiny": "sd1", "tiny-xl": "sdxl"}  # families whose configs are Python (sdtune.tiny.config)

# kohya's ss_base_model_version values (and the older ss_v2/ss_sdxl spellings) -> family.
_BASE_MODEL_VERSIONS = {"sd_v1": "sd1", "sd_v1_v": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2", "sd_v2_512": "sd2",
                        "sd_v2_768_v": "sd2",
                        "sdxl_base_v0-9": "sdxl", "sdxl_base_v1-0": "sdxl"}


def get(name: str) -> Family:
    return FAMILIES[name]


def by_cross_attention(width: int) -> Family | None:
    """The family whose UNet cross-attends to features of this width (768, 1024, 2048, or the tiny model's)."""
    return next((f for f in FAMILIES.values() if f.cross_attention_width == width), None)


def by_text_width(width: int) -> list[tuple[Family, TextEncoder]]:
    """Every (family, text encoder) whose token table is this wide: what an embedding of that width fits."""
    return [(f, te) for f in FAMILIES.values() for te in f.text_encoders if te.width == width]


def by_base_model_version(value: str | None) -> Family | None:
    """The family a kohya ``ss_base_model_version`` names (``sdxl_base_v1-0``...), or None if unknown."""
    if not value:
        return None
    name = _BASE_MODEL_VERSIONS.get(value) or ("sdxl" if value.startswith("sdxl") else None)
    return FAMILIES.get(name) if name else None


def kohya_clip_skip(family: Family, clip_skip: int) -> str:
    """A1111's clip skip as sd-scripts counts it (``ss_clip_skip``, ``modelspec.encoder_layer``): from the end of
    the encoder as diffusers stores it. That is A1111's count except on SD 2.x, whose stored encoder already lacks
    OpenCLIP's last layer (A1111's 2 is sd-scripts' 1, written "None" as when no skip is set)."""
    skip = clip_skip - (1 if family.text_encoders[0].pretrained_layers else 0)
    return str(skip) if skip > 1 else "None"


# ModelSpec's architecture names (modelspec.architecture, "stable-diffusion-xl-v1-base/lora" in a LoRA) by prefix
_MODELSPEC_ARCHITECTURES = (("stable-diffusion-xl-v1", "sdxl"), ("stable-diffusion-v2", "sd2"),
                            ("stable-diffusion-v1", "sd1"))


def by_modelspec_architecture(value: str | None) -> Family | None:
    """The family a ModelSpec ``modelspec.architecture`` names (SDXL's refiner and others: None)."""
    name = next((n for prefix, n in _MODELSPEC_ARCHITECTURES if (value or "").startswith(prefix)), None)
    return FAMILIES.get(name) if name and "refiner" not in value else None


# SDXL's refiner: the SDXL architecture reading OpenCLIP bigG's 1280-wide text only, an img2img model sdtune does
# not load; its cross-attention width names it in refusals (its checkpoints, its LoRAs).
SDXL_REFINER_CROSS_WIDTH = 1280


def describe_width(width: int) -> str:
    """What a text width belongs to, for messages: 768 -> "SD 1.x", 1280 -> "SDXL's text_encoder_2"."""
    owners = by_text_width(width)
    if not owners:
        return "an unknown model family"
    return " or ".join(f.title if len(f.text_encoders) == 1 else f"{f.title}'s {te.component}" for f, te in owners)


@cache
def _read_configs(name: str) -> dict[str, dict]:
    family = FAMILIES[name]
    if not family.configs:
        return tiny_config.configs(_TINY_ARCH[name])
    folder = CONFIGS / family.configs
    parts = ["unet", "vae", "scheduler", *(te.component for te in family.text_encoders)]
    return {part: _without_private(json.loads((folder / f"{part}.json").read_text())) for part in parts}


def _without_private(config: dict) -> dict:
    """Drop diffusers' bookkeeping keys ("_class_name", "_diffusers_version"): not constructor arguments."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@cache
def _read_modules(name: str) -> dict[str, dict[str, tuple[int, ...]]]:
    with gzip.open(MODULES / f"{name}.json.gz", "rt") as f:
        table = json.load(f)
    return {c: {path: tuple(shape) for path, shape in paths.items()} for c, paths in table.items()}
