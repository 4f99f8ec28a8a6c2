"""Base models of every family: load one (the built-in tiny ones, random-init ones, a diffusers folder, a single
file, a hub id) as a ``Base``, and save it back.

Everything here works offline except a hub id: single files are read through ``safeio`` (no unpickling of
code), their family and sampling told by ``checkpoints``, and split with ``ldm`` into components built from the
family's shipped configs (``families``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import diffusers
import huggingface_hub
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as tf_logging

from . import families, ldm
from .checkpoints import (
    META_ARCH,
    META_CONFIGS,
    META_SCALING,
    V_PRED,
    ZTSNR,
    as_loaded,
    detect_family,
    family_from_metadata,
    file_configs,
    folder_family,
    folder_index,
    unwrap,
    weights_variant,
)
from .families import Family, TextEncoder
from .families.build import TEXT_CLASSES, build_parts
from .lora.hashes import file_sha256
from .lora.patch import LoraSet
from .model_names import RANDOM_SPECS, TINY_SPECS, tiny_export
from .safeio import (
    SdtuneError,
    atomic_folder,
    atomic_save_safetensors,
    atomic_write_text,
    input_path,
    is_safetensors,
    load_state,
)
from .ti.tokens import EmbeddingSet
from .tiny import files as tiny_files
from .tiny import model as tiny_model

SD15 = families.CONFIGS / families.SD1.configs
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# torch's CPU kernels split their work one way in the state a process starts in, and another way (other last
# bits) once anything calls torch.set_num_threads, even with the same count, as the LoRA patcher and the bake
# do for their worker threads. A training run after them came out different in the last bits from the same run
# before them. Set once here, on import, every computation of a process runs in the one state.
torch.set_num_threads(torch.get_num_threads())


@dataclass
class Base:
    """A loaded base model of any family: its components, its family, and where it came from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    name: str  # the spec as given
    source: str  # tiny | tiny-xl | tiny(-xl)-random | <family>-random | diffusers | single-file | hub
    single_file: Path | None
    model_hash: str  # A1111-style short hash (10 hex)
    family: Family = families.SD1
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's second text encoder (OpenCLIP bigG)
    tokenizer_2: CLIPTokenizer | None = None
    vae_file: Path | None = None  # the weights of a VAE put in place of the model's own (use_vae) ...
    vae_name: str = ""  # ... which images name (the file, or the folder it came as) ...
    vae_hash: str = ""  # ... with its short hash, as A1111's "VAE hash"

    def text_encoders(self) -> list[tuple[TextEncoder, torch.nn.Module, CLIPTokenizer]]:
        """(description, model, tokenizer) of each text encoder, in the family's order."""
        return [(te, getattr(self, te.component), getattr(self, te.tokenizer)) for te in self.family.text_encoders]

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every weighted component by its diffusers name: unet, vae, text_encoder (, text_encoder_2)."""
        return {"unet": self.unet, "vae": self.vae, **{te.component: m for te, m, _ in self.text_encoders()}}

    def to(self, device=None, dtype=None) -> Base:
        device = self.device if device is None else pick_device(device)
        dtype = self.dtype if dtype is None else pick_dtype(device, dtype)
        for module in self.modules().values():
            _move(module, device, dtype)
        self.device, self.dtype = device, dtype
        return self

    @property
    def loras(self) -> LoraSet:
        """The named LoRAs merged into this model (``sdtune.lora.patch.LoraSet``), created on first use. The
        embeddings a LoRA file bundles are loaded into ``embeddings`` with it, and unloaded with it."""
        return LoraSet.attach(self)

    @property
    def embeddings(self) -> EmbeddingSet:
        """The TI embeddings loaded into this model (``sdtune.ti.tokens.EmbeddingSet``) over every text encoder
        of its family (SDXL: both), created on first use."""
        if "_embeddings" not in self.__dict__:
            self.__dict__["_embeddings"] = EmbeddingSet.for_base(self)
        return self.__dict__["_embeddings"]

    def pipeline(self, scheduler=None):
        """The family's diffusers pipeline over these very modules (nothing is copied)."""
        cls = getattr(diffusers, self.family.pipeline)
        parts = {**self.modules(), **{te.tokenizer: tok for te, _, tok in self.text_encoders()},
                 "scheduler": scheduler if scheduler is not None else self.scheduler}
        # SD 1.x/2.x pipelines also take a safety checker, which sdtune never loads
        optional = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**parts, **{k: v for k, v in optional.items() if k in accepted})


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

