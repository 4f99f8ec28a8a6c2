"""kohya sd-scripts' training config (the TOML file its ``--config_file`` reads, which kohya_ss writes for each run)
read as sdtune's settings, so that ``sdtune train lora --config config_lora.toml`` runs what the file describes
(``train_network.py``'s; ``train_textual_inversion.py``'s for ``sdtune train ti``).

A table is kohya's when it names the base model, the network or the token as sd-scripts does
(``pretrained_model_name_or_path``, ``network_module``, ``token_string``). Each of its keys is then one of:

- a setting under another name (``learning_rate`` is ``lr``), its value read as sd-scripts reads it where sdtune
  writes it otherwise (``resolution = "512,512"``, ``optimizer_type = "AdamW8bit"``, ``save_precision = "float"``);
- sd-scripts' own way of saying what sdtune says otherwise: the network module and its ``network_args`` (``--algo``,
  ``--conv-rank``...), the text encoder trained unless ``network_train_unet_only``, a separate ``unet_lr``;
- a switch of how sd-scripts runs that changes nothing sdtune trains (xformers, data loader workers, logging
  folder...): left out, and said in one line;
- a feature sdtune does not have: accepted while it is off (kohya's default), refused in one line when it is on.

A ``dataset_config`` (sd-scripts' dataset config, ``kohya_dataset``) becomes the run's --data, its options and
folders replacing the config's own as in sd-scripts; ``network_args``' block-wise lists are ``kohya_blocks``'.

Keys sdtune knows under its own name pass through; what fits none of these is refused as any unknown setting is.
A key the file lacks takes the model's preset, as in any sdtune config, except the two whose sd-scripts default a
config relies on: the text encoder is trained, and ``network_alpha`` is 1.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import NamedTuple

from ..console import note
from ..lora import algos
from ..safeio import SdtuneError
from . import kohya_blocks, kohya_dataset

MARKERS = ("pretrained_model_name_or_path", "network_module", "token_string")  # keys sd-scripts' configs have

# kohya's name -> sdtune's, the value read as it is
RENAMED = {
    "train_batch_size": "batch_size", "max_train_steps": "steps", "max_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "network_dim": "rank", "network_alpha": "alpha",
    "output_dir": "out", "train_data_dir": "data", "reg_data_dir": "reg_dir",
    "pretrained_model_name_or_path": "model", "save_every_n_steps": "save_every",
    "save_every_n_epochs": "save_every_epochs", "sample_every_n_steps": "sample_every",
    "sample_every_n_epochs": "sample_every_epochs", "shuffle_caption": "shuffle_captions",
    "caption_dropout_rate": "caption_dropout", "output_name": "name", "network_dropout": "lora_dropout",
    "debiased_estimation_loss": "debiased_estimation", "caption_tag_dropout_rate": "caption_tag_dropout",
    "enable_wildcard": "wildcards", "caption_dropout_every_n_epochs": "caption_dropout_every_epochs",
    "validate_every_n_steps": "validation_every",
    "bucket_reso_steps": "bucket_step", "enable_bucket": "buckets", "flip_aug": "flip",
    # train_textual_inversion.py's
    "token_string": "token", "init_word": "init_token", "num_vectors_per_token": "num_vectors",
    "weights": "init_embedding",
}

# how sd-scripts runs, not what it trains: nothing to do here
NO_EFFECT = {
    "cache_latents", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "dynamo_backend",
    "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic", "logging_dir", "log_prefix", "log_config",
    "max_data_loader_n_workers", "persistent_data_loader_workers",
    "save_model_as", "sdpa", "xformers", "mem_eff_attn", "lowram", "lowvram", "highvram", "vae_batch_size",
    "save_state", "save_state_on_train_end", "no_half_vae", "noise_offset_type", "training_comment",
    "console_log_simple", "console_log_level", "console_log_file", "huggingface_repo_id", "huggingface_token",
    "gpu_ids", "num_processes", "num_machines", "num_cpu_threads_per_process", "multi_gpu", "main_process_port",
    "wandb_api_key",  # (never kept: the settings go into the files trained; wandb reads WANDB_API_KEY)
    "sample_at_first",
    "cache_info", "debug_dataset",  # a dataset config's: its image-size cache, its preview
    "skip_cache_check", "mem_eff_save", "disable_mmap_load_safetensors", "ddp_timeout", "ddp_gradient_as_bucket_view",
    "ddp_static_graph", "async_upload", "huggingface_path_in_repo", "huggingface_repo_type",
    "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface",
    "validation_seed",  # sdtune holds out the same images whatever the seed (scan.held_out_order)
    "save_last_n_steps_state", "save_last_n_epochs_state",  # sdtune keeps one resume state, the newest
    *("v2", "sdxl", "v_parameterization"),  # sdtune reads the family and prediction type from the model itself
    # sdtune validates at step 0, each save, every validation_every steps and the end, on every held-out image
    "validate_every_n_epochs", "max_validation_steps",
    "log_tracker_config", "tokenizer_cache_dir", "output_config", "torch_compile",
    "dataset_repeats",  # (in_json's fine-tuning datasets only, which are read from a dataset config here)
    "apply_t5_attn_mask",  # (SD3/FLUX's)
    "base_weights_multiplier",  # (base_weights's, which is refused while given)
}
# kohya's switches of features sdtune lacks: fine while off
OFF_ONLY = {
    "face_crop_aug_range", "fused_backward_pass", "initial_step", "initial_epoch", "skip_until_initial_step",
    "no_metadata", "resize_interpolation", "no_token_padding", "conditioning_data_dir", "dataset_class",
    "base_weights",
}
# sd-scripts' step counts that are a share of the run below 1 -> sdtune's (steps, share) settings
STEPS_OR_SHARE = {"lr_warmup_steps": ("lr_warmup_steps", "lr_warmup_ratio"),
                  "lr_decay_steps": ("lr_decay_steps", "lr_decay_ratio"),
                  "token_warmup_step": ("token_warmup_steps", "token_warmup_ratio")}
# sd-scripts' values of settings sdtune spells otherwise
OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "pagedadamw8bit": "pagedadamw8bit", "lion": "lion",
              "lion8bit": "lion8bit", "sgdnesterov": "sgdnesterov", "sgdnesterov8bit": "sgdnesterov8bit",
              "prodigy": "prodigy", "adafactor": "adafactor", "adamwschedulefree": "adamwschedulefree",
              "radamschedulefree": "radamschedulefree", "sgdschedulefree": "sgdschedulefree",
              "dadaptation": "dadaptation", "dadaptadampreprint": "dadaptation", "dadaptadam": "dadaptadam",
              "dadaptadagrad": "dadaptadagrad", "dadaptadan": "dadaptadan", "dadaptadanip": "dadaptadanip",
              "dadaptlion": "dadaptlion", "dadaptsgd": "dadaptsgd"}
PRECISIONS = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# LyCORIS's algo= names
NETWORK_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr", "diag-oft": "oft", "boft": "oft",
                 "ia3": "ia3", "full": "full"}
LYCORIS_PRESETS = {"full": "all", "attn-mlp": "attn+ff", "attn-only": "attn"}  # LyCORIS's preset= as --targets


class Switch(NamedTuple):
    """An algorithm's own switch: the --algo values it shapes, its layer's keyword, LyCORIS's network_args name
    (None: LyCORIS says it otherwise: BOFT is its own algo=)."""

    algos: tuple[str, ...]
    option: str
    lycoris: str | None


# sdtune's setting -> its switch: each algorithm's own options, in one table (settings check, layers, metadata,
# kohya configs)
ALGO_SWITCHES = {
    "lokr_full_matrix": Switch(("lokr",), "full_matrix", "full_matrix"),
    "lokr_decompose_both": Switch(("lokr",), "decompose_both", "decompose_both"),
    "lokr_unbalanced": Switch(("lokr",), "unbalanced", "unbalanced_factorization"),
    "oft_rescaled": Switch(("oft",), "rescaled", "rescaled"),
    "oft_butterfly": Switch(("oft",), "butterfly", None),
    "dora_wd_on_output": Switch(("dora",), "on_output", "wd_on_output"),
    "ia3_on_input": Switch(("ia3",), "on_input", "train_on_input"),
    "tucker": Switch(("lora", "loha", "lokr", "dora"), "tucker", "use_tucker"),
    "scalar": Switch(("lora", "loha", "lokr", "dora"), "scalar", "use_scalar"),
}
OLDER_NAMES = {"wd_on_out": "wd_on_output", "use_cp": "use_tucker"}  # LyCORIS's earlier names of its switches
# LyCORIS's switches of how a layer computes, not what it learns (bypass_mode: W0·x + ΔW·x, for a quantised base,
# where sdtune's layers compute (W0 + ΔW)·x): the same training either way
SAME_TRAINING = {"bypass_mode"}
# network_args keys -> sdtune's settings (LyCORIS's and kohya's LoRA module's)
NETWORK_ARGS = {"conv_dim": "conv_rank", "conv_alpha": "conv_alpha", "rank_dropout": "rank_dropout",
                "module_dropout": "module_dropout", "factor": "lokr_factor", "dropout": "lora_dropout",
                "loraplus_lr_ratio": "loraplus_lr_ratio", "loraplus_unet_lr_ratio": "loraplus_unet_lr_ratio",
                "loraplus_text_encoder_lr_ratio": "loraplus_te_lr_ratio"}


def is_kohya(table: dict) -> bool:
    return any(key in table for key in MARKERS)


def translate(table: dict, where, kind: str = "lora", family=None) -> tuple[dict, list[str]]:
    """(sdtune's table, the kohya keys left out as changing nothing here) for kohya's ``table`` from ``where``: a
    train_network.py config for ``kind`` "lora", a train_textual_inversion.py one for "ti". ``family``: the base
    model's where known, whose clip skip sd-scripts may count otherwise than A1111 (``kohya_clip_skip``)."""
    theirs = dict(table)
    out, unused = {}, []
    for mine, foreign, what, other in (("ti", "network_module", "LoRA", "lora"),
                                       ("lora", "token_string", "textual inversion", "ti")):
        if kind == mine and foreign in theirs:
            raise SdtuneError(f"{where}: {foreign} makes it a {what} config; use sdtune train {other}")

    def take(key: str, name: str, value) -> None:
        if name in out and out[name] != value:
            raise SdtuneError(f"{where}: {key} = {value!r} and another key set {name} to {out[name]!r}; keep one")
        out[name] = value

    if kind == "lora":
        _network(theirs, take, where, family)
    for key, prop in (("use_object_template", "object"), ("use_style_template", "style")):
        if theirs.pop(key, False):  # sd-scripts' templates: sdtune's when no caption names the token
            take(key, "property", prop)
    _rates(theirs, take)
    _kept_saves(theirs, take, where)
    if theirs.get("dataset_config"):
        _dataset(theirs, take, where, kind, unused)
    if "epoch" in theirs:  # kohya_ss's own field for max_train_epochs, written beside it
        epoch = theirs.pop("epoch")
        theirs.setdefault("max_train_epochs", epoch)
    _options(theirs, take, where, family, unused)
    return out, unused


def _options(theirs: dict, take, where, family, unused: list[str]) -> None:
    """Each key of ``theirs`` as sdtune's setting (``take``); a switch that changes nothing here into ``unused``."""
    refused = []
    if theirs.get("lr_scheduler_type"):  # a scheduler class: sd-scripts then leaves lr_scheduler aside
        theirs = {k: v for k, v in theirs.items() if k != "lr_scheduler"}
    for key, value in theirs.items():
        if key == "random_crop":  # a switch in kohya, a choice in sdtune
            take(key, "crop", "random" if value else "center")
        elif key in RENAMED:
            take(key, RENAMED[key], value)
        elif key in NO_EFFECT:
            unused.append(key)
        elif key in OFF_ONLY:
            if value not in (False, 0, "", None, [], "0"):
                refused.append(f"{key} = {value!r}")
        elif key == "resume" and isinstance(value, str):  # sd-scripts' saved state folder, not sdtune's switch
            if value:
                raise SdtuneError(f"{where}: resume = {value!r}: sd-scripts' saved state (accelerate's) is not one "
                                  f"sdtune reads; continue from its last LoRA with network_weights = 'FILE' (sdtune "
                                  f"then keeps its own resume state in output_dir)")
            unused.append(key)
        elif key in STEPS_OR_SHARE:  # sd-scripts: below 1, a share of the run's steps
            steps, share = STEPS_OR_SHARE[key]
            if isinstance(value, float) and 0 < value < 1:
                take(key, share, value)
            else:  # (a whole float, 10.0, as the steps it counts)
                take(key, steps, int(value) if isinstance(value, float) and value == int(value) else value)
        elif key == "alpha_mask":  # the images' transparency as the loss's mask: sdtune's masked loss reads it
            if value:
                take(key, "masked_loss", True)
        elif key == "stop_text_encoder_training":  # train_db.py's steps of the text encoder (-1: none of them)
            if isinstance(value, (int, float)) and value > 0:
                take(key, "te_steps", int(value))
            elif value:
                refused.append(f"{key} = {value!r} (network_train_unet_only = true trains the UNet alone)")
        elif key == "lr_scheduler_type":  # a class, of torch.optim.lr_scheduler or as module.Class
            if value:
                take(key, "lr_scheduler", str(value))
        elif key == "lr_scheduler_args":  # (kohya_ss writes one string of them)
            items = shlex.split(value) if isinstance(value, str) else [str(item) for item in value or []]
            if items:
                take(key, "lr_scheduler_args", items)
        elif key == "optimizer_args":  # (one string of them too); sd-scripts gives the weight decay among them
            items = shlex.split(value) if isinstance(value, str) else [str(item) for item in value or []]
            decay = [item for item in items if item.partition("=")[0].strip() == "weight_decay"]
            for item in decay:
                text = item.partition("=")[2].strip()
                try:
                    take(key, "weight_decay", float(text))
                except ValueError:
                    raise SdtuneError(f"{where}: optimizer_args {item!r}: weight_decay takes a number, e.g. "
                                      f"weight_decay=0.01") from None
            take(key, "optimizer_args", [item for item in items if item not in decay])
        elif key == "caption_separator":  # how sd-scripts splits a caption into tags: sdtune splits at commas
            if str(value) != ",":
                raise SdtuneError(f"{where}: caption_separator = {value!r}: sdtune splits captions into tags at "
                                  f"commas; write the captions with commas (or leave it out)")
        elif key == "save_n_epoch_ratio":  # that many saves over the epochs, as sd-scripts spreads them
            epochs = theirs.get("max_train_epochs") or theirs.get("epoch")
            if value and not epochs:
                raise SdtuneError(f"{where}: save_n_epoch_ratio = {value!r} spreads saves over max_train_epochs, "
                                  f"which it does not give; give save_every_n_epochs instead")
            if value:
                take(key, "save_every_epochs", math.floor(int(epochs) / value) or 1)
        elif key == "full_fp16":  # fp16 trained weights: sd-scripts patches accelerate's grad scaler for them
            if value and theirs.get("mixed_precision") != "fp16":
                raise SdtuneError(f"{where}: full_fp16 = true needs mixed_precision = \"fp16\", as sd-scripts "
                                  f"requires; set it, or leave full_fp16 out")
            if value:  # run, not refused: the base model is fp16 either way, so fp16 state saves the network's own
                # memory only (a LoRA's: megabytes), at the cost of small updates lost below fp16's precision
                note(f"{where}: full_fp16 = true: sdtune keeps the network's weights, gradients and optimizer state "
                     f"in fp32 under fp16 mixed precision (the model's own weights are fp16 either way); only they "
                     f"take more memory (full_bf16 = true halves them on a GPU with bf16)")
        elif key == "dim_from_weights":  # sdtune always continues network_weights at the file's own ranks
            if value and not theirs.get("network_weights"):
                unused.append(key)
        elif key == "in_json":  # train_network.py's fine-tuning metadata for train_data_dir's images
            if value:
                raise SdtuneError(f"{where}: in_json = {value!r}: sdtune reads sd-scripts' fine-tuning metadata from "
                                  f"a dataset config; give dataset_config = a .toml with [[datasets.subsets]] "
                                  f"image_dir = train_data_dir's folder and metadata_file = {str(value)!r}")
        elif key in ("network_multiplier", "huber_scale"):  # 1 unless changed (the LoRA's strength in training,
            # the Huber threshold's factor)
            if value != 1:
                refused.append(f"{key} = {value!r}")
        elif key == "caption_extension":
            if value not in (".txt", ".caption"):
                raise SdtuneError(f"{where}: caption_extension = {value!r}: sdtune reads captions from .txt and "
                                  f".caption files beside the images; rename the captions")
        elif key == "clip_skip":
            take(key, "clip_skip", _clip_skip(value, family))
        elif key == "resolution":
            take(key, "resolution", kohya_dataset.square_side(value, where))
        elif key == "optimizer_type":
            # (sd-scripts also takes any optimizer class as module.Class, as --optimizer does)
            name = OPTIMIZERS.get(str(value).lower()) or (str(value) if "." in str(value) else None)
            if name is None:
                raise SdtuneError(f"{where}: optimizer_type = {value!r}: sdtune trains with "
                                  f"{', '.join(OPTIMIZERS)} or a class given as module.Class; pick one of them")
            take(key, "optimizer", name)
        elif key == "save_precision":
            take(key, "save_precision", PRECISIONS.get(str(value), value))
        elif key in ("sample_prompts", "sample_sampler") and value in ("", None):
            unused.append(key)
        elif key == "sample_prompts":
            take(key, "sample_prompts", [value] if isinstance(value, str) else value)
        else:
            take(key, key, value)  # sdtune's own name, or unknown: the settings reader says which
    if refused:
        raise SdtuneError(f"{where}: sdtune does not offer {', '.join(refused)}; leave "
                          f"{'it' if len(refused) == 1 else 'them'} out (or off) to train without")


def _dataset(theirs: dict, take, where, kind: str, unused: list[str]) -> None:
    """dataset_config as --data: its folders replace train_data_dir and reg_data_dir, and its options replace the
    config's own, as in sd-scripts (read_settings then takes them from the file: ``dataset_settings``); the config's
    value of an option only some subsets give is the others'."""
    given = Path(str(theirs.pop("dataset_config"))).expanduser()
    if not given.is_absolute() and not given.is_file() and (Path(where).parent / given).is_file():
        given = Path(where).parent / given  # sd-scripts finds it from the current folder; the config's also works
    if not given.is_file():
        raise SdtuneError(f"{where}: dataset_config {str(given)!r} is not a file; give the path of the dataset "
                          f"config (.toml)")
    dataset = kohya_dataset.read(given)
    for key in ("train_data_dir", "reg_data_dir"):
        if theirs.pop(key, None):
            unused.append(f"{key} (dataset_config's folders are used)")
    # what the dataset gives every image replaces the config's (a dataset's batch_size is its train_batch_size); a
    # caption option some subsets give their own stays: the subsets without one take it, as in sd-scripts
    for key in [*dataset.options, *(k for k in dataset.varying if dataset.every_own(k))]:
        theirs.pop("train_batch_size" if key == "batch_size" else key, None)
    take("dataset_config", "data", str(given.resolve()))


def subset_settings(subset: kohya_dataset.Subset, where, family=None) -> set[str]:
    """The settings (sdtune's names) a subset's own keys are, to check them as the run's are."""
    names: set[str] = set()
    _options(dict(subset.options), lambda key, name, value: names.add(name), where, family, [])
    return names


def dataset_settings(dataset: kohya_dataset.Dataset, kind: str, family=None) -> tuple[dict, list[str]]:
    """(sdtune's settings, kohya keys left out) of a kohya dataset config (``kohya_dataset.read``), the --data of a
    run: its caption and bucket options, and its class images (is_reg subsets) as the --reg-dir."""
    path = dataset.path
    for line in dataset.notes:
        note(line)
    out, unused = {}, []

    def take(key: str, name: str, value) -> None:
        out[name] = value

    _options(dict(dataset.options), take, path, family, unused)
    if dataset.images(reg=True):
        if kind == "ti":
            raise SdtuneError(f"{path}: its is_reg subsets are class images for prior preservation, which textual "
                              f"inversion does not use; leave them out")
        out["reg_dir"] = str(Path(path).resolve())
    return out, unused


def _clip_skip(value, family) -> int:
    """sd-scripts' clip skip as A1111 counts it (sdtune's): one more on SD 2.x, whose encoder sd-scripts holds
    without OpenCLIP's last layer, as diffusers stores it (``families.kohya_clip_skip`` is the other way)."""
    skip = int(value or 1)
    return skip + 1 if skip > 1 and family is not None and family.text_encoders[0].pretrained_layers else skip


def _network(theirs: dict, take, where, family) -> None:
    """network_module and network_args as --algo and its settings (the block-wise ones: ``kohya_blocks``); the text
    encoder trained unless network_train_unet_only, as sd-scripts trains it."""
    module = theirs.pop("network_module", "networks.lora")
    args = theirs.pop("network_args", [])
    if isinstance(args, str):  # one string of arguments, as on sd-scripts' command line: "algo=loha" "conv_dim=4"
        args = shlex.split(args)
    parsed = dict(str(a).split("=", 1) for a in args if "=" in str(a))
    parsed = {k.strip(): v.strip() for k, v in parsed.items()}
    if module == "networks.lora":
        algo = "lora"
    elif module == "lycoris.kohya":
        named = parsed.pop("algo", "lora")
        algo = NETWORK_ALGOS.get(named.lower())
        if algo is None:
            raise SdtuneError(f"{where}: network_args algo = {named!r}: sdtune trains LyCORIS's "
                              f"{', '.join(NETWORK_ALGOS)}; pick one of them")
        if named.lower() == "boft":  # (diag-oft's layer as a butterfly)
            take("network_args algo", "oft_butterfly", True)
    elif module == "networks.oft":
        algo = "oft"
        _kohya_oft(theirs, parsed, take, where)
    else:
        raise SdtuneError(f"{where}: network_module = {module!r}: sdtune trains networks.lora, networks.oft and "
                          f"lycoris.kohya (LoCon, LoHa, LoKr, diag-OFT, BOFT, IA3, full); use one of them")
    if _true(parsed.pop("dora_wd", "false")):
        algo = "dora"
    if _true(parsed.pop("rs_lora", "false")):  # LyCORIS's
        take("network_args rs_lora", "rs_lora", True)
    if "preset" in parsed:
        preset = parsed.pop("preset")
        if preset not in LYCORIS_PRESETS:
            raise SdtuneError(f"{where}: network_args preset={preset}: sdtune reads LyCORIS's "
                              f"{', '.join(LYCORIS_PRESETS)} (as --targets); pick one, or give targets")
        take("network_args preset", "targets", LYCORIS_PRESETS[preset])
    take("network_module", "algo", algo)
    # (sd-scripts' defaults where the file gives no network_dim or network_alpha: 4 and 1)
    blocks = kohya_blocks.translate(parsed, family, bool(theirs.get("sdxl")), theirs.get("network_dim", 4),
                                    theirs.get("network_alpha", 1), where)
    for name, value in blocks.items():
        take("network_args (block-wise)", name, value)
    for key in kohya_blocks.ARGS:
        parsed.pop(key, None)
    # (diag-oft: LyCORIS's constraint argument is its alpha; kohya's OFT reads network_alpha: _kohya_oft)
    constrained = algos.get(algo).alpha_is_constraint and module != "networks.oft"
    constraint = parsed.pop("constraint", None) if constrained else None
    # (DoRA's axis: LyCORIS's recent versions default to per output row where wd_on_output is absent; sdtune keeps
    # per input column, kohya's, the one A1111 reads, unless the config asks: the file's shape tells loaders which)
    for older, name in OLDER_NAMES.items():
        if older in parsed:
            parsed.setdefault(name, parsed.pop(older))
    for name, switch in ALGO_SWITCHES.items():  # (LyCORIS's other algorithms pass an algorithm's switch by)
        if switch.lycoris and _true(parsed.pop(switch.lycoris, "false")) and algo in switch.algos:
            take(f"network_args {switch.lycoris}", name, True)
    # sdtune scales the rows rank dropout keeps by 1/(1 - p) (kohya's LoRA does; LyCORIS with this switch on, by the
    # kept fraction): what the run does whatever the switch says, so its False is only noted
    rescaled_rows = _true(parsed.pop("rank_dropout_scale", "true"))
    for key in SAME_TRAINING & parsed.keys():
        parsed.pop(key)
    if _true(parsed.pop("train_norm", "false")):  # (LyCORIS's norm layers, beside any algorithm's)
        take("network_args train_norm", "train_norm", True)
    for key, value in parsed.items():
        if key not in NETWORK_ARGS:
            raise SdtuneError(f"{where}: network_args {key}={value}: not an argument sdtune reads (it reads "
                              f"{', '.join(NETWORK_ARGS)}, algo, dora_wd, preset and the block-wise "
                              f"{', '.join(kohya_blocks.ARGS)}); leave it out")
        take(f"network_args {key}", NETWORK_ARGS[key], _number(value))
    dropped = _number(parsed.get("rank_dropout", "0"))
    if not rescaled_rows and isinstance(dropped, (int, float)) and dropped > 0:
        note(f"{where}: network_args rank_dropout_scale=False: sdtune scales the rows rank dropout keeps by "
             f"1/(1 - rank_dropout), as rank_dropout_scale=True does")
    if constrained:  # the constraint argument (0: none) is the layers' alpha; network_alpha goes unused
        theirs.pop("network_alpha", None)
        take("network_args constraint", "alpha", _number(constraint or "0"))
    elif "network_dim" in theirs:  # sd-scripts' alpha when the file gives none is 1, not the rank
        theirs.setdefault("network_alpha", 1)
    unet_only = theirs.pop("network_train_unet_only", False) or module == "networks.oft"  # (kohya's OFT: UNet only)
    te_only = theirs.pop("network_train_text_encoder_only", False)
    take("network_train_unet_only", "text_encoder", not unet_only)
    if te_only:
        take("network_train_text_encoder_only", "unet", False)


def _kohya_oft(theirs: dict, parsed: dict, take, where) -> None:
    """kohya's own OFT (``networks.oft``) as --algo oft: network_dim counts each layer's blocks (sd-scripts' default
    4), network_alpha is every layer's constraint, the UNet alone (it trains no text encoder), its attention layers
    unless enable_all_linear (every linear layer of the transformers: sdtune's attn+ff); enable_conv adds the
    resnets and samplers."""
    dim, alpha = int(theirs.get("network_dim", 4)), theirs.setdefault("network_alpha", 1)
    take("network_dim", "oft_blocks", dim)
    all_linear = _true(parsed.pop("enable_all_linear", "false"))
    if _true(parsed.pop("enable_conv", "false")):  # (the convolutions in the same blocks, at the same alpha)
        take("network_args enable_conv", "conv_rank", dim)
        take("network_args enable_conv", "conv_alpha", float(alpha))
    take("network_args enable_all_linear", "targets", "attn+ff" if all_linear else "attn")
    if theirs.pop("network_train_text_encoder_only", False):
        raise SdtuneError(f"{where}: network_train_text_encoder_only with networks.oft: kohya's OFT trains the UNet "
                          f"alone; leave it out, or use lycoris.kohya with algo=diag-oft")


def _kept_saves(theirs: dict, take, where) -> None:
    """save_last_n_epochs / save_last_n_steps as --keep-last: sd-scripts deletes the save N epochs (N saves) or N
    steps back at each save, so it keeps N saves, or N // save_every_n_steps + 1 (sdtune keeps the best too)."""
    epochs, steps = theirs.pop("save_last_n_epochs", None), theirs.pop("save_last_n_steps", None)
    if epochs:
        take("save_last_n_epochs", "keep_last", epochs)
    if steps:
        every = theirs.get("save_every_n_steps")
        if not every:
            raise SdtuneError(f"{where}: save_last_n_steps = {steps} without save_every_n_steps: there are no step "
                              f"saves to keep; give save_every_n_steps")
        take("save_last_n_steps", "keep_last", steps // every + 1)


def _rates(theirs: dict, take) -> None:
    """learning_rate, unet_lr and text_encoder_lr as sd-scripts reads them: the UNet's rate is unet_lr if given,
    the text encoders' text_encoder_lr (a list: SDXL's two), both else learning_rate."""
    base = theirs.pop("learning_rate", None)
    unet = theirs.pop("unet_lr", None)
    text = theirs.pop("text_encoder_lr", None)
    if unet is not None or base is not None:
        take("unet_lr" if unet is not None else "learning_rate", "lr", unet if unet is not None else base)
    if isinstance(text, list):
        text = [t for t in text if t is not None]
        if text:
            take("text_encoder_lr", "te_lr", text[0])
        if len(text) > 1:
            take("text_encoder_lr", "te2_lr", text[1])
    elif text is not None:
        take("text_encoder_lr", "te_lr", text)
    elif unet is not None and base is not None and unet != base:  # sd-scripts gives the text encoders the base
        take("learning_rate", "te_lr", base)


def _true(text: str) -> bool:
    """A network_args switch's value as kohya_ss writes it ("True"/"False"; LyCORIS takes 1/0 and the like too)."""
    return str(text).strip().lower() not in ("false", "0", "", "none")


def _number(text: str):
    """A network_args value: an int, a float or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
