"""What a model file or folder holds, read from its header and configs, before (or instead of) loading it: its
family (by sdtune's metadata, else its key layout and cross-attention width), how it samples (v-prediction and
zero-terminal-SNR markers, ModelSpec metadata, an A1111 config beside it, one weight's spread), the configs its
components are built from, and a description for ``sdtune inspect``. What a file that is no model holds instead
is said by ``not_a_model``. ``models`` loads what this module has read.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open

from . import families, ldm
from .families import Family
from .safeio import ST_DTYPES, SdtuneError, is_safetensors, load_state

META_SCALING = "sdtune.vae_scaling_factor"
META_ARCH = "sdtune.architecture"
META_CONFIGS = "sdtune.configs"  # JSON {component: config}: the architecture, for models not of the shipped size


FAMILY_KEYS = "SD 1.x (768), SD 2.x (1024) or SDXL (2048)"


def not_a_model(keys: list[str]) -> str:
    """What a file given as a model holds instead of a UNet, by its keys, and where it goes."""
    if any(ldm.ADAPTER_KEY.search(k) or k.endswith(".alpha") for k in keys):
        return "this is a LoRA/adapter file, not a base model; give it with --lora, and a full checkpoint in its place"
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") or k.startswith("<") for k in keys):
        return "this is a textual-inversion embedding, not a base model; give it with --embedding"
    if any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.", "encoder.down_blocks.")) for k in keys):
        return "this is a VAE, not a whole model; give it with --vae, and a full checkpoint in its place"
    if any(k.startswith(("control_model.", "controlnet_")) for k in keys):
        return "this is a ControlNet, which sdtune does not use; pass a full Stable Diffusion checkpoint"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return ("this is a bare diffusers UNet, not a full checkpoint; pass a single-file checkpoint or a diffusers "
                "folder")
    if any(k.startswith(("text_model.", "encoder.layers.")) for k in keys):
        return ("this is a text encoder's weights alone (a part of a diffusers model folder), not a full "
                "checkpoint; pass a single-file checkpoint or a diffusers folder")
    return "no Stable Diffusion UNet weights (model.diffusion_model.*) in this file; pass a full checkpoint"


def detect_family(state: dict, path: Path) -> Family:
    """The family of a single-file checkpoint, from its key layout and tensor shapes; anything else is refused."""
    keys = list(state)
    if not any(k.startswith(ldm.UNET_PREFIX) for k in keys):
        raise SdtuneError(f"{path}: {not_a_model(keys)}")
    conv_in = state.get(ldm.UNET_PREFIX + "input_blocks.0.0.weight")
    cross = next((v for k, v in state.items() if k.startswith(ldm.UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
                 None)
    if conv_in is None or cross is None or conv_in.ndim != 4 or cross.ndim != 2:
        raise SdtuneError(f"{path}: the UNet weights are incomplete (no conv_in or cross-attention); "
                          "the file is damaged or not a Stable Diffusion checkpoint")
    if conv_in.shape[1] != 4:
        raise SdtuneError(f"{path}: {other_channels(conv_in.shape[1])}; sdtune works with plain text-to-image models")
    family = families.by_cross_attention(cross.shape[1])
    if family is None:
        raise SdtuneError(f"{path}: {unknown_width(cross.shape[1])}")
    missing = [te for te in family.text_encoders if not any(k.startswith(te.single_file_prefix) for k in keys)]
    if missing:
        raise SdtuneError(f"{path}: {family.title} UNet weights without the text encoder's ({missing[0].component}: "
                          f"{missing[0].single_file_prefix}*); pass a full checkpoint of {family.title}")
    return family


def unwrap(obj, path: Path) -> dict:
    """The tensor dict of a checkpoint (.ckpt files nest it under "state_dict")."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise SdtuneError(f"{path}: holds no weight dictionary; pass an SD 1.x checkpoint")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# Single-file entries that are flags, not weights. SDXL fine-tunes trained for v-prediction (NoobAI-XL V-Pred and
# others) carry an empty "v_pred" tensor, those trained with zero terminal SNR a "ztsnr" one; ComfyUI and A1111
# pick their sampling from these, and the weights alone cannot tell. EDM models (Playground v2.5) carry their
# sigmas.
V_PRED, ZTSNR = "v_pred", "ztsnr"
EDM_MARKERS = {"edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min"}
# ModelSpec (the modelspec.* metadata sd-scripts and Stability write): prediction_type "v"/"epsilon", else the
# architecture name of SD 2.x's two kinds
_MODELSPEC_PREDICTION = {"v": "v_prediction", "epsilon": "epsilon"}
_MODELSPEC_ARCH_PREDICTION = {"stable-diffusion-v2-512": "epsilon", "stable-diffusion-v2-768-v": "v_prediction"}


