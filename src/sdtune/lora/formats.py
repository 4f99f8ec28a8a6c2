"""LoRA files <-> the neutral ``Lora``: every common layout in, kohya or diffusers out.

Read (``load_lora`` / ``from_state_dict``), detected key by key, so a file mixing layouts still loads:

- kohya / A1111 / civitai: ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL: ``lora_te1_``, ``lora_te2_``) with
  ``.lora_down.weight`` ``.lora_up.weight`` [``.lora_mid.weight``] [``.alpha``]; UNet paths in diffusers or
  LDM/SGM naming (``input_blocks_4_1_…``), resolved against the model or the family the layer widths point to;
  LyCORIS LoHa (``hada_*``), LoKr (``lokr_*``), full (``.diff``, ``.diff_b``) and norm (``.w_norm``, ``.b_norm``)
  under the same names.
- diffusers / PEFT: ``[unet.|text_encoder.|text_encoder_2.|base_model.model.]<path>.lora_A.weight`` /
  ``lora_B.weight``, alphas from ``.alpha`` keys, the ``lora_adapter_metadata`` header or a PEFT
  ``adapter_config.json`` beside the file (a raw PEFT text-encoder adapter goes to the encoder of its width);
  the older ``.lora.down.weight``, ``.lora_linear_layer.down.weight`` and attention-processor
  (``attn1.processor.to_q_lora.down.weight``) keys. Text paths are read with or without ``text_model.``.
- cloneofsimo ``lora_diffusion``: order-indexed ``unet:N:up`` keys (and its bare-list ``.pt``), TI vectors beside.
- bundled embeddings (A1111's ``bundle_emb.<name>.string_to_param.*``, SDXL ``bundle_emb.<name>.clip_l`` /
  ``.clip_g``, cloneofsimo ``<s1>``) go to ``Lora.embeddings`` (an SDXL bundle's clip_g rows as ``<name>.clip_g``);
  ``bundled_embeddings`` gives them as ``Embedding``s, ``bundle`` puts one in (pivotal tuning).

Keys no reader understands are kept in ``Lora.unknown`` (``keys.match`` reports them); nothing is dropped.
LyCORIS Tucker factors (``hada_t1``, ``lokr_t2``) are folded into plain two-factor form on reading, which gives
the same ΔW with the same rank (and so the same alpha / rank scale).

Write (``save_lora``): kohya (LyCORIS names for LoHa/LoKr/full; the family's text-encoder prefixes, UNet naming
(SGM for SDXL) and ``ss_base_model_version``) with ``ss_*`` metadata, or diffusers/PEFT keys
with the alphas in the ``lora_adapter_metadata`` header (per-module ``rank_pattern``/``alpha_pattern``), which
diffusers' ``load_lora_weights`` reads, so the scale stays exact and the factors are stored unchanged (a PEFT DoRA
keeps its ``lora_magnitude_vector``, with ``use_dora`` on).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch

from .. import families
from ..families import Family
from ..ldm import ADAPTER_KEY, unet_module_map
from ..safeio import SdtuneError, atomic_save_safetensors, input_at, is_safetensors, load_state, output_file, read_keys
from ..ti.formats import SDXL_KEYS, Embedding, file_stem, load_embedding, save_embedding
from . import algos, hashes, keys
from .neutral import COMPONENTS, TEXT_COMPONENTS, Adapter, Lora, text_path, text_paths

KOHYA_UNET_PREFIX = "lora_unet_"
# kohya prefix -> component: lora_unet_, and each family's text-encoder prefixes (lora_te_, lora_te1_, lora_te2_)
KOHYA_PREFIXES = {KOHYA_UNET_PREFIX: "unet"} | {te.kohya_prefix: te.component for f in families.FAMILIES.values()
                                                for te in f.text_encoders}
# kohya's own OFT (``networks.oft``, UNet only) names its modules oft_unet_<kohya name>, as A1111 reads them; sdtune
# writes them back as lora_unet_ (the LyCORIS layout, which A1111 and ComfyUI read)
KOHYA_OFT_PREFIX = "oft_unet_"
KOHYA_PREFIXES[KOHYA_OFT_PREFIX] = "unet"
# The key suffixes and roles of each algorithm are its own (``algos``); ``alpha`` is shared by all of them.
_ALPHA = "alpha"
# attention-processor LoRA (diffusers < 0.19, and the text-encoder monkey patch of that time)
_PROCESSOR_KEY = re.compile(r"^(.*?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_CLONEOFSIMO_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
_DIFFUSERS_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"),
                       ("base_model.model.", None))
# ComfyUI's own layout (its LoraSave node writes it): the UNet's LDM/SGM module paths under "diffusion_model.", each
# text encoder's transformers path under "text_encoders.<ComfyUI's name for it>.transformer.", with kohya's key
# suffixes; read as the kohya names they spell (ComfyUI's clip_l is SDXL's first encoder, SD 1.x's only one)
_COMFY_UNET = "diffusion_model."
_COMFY_TEXT = re.compile(r"^text_encoders\.(clip_[lgh])\.transformer\.")
_COMFY_TEXT_PREFIX = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "clip_h": "lora_te_"}
_META_KEY = "lora_adapter_metadata"
# A text encoder's PEFT keys that diffusers hands to transformers, which loads them under the module's own parameter
# name: a DoRA magnitude as PEFT saves it (without .weight) is left unloaded there; the UNet's loads either way
_TEXT_SUFFIXES = {".lora_magnitude_vector": ".lora_magnitude_vector.weight"}
BUNDLE_PREFIX = "bundle_emb."  # A1111's keys of an embedding a LoRA file carries
CLIP_G_SUFFIX = ".clip_g"  # Lora.embeddings name suffix of an SDXL bundle's second-encoder rows


# ================================================================= reading

def load_lora(path: str | Path, *, model_keys: dict | None = None) -> Lora:
    """Read a LoRA file (or a folder holding one) of any supported layout into a ``Lora``.

    ``model_keys`` ({component: root module or module paths}) resolves kohya's underscore names and
    cloneofsimo's indices against the actual model; without it, against the structure of the family the
    file's layer widths point to (SD 1.x when they do not say).
    """
    path = Path(path)
    if path.is_dir():
        path = _weights_in_folder(path)
    state, metadata = load_state(path)
    peft_config = _peft_config_beside(path)
    if isinstance(state, (list, tuple)):
        return _from_cloneofsimo_list(state, path, model_keys)
    return from_state_dict(state, metadata, source=str(path), model_keys=model_keys, peft_config=peft_config)


def adapter_folder_file(folder: Path) -> Path | None:
    """The weights file of a diffusers or PEFT adapter folder (``save_lora_weights``, ``save_pretrained``)."""
    for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                 "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def _weights_in_folder(folder: Path) -> Path:
    named = adapter_folder_file(folder)
    if named is not None:
        return named
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise SdtuneError(f"{folder}: a folder without one clear LoRA file (pytorch_lora_weights.safetensors or "
                      f"adapter_model.safetensors); give the file's path instead")


def _peft_config_beside(path: Path) -> dict | None:
    """The PEFT ``adapter_config.json`` saved with ``adapter_model.*`` (also as ``<x>adapter_config.json`` beside
    ``<x>adapter_model.safetensors``). Other JSON files next to a LoRA (A1111/civitai notes) are not configs."""
    candidates = [path.with_name("adapter_config.json")]
    if "adapter_model" in path.name:
        candidates.insert(0, path.with_name(path.name.replace("adapter_model", "adapter_config")).with_suffix(".json"))
    for c in candidates:
        if not c.is_file():
            continue
        try:
            config = json.loads(c.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SdtuneError(f"{c}: unreadable PEFT adapter config ({e}); fix or remove it")
        if isinstance(config, dict) and ("peft_type" in config or {"r", "lora_alpha"} <= set(config)):
            return config
    return None


def from_state_dict(sd: dict, metadata: dict | None = None, *, source: str = "", model_keys: dict | None = None,
                    peft_config: dict | None = None) -> Lora:
    """A ``Lora`` from tensors and the safetensors header. ``peft_config``: an adapter_config.json's contents."""
    source = source or "LoRA state dict"
    metadata = dict(metadata or {})
    sd = _plain_tensors(sd, source)
    lora = Lora(metadata=metadata)
    reader = _Reader(lora, source, model_keys, metadata, peft_config)
    for key, value in sd.items():
        reader.take(key, value)
    reader.finish()
    if not len(lora) and lora.embeddings and not any(k.startswith("bundle_emb.") for k in sd):
        # {token: vectors}, as cloneofsimo's files bundle them, alone: a diffusers TI file
        raise SdtuneError(f"{source}: holds Textual Inversion embeddings ({', '.join(lora.embeddings)}) and no LoRA "
                          f"weights; load it as an embedding")
    if not len(lora) and not lora.embeddings:
        if reader.malformed:  # the keys of a known algorithm, in shapes that do not fit together
            raise SdtuneError(f"{source}: {reader.malformed[0]}; the file is damaged: re-download or re-export it")
        raise SdtuneError(_not_a_lora_message(sd, source))
    return lora