def make_scheduler(family: Family, config: dict):
    """The family's own scheduler class from a config dict."""
    return getattr(diffusers, family.scheduler).from_config(config)


def tokenizer_for(te: TextEncoder) -> CLIPTokenizer:
    """The CLIP BPE tokenizer shipped with sdtune, padded as this text encoder was trained."""
    return CLIPTokenizer.from_pretrained(tiny_files.TOKENIZER, pad_token=te.pad_token)


def _move(module: torch.nn.Module, device, dtype) -> None:
    # diffusers' ModelMixin.to warns about fp32-only modules even when there are none; plain Module.to
    # does the same move quietly.
    torch.nn.Module.to(module, device=device, dtype=dtype)


@contextmanager
def quiet_progress():
    """No per-component "Loading weights"/"Writing model shards" bars from transformers."""
    was_enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tf_logging.enable_progress_bar()




def _finish(parts: dict, scheduler, device, dtype, family: Family, tokenizers: dict | None = None, **info) -> Base:
    for module in parts.values():
        _move(module, device, dtype)
        module.eval()
    tokenizers = tokenizers or {te.tokenizer: tokenizer_for(te) for te in family.text_encoders}
    return Base(**parts, **tokenizers, scheduler=scheduler, device=device, dtype=dtype, family=family, **info)


# ---------------------------------------------------------------- sources

def _load_tiny(spec: str, device, dtype, folder: Path | None = None) -> Base:
    """A built-in model; ``folder`` may be another export of its recipe (``runs/tiny/model``,
    ``runs/tiny-xl/model``)."""
    xl, trained = TINY_SPECS.get(spec, (folder is not None and tiny_files.is_xl_export(folder), True))
    folder = folder or (tiny_files.XL_WEIGHTS if xl else tiny_files.WEIGHTS)
    build, load = (tiny_model.build_xl, tiny_model.load_xl) if xl else (tiny_model.build, tiny_model.load)
    files = tiny_files.weight_files(folder, xl)
    trained = trained and all(f.is_file() for f in files)
    parts = load(folder) if trained else build(seed=0)
    scheduler = parts.pop("scheduler")
    tokenizers = {"tokenizer": parts.pop("tokenizer")} if "tokenizer" in parts else None
    # Each file by its own folder's path: an export of tiny-xl hashes as the shipped one when its files are.
    model_hash = (hashlib.sha256("".join(_files_hash([f], f.parent) for f in files).encode()).hexdigest()[:10]
                  if xl and trained else _files_hash(files, folder) if trained else _weights_hash(*parts.values()))
    family = families.TINY_XL if xl else families.TINY
    return _finish(parts, scheduler, device, dtype, family, tokenizers, name=spec,
                   source=("tiny-xl" if xl else "tiny") + ("" if trained else "-random"), single_file=None,
                   model_hash=model_hash)


def _load_random(spec: str, device, dtype) -> Base:
    family, make_configs = RANDOM_SPECS[spec]
    configs = make_configs() if make_configs else family.component_configs()
    torch.manual_seed(0)
    # Initialise where it will run and in the dtype it will run in: SDXL is 3.5 B parameters, slow to draw
    # on a CPU and 14 GB in fp32.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            parts = build_parts(family, configs)
    finally:
        torch.set_default_dtype(default)
    # Random init is fully determined by the config and the seed; hashing gigabytes of noise would only cost time.
    model_hash = hashlib.sha256((json.dumps(configs, sort_keys=True) + "seed=0").encode()).hexdigest()[:10]
    return _finish(parts, make_scheduler(family, configs["scheduler"]), device, dtype, family, name=spec,
                   source=spec, single_file=None, model_hash=model_hash)