# Above this standard deviation of a family's prediction_probe weight, a file that does not say is v-prediction
V_PROBE_STD = 0.09


def file_sampling(metadata: dict, keys=(), probe: torch.Tensor | None = None) -> dict:
    """Scheduler settings a single file states beside its family's defaults: the prediction type (a v_pred
    marker, else ModelSpec metadata, else what the family's ``prediction_probe`` weight, given as ``probe``, tells)
    and zero terminal SNR (a ztsnr marker: rescaled betas, trailing timesteps)."""
    settings = {}
    prediction = ("v_prediction" if V_PRED in keys else None) or (
        _MODELSPEC_PREDICTION.get(metadata.get("modelspec.prediction_type", ""))
        or _MODELSPEC_ARCH_PREDICTION.get(metadata.get("modelspec.architecture", "")))
    if prediction is None and probe is not None:
        prediction = "v_prediction" if torch.std(probe.float(), unbiased=False) > V_PROBE_STD else "epsilon"
    if prediction:
        settings["prediction_type"] = prediction
    if ZTSNR in keys:
        settings |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return settings


def config_beside(path: Path) -> Path | None:
    """The model config A1111 reads for a checkpoint (``model.yaml`` beside ``model.safetensors``), if any."""
    found = Path(path).with_suffix(".yaml")
    return found if Path(path).suffix and found.is_file() else None


def config_prediction(path: Path) -> str | None:
    """The prediction type the A1111 config beside a checkpoint states: LDM's ``parameterization`` ("v"; no
    entry is noise prediction) or SGM's (SDXL) denoiser scaling (VScaling or EpsScaling). It is how A1111 and
    ComfyUI's "load checkpoint with config" learn that a model whose file does not say is v-prediction, so it
    wins over what sdtune reads from the file. None where there is no such config or it states neither."""
    config = config_beside(path)
    if config is None:
        return None
    try:
        model = yaml.safe_load(config.read_text(encoding="utf-8"))["model"]  # safe_load: data only, no code
        target, params = str(model.get("target", "")), model.get("params") or {}
        scaling = params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", "")
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        mark = getattr(e, "problem_mark", None)
        reason = ("no model.params entry" if not isinstance(e, yaml.YAMLError) else
                  f"{getattr(e, 'problem', None) or 'bad YAML'}" + (f" at line {mark.line + 1}" if mark else ""))
        raise SdtuneError(f"{config}: not a model config A1111 reads ({reason}); fix it, or rename it so that it "
                          f"is not read as {path.name}'s") from None
    if "parameterization" in params:
        said = {"v": "v_prediction", "eps": "epsilon"}.get(params["parameterization"])
        if said is None:
            raise SdtuneError(f"{config}: parameterization {params['parameterization']!r} is not one sdtune samples; "
                              f"use v or eps")
        return said
    if str(scaling).endswith("VScaling"):
        return "v_prediction"
    if str(scaling).endswith("EpsScaling") or target.startswith("ldm."):  # LDM's default is eps
        return "epsilon"
    return None


def read_probe(family: Family, path: Path, keys) -> torch.Tensor | None:
    """The family's ``prediction_probe`` weight of a single file, read alone (None where the family has none or
    the file lacks it)."""
    key = family.prediction_probe
    if not key or key not in keys:
        return None
    if is_safetensors(path):
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(key)
    raw, _ = load_state(path, mmap=True)
    return unwrap(raw, path)[key]


def family_from_metadata(metadata: dict) -> Family | None:
    """The family sdtune wrote into its own single files ("sd15" is what earlier versions wrote for SD 1.x)."""
    name = {"sd15": "sd1"}.get(metadata.get(META_ARCH), metadata.get(META_ARCH))
    return families.FAMILIES.get(name) if name else None


def file_configs(family: Family, metadata: dict, path: Path, keys=(), probe: torch.Tensor | None = None) -> dict:
    """The component configs a single file is built from: the family's shipped ones, or the ones sdtune wrote
    into its own files (a model of another size, a different scheduler), which the weights alone do not tell;
    the scheduler as the file's markers, ModelSpec metadata or ``probe`` weight say (``file_sampling``), given its
    ``keys``."""
    edm = sorted(EDM_MARKERS.intersection(keys))
    if edm:
        raise SdtuneError(f"{path}: an EDM model (Playground v2.5 style: {edm[0]}), which "
                          f"samples on a continuous noise schedule sdtune does not implement; use a DDPM-style "
                          f"checkpoint")
    configs = family.component_configs()
    configs["scheduler"] = dict(configs["scheduler"], **file_sampling(metadata, keys, probe))
    declared = config_prediction(path)
    if declared:
        configs["scheduler"]["prediction_type"] = declared
    if family.epsilon_sample_size and configs["scheduler"]["prediction_type"] == "epsilon":  # SD 2.x base: 512 px
        configs["unet"]["sample_size"] = family.epsilon_sample_size
    if META_CONFIGS in metadata:
        try:
            written = json.loads(metadata[META_CONFIGS])
        except ValueError:
            written = None
        if not isinstance(written, dict) or not all(isinstance(v, dict) for v in written.values()):
            raise SdtuneError(f"{path}: unreadable {META_CONFIGS} metadata; re-export the model or remove that entry")
        configs |= written
        if declared:
            configs["scheduler"] = dict(configs["scheduler"], prediction_type=declared)
    if META_SCALING in metadata:
        configs["vae"]["scaling_factor"] = float(metadata[META_SCALING])
    return configs