def _plain_tensors(sd, source: str) -> dict:
    if not isinstance(sd, dict):
        raise SdtuneError(f"{source}: holds a {type(sd).__name__}, not a dict of tensors; is it a LoRA file?")
    if "string_to_param" in sd or "emb_params" in sd:
        raise SdtuneError(f"{source}: this is a Textual Inversion embedding, not a LoRA; load it as an embedding")
    if isinstance(sd.get("state_dict"), dict) and len(sd) <= 4:  # a training checkpoint wrapping the weights
        sd = sd["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SdtuneError(f"{source}: entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a tensor; "
                          f"this is not a LoRA weight file sdtune can read")
    # a broken file (a training run that diverged, a bad download): it would draw black images, and a merge,
    # a bake or a resize would carry it on
    broken = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise SdtuneError(f"{source}: {len(broken)} of its tensors hold NaN or infinite values (e.g. {broken[0]}); "
                          f"the file is broken: re-train or re-download it")
    return sd


def _not_a_lora_message(sd: dict, source: str) -> str:
    first = ", ".join(list(sd)[:3])
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in sd):
        return f"{source}: this is a full Stable Diffusion checkpoint, not a LoRA; load it as the base model"
    if sd and all(k.startswith(_COMFY_UNET) and not ADAPTER_KEY.search(k) for k in sd):
        return f"{source}: this is a UNet's weights (diffusion_model.… keys, as ComfyUI saves a UNet), not a LoRA"
    what = algos.not_read(sd)
    if what:
        return f"{source}: holds {what}, which sdtune does not apply; it reads {algos.READ}"
    if not sd:
        return f"{source}: holds no tensors at all (metadata alone); re-download or re-export it"
    return f"{source}: no LoRA weights found (first keys: {first}); is this a LoRA file?"