def _place(tensors: dict, device, dtype) -> None:
    """Move/cast tensors in place, and copy any that are not 64-byte aligned: tensors read from a
    safetensors buffer can sit at odd offsets, which makes CPU kernels take other (slower, and not
    bit-identical) paths than for the same weights in freshly allocated memory."""
    for key in list(tensors):
        value = tensors[key]
        value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        tensors[key] = value.clone() if value.data_ptr() % 64 else value


def _load_single_file(spec: str, path: Path, device, dtype, vae=None) -> Base:
    """``vae``: the --vae that will decode, which stands in for the VAE a "no VAE" checkpoint leaves out (as A1111's
    and ComfyUI's VAE choice does)."""
    # For a GPU each tensor goes from a mapping of the file straight to the device; for the CPU it is read into its
    # own aligned memory, the file held once (a mapping kept beside the copies held it twice). A .ckpt is read
    # whole: torch maps only its newer zip form
    raw, metadata = load_state(path, mmap=device.type != "cpu" and is_safetensors(path))
    state = unwrap(raw, path)
    family = family_from_metadata(metadata) or detect_family(state, path)
    configs = file_configs(family, metadata, path, keys=state.keys(), probe=state.get(family.prediction_probe))
    with init_empty_weights():  # no random init: the file fills every parameter
        modules = build_parts(family, configs)
    try:
        parts = ldm.split_single_file(state, family, modules, optional=("vae",) if vae else ())
    except SdtuneError as e:
        raise SdtuneError(f"{path}: {e}") from None
    del raw, state  # from here on each tensor is referenced once, so _place can free as it goes
    info = {}
    if not parts["vae"]:
        modules["vae"], info = _vae_from(vae, configs["vae"], family, device, dtype)
        del parts["vae"]
    for part in parts:
        module = modules[part]
        _place(parts[part], device, dtype)
        try:
            module.load_state_dict(parts[part], strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise SdtuneError(f"{path}: the {part} weights do not fit the architecture of {family.title} "
                              f"({detail}); the file is damaged or not a checkpoint of {family.title}") from None
    return _finish(modules, make_scheduler(family, configs["scheduler"]), device, dtype, family, name=spec,
                   source="single-file", single_file=path, model_hash=file_sha256(path)[:10], **info)


def _load_folder(spec: str, folder: Path, device, dtype, source: str = "diffusers") -> Base:
    index = folder_index(folder)
    family = folder_family(folder, index)
    components = ["unet", "vae", *(te.component for te in family.text_encoders)]
    missing = [c for c in components if not (folder / c / "config.json").is_file()]
    if missing:  # said by its name (the loaders' own messages read as a hub error or name no component)
        raise SdtuneError(f"{folder}: no {missing[0]}/config.json, so the {missing[0]} is missing; re-download or "
                          f"re-export the whole model folder")
    variant = {c: weights_variant(folder / c) for c in components}
    try:
        # Read straight into the dtype asked for: loading in fp32 and casting after would hold an fp32 copy
        # (an SDXL folder in bf16: 15 GB of RAM at the peak instead of 7.5).
        with quiet_progress():
            parts = {c: cls.from_pretrained(folder, subfolder=c, torch_dtype=dtype, variant=variant[c])
                     for c, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL))}
            for te in family.text_encoders:
                parts[te.component] = TEXT_CLASSES[te.model_class].from_pretrained(
                    folder / te.component, dtype=dtype, variant=variant[te.component])
        scheduler_class = (index.get("scheduler") or [None, family.scheduler])[1]
        scheduler = getattr(diffusers, scheduler_class).from_pretrained(folder, subfolder="scheduler")
    except Exception as e:  # noqa: BLE001 - any loader failure is a damaged or incomplete folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise SdtuneError(f"{folder}: cannot load the diffusers model ({first}); re-download or re-export it") from None
    family = as_loaded(family)
    tokenizers = {te.tokenizer: CLIPTokenizer.from_pretrained(folder / te.tokenizer)
                  if (folder / te.tokenizer / "vocab.json").is_file() else tokenizer_for(te)
                  for te in family.text_encoders}
    files = [f for c in parts for f in (folder / c).glob("*") if f.suffix in WEIGHT_SUFFIXES]
    return _finish(parts, scheduler, device, dtype, family, tokenizers, name=spec, source=source, single_file=None,
                   model_hash=_files_hash(files, folder))


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


