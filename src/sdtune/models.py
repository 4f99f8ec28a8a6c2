"""Base models: load SD 1.x (built-in tiny, random SD 1.5, diffusers folder, single file, hub id), save them back.

Everything here works offline except a hub id: single files are read through ``safeio`` (no unpickling of
code), split with ``ldm`` into components built from the configs shipped in ``sdtune/configs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import huggingface_hub
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as tf_logging

from . import ldm
from .lora.patch import LoraSet
from .safeio import SdtuneError, atomic_folder, atomic_save_safetensors, atomic_write_text, load_state
from .ti.tokens import EmbeddingSet
from .tiny import config as tiny_config
from .tiny import model as tiny_model

CONFIGS = Path(__file__).parent / "configs"
SD15 = CONFIGS / "sd15"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
META_SCALING = "sdtune.vae_scaling_factor"
META_ARCH = "sdtune.architecture"


@dataclass
class Base:
    """A loaded SD 1.x base model: its components and where it came from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    name: str  # the spec as given
    source: str  # tiny | tiny-random | sd15-random | diffusers | single-file | hub
    single_file: Path | None
    model_hash: str  # A1111-style short hash (10 hex)
    architecture: str = field(default="sd15")  # tiny | sd15

    def to(self, device=None, dtype=None) -> Base:
        device = self.device if device is None else pick_device(device)
        dtype = self.dtype if dtype is None else pick_dtype(device, dtype)
        for module in (self.unet, self.vae, self.text_encoder):
            _move(module, device, dtype)
        self.device, self.dtype = device, dtype
        return self

    @property
    def loras(self) -> LoraSet:
        """The named LoRAs merged into this model (``sdtune.lora.patch.LoraSet``), created on first use."""
        return LoraSet.attach(self)

    @property
    def embeddings(self) -> EmbeddingSet:
        """The TI embeddings loaded into this model (``sdtune.ti.tokens.EmbeddingSet``), created on first use."""
        if "_embeddings" not in self.__dict__:
            self.__dict__["_embeddings"] = EmbeddingSet(self.tokenizer, self.text_encoder)
        return self.__dict__["_embeddings"]

    def pipeline(self, scheduler=None) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler if scheduler is not None else self.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ---------------------------------------------------------------- device and dtype

def pick_device(name=None) -> torch.device:
    """``None``/"auto": CUDA, then MPS, then CPU; otherwise the named device, if this machine has it."""
    if isinstance(name, torch.device):
        name = str(name)
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SdtuneError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdtuneError(f"device {name!r}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SdtuneError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SdtuneError(f"device {name!r}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SdtuneError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(device, name=None) -> torch.dtype:
    """``None``/"auto": fp16 on CUDA and MPS, fp32 on CPU; otherwise fp32, fp16 or bf16."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise SdtuneError(f"unsupported dtype {name}; use fp32, fp16 or bf16")
        return name
    if name in (None, "", "auto"):
        return torch.float16 if torch.device(device).type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise SdtuneError(f"unknown dtype {name!r}; use fp32, fp16 or bf16")
    return DTYPES[name]


# ---------------------------------------------------------------- hashes

def _cache_file() -> Path:
    root = os.environ.get("SDTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdtune")
    return Path(root) / "hashes.json"


CACHE_MIN_BYTES = 64 << 20  # smaller files hash faster than the cache is read


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file; for big files remembered across runs by (path, size, mtime): SD files are gigabytes."""
    path = Path(path).resolve()
    stat = path.stat()
    if stat.st_size < CACHE_MIN_BYTES:
        return _sha256(path)
    stamp = [stat.st_size, stat.st_mtime_ns]
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(path))
    if isinstance(hit, dict) and hit.get("stamp") == stamp:
        return hit["sha256"]
    sha = _sha256(path)
    cache = {k: v for k, v in cache.items() if Path(k).exists()}  # forget deleted files
    cache[str(path)] = {"stamp": stamp, "sha256": sha}
    try:
        atomic_write_text(json.dumps(cache), cache_file)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return sha