# safetensors' dtype names -> torch's, as names: the ones sdtune reads itself, and fp8 (a header is only described)
_ST_DTYPES = {name: str(dtype).removeprefix("torch.") for name, dtype in ST_DTYPES.items()} | \
    {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def checkpoint_header(path: Path) -> tuple[dict[str, tuple[str, tuple]], dict]:
    """Each tensor's (dtype, shape) and the metadata of a weight file: a safetensors header read alone, a torch
    file mapped through the safe loader."""
    if is_safetensors(path):
        try:
            with safe_open(str(path), "pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                shapes = {k: (_ST_DTYPES.get(t.get_dtype(), t.get_dtype().lower()), tuple(t.get_shape()))
                          for k, t in slices.items()}
                return shapes, dict(f.metadata() or {})
        except SafetensorError as e:
            raise SdtuneError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None
    try:
        raw, metadata = load_state(path, mmap=True)
    except SdtuneError:  # a pickle torch cannot map (the pre-1.6 format), or one that says why it is refused
        raw, metadata = load_state(path)
    state = unwrap(raw, path) if isinstance(raw, dict) else {}
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()}, metadata


def header_family(shapes: dict[str, tuple[str, tuple]], metadata: dict) -> Family | None:
    """A checkpoint's family from its header: sdtune's metadata, else the UNet's cross-attention width."""
    cross = next((s for k, (_, s) in shapes.items() if k.startswith(ldm.UNET_PREFIX) and k.endswith("attn2.to_k.weight")
                  and len(s) == 2), None)
    return family_from_metadata(metadata) or (families.by_cross_attention(cross[1]) if cross else None)