def load_base(spec: str = "tiny", device=None, dtype=None, vae=None) -> Base:
    """Load a base model of any family (SD 1.x, SD 2.x, SDXL); the family is read from the files.

    ``spec``: "tiny" or "tiny-xl" (built-in), "tiny-random", "tiny-xl-random", a random-init real architecture
    ("sd15-random", "sd2-random", "sdxl-random", or "sd1-small-random"/"sdxl-small-random": the family's structure
    and names at small widths), a diffusers folder,
    a single-file checkpoint (.safetensors; .ckpt/.pt through the safe loader), or a hub id.
    ``device``/``dtype`` default to ``pick_device()``/``pick_dtype()``.
    ``vae``: a VAE file or folder to decode with in place of the model's own (``use_vae``), or of none: a "no VAE"
    single file loads only with one, as in A1111 and ComfyUI.
    """
    if vae is not None:  # before the model loads
        input_path(vae, "VAE file or folder", "--vae")
    base = _load_any(spec, device, dtype, vae)
    return use_vae(base, vae) if vae and base.vae_file is None else base


def _load_any(spec: str, device, dtype, vae) -> Base:
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    spec = str(spec)
    if spec in TINY_SPECS:
        return _load_tiny(spec, device, dtype)
    if spec in RANDOM_SPECS:
        return _load_random(spec, device, dtype)
    path = Path(spec).expanduser()
    if tiny_export(path):
        return _load_tiny(spec, device, dtype, path)  # an export of the tiny recipe
    if path.is_dir():
        return _load_folder(spec, path, device, dtype)
    if path.is_file():
        return _load_single_file(spec, path, device, dtype, vae)
    if HUB_ID.match(spec) and not spec.lower().endswith(WEIGHT_SUFFIXES):
        return _load_hub(spec, device, dtype)
    raise SdtuneError(f"{spec}: no such file or folder; pass tiny, tiny-xl, a diffusers folder, a .safetensors "
                      "checkpoint or a hub id")


VAE_FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")


def use_vae(base: Base, spec: str | Path) -> Base:
    """Put the VAE of ``spec`` in place of ``base``'s, as A1111's "SD VAE" setting and ComfyUI's Load VAE do: a VAE
    file (.safetensors, or .ckpt/.pt read without running code; LDM names as A1111's VAE files have them, with or
    without ``first_stage_model.``, or diffusers' names) or a diffusers VAE folder. It is built in the family's VAE
    architecture and keeps the family's latent scaling, which a VAE file does not state."""
    # without diffusers' bookkeeping: its "_use_default_values" would reset a scaling factor set after construction
    config = {k: v for k, v in base.vae.config.items() if not k.startswith("_")}
    base.vae, info = _vae_from(spec, config, base.family, base.device, base.dtype)
    for field, value in info.items():
        setattr(base, field, value)
    return base


def _vae_from(spec: str | Path, config: dict, family: Family, device, dtype) -> tuple[AutoencoderKL, dict]:
    """The VAE of ``spec`` built in ``config``, and the Base fields that name it (file, name, hash)."""
    weights = vae_weights(spec)
    raw, _ = load_state(weights)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    try:
        state = ldm.read_vae(unwrap(raw, weights), vae)
        _place(state, device, dtype)
        vae.load_state_dict(state, strict=True, assign=True)
    except SdtuneError as e:
        raise SdtuneError(f"{weights}: {e}; pass a VAE made for {family.title}") from None
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise SdtuneError(f"{weights}: does not fit the VAE of {family.title} ({detail}); pass a VAE made for "
                          f"{family.title}") from None
    # the name: the file, or the folder it came as
    return vae.eval(), {"vae_file": weights, "vae_name": Path(spec).name, "vae_hash": file_sha256(weights)[:10]}


def vae_weights(spec: str | Path) -> Path:
    """The weights file of a --vae: the file itself, or the one in a diffusers VAE folder (or a model folder's vae/)."""
    path = input_path(spec, "VAE file or folder", "--vae")
    if not path.is_dir():
        return path
    weights = next((path / name for name in VAE_FOLDER_FILES if (path / name).is_file()), None)
    if weights is None:
        raise SdtuneError(f"{path}: no diffusion_pytorch_model.safetensors in this folder or its vae/; pass a VAE "
                          f"file or a diffusers VAE folder")
    return weights