class _Reader:
    """Groups file keys by (component, module) and turns each group into an ``Adapter``.

    kohya names are kept as they are until the whole file is read: which structure resolves them (SD 1.x's,
    SDXL's...) depends on the family, and that is read off the widths of all the file's layers.
    """

    def __init__(self, lora: Lora, source: str, model_keys, metadata: dict, peft_config: dict | None):
        self.lora, self.source, self.model_keys, self.metadata = lora, source, model_keys, metadata
        self.groups: dict[tuple[str, str], dict] = {}  # (component, module path) -> keys of one adapter
        self.kohya: dict[tuple[str, str], dict] = {}  # (component, kohya underscore name) -> keys of one adapter
        self.bare_text: set[tuple[str, str]] = set()  # text-encoder groups whose keys did not say which encoder
        self.styles: Counter = Counter()
        self.cloneofsimo: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        self.peft = _peft_configs(metadata, peft_config, source)
        self.malformed: list[str] = []  # why groups of a known algorithm's keys made no adapter
        # read from the registry now, so that an algorithm registered at run time is read too
        self.kohya_roles = algos.kohya_roles() | {_ALPHA: (None, _ALPHA)}
        self.comfy_suffixes = [*algos.kohya_roles(comfy=True), _ALPHA]
        self.diffusers_roles = [(algo.name, r) for algo in algos.ALGORITHMS.values() for r in algo.diffusers_roles]

    def take(self, key: str, value: torch.Tensor) -> None:
        if self._embedding(key, value):
            return
        if m := _CLONEOFSIMO_KEY.match(key):
            self.cloneofsimo.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
            return
        key = self._comfy_as_kohya(key)
        for prefix, comp in KOHYA_PREFIXES.items():  # kohya names; an unknown kohya suffix is an unknown key
            if key.startswith(prefix):
                name, _, suffix = key[len(prefix):].partition(".")
                kind_role = self.kohya_roles.get(suffix)
                if kind_role is None:
                    break
                style = algos.get(kind_role[0]).style if kind_role[0] else None
                if prefix == KOHYA_OFT_PREFIX:
                    style = "kohya-oft"
                self._add(self.kohya, comp, name, kind_role, value, key, style)
                return
        else:
            if self._diffusers(key, value):
                return
        self.lora.unknown.append(key)

    def _comfy_as_kohya(self, key: str) -> str:
        """A key of ComfyUI's layout as the kohya key it stands for; any other key as it is."""
        m = _COMFY_TEXT.match(key)
        prefix, rest = ((KOHYA_UNET_PREFIX, key[len(_COMFY_UNET):]) if key.startswith(_COMFY_UNET) else
                        (_COMFY_TEXT_PREFIX[m.group(1)], key[m.end():]) if m else (None, ""))
        suffix = max((x for x in self.comfy_suffixes if rest.endswith("." + x)), key=len, default=None) if prefix \
            else None
        if suffix is None:
            return key
        return prefix + rest[: -len(suffix) - 1].replace(".", "_") + "." + suffix

    def _embedding(self, key: str, value: torch.Tensor) -> bool:
        if key.startswith(BUNDLE_PREFIX):
            rest = key[len(BUNDLE_PREFIX):]
            m = re.match(r"^(.+)\.(string_to_param\.[^.]+|clip_l|clip_g)$", rest)
            if not m:
                return False
            name = m.group(1) if m.group(2) != "clip_g" else f"{m.group(1)}.clip_g"
            self.lora.embeddings[name] = value
            return True
        if self.metadata.get(key) == "<embed>" or (re.fullmatch(r"<[^<>]+>", key) and value.dim() <= 2):
            self.lora.embeddings[key] = value
            return True
        return False

    def _diffusers(self, key: str, value: torch.Tensor) -> bool:
        comp, rest, prefixed = None, key, False
        for prefix, c in _DIFFUSERS_PREFIXES:
            if key.startswith(prefix):
                comp, rest, prefixed = c, key[len(prefix):], c is not None
                break
        if m := _PROCESSOR_KEY.match(rest):
            comp = comp or _component_of(m.group(1))
            if comp is None:
                return False
            table = _PROCESSOR_TEXT if comp in TEXT_COMPONENTS else _PROCESSOR_UNET
            path = f"{m.group(1)}.{table[m.group(3)]}"
            self._add_dotted(comp, path, prefixed, (None, m.group(4)), value, key, "diffusers-old")
            return True
        for kind, (suffix, role, style) in [*self.diffusers_roles, (None, ("." + _ALPHA, _ALPHA, None))]:
            if rest.endswith(suffix):
                path = rest[: -len(suffix)]
                comp = comp or _component_of(path)
                if comp is None or not path:
                    return False
                if style == "peft" and prefixed:
                    style = "diffusers"
                self._add_dotted(comp, path, prefixed, (kind, role), value, key, style)
                return True
        return False

    def _add_dotted(self, comp, path, prefixed: bool, kind_role, value, key, style) -> None:
        if comp in TEXT_COMPONENTS:
            path = text_path(path)
            if not prefixed:  # raw PEFT / unprefixed keys: which encoder is decided from the widths in finish()
                self.bare_text.add((comp, path))
        self._add(self.groups, comp, path, kind_role, value, key, style)

    def _add(self, groups: dict, comp, name, kind_role, value, key, style) -> None:
        group = groups.setdefault((comp, name), {"kinds": set(), "roles": {}, "keys": [], "styles": set()})
        kind, role = kind_role
        if kind:
            group["kinds"].add(kind)
        if role in group["roles"]:  # the same module twice (e.g. with and without text_model.)
            self.lora.unknown.append(key)
            return
        group["roles"][role] = value
        group["keys"].append(key)
        if style:
            group["styles"].add(style)

    def finish(self) -> None:
        built = self._place_bare_text(self._build(self.groups))
        raw = self._build(self.kohya)
        if raw:
            self._resolve_kohya(built, raw)
        for (comp, path), (adapter, group) in built.items():
            self.lora.modules.setdefault(comp, {})[path] = adapter
            self.styles.update(group["styles"])
        for comp, entries in self.cloneofsimo.items():
            self._cloneofsimo(comp, entries)
        styles = [s for s, n in self.styles.most_common() if n]
        self.lora.format = "+".join(styles) if styles else ("embeddings" if self.lora.embeddings else "")

    def _resolve_kohya(self, built: dict, raw: dict) -> None:
        """Add the kohya-named adapters ``raw`` to ``built`` under module paths, resolved against the model,
        or (without one) against the structure of the family all the file's layers point to."""
        sketch = Lora(modules={c: {} for c in COMPONENTS}, metadata=self.metadata, embeddings=self.lora.embeddings)
        for (comp, name), (adapter, _) in {**built, **raw}.items():
            sketch.modules.setdefault(comp, {})[name] = adapter
        resolver = keys.NameResolver(self.model_keys, keys.guess_family(sketch))
        for (comp, name), (adapter, group) in raw.items():
            path = resolver.kohya(comp, name)
            if (comp, path) in built:  # the same module under two names: neither is applied twice
                self.lora.unknown.extend(group["keys"])
                continue
            built[(comp, path)] = adapter, group

    def _build(self, groups: dict) -> dict[tuple[str, str], tuple[Adapter, dict]]:
        """{group key: (adapter, group)}; groups that make no adapter go to ``unknown``."""
        built = {}
        for (comp, name), group in groups.items():
            adapter = self._adapter(comp, name, group)
            if adapter is None:
                self.lora.unknown.extend(group["keys"])
            else:
                built[(comp, name)] = adapter, group
        return built

    def _place_bare_text(self, built: dict) -> dict:
        """Text-encoder adapters from keys that name no encoder (a raw PEFT ``text_model.…`` file) go to the
        encoder whose width their attention projections have: 1280 is only SDXL's text_encoder_2."""
        bare = {k: v for k, v in built.items() if k in self.bare_text}
        ios = [keys.adapter_io(ad) for (_, p), (ad, _) in bare.items() if keys.TEXT_ATTENTION.search(p)]
        widths = {io.out or io.inner for io in ios} - {None}  # these layers are square: PEFT OFT tells only in
        comp = keys.text_component(widths.pop()) if len(widths) == 1 else None
        if comp is None:
            return built
        return {((comp if k in bare else k[0]), k[1]): v for k, v in built.items()}

    def _adapter(self, comp: str, path: str, group: dict) -> Adapter | None:
        # keys that name no algorithm (alpha alone, the attention-processor layout) are plain LoRA's
        roles, kinds = dict(group["roles"]), set(group["kinds"]) or {"lora"}
        if combined := algos.combined(kinds):  # a DoRA's keys: LoRA's (or LoHa's, LoKr's) plus its own
            kinds = {combined}
        if len(kinds) != 1:
            return None
        algo = algos.get(kinds.pop())
        alpha = roles.pop(_ALPHA, None)
        alpha = float(alpha.float().item()) if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 else alpha
        if isinstance(alpha, torch.Tensor):
            return None
        try:
            if group["styles"] & {"peft", "diffusers"}:
                roles = algo.configure(roles, self.peft.get(comp) or self.peft.get("*") or {})
            tensors = algo.build(roles)
        except (KeyError, RuntimeError, ValueError) as e:
            why = e.args[0] if isinstance(e, KeyError) and e.args else e
            module = self._module_named(group["keys"])
            self.malformed.append(f"the {algo.label or algo.name} tensors of {module} make no adapter ({why})")
            return None
        if not algo.uses_alpha:
            alpha = None
        elif alpha is None and group["styles"] & {"peft", "diffusers"}:
            alpha = self.peft_alpha(comp, path, algo.rank(tensors))
        return Adapter(algo.name, tensors, alpha)

    def _module_named(self, file_keys: list[str]) -> str:
        """The module a group's keys name, as the file spells it: what they share, or a lone key without its
        role's suffix."""
        if len(file_keys) > 1:
            return os.path.commonprefix(sorted(file_keys)).rstrip(".")
        key = file_keys[0]
        endings = [*("." + x for x in self.kohya_roles), *(r.suffix for _, r in self.diffusers_roles)]
        return key[: -max((len(e) for e in endings if key.endswith(e)), default=0) or None]

    def peft_alpha(self, comp: str, path: str, rank: int) -> float | None:
        cfg = self.peft.get(comp) or self.peft.get("*")
        if not cfg:
            return None
        names = list(dict.fromkeys(text_paths(path))) if comp in TEXT_COMPONENTS else [path]
        r = _pattern_value(cfg.get("rank_pattern") or {}, names, cfg.get("r", rank))
        a = _pattern_value(cfg.get("alpha_pattern") or {}, names, cfg.get("lora_alpha", 8))
        r, a = int(r), float(a)
        if cfg.get("use_rslora"):
            return a * rank / math.sqrt(r)  # PEFT scale alpha / sqrt(r), as alpha' / rank
        return a if r == rank else a * rank / r

    def _cloneofsimo(self, comp: str, entries: dict[int, dict]) -> None:
        """lora_diffusion numbered the layers it patched; map numbers back to module paths."""
        layout = "the cloneofsimo lora_diffusion layout (keys like unet:N:up)"
        if self.model_keys and self.model_keys.get(comp) is not None:
            paths = keys.model_keys_of({comp: self.model_keys[comp]})[comp]
        else:
            paths = keys.reference(families.SD1)[comp]  # lora_diffusion only ever trained SD 1.x
        targets = [text_path(t) for t in keys.cloneofsimo_targets(comp, paths)]
        declared = self.metadata.get(comp, "")
        if comp == "unet" and ("GEGLU" not in declared if declared else len(entries) * 9 == len(targets) * 8):
            targets = [t for t in targets if not t.endswith("ff.net.0.proj")]  # older default: attention only
        if len(entries) != len(targets) or set(entries) != set(range(len(entries))):
            raise SdtuneError(f"{self.source}: {layout} with {len(entries)} {comp} entries, but the model has "
                              f"{len(targets)} layers in that scheme; the file is not for this model's architecture")
        for index, pair in sorted(entries.items()):
            if set(pair) != {"up", "down"}:
                self.lora.unknown.extend(f"{comp}:{index}:{r}" for r in pair)
                continue
            self.lora.modules.setdefault(comp, {})[targets[index]] = Adapter("lora", {"down": pair["down"],
                                                                                     "up": pair["up"]})
        self.styles["cloneofsimo"] += len(entries)