def describe_checkpoint(path: str | Path) -> dict | None:
    """What a single-file checkpoint holds, from its header (no weight is read): family, parameters per component,
    EMA copies, dtypes, the prediction type and noise schedule sdtune samples it with, its ModelSpec metadata.
    None for a file with no Stable Diffusion UNet (a LoRA, an embedding)."""
    path = Path(path)
    shapes, metadata = checkpoint_header(path)
    if not any(k.startswith(ldm.UNET_PREFIX) for k in shapes):
        return None
    family = header_family(shapes, metadata)
    prefixes = ldm.component_prefixes(family) if family else {"unet": ldm.UNET_PREFIX, "vae": ldm.VAE_PREFIX}
    conv_in = shapes.get(ldm.UNET_PREFIX + "input_blocks.0.0.weight", ("", ()))[1]
    cross = next((s for k, (_, s) in shapes.items() if k.startswith(ldm.UNET_PREFIX)
                  and k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    # what loading it would refuse, as loading says it (detect_family)
    refused = (other_channels(conv_in[1]) if len(conv_in) == 4 and conv_in[1] != 4
               else unknown_width(cross[1]) if family is None and cross else None)
    weights = {k: (d, s) for k, (d, s) in shapes.items() if k.startswith(tuple(prefixes.values())) and "float" in d}
    components = {c: sum(math.prod(s) for k, (_, s) in weights.items() if k.startswith(prefix))
                  for c, prefix in prefixes.items()}
    dtypes = Counter(d for d, _ in weights.values())
    probe = read_probe(family, path, shapes.keys()) if family else None
    if EDM_MARKERS & shapes.keys():
        sampling = {"prediction_type": "EDM (sdtune does not sample it)"}
    else:
        try:
            sampling = (file_configs(family, metadata, path, keys=shapes.keys(), probe=probe)["scheduler"]
                        if family else {})
        except SdtuneError:  # unreadable sdtune configs: loading says so
            sampling = {}
    declared = config_prediction(path)  # an unreadable config is said here, as loading says it
    said = (V_PRED in shapes or META_CONFIGS in metadata or metadata.get("modelspec.prediction_type") in
            _MODELSPEC_PREDICTION or metadata.get("modelspec.architecture") in _MODELSPEC_ARCH_PREDICTION)
    return {
        "file": str(path),
        "kind": "checkpoint",
        "family": family.name if family else None,
        "family_name": family.title if family else None,
        "components": components,  # parameters each; 0: the file lacks that component
        "ema_tensors": sum(1 for k in shapes if k.startswith("model_ema.")),
        "dtypes": dict(dtypes.most_common()),
        "parameters": sum(components.values()),
        "prediction": sampling.get("prediction_type"),
        # where that comes from: the A1111 config beside it, the file, or (SD 2.x files that do not say) one
        # weight's spread, as ComfyUI reads it, or the family's own
        "prediction_from": ("config" if declared else "file" if said else "weights" if probe is not None
                            else "family"),
        "zero_terminal_snr": bool(sampling.get("rescale_betas_zero_snr")),
        "not_loaded": refused,  # why sdtune does not load it, where it does not
        "metadata": {k: v for k, v in sorted(metadata.items()) if k.startswith("modelspec.") or k == META_ARCH},
    }


def other_channels(channels: int) -> str:
    """What a UNet that takes other than the 4 latent channels is, for its refusal (loading, inspect)."""
    return f"the UNet takes {channels} input channels (an inpainting or instruct-pix2pix model)"


def unknown_width(width) -> str:
    """The refusal of a UNet whose cross-attention width no family has; SDXL's refiner (1280) named as such."""
    if width == families.SDXL_REFINER_CROSS_WIDTH:
        return (f"an SDXL refiner (cross-attention width {width}), which only refines images by img2img; sdtune needs "
                "a text-to-image base model (SDXL base, Pony, Illustrious...)")
    return f"cross-attention width {width} is not {FAMILY_KEYS}; sdtune does not know this model family"


def folder_family(folder: Path, index: dict) -> Family:
    try:
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SdtuneError(f"{folder}: no readable unet/config.json ({e}); re-download or re-export the model") from None
    width = unet_config.get("cross_attention_dim")
    if unet_config.get("in_channels", 4) != 4:  # the check a single file gets (it loaded, then sampling failed)
        raise SdtuneError(f"{folder}: {other_channels(unet_config['in_channels'])}; sdtune works with plain "
                          f"text-to-image models")
    family = families.by_cross_attention(width)
    if family is None:
        raise SdtuneError(f"{folder}: {unknown_width(width)}")
    missing = [te.component for te in family.text_encoders if te.component not in index]
    if missing:
        raise SdtuneError(f"{folder}: {family.title} UNet but no {missing[0]} in model_index.json; "
                          f"pass a complete {family.title} diffusers folder")
    return family


def as_loaded(family: Family) -> Family:
    """The family a diffusers folder of ``family``'s layout loads as: the built-in tiny one where its widths are."""
    return families.TINY if family.cross_attention_width == families.TINY.cross_attention_width else family


def folder_index(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise SdtuneError(f"{folder}: not a diffusers model folder (no model_index.json); "
                          "pass a diffusers folder or a .safetensors checkpoint")
    try:
        return json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise SdtuneError(f"{index_file}: unreadable ({e}); re-download or re-export the model") from None


def describe_folder(folder: str | Path) -> dict:
    """What a diffusers model folder holds, from its configs and weight headers (no weight is read): family,
    parameters per component (None: weights sdtune cannot read without loading, .bin), dtypes, prediction."""
    folder = Path(folder)
    family = folder_family(folder, folder_index(folder))
    components, dtypes = {}, Counter()
    for comp in ("unet", "vae", *(te.component for te in family.text_encoders)):
        place = folder / comp
        variant = weights_variant(place) if place.is_dir() else None
        files = [f for f in sorted(place.glob("*.safetensors"))
                 if (f".{variant}" in f.name if variant else f.name.count(".") == 1)]
        shapes = [s for f in files for s in checkpoint_header(f)[0].values() if "float" in s[0]]
        components[comp] = sum(math.prod(shape) for _, shape in shapes) if files else None
        dtypes.update(d for d, _ in shapes)
    try:
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        scheduler = {}
    return {"file": str(folder), "kind": "model folder", "family": family.name, "family_name": family.title,
            "components": components, "dtypes": dict(dtypes.most_common()),
            "parameters": sum(n or 0 for n in components.values()), "prediction": scheduler.get("prediction_type")}


def weights_variant(component: Path) -> str | None:
    """The weights variant a component folder holds where it has no plain weights: "fp16" for a hub download
    of only ``*.fp16.safetensors`` files (diffusers looks for plain ones unless told)."""
    names = [f.name for f in component.iterdir() if f.suffix in (".safetensors", ".bin")]
    if any(name.count(".") == 1 for name in names):
        return None
    found = {name.split(".")[-2] for name in names if name.count(".") >= 2}
    return found.pop() if len(found) == 1 else None