def _files_hash(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(f"{f.relative_to(root).as_posix()}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()[:10]


def _weights_hash(*modules) -> str:
    """Hash of the weights themselves (fp32 bytes), for models that have no file."""
    digest = hashlib.sha256()
    for module in modules:
        for key, value in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:10]


# ---------------------------------------------------------------- configs and construction

def _read_json(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def sd15_configs() -> dict:
    """The shipped SD 1.5 component configs."""
    return {part: _read_json(SD15 / f"{part}.json") for part in ("unet", "vae", "text_encoder", "scheduler")}


def tiny_configs() -> dict:
    return {"unet": dict(tiny_config.UNET), "vae": dict(tiny_config.VAE, scaling_factor=1.0),
            "text_encoder": dict(tiny_config.TEXT_ENCODER), "scheduler": dict(tiny_config.SCHEDULER)}


def _scheduler(architecture: str):
    if architecture == "tiny":
        return DDIMScheduler(**tiny_config.SCHEDULER)
    return PNDMScheduler.from_config(_read_json(SD15 / "scheduler.json"))


def build_components(configs: dict) -> tuple:
    """(unet, vae, text_encoder) built from config dicts (random init; use under init_empty_weights for shapes)."""
    text_config = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    return (UNet2DConditionModel(**configs["unet"]), AutoencoderKL(**configs["vae"]),
            CLIPTextModel(CLIPTextConfig(**text_config)))


def _move(module: torch.nn.Module, device, dtype) -> None:
    # diffusers' ModelMixin.to warns about fp32-only modules even when there are none; plain Module.to
    # does the same move quietly.
    torch.nn.Module.to(module, device=device, dtype=dtype)


@contextmanager
def _quiet_progress():
    """No per-component "Loading weights"/"Writing model shards" bars from transformers."""
    was_enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tf_logging.enable_progress_bar()




def _finish(unet, vae, text_encoder, scheduler, device, dtype, **info) -> Base:
    for module in (unet, vae, text_encoder):
        _move(module, device, dtype)
        module.eval()
    return Base(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_model.tokenizer(),
                scheduler=scheduler, device=device, dtype=dtype, **info)


# ---------------------------------------------------------------- sources

def _load_tiny(spec: str, device, dtype, folder: Path = tiny_model.WEIGHTS) -> Base:
    """The built-in model; ``folder`` may be another export of its recipe (``runs/tiny/model``)."""
    parts = tiny_model.build(seed=0) if spec == "tiny-random" else tiny_model.load(folder)
    trained = spec != "tiny-random" and tiny_model.trained_weights_exist(folder)
    if trained:
        files = [folder / f"{c}.safetensors" for c in tiny_model.COMPONENTS]
        model_hash = _files_hash(files, folder)
    else:
        model_hash = _weights_hash(parts["unet"], parts["vae"], parts["text_encoder"])
    return _finish(parts["unet"], parts["vae"], parts["text_encoder"], parts["scheduler"], device, dtype,
                   name=spec, source="tiny" if trained else "tiny-random",
                   single_file=None, model_hash=model_hash, architecture="tiny")


def _load_sd15_random(spec: str, device, dtype) -> Base:
    configs = sd15_configs()
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it will run: ~1B parameters are slow to init on CPU
        unet, vae, text_encoder = build_components(configs)
    # Random init is fully determined by the config and the seed; hashing 4 GB of noise would only cost time.
    model_hash = hashlib.sha256((json.dumps(configs, sort_keys=True) + "seed=0").encode()).hexdigest()[:10]
    return _finish(unet, vae, text_encoder, _scheduler("sd15"), device, dtype, name=spec, source=spec,
                   single_file=None, model_hash=model_hash, architecture="sd15")


# (conv_in width, cross-attention width) of the SD 1.x architectures sdtune knows.
KNOWN_SHAPES = {(320, 768): "sd15", (tiny_config.UNET["block_out_channels"][0], tiny_config.TEXT_WIDTH): "tiny"}


def detect_architecture(state: dict, path: Path) -> str:
    """"sd15" or "tiny" from the tensor shapes of an LDM single-file checkpoint; anything else is refused."""
    keys = list(state)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SdtuneError(f"{path}: this is an SDXL checkpoint; sdtune works with SD 1.x models (e.g. SD 1.5)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise SdtuneError(f"{path}: this is an SD 2.x checkpoint (OpenCLIP text encoder); sdtune works with SD 1.x")
    if not any(k.startswith(ldm.UNET_PREFIX) for k in keys):
        if any("lora_" in k or ".lora_A" in k or ".alpha" in k for k in keys):
            raise SdtuneError(f"{path}: this is a LoRA/adapter file, not a base model; pass a full SD 1.x checkpoint")
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
            raise SdtuneError(f"{path}: this is a bare diffusers UNet, not a full SD 1.x checkpoint; "
                              "pass a single-file checkpoint or a diffusers folder")
        raise SdtuneError(f"{path}: no Stable Diffusion UNet weights (model.diffusion_model.*) in this file; "
                          "pass an SD 1.x checkpoint")
    conv_in = state.get(ldm.UNET_PREFIX + "input_blocks.0.0.weight")
    cross = next((v for k, v in state.items() if k.startswith(ldm.UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
                 None)
    if conv_in is None or cross is None or conv_in.ndim != 4 or cross.ndim != 2:
        raise SdtuneError(f"{path}: the UNet weights are incomplete (no conv_in or cross-attention); "
                          "the file is damaged or not an SD 1.x checkpoint")
    width = cross.shape[1]
    if width == 2048:
        raise SdtuneError(f"{path}: cross-attention width 2048 means SDXL; sdtune works with SD 1.x models")
    if width == 1024:
        raise SdtuneError(f"{path}: cross-attention width 1024 means SD 2.x; sdtune works with SD 1.x models")
    if conv_in.shape[1] != 4:
        raise SdtuneError(f"{path}: the UNet takes {conv_in.shape[1]} input channels (an inpainting or "
                          "instruct-pix2pix model); sdtune works with plain text-to-image SD 1.x models")
    arch = KNOWN_SHAPES.get((conv_in.shape[0], width))
    if arch is None:
        raise SdtuneError(f"{path}: unknown UNet shape (width {conv_in.shape[0]}, cross-attention {width}); "
                          "sdtune works with SD 1.x models")
    return arch


def _unwrap(obj, path: Path) -> dict:
    """The tensor dict of a checkpoint (.ckpt files nest it under "state_dict")."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise SdtuneError(f"{path}: holds no weight dictionary; pass an SD 1.x checkpoint")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _place(tensors: dict, device, dtype) -> None:
    """Move/cast tensors in place, and copy any that are not 64-byte aligned: tensors read from a
    safetensors buffer can sit at odd offsets, which makes CPU kernels take other (slower, and not
    bit-identical) paths than for the same weights in freshly allocated memory."""
    for key in list(tensors):
        value = tensors[key]
        value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        tensors[key] = value.clone() if value.data_ptr() % 64 else value


def _load_single_file(spec: str, path: Path, device, dtype) -> Base:
    raw, metadata = load_state(path)
    state = _unwrap(raw, path)
    arch = metadata.get(META_ARCH) if metadata.get(META_ARCH) in ("tiny", "sd15") else None
    arch = detect_architecture(state, path) if arch is None else arch
    configs = tiny_configs() if arch == "tiny" else sd15_configs()
    try:
        parts = ldm.split_ldm_state_dict(state, configs["unet"], configs["vae"])
    except SdtuneError as e:
        raise SdtuneError(f"{path}: {e}") from None
    for part, prefix in (("vae", ldm.VAE_PREFIX), ("text_encoder", "cond_stage_model.transformer.")):
        if not parts[part]:
            raise SdtuneError(f"{path}: has no {part.replace('_', ' ')} weights ({prefix}*); "
                              "pass a full SD 1.x checkpoint that includes them")
    if META_SCALING in metadata:
        configs["vae"]["scaling_factor"] = float(metadata[META_SCALING])
    del raw, state  # from here on each tensor is referenced once, so _place can free as it goes
    with init_empty_weights():  # no random init: the file fills every parameter
        unet, vae, text_encoder = build_components(configs)
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        _place(parts[part], device, dtype)
        try:
            module.load_state_dict(parts[part], strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise SdtuneError(f"{path}: the {part} weights do not fit the {arch} architecture ({detail}); "
                              "the file is damaged or not an SD 1.x checkpoint") from None
    return _finish(unet, vae, text_encoder, _scheduler(arch), device, dtype, name=spec, source="single-file",
                   single_file=path, model_hash=file_sha256(path)[:10], architecture=arch)


def _load_folder(spec: str, folder: Path, device, dtype, source: str = "diffusers") -> Base:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise SdtuneError(f"{folder}: not a diffusers model folder (no model_index.json); "
                          "pass a diffusers folder or a .safetensors checkpoint")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise SdtuneError(f"{index_file}: unreadable ({e}); re-download or re-export the model") from None
    pipeline = index.get("_class_name", "")
    if "XL" in pipeline or "text_encoder_2" in index:
        raise SdtuneError(f"{folder}: this is an SDXL model ({pipeline}); sdtune works with SD 1.x models")
    try:
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SdtuneError(f"{folder}: no readable unet/config.json ({e}); re-download or re-export the model") from None
    width = unet_config.get("cross_attention_dim")
    if width in (1024, 2048) or unet_config.get("addition_embed_type") is not None:
        raise SdtuneError(f"{folder}: cross-attention width {width} is not SD 1.x (it is SD 2.x or SDXL); "
                          "sdtune works with SD 1.x models")
    try:
        with _quiet_progress():
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        scheduler_class = (index.get("scheduler") or [None, "DDIMScheduler"])[1]
        scheduler = getattr(diffusers, scheduler_class).from_pretrained(folder, subfolder="scheduler")
    except Exception as e:  # noqa: BLE001 - any loader failure is a damaged or incomplete folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise SdtuneError(f"{folder}: cannot load the diffusers model ({first}); re-download or re-export it") from None
    arch = KNOWN_SHAPES.get((unet.config.block_out_channels[0], width), "sd15")
    files = [f for c in ("unet", "vae", "text_encoder") for f in (folder / c).glob("*") if f.suffix in WEIGHT_SUFFIXES]
    base = _finish(unet, vae, text_encoder, scheduler, device, dtype, name=spec, source=source, single_file=None,
                   model_hash=_files_hash(files, folder), architecture=arch)
    if (folder / "tokenizer" / "vocab.json").is_file():
        base.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return base


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


HUB_FILES = ["model_index.json", "scheduler/*.json", "tokenizer/*", "unet/config.json", "vae/config.json",
             "text_encoder/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]


def _load_hub(spec: str, device, dtype) -> Base:
    offline = _hub_offline()
    unreachable = (f"{spec}: not a local file or folder, and the Hugging Face hub is unreachable"
                   f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; download the model and pass its local "
                   "diffusers folder or .safetensors file")
    try:
        folder = huggingface_hub.snapshot_download(spec, allow_patterns=HUB_FILES, local_files_only=offline)
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
        raise SdtuneError(f"{spec}: no such model on the Hugging Face hub (or it is gated); "
                          "check the id, or pass a local path") from None
    except Exception:  # noqa: BLE001 - connection, DNS, timeout, offline mode: all mean "unreachable"
        raise SdtuneError(unreachable) from None
    return _load_folder(spec, Path(folder), device, dtype, source="hub")


def load_base(spec: str = "tiny", device=None, dtype=None) -> Base:
    """Load an SD 1.x base model.

    ``spec``: "tiny" (built-in; random init until trained weights ship), "tiny-random", "sd15-random"
    (random init of the real SD 1.5 architecture), a diffusers folder, a single-file checkpoint
    (.safetensors; .ckpt/.pt through the safe loader), or a hub id. ``device``/``dtype`` default to
    ``pick_device()``/``pick_dtype()``.
    """
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    spec = str(spec)
    if spec in ("tiny", "tiny-random"):
        return _load_tiny(spec, device, dtype)
    if spec == "sd15-random":
        return _load_sd15_random(spec, device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir() and tiny_model.trained_weights_exist(path):  # an export of the tiny recipe
        return _load_tiny(spec, device, dtype, path)
    if path.is_dir():
        return _load_folder(spec, path, device, dtype)
    if path.is_file():
        return _load_single_file(spec, path, device, dtype)
    if HUB_ID.match(spec) and not spec.lower().endswith(WEIGHT_SUFFIXES):
        return _load_hub(spec, device, dtype)
    raise SdtuneError(f"{spec}: no such file or folder; pass tiny, a diffusers folder, a .safetensors "
                      "checkpoint or a hub id")


# ---------------------------------------------------------------- saving

def save_single_file(base: Base, path, dtype=None) -> Path:
    """Write the model as one original-LDM-layout .safetensors file (A1111/ComfyUI/kohya read it)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SdtuneError(f"{path}: single-file models are written as .safetensors; use that suffix")
    dtype = None if dtype is None else pick_dtype("cpu", dtype)
    state = {}
    for key, value in ldm.to_ldm_state_dict(base.unet, base.vae, base.text_encoder).items():
        value = value.detach().to("cpu")
        state[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    metadata = {"format": "pt", META_ARCH: base.architecture, META_SCALING: repr(float(base.vae.config.scaling_factor))}
    atomic_save_safetensors(state, path, metadata=metadata)
    return path


def save_diffusers(base: Base, folder) -> Path:
    """Write the model as a diffusers folder; an existing folder at that path is replaced only on success."""
    folder = Path(folder)
    if folder.exists() and not (folder / "model_index.json").is_file() and any(folder.iterdir()):
        raise SdtuneError(f"{folder}: exists and is not a diffusers model folder; choose a new or empty folder")
    with atomic_folder(folder) as tmp, _quiet_progress():
        base.pipeline().save_pretrained(tmp, safe_serialization=True)
    return folder