def _component_of(path: str) -> str | None:
    root = path.split(".", 1)[0]
    if root in keys.UNET_ROOTS:
        return "unet"
    if root in keys.TEXT_ROOTS:
        return "text_encoder"
    return None


def _pattern_value(patterns: dict, names: list[str], default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name ending in it (as a regex)."""
    for pattern, value in patterns.items():
        for name in names:
            try:
                if re.match(rf"(.*\.)?({pattern})$", name):
                    return value
            except re.error:
                continue
    return default


def _peft_configs(metadata: dict, peft_config: dict | None, source: str) -> dict[str, dict]:
    """{component or "*": LoraConfig kwargs} from the diffusers header and/or an adapter_config.json."""
    configs: dict[str, dict] = {}
    if peft_config:
        configs["*"] = peft_config
    raw = metadata.get(_META_KEY)
    if raw:
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise SdtuneError(f"{source}: the {_META_KEY} header is not valid JSON ({e}); re-export the file")
        prefixed = {k for k in data if k.split(".", 1)[0] in COMPONENTS and "." in k}
        if prefixed:
            for k in prefixed:
                comp, _, field_name = k.partition(".")
                configs.setdefault(comp, {})[field_name] = data[k]
        else:
            configs["*"] = data
    return configs


def _from_cloneofsimo_list(state: list, path: Path, model_keys) -> Lora:
    """lora_diffusion's ``.pt``: a bare list [up0, down0, up1, down1, ...] of one component."""
    if len(state) % 2 or not all(isinstance(t, torch.Tensor) for t in state):
        raise SdtuneError(f"{path}: a list that is not the cloneofsimo lora_diffusion .pt layout (pairs of up, "
                          f"down tensors); sdtune cannot read it")
    comp = "text_encoder" if "text_encoder" in path.name else "unet"
    sd = {}
    for i in range(len(state) // 2):
        sd[f"{comp}:{i}:up"], sd[f"{comp}:{i}:down"] = state[2 * i], state[2 * i + 1]
    meta = {comp: '["CrossAttention", "Attention", "GEGLU"]'} if comp == "unet" else {}
    return from_state_dict(sd, meta, source=str(path), model_keys=model_keys)


# ================================================================= writing

def check_output(path: str | Path, inputs=(), option: str = "--out") -> Path:
    """A LoRA output path, checked before any work: a ``.safetensors`` name (a .ckpt/.pt one would make other
    tools unpickle it) where a file can be written, and none of the command's ``inputs`` (written over, the
    input would be lost, read-only or not: the atomic rename replaces it). ``option``: how the user gave it."""
    path = output_file(path, option)
    if path.suffix != ".safetensors":
        raise SdtuneError(f"{path}: sdtune writes LoRAs as .safetensors files; use {path.with_suffix('.safetensors')}")
    if input_at(path, inputs):
        raise SdtuneError(f"{path}: is an input of this command; write to a new file")
    if path.is_file() and not _holds_a_lora(path):  # a rerun writes over its LoRA; a model or other file is kept
        raise SdtuneError(f"{path}: exists and holds no LoRA (a model, an embedding or another file), which this "
                          f"would replace; remove it first, or write to another name")
    return path


def _holds_a_lora(path: Path) -> bool:
    """Whether a file's header names LoRA-like keys (an empty or cut file is no loss either)."""
    if path.stat().st_size == 0:
        return True
    try:
        keys = read_keys(path) if is_safetensors(path) else None
    except SdtuneError:  # an unreadable safetensors header: a cut write of ours, nothing to keep
        return True
    return keys is not None and (not keys or any(ADAPTER_KEY.search(k) for k in keys))


def save_lora(lora: Lora, path: str | Path, format: str = "kohya", metadata: dict | None = None,
              family: Family | None = None, source: str | Path | None = None) -> None:
    """Write ``lora`` as a ``.safetensors`` file in the kohya or the diffusers layout (atomically).

    ``family`` (default: the one its layer widths point to, else SD 1.x) gives the kohya text-encoder prefixes
    (``lora_te_`` or ``lora_te1_``/``lora_te2_``), the UNet's naming and ``ss_base_model_version``. ``source``: the
    file the LoRA was read from, which a refusal of its content names (default: ``path``).
    """
    path = check_output(path)
    source = source or path
    family = family or keys.guess_family(lora) or families.SD1
    if lora.unknown:
        raise SdtuneError(f"{source}: the LoRA has {len(lora.unknown)} keys sdtune could not read (e.g. "
                          f"{lora.unknown[0]}); writing it would lose them. Remove them from the source first")
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    if format == "kohya":
        tensors, header = _kohya_tensors(lora, family), _kohya_metadata(lora, family)
        meta = {**_carried_metadata(lora), **header, **extra}
    elif format == "diffusers":
        tensors, header = _diffusers_tensors(lora, source)
        # kohya's version keys too: A1111 files a LoRA whose header lacks them under SD 1.x, and civitai reads them
        meta = {**_carried_metadata(lora), **_version_metadata(lora, family), **extra, "format": "pt",
                _META_KEY: header}
    else:
        raise SdtuneError(f"{path}: unknown LoRA format {format!r}; use 'kohya' or 'diffusers'")
    # kohya's precomputed hashes, so A1111/additional-networks/civitai need not hash the file (stale ones carried
    # from the source are replaced)
    meta |= hashes.sshs_hashes(tensors, meta)
    atomic_save_safetensors(tensors, path, metadata=meta)


def convert(in_path: str | Path, out_path: str | Path, to: str = "kohya", *, model_keys: dict | None = None,
            family: Family | None = None, words_in: str | Path | None = None) -> Lora:
    """Re-write a LoRA file in another layout; the ΔW of every module is unchanged. Returns what was read.
    The diffusers layout has no place for bundled embeddings (pivotal tuning's words; diffusers' loader refuses
    the file): each goes into folder ``words_in`` (default: beside the output) as ``word_files`` names it, in the
    layout ``load_textual_inversion`` reads, and the LoRA without them."""
    check_output(out_path, inputs=[in_path], option="the output (convert's OUT, or --out)")
    lora = load_lora(in_path, model_keys=model_keys)
    words = word_files(lora, out_path, words_in) if to == "diffusers" else {}
    for path, emb in words.items():
        _check_word_file(path, emb, in_path)
    kept = dataclasses.replace(lora, embeddings={}) if words else lora
    save_lora(kept, out_path, format=to, family=family, source=in_path)  # what the layout cannot hold: the input's
    for path, emb in words.items():
        if not path.exists():
            save_embedding(emb, path, format="diffusers")
    return lora


def word_files(lora: Lora, out_path: str | Path, folder: str | Path | None = None) -> dict[Path, Embedding]:
    """Where ``convert`` to the diffusers layout writes each of ``lora``'s bundled embeddings: in ``folder``
    (default: beside ``out_path``), named as pivotal training names the word's own file (``<os>``:
    ``os.safetensors``, A1111's word)."""
    folder = Path(folder) if folder is not None else Path(out_path).parent
    return {folder / (file_stem(emb.token) + ".safetensors"): emb for emb in bundled_embeddings(lora)}


def _check_word_file(path: Path, emb: Embedding, source) -> None:
    """A word's file may be there already (a training run's folder holds ``os.safetensors``): the same rows are
    kept as they are, other ones are not written over."""
    if not path.exists():
        check_output(path, inputs=[source])
        return
    try:
        there = load_embedding(path)
        same = there.token == emb.token and there.parts.keys() == emb.parts.keys() and all(
            torch.equal(there.parts[k], emb.parts[k]) for k in emb.parts)
    except SdtuneError:
        same = False
    if not same:
        raise SdtuneError(f"{path}: exists and is not the word {emb.token} of {source}, which the diffusers layout "
                          f"keeps in its own file there; move that file, or convert into another folder")


def _carried_metadata(lora: Lora) -> dict[str, str]:
    """Header entries worth keeping across formats (not those describing the old layout: a LoKr resized to LoRA
    factors kept ``ss_network_args`` ``{"algo": "lokr"}``; the kohya layout writes its own)."""
    drop = {_META_KEY, "format", "ss_network_args", "ss_network_module", "ss_network_dim", "ss_network_alpha"}
    return {k: v for k, v in lora.metadata.items() if k not in drop and v != "<embed>"
            and not re.match(r"^(unet|text_encoder):\d+:rank$", k) and k not in ("unet", "text_encoder")}


def _kohya_unet_names(paths, family: Family) -> dict[str, str]:
    """diffusers UNet path -> the path kohya names it by: the same for SD 1.x/2.x, SGM's for SDXL
    (``input_blocks.4.1.proj_in``, ``label_emb.0.0``), as sd-scripts writes. A1111 and ComfyUI match SGM names as
    they are, while A1111 maps diffusers names by SD 1.x's block layout (SDXL's first upsampler lands on the wrong
    module, and the added embedding on none). A UNet with a module outside the family's layout keeps diffusers
    names throughout: diffusers drops the SGM keys of a file that mixes the two."""
    same = {p: p for p in paths}
    if family.kohya_unet_names != "sgm":
        return same
    sgm = {diffusers: name for name, diffusers in unet_module_map(family.component_configs()["unet"]).items()}
    return {p: sgm[p] for p in paths} if all(p in sgm for p in paths) else same


def _kohya_name(comp: str, path: str, family: Family) -> str:
    """kohya's name of a text-encoder module: its prefix, then the path with dots as underscores (keeping the
    ``text_model`` level, as kohya's transformers-4 models had it)."""
    try:
        prefix = family.text_encoder(comp).kohya_prefix
    except KeyError:
        raise SdtuneError(f"this LoRA has {comp} layers, which {family.title} has no kohya name for; "
                          f"write it for a family with that text encoder (SDXL) or drop those layers") from None
    return prefix + keys.underscored(text_paths(path)[1])


def _kohya_tensors(lora: Lora, family: Family) -> dict[str, torch.Tensor]:
    out = {}
    unet = _kohya_unet_names(lora.modules["unet"], family)
    for comp, path, ad in lora.items():
        name = KOHYA_UNET_PREFIX + keys.underscored(unet[path]) if comp == "unet" else _kohya_name(comp, path, family)
        for role, tensor in ad.tensors.items():
            out[f"{name}.{ad.algo.file_key(role)}"] = tensor
        if ad.alpha is not None and ad.algo.uses_alpha:
            out[f"{name}.{_ALPHA}"] = torch.tensor(float(ad.alpha), dtype=torch.float32)
    for name, emb in lora.embeddings.items():
        emb = emb[None] if emb.dim() == 1 else emb
        if name.endswith(CLIP_G_SUFFIX):
            key = f"bundle_emb.{name[:-len(CLIP_G_SUFFIX)]}.clip_g"
        elif name + CLIP_G_SUFFIX in lora.embeddings:  # SDXL: the first encoder's rows are clip_l, as A1111 names them
            key = f"bundle_emb.{name}.clip_l"
        else:
            key = f"bundle_emb.{name}.string_to_param.*"
        out[key] = emb.contiguous()
    return out


# ================================================================= bundled embeddings

def bundle(lora: Lora, token: str, parts: dict[str, torch.Tensor]) -> None:
    """Put a Textual Inversion embedding into ``lora`` (``parts``: rows by embedding key, ``{"": rows}`` for one
    text encoder, ``{"clip_l": .., "clip_g": ..}`` for SDXL). The kohya writer saves it in A1111's layout:
    ``bundle_emb.<token>.string_to_param.*``, or ``bundle_emb.<token>.clip_l`` / ``.clip_g``."""
    if "." in token:
        raise SdtuneError(f"token {token!r}: A1111 reads bundled embedding names up to the first dot; choose a "
                          f"token without dots")
    if set(parts) == {""}:
        lora.embeddings[token] = parts[""]
    elif set(parts) == set(SDXL_KEYS):
        lora.embeddings[token], lora.embeddings[token + CLIP_G_SUFFIX] = parts["clip_l"], parts["clip_g"]
    else:
        raise SdtuneError(f"token {token!r}: embedding rows for {sorted(parts)}; a LoRA file bundles one text "
                          f"encoder's rows or SDXL's clip_l and clip_g")


def bundled_words(source: Lora | str | Path) -> list[str]:
    """The words a LoRA (or a LoRA file, read from its header only) bundles; [] for a file of another kind."""
    if isinstance(source, Lora):
        return sorted({emb.token for emb in bundled_embeddings(source)})
    if not is_safetensors(source):
        return []
    # names up to the first dot, as A1111 reads them
    return sorted({k[len(BUNDLE_PREFIX):].split(".")[0] for k in read_keys(source) if k.startswith(BUNDLE_PREFIX)})


def diffusers_refuses_kohya(lora: Lora) -> str | None:
    """Why diffusers' ``load_lora_weights`` refuses ``lora`` written in the kohya layout, where it does (None: it
    loads): bundled words (their keys hold no "lora"), or text-encoder layers alone without an ``out_proj`` (its
    kohya reader tells the old text-encoder naming by that layer)."""
    if bundled_embeddings(lora):
        return "its bundled words (keys without 'lora')"
    text = [p for c in TEXT_COMPONENTS for p in lora.modules.get(c, {})]
    if text and not lora.modules.get("unet") and not any(p.endswith("out_proj") for p in text):
        return "text-encoder layers without an out_proj (its kohya reader infers the layout from one)"
    return None


def bundled_embeddings(lora: Lora, source: str = "") -> list[Embedding]:
    """The Textual Inversion embeddings a LoRA file carries (``bundle_emb.*``, cloneofsimo's ``<s1>``), each as an
    ``Embedding`` whose token is its bundled name (A1111's prompt word)."""
    found = []
    for name, rows in lora.embeddings.items():
        if name.endswith(CLIP_G_SUFFIX):
            continue
        rows = (rows[None] if rows.dim() == 1 else rows).to("cpu", torch.float32)
        g = lora.embeddings.get(name + CLIP_G_SUFFIX)
        parts = {"": rows} if g is None else {"clip_l": rows, "clip_g": (g[None] if g.dim() == 1 else g).to(
            "cpu", torch.float32)}
        found.append(Embedding.from_parts(name, parts, f"{source or 'LoRA'} (bundled {name})", "bundle"))
    return found


def _number(x: float) -> str:
    return str(float(x))


def _base_model_version(lora: Lora, family: Family) -> str:
    """The family's ``ss_base_model_version``, or the file's own when it names the same family more precisely
    (``sd_v2_768_v``)."""
    carried = lora.metadata.get("ss_base_model_version")
    return carried if families.by_base_model_version(carried) == family else family.base_model_version


def _version_metadata(lora: Lora, family: Family) -> dict[str, str]:
    """``ss_base_model_version``, and kohya's ``ss_v2`` flag, which means exactly "an SD 2.x base"."""
    return {"ss_base_model_version": _base_model_version(lora, family), "ss_v2": str(family == families.SD2)}


def sampling_metadata(family: Family, scheduler_config) -> dict[str, str]:
    """kohya's record of how the base model samples, for a LoRA made on it (trained, extracted): a v-prediction
    SD 2.x is ``sd_v2_v`` (its get_model_version_str_for_sd1_sd2) with ``ss_v_parameterization``; zero terminal
    SNR is ``ss_zero_terminal_snr``. Written in either layout, so a converted file keeps it."""
    v_pred = scheduler_config.get("prediction_type") == "v_prediction"
    meta = {"ss_v_parameterization": str(v_pred)}
    if v_pred and family.base_model_version.startswith("sd_v"):
        meta["ss_base_model_version"] = family.base_model_version + "_v"
    if scheduler_config.get("rescale_betas_zero_snr"):
        meta["ss_zero_terminal_snr"] = "True"
    return meta


def _kohya_metadata(lora: Lora, family: Family) -> dict[str, str]:
    kinds = {ad.kind for _, _, ad in lora.items()}
    # norm adapters have no rank or kernel; a LoHa's or LoKr's kernel is the architecture's
    kernels = [(ad, keys.kernel_of(c, p, ad, family)) for c, p, ad in lora.items() if not ad.algo.vector]
    linear = [ad for ad, kernel in kernels if kernel in (None, (1, 1))]
    conv = [ad for ad, kernel in kernels if kernel not in (None, (1, 1))]

    def dim_alpha(ads):
        ranks = {ad.rank for ad in ads}
        alphas = {ad.alpha if ad.alpha is not None else ad.rank for ad in ads}
        dim = str(ranks.pop()) if len(ranks) == 1 and None not in ranks else "Dynamic"
        alpha = _number(alphas.pop()) if len(alphas) == 1 and None not in alphas else "Dynamic"
        return dim, alpha

    dim, alpha = dim_alpha(linear or conv) if (linear or conv) else ("0", "0")
    meta = {"ss_network_dim": dim, "ss_network_alpha": alpha, **_version_metadata(lora, family)}
    # LyCORIS names the algorithms beyond kohya's plain LoRA; a Tucker core alone makes it LyCORIS's LoCon
    network_algos = sorted({ad.algo.lycoris_algo(ad.tensors) for _, _, ad in lora.items()} - {None})
    lycoris = network_algos or any(ad.algo.lycoris_label(ad.tensors) for _, _, ad in lora.items())
    args = {}
    if conv:
        args["conv_dim"], args["conv_alpha"] = dim_alpha(conv)
    if lycoris:
        args["algo"] = "+".join(network_algos) or "locon"
        for k in sorted(kinds):  # the switches its algorithms need (dora_wd, train_norm)
            args |= algos.get(k).network_args
        meta["ss_network_module"] = "lycoris.kohya"
    else:
        meta["ss_network_module"] = "networks.lora"
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


KOHYA_HINT = "sdtune convert --to kohya; in Python format='kohya'"


def _diffusers_module(comp: str, path: str) -> str:
    # diffusers 0.42 strips a leading ``text_model.`` when the CLIPTextModel has none (transformers 5) and keeps
    # it for transformers 4 and CLIPTextModelWithProjection, so writing it is what every diffusers version with
    # either transformers loads.
    return f"{comp}.{text_paths(path)[1] if comp in TEXT_COMPONENTS else path}"


def _diffusers_tensors(lora: Lora, path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    if lora.embeddings:
        raise SdtuneError(f"{path}: this LoRA carries Textual Inversion embeddings ({', '.join(lora.embeddings)}), "
                          f"which the diffusers LoRA layout cannot hold; write it in the kohya layout ({KOHYA_HINT}), "
                          f"or save the embeddings apart")
    tensors, header = {}, {}
    for comp in lora.modules:
        mods = lora.modules[comp]
        if not mods:
            continue
        other = {ad.algo.label or ad.kind for ad in mods.values() if ad.algo.peft_factors(ad.tensors) is None}
        if other:
            why = ("a kohya/LyCORIS DoRA normalises other axes than PEFT's" if any("dora" in o.lower() for o in other)
                   else "PEFT has no such adapter in diffusers")
            readers = "A1111 and ComfyUI load" if all(ad.algo.in_comfyui for ad in mods.values()) else "A1111 loads"
            raise SdtuneError(f"{path}: {'/'.join(sorted(other))} adapters have no layout that diffusers loads "
                              f"({why}); write this LoRA in the kohya layout, which {readers} ({KOHYA_HINT})")
        # PEFT switches an option such as DoRA on for a whole component, never per module
        switches = {ad.algo.peft_switch for ad in mods.values()}
        if len(switches) > 1:
            raise SdtuneError(f"{path}: {comp} mixes DoRA and plain LoRA layers, which one PEFT config cannot "
                              f"describe; write it in the kohya layout ({KOHYA_HINT})")
        ranks, alphas = {}, {}
        for p, ad in mods.items():
            down, up = ad.algo.peft_factors(ad.tensors)
            key = _diffusers_module(comp, p)
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
            tensors |= {key + (_TEXT_SUFFIXES.get(suffix, suffix) if comp in TEXT_COMPONENTS else suffix): t
                        for suffix, t in ad.algo.peft_extras(ad.tensors).items()}
            ranks[p] = ad.rank
            alphas[p] = float(ad.alpha) if ad.alpha is not None else float(ad.rank)
        header |= _pack_config(comp, ranks, alphas, switches.pop())
    return tensors, json.dumps(header, sort_keys=True)


def _pack_config(comp: str, ranks: dict[str, int], alphas: dict[str, float], switch: str | None = None) -> dict:
    """LoraConfig kwargs for one component, prefixed the way diffusers' save_lora_weights packs them (``switch``:
    a boolean option its algorithm needs on, "use_dora")."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]
    # Exact, anchored-at-a-dot patterns: PEFT matches ``(.*\.)?(pattern)$`` against the full module name.
    config = {
        "r": r, "lora_alpha": a,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != a},
        "target_modules": sorted(ranks),
        "init_lora_weights": True, "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False,
    }
    if switch:
        config[switch] = True
    return {f"{comp}.{k}": v for k, v in config.items()}