@contextmanager
def vae_swapped(base: Base, spec: str | Path | None):
    """``base`` with the VAE of ``spec`` (``use_vae``) for the duration, and its own back afterwards, so that a
    training run's VAE does not stay on a model the next run (a queue, the web UI) shares; none: unchanged."""
    if not spec:
        yield base
        return
    own = base.vae, base.vae_file, base.vae_name, base.vae_hash
    use_vae(base, spec)
    try:
        yield base
    finally:
        base.vae, base.vae_file, base.vae_name, base.vae_hash = own


# ---------------------------------------------------------------- saving

def _component_configs(base: Base) -> dict:
    """The config of each component (and the scheduler) as build_parts/make_scheduler take them back."""
    configs = {"unet": dict(base.unet.config), "vae": dict(base.vae.config), "scheduler": dict(base.scheduler.config)}
    for te, module, _ in base.text_encoders():
        configs[te.component] = module.config.to_diff_dict()
    # diffusers' bookkeeping ("_use_default_values") and transformers' version stamp are no constructor arguments
    return {name: {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
            for name, config in configs.items()}


def save_single_file(base: Base, path, dtype=None, metadata: dict | None = None) -> Path:
    """Write the model as one .safetensors file in its family's original layout (LDM for SD 1.x/2.x, SGM for
    SDXL), which A1111, ComfyUI and kohya read; ``metadata``: entries to add."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SdtuneError(f"{path}: single-file models are written as .safetensors; use that suffix")
    dtype = None if dtype is None else pick_dtype("cpu", dtype)
    state = {}
    for key, value in ldm.to_single_file(base.modules(), base.family).items():
        value = value.detach().to("cpu")
        state[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    scheduler = base.scheduler.config  # the flags ComfyUI and A1111 read (sdtune reads its configs below too)
    if scheduler.get("prediction_type") == "v_prediction":
        state[V_PRED] = torch.zeros(0)
    if scheduler.get("rescale_betas_zero_snr"):
        state[ZTSNR] = torch.zeros(0)
    metadata = {**(metadata or {}), "format": "pt", META_ARCH: base.family.name,
                META_SCALING: repr(float(base.vae.config.scaling_factor)),
                META_CONFIGS: json.dumps(_component_configs(base))}
    atomic_save_safetensors(state, path, metadata=metadata)
    return path


def save_diffusers(base: Base, folder, dtype=None) -> Path:
    """Write the model as a diffusers folder, its weights in ``dtype`` (default: as loaded); an existing folder at
    that path is replaced only on success."""
    folder = Path(folder)
    dtype = None if dtype is None else pick_dtype("cpu", dtype)
    if folder.exists() and not (folder / "model_index.json").is_file() and any(folder.iterdir()):
        raise SdtuneError(f"{folder}: exists and is not a diffusers model folder; choose a new or empty folder")
    with atomic_folder(folder) as tmp, quiet_progress():
        base.pipeline().save_pretrained(tmp, safe_serialization=True)
        if dtype is not None:  # the files written are cast, not the modules: a Base passed in stays as it was
            for path in sorted(Path(tmp).glob("*/*.safetensors")):
                state, metadata = load_state(path)
                atomic_save_safetensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                                        path, metadata=metadata)
            for te in base.family.text_encoders:
                set_config_dtype(Path(tmp) / te.component / "config.json", dtype)
    return folder


def set_config_dtype(config: Path, dtype: torch.dtype) -> None:
    """Name ``dtype`` in a text encoder's transformers config (``dtype``; ``torch_dtype`` before transformers 5),
    which ``from_pretrained(dtype="auto")`` loads the weights in, so that it says what the folder holds."""
    data = json.loads(config.read_text(encoding="utf-8"))
    keys = [k for k in ("dtype", "torch_dtype") if k in data]
    if keys:
        data.update(dict.fromkeys(keys, str(dtype).removeprefix("torch.")))
        atomic_write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", config)
