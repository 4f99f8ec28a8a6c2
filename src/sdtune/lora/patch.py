"""Named LoRA adapters merged into a loaded model: add, reweight, remove, all without reloading the base.

Every touched layer is always recomputed from its pristine weight::

    W' = W0 + Σ_i w_i · ΔW_i          (summed in float32, then cast to the layer's dtype)

(a non-additive adapter, DoRA or OFT, adds its change f_i(W0, w_i) − W0, from the pristine weight as A1111 does;
an adapter that also changes the layer's bias, LyCORIS full's ``diff_b`` or a norm adapter's ``b_norm``, gives
b' = b0 + Σ_i w_i · Δb_i the same way, with b0 kept aside too)

with w_i the adapter's weight for the layer's component: the UNet, the text encoder and SDXL's second text
encoder each have their own (``as_weights``), times the layer's block weight when the adapter was added with
``blocks=`` (the lora-block-weight extension's vectors, ``lora.blocks``). So any sequence of ``add`` / ``set_weights`` / ``remove`` leaves exactly the weights a fresh patch with the
final set would give, and removing every adapter puts W0 back: the base is restored bit for bit.

Cost: the first time a layer is touched, its original weight tensor is kept aside (the parameter gets a new
buffer for W', so nothing is copied on the model's device; ``pristine_device="cpu"`` keeps a CPU copy instead,
to spare GPU memory) until no adapter touches that layer any more; restoring hands the original tensor back.
That is the touched layers' weights once, whatever the number of adapters or reweights
(``LoraSet.pristine_bytes()`` gives the current figure; the README has it for SD 1.5). Nothing else of the
model is copied.

Weights stay merged: there is no hook or wrapper on the forward path, so inference runs at base speed.
A reweight recomputes only the layers whose weighted sum changed (e.g. only text-encoder layers when only
the text-encoder weight moved). For plain LoRA adapters (low-rank ones, ``algos``) one layer's whole sum
is a single ``addmm``:
``W0 + [w1·s1·up1 | w2·s2·up2 | …] @ [down1; down2; …]``, written straight into the parameter; on CPU the
layers are spread over the threads. ``with loras.batch():`` groups several changes into one pass.
Contributions are taken in adapter-name order, so the floating-point result does not depend on the order
in which adapters were added either.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import families
from ..console import note
from ..families import Family
from ..safeio import SdtuneError
from . import blocks as block_weights
from . import keys
from .formats import bundled_embeddings, from_state_dict, load_lora
from .neutral import COMPONENTS, TEXT_COMPONENTS, Adapter, Lora, text_paths

LayerKey = tuple[str, str]  # (component, module path)
_ENTRY_IDS = itertools.count()


@dataclass
class _Entry:
    """One named adapter: its LoRA, its weight per component and the layers it was matched to."""

    lora: Lora
    weights: dict[str, float]  # component (unet, text_encoder, text_encoder_2) -> user weight
    targets: dict[LayerKey, Adapter] = field(default_factory=dict)
    factors: dict[LayerKey, float] = field(default_factory=dict)  # block weight per layer (``blocks``); none: 1
    blocks: dict[str, float] | None = None  # {block id: weight} as given (lbw=), None: no block weights
    source: str = ""
    uid: int = field(default_factory=lambda: next(_ENTRY_IDS))  # tells a re-added name from the old one
    tokens: list[str] = field(default_factory=list)  # bundled embeddings it loaded (unloaded with it)


@dataclass
class _Layer:
    module: torch.nn.Module
    pristine: torch.Tensor | None = None  # original weight, kept while any non-zero contribution is merged
    applied: tuple = ()  # signature of what is merged now: ((name, entry uid, weight), ...)
    bias: torch.Tensor | None = None  # original bias, kept while some adapter changes it (LyCORIS full, norm)


def _component_modules(target) -> dict[str, torch.nn.Module]:
    """{"unet": ..., "text_encoder": ..., "text_encoder_2": ...} (those present) from a Base, a diffusers
    pipeline or a dict of components."""
    get = target.get if isinstance(target, dict) else lambda k: getattr(target, k, None)
    mods = {c: _unwrapped(get(c)) for c in COMPONENTS}
    mods = {c: m for c, m in mods.items() if isinstance(m, torch.nn.Module)}
    if not mods:
        raise SdtuneError(f"{type(target).__name__}: has no unet or text_encoder module to put LoRAs on")
    return mods


def _unwrapped(module):
    """The model inside a ``torch.compile`` wrapper or a PEFT model (their parameters are the model's: patching
    them reaches the wrapper); anything else as it is."""
    if not isinstance(module, torch.nn.Module):
        return module
    module = getattr(module, "_orig_mod", module)
    get_base = getattr(module, "get_base_model", None)  # PeftModel: its paths start with base_model.model.
    return get_base() if callable(get_base) else module


def _find_module(root: torch.nn.Module, comp: str, path: str) -> torch.nn.Module | None:
    """The module at ``path``; text encoders are looked up with and without ``text_model.``."""
    candidates = text_paths(path) if comp in TEXT_COMPONENTS else (path,)
    for p in candidates:
        try:
            return root.get_submodule(p)
        except AttributeError:
            continue
    return None


def check_fit(lora: Lora, modules: dict, allow_partial: bool, source: str) -> dict[LayerKey, Adapter]:
    """The adapters of ``lora`` that fit ``modules`` ({component: root module or {path: shape}}).

    Anything that does not fit raises ``SdtuneError`` (naming the likely cause and the first offenders), or with
    ``allow_partial`` warns and is left out: nothing is dropped silently.
    """
    report = keys.match(lora, modules)
    report.raise_if_bad(allow_partial=allow_partial, source=source)
    return {(comp, path): lora.modules[comp][path] for comp, path in report.matched}


def as_weights(w, current: dict[str, float] | None = None, two_encoders: bool = False) -> dict[str, float]:
    """{component: weight} for unet, text_encoder and text_encoder_2 from a weight as users give it:

    - one number: every component;
    - ``(unet_w, te_w)``: te_w for the text encoder(s), both of SDXL's; None: the UNet's weight;
    - ``{"unet": .., "text_encoder": ..}``: components not named keep ``current`` (a reweight), or without it
      follow the pair's rule (UNet 1.0, the text encoders from the UNet);
    - with ``two_encoders`` (an SDXL model) also ``(unet_w, te1_w, te2_w)`` and a dict naming
      ``text_encoder_2``; None in a triple: te2 takes te1's weight, te1 the UNet's.
    """
    forms = "(unet, text_encoder, text_encoder_2) weights, " if two_encoders else ""
    components = COMPONENTS if two_encoders else COMPONENTS[:2]
    bad = SdtuneError(f"adapter weight {w!r}: give one number, (unet_weight, text_encoder_weight), {forms}or a "
                      f"{{component: weight}} dict of {', '.join(components)}")
    try:
        if isinstance(w, dict):
            if not w or set(w) - set(components):
                raise bad
            given = {c: float(v) for c, v in w.items()}
            if current:
                return _finite({**current, **given}, w)
            w = (given.get("unet", 1.0), given.get("text_encoder"), given.get("text_encoder_2"))[:len(components)]
        if isinstance(w, (tuple, list)):
            if len(w) != len(components) and len(w) != 2:
                raise bad
            unet = float(w[0])
            te = unet if w[1] is None else float(w[1])
            te2 = te if len(w) == 2 or w[2] is None else float(w[2])
            return _finite({"unet": unet, "text_encoder": te, "text_encoder_2": te2}, w)
        return _finite(dict.fromkeys(COMPONENTS, float(w)), w)
    except (TypeError, ValueError):
        raise bad from None


def no_bias(source: str, comp: str, path: str) -> SdtuneError:
    """The refusal of an adapter that changes a bias the model's layer does not have (``LoraSet`` and the bake)."""
    return SdtuneError(f"{source}: changes the bias of {comp}:{path}, which has none in this model; use a LoRA made "
                       f"for this base model")


def _finite(weights: dict[str, float], given) -> dict[str, float]:
    if not all(math.isfinite(v) for v in weights.values()):  # it would draw black images
        raise SdtuneError(f"adapter weight {given!r}: must be a finite number")
    return weights


_ATTR = "_sdtune_lora_set"  # the LoraSet of a module is kept on the module itself, so both go away together


def _locked(method):
    """One change to a set at a time: two threads patching at once could each take the other's patched weight
    for an original, which no remove would give back."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


class LoraSet:
    """The named adapters merged into one model's ``unet``, ``text_encoder`` and (SDXL) ``text_encoder_2``.

    ``LoraSet.attach(base)`` returns the set already attached to that model, or a new one: two sets on the
    same modules would each take the other's patched weights for pristine ones.
    """

    def __init__(self, unet: torch.nn.Module | None = None, text_encoder: torch.nn.Module | None = None,
                 text_encoder_2: torch.nn.Module | None = None, *, pristine_device: str | torch.device | None = None,
                 family: Family | None = None):
        given = zip(COMPONENTS, (unet, text_encoder, text_encoder_2))
        self.modules = {c: _unwrapped(m) for c, m in given if m is not None}
        if not self.modules:
            raise SdtuneError("LoraSet needs a unet or a text_encoder to patch")
        self.pristine_device = pristine_device  # None: originals stay where they are (no copy); "cpu": saves VRAM
        self.family = family  # for block weights; None: told by the UNet's cross-attention width
        # where the Textual Inversion embeddings a LoRA file bundles are loaded (``ti.tokens.EmbeddingSet``: its
        # ``add(Embedding)`` and ``remove(token)``); a ``Base`` sets its own. None: they are not loaded
        self.embeddings = None
        self._entries: dict[str, _Entry] = {}
        self._layers: dict[LayerKey, _Layer] = {}  # layers that hold merged contributions now
        self._module_of: dict[LayerKey, torch.nn.Module] = {}  # every layer some adapter was matched to
        self._batch_depth, self._dirty = 0, set()
        self._lock = threading.RLock()
        for m in self.modules.values():
            if getattr(m, _ATTR, None) is not None:
                raise SdtuneError("this model already has a LoraSet; use LoraSet.attach(model) to get it")
        for m in self.modules.values():
            object.__setattr__(m, _ATTR, self)

    # a copied model (copy.deepcopy) takes a copy of its set, with a lock of its own
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.RLock())

    @classmethod
    def attach(cls, target, *, pristine_device: str | torch.device | None = None) -> LoraSet:
        mods = _component_modules(target)
        sets = {id(s): s for m in mods.values() if (s := getattr(m, _ATTR, None)) is not None}
        found = next(iter(sets.values()), None)
        if found is not None and (len(sets) > 1 or any(found.modules.get(c) is not m for c, m in mods.items())):
            # a component was swapped (a fine-tuned UNet put in): the set would patch the old one
            swapped = sorted(c for c, m in mods.items() if found.modules.get(c) is not m)
            merged = [n for s in sets.values() for n in s.names()]
            if merged:
                raise SdtuneError(f"the model's {', '.join(swapped)} was replaced while LoRAs are merged into the "
                                  f"old one ({', '.join(merged)}); remove them first (loras.remove_all()), then swap "
                                  f"it")
            for old in sets.values():
                old.detach()
            found = None
        if found is None:
            family = getattr(target, "family", None)
            found = cls(mods.get("unet"), mods.get("text_encoder"), mods.get("text_encoder_2"),
                        pristine_device=pristine_device, family=family if isinstance(family, Family) else None)
        embeddings = getattr(target, "embeddings", None)  # a Base's: bundled embeddings load into it
        if found.embeddings is None and hasattr(embeddings, "add") and hasattr(embeddings, "remove"):
            found.embeddings = embeddings
        return found

    # ---- queries ----
    def names(self) -> list[str]:
        return list(self._entries)

    def list(self) -> list[dict]:
        """One row per adapter: name, weight and layers patched per component (te: text_encoder, te2:
        text_encoder_2), format, source."""
        rows = []
        for name, e in self._entries.items():
            per_comp = {c: sum(1 for (cc, _) in e.targets if cc == c) for c in COMPONENTS}
            rows.append({"name": name, "unet_weight": e.weights["unet"], "te_weight": e.weights["text_encoder"],
                         "te2_weight": e.weights["text_encoder_2"], "unet_layers": per_comp["unet"],
                         "te_layers": per_comp["text_encoder"], "te2_layers": per_comp["text_encoder_2"],
                         "format": e.lora.format, "source": e.source, "blocks": e.blocks})
        return rows

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def pristine_bytes(self) -> int:
        """Bytes of original weights kept aside for exact restore (the whole memory cost of patching)."""
        return sum(t.numel() * t.element_size() for l in self._layers.values() for t in (l.pristine, l.bias)
                   if t is not None)

    # ---- changes ----
    @_locked
    def add(self, name: str, lora: Lora | str | Path, weight=1.0, te_weight: float | None = None,
            allow_partial: bool = False, blocks=None, words: bool = True) -> None:
        """Merge ``lora`` under ``name`` (replacing an adapter of that name).

        ``weight``: any form ``as_weights`` takes; ``te_weight`` (None: from ``weight``) sets both text encoders.
        ``blocks``: block weights as the lora-block-weight extension gives them (``lora.blocks``): a preset name
        (``"INALL"``), ``"1,0,…"`` or a sequence of numbers; each layer's strength is then its component's weight
        times its block's weight.
        Every LoRA module must match a model layer of the right shape, else ``SdtuneError`` naming the first
        offenders; ``allow_partial=True`` skips those (with a warning) and applies the rest. ``words=False``
        leaves the embeddings the file bundles unloaded (a merge, which bakes layers only).
        """
        weights = self._weights(weight)  # a bad weight fails before the file is read
        if te_weight is not None:
            weights |= dict.fromkeys(TEXT_COMPONENTS, as_weights(te_weight)["unet"])
        block_ws = None if blocks is None else block_weights.parse(blocks, self._family())  # so does a bad vector
        if isinstance(lora, dict):  # a state dict, as diffusers' load_lora_weights takes one
            lora = from_state_dict(lora, source=f"{name} (a state dict)", model_keys=self.modules)
        elif not isinstance(lora, (str, Path, Lora)):
            raise SdtuneError(f"LoRA {name!r}: give a file path, a Lora or a dict of tensors, not a "
                              f"{type(lora).__name__}")
        source = str(lora) if isinstance(lora, (str, Path)) else (lora.metadata.get("source", "") or name)
        if isinstance(lora, (str, Path)):
            lora = load_lora(lora, model_keys=self.modules)
        targets = check_fit(lora, self.modules, allow_partial, source)
        for key, ad in targets.items():
            if key not in self._module_of:
                self._module_of[key] = _find_module(self.modules[key[0]], key[0], key[1])
            if ad.bias_part() is not None and getattr(self._module_of[key], "bias", None) is None:
                raise no_bias(source, *key)
        if lora.embeddings and self.embeddings is None and words:  # patching changes weights only
            warnings.warn(f"{source}: also carries Textual Inversion embeddings ({', '.join(lora.embeddings)}), "
                          "which LoraSet does not load; load them with the embedding loader", stacklevel=2)
        factors = {}
        if block_ws is not None:
            config = getattr(self.modules.get("unet"), "config", None) or self._family().component_configs()["unet"]
            factors = block_weights.layer_factors(block_ws, targets, config)
        old = self._entries.pop(name, None)
        self._entries[name] = entry = _Entry(lora, weights, targets, source=source, factors=factors, blocks=block_ws)
        touched = set(targets) | (set(old.targets) if old else set())

        def back():
            del self._entries[name]
            if old is not None:
                self._entries[name] = old
        with self._undo(touched, back):
            self._sync(touched)
        if old is not None:
            self._unload_tokens(old)
        entry.tokens = self._load_tokens(lora, source) if words else []

    @contextmanager
    def _undo(self, keys: set[LayerKey], back):
        """On a failure inside (a layer that could not be patched: out of memory, an adapter that breaks on
        this layer), ``back()`` puts the adapters as they were and those layers are recomputed from their
        originals: a failed call changes nothing, and the originals are never lost."""
        try:
            yield
        except BaseException:
            back()
            self._sync(keys)
            raise

    def _load_tokens(self, lora: Lora, source: str) -> list[str]:
        """Load the embeddings ``lora`` bundles (pivotal tuning's new words), as A1111 does: one that is already
        loaded (e.g. from the embeddings folder) or does not fit the model is skipped with a note."""
        if self.embeddings is None:
            return []
        loaded = []
        for emb in bundled_embeddings(lora, source):
            if emb.token in self.embeddings:
                note(f"{source}: its bundled embedding {emb.token!r} is already loaded; that one is used")
                continue
            try:
                self.embeddings.add(emb)
            except SdtuneError as e:
                note(f"{e} (the bundled embedding is skipped; the LoRA is loaded)")
                continue
            loaded.append(emb.token)
        return loaded

    def _unload_tokens(self, entry: _Entry) -> None:
        for token in entry.tokens:
            if token in self.embeddings:
                self.embeddings.remove(token)
        entry.tokens = []

    @_locked
    def set_weights(self, weights: dict) -> None:
        """``{name: w}``, w in any form ``as_weights`` takes: one number (every component), ``(unet_w, te_w)``
        (te_w for both text encoders), ``(unet_w, te1_w, te2_w)`` or ``{component: w}`` (the others keep
        theirs); adapters not named keep their weights."""
        unknown = [n for n in weights if n not in self._entries]
        if unknown:
            raise SdtuneError(f"no adapter named {unknown[0]!r}; loaded: {', '.join(self._entries) or 'none'}")
        # all checked before any changes
        parsed = {name: self._weights(w, self._entries[name].weights) for name, w in weights.items()}
        before = {name: self._entries[name].weights for name in parsed}
        changed: set[LayerKey] = set()
        for name, new in parsed.items():
            e = self._entries[name]
            for comp in COMPONENTS:
                if new[comp] != e.weights[comp]:
                    changed.update(k for k in e.targets if k[0] == comp)
            e.weights = new

        def back():
            for name, w in before.items():
                self._entries[name].weights = w
        with self._undo(changed, back):
            self._sync(changed)

    def _check_layers(self, keys: set[LayerKey]) -> None:
        """Refuse to write layers that something else changed under this set (recomputing from the originals
        would undo it silently, or be undone by it): a LoRA diffusers/PEFT fused into the layer
        (``pipe.fuse_lora``), attention projections fused into one (``fuse_qkv_projections``), weights offloaded
        to the meta device (accelerate's sequential CPU offload, where a patch would change nothing)."""
        for comp, path in keys:
            where = f"{comp}:{path}"
            module = _find_module(self.modules[comp], comp, path)
            if getattr(module, "merged_adapters", None):  # a PEFT tuner layer, merged
                raise SdtuneError(f"{where}: diffusers/PEFT fused a LoRA into this layer (fuse_lora); unfuse it "
                                  f"(pipe.unfuse_lora()) before changing sdtune's LoRAs")
            parent = _find_module(self.modules[comp], comp, path.rpartition(".")[0]) if "." in path else None
            # diffusers' unfuse_qkv_projections only puts the unfused processors back (to_qkv stays): the
            # processor says whether the fused weight is the one used
            if getattr(parent, "fused_projections", False) and "Fused" in type(getattr(parent, "processor", None)).__name__:
                raise SdtuneError(f"{where}: its attention's projections are fused (fuse_qkv_projections), so a "
                                  f"change to this layer would not be used; unfuse them "
                                  f"(unfuse_qkv_projections()) before changing LoRAs, and fuse again after")
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_meta:
                raise SdtuneError(f"{where}: its weights are offloaded (on the meta device, as accelerate's "
                                  f"sequential CPU offload leaves them), where a LoRA cannot be merged; change "
                                  f"LoRAs before enabling the offload")

    def _family(self) -> Family | None:
        if self.family is None and "unet" in self.modules:
            width = getattr(getattr(self.modules["unet"], "config", None), "cross_attention_dim", None)
            return families.by_cross_attention(width) if isinstance(width, int) else None
        return self.family

    def _weights(self, w, current: dict[str, float] | None = None) -> dict[str, float]:
        return as_weights(w, current, two_encoders="text_encoder_2" in self.modules)

    @_locked
    def remove(self, name: str) -> None:
        if name not in self._entries:
            raise SdtuneError(f"no adapter named {name!r}; loaded: {', '.join(self._entries) or 'none'}")
        self._check_layers(set(self._entries[name].targets))  # nothing is dropped when a layer is refused
        entry = self._entries.pop(name)
        self._sync(set(entry.targets))
        self._unload_tokens(entry)

    @_locked
    def remove_all(self) -> None:
        """Drop every adapter (and the embeddings they loaded); every touched layer gets its original tensor
        back, bit for bit."""
        self._check_layers(set(self._layers))
        for entry in self._entries.values():
            self._unload_tokens(entry)
        self._entries.clear()
        self._sync(set(self._layers))

    @_locked
    def detach(self) -> None:
        """Restore the base and forget this set (a new one may then be attached)."""
        self.remove_all()
        for m in self.modules.values():
            if getattr(m, _ATTR, None) is self:
                object.__delattr__(m, _ATTR)

    # ---- the one place weights are written ----
    def _contributions(self, key: LayerKey) -> list[tuple[str, int, Adapter, float]]:
        out = []
        for name in sorted(self._entries):
            e = self._entries[name]
            ad = e.targets.get(key)
            w = e.weights[key[0]] * e.factors.get(key, 1.0)
            if ad is not None and w != 0.0:
                out.append((name, e.uid, ad, w))
        return out

    @contextmanager
    def batch(self):
        """Group changes: layers are recomputed once, when the outermost ``with`` block ends.

        ``with loras.batch(): loras.add("a", a, 0.5); loras.add("b", b, 1.0)`` touches each layer once
        (one rank-(ra+rb) product) instead of once per call.
        """
        with self._lock:
            self._batch_depth += 1
            try:
                yield self
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0:
                    dirty, self._dirty = self._dirty, set()
                    self._sync(dirty)

    @torch.no_grad()
    def _sync(self, keys: set[LayerKey]) -> None:
        if self._batch_depth:
            self._dirty |= keys
            return
        self._check_layers(keys)  # before anything is written
        jobs = []  # (weight, base, contribs, out or None): out None means "a fresh buffer" (first touch)
        fresh, signatures = {}, {}  # first-touch layers, and what each job merges
        for key in keys:
            contribs = self._contributions(key)
            layer = self._layers.get(key)
            if not contribs:  # nothing merged here any more: put the originals back and forget them
                if layer is not None:
                    _restore(layer.module.weight, layer.pristine)
                    if layer.bias is not None:
                        _restore(layer.module.bias, layer.bias)
                    del self._layers[key]
                continue
            signature = tuple((n, uid, w) for n, uid, _, w in contribs)
            if layer is not None and signature == layer.applied:
                continue
            if layer is None:  # first touch: the current tensor is the original
                original = self._module_of[key].weight.data
                store = original.device if self.pristine_device is None else torch.device(self.pristine_device)
                pristine = original if store == original.device else original.to(store, copy=True)
                layer = fresh[key] = _Layer(self._module_of[key], pristine)
                jobs.append((key, layer, original, contribs, None))
            else:
                layer.applied = ()  # written in place: until the job is done, it holds no known sum
                jobs.append((key, layer, layer.pristine, contribs, layer.module.weight.data))
            signatures[key] = signature
        # A layer is recorded as patched only once its job is done: a first-touch layer whose job failed still
        # holds its original, which must not be taken for a patched copy (the next patch would overwrite it)
        failed = _run_jobs(jobs)
        for key, signature in signatures.items():
            if key not in failed:
                if key in fresh:
                    self._layers[key] = fresh[key]
                self._layers[key].applied = signature
        if failed:
            raise next(iter(failed.values()))


def _patch_one(layer: _Layer, base: torch.Tensor, contribs, out: torch.Tensor | None) -> None:
    bias = _patched_bias(layer, contribs)  # first: a failure there leaves the layer as it was
    weight = layer.module.weight
    if out is None:
        # The original storage stays as the pristine copy (no copy on the model's device) and the parameter
        # gets a fresh buffer: one read and one write per element.
        out = torch.empty_like(base)  # the original's memory format too (a channels-last conv stays one)
        write_patched(out, base, contribs)
        weight.data = out
    else:
        write_patched(out, base, contribs)
    if bias is not None:  # the bias takes its new value; its original is kept to restore (a tiny tensor)
        if layer.bias is None:
            layer.bias = layer.module.bias.data
        layer.module.bias.data = bias
    elif layer.bias is not None:  # no adapter changes it any more
        _restore(layer.module.bias, layer.bias)
        layer.bias = None


def _patched_bias(layer: _Layer, contribs) -> torch.Tensor | None:
    """b0 + Σ w·Δb over the contributions that change the bias (as ``write_patched`` sums ΔW), or None when
    none does."""
    parts = [(name, uid, part, w) for name, uid, ad, w in contribs if (part := ad.bias_part()) is not None]
    if not parts:
        return None
    b0 = layer.bias if layer.bias is not None else layer.module.bias.data
    out = torch.empty(b0.shape, dtype=b0.dtype, device=b0.device)
    write_patched(out, b0, parts)
    return out


def _run_jobs(jobs: list) -> dict[LayerKey, BaseException]:
    """Patch layers (``(key, layer, base, contribs, out)`` jobs); every job is tried, and the failed ones'
    errors are returned by layer. On CPU, whole layers are spread over the intra-op threads, each GEMM
    single-threaded.

    Layers are independent, so workers never wait on each other, where one multi-threaded GEMM per small layer
    spends much of its time in thread barriers (worst on a busy machine). Every CPU GEMM then also runs with
    the same threading, so a layer gets the same bits however many layers are recomputed with it.
    """
    failed: dict[LayerKey, BaseException] = {}

    def run(key, *job):
        try:
            _patch_one(*job)
        except Exception as e:  # noqa: BLE001 - handed to the caller, which puts the set back and raises it
            failed[key] = e

    if not jobs:
        return failed
    if any(job[1].module.weight.device.type != "cpu" for job in jobs):
        for job in jobs:
            run(*job)
        return failed
    workers = torch.get_num_threads()
    jobs = sorted(jobs, key=lambda j: -j[2].numel())  # biggest first: workers finish together
    torch.set_num_threads(1)
    try:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                run(*job)
        else:
            with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
                for f in [pool.submit(run, *job) for job in jobs]:
                    f.result()
    finally:
        torch.set_num_threads(workers)
    return failed


def _restore(weight: torch.nn.Parameter, pristine: torch.Tensor) -> None:
    """Put the original tensor back: the very same storage where it lives on the layer's device."""
    if pristine.device == weight.device and pristine.dtype == weight.dtype:
        weight.data = pristine
    else:
        weight.data.copy_(pristine)


def write_patched(out: torch.Tensor, base: torch.Tensor, contribs) -> None:
    """out <- base + Σ w·ΔW over ``contribs`` ((name, uid, adapter, w) tuples), summed in float32.

    All low-rank adapters of the layer (``Algorithm.low_rank``: plain LoRA) go through one ``addmm`` of the
    stacked factors, the other additive ones add their ΔW, and each non-additive one (``Algorithm.additive``
    false: DoRA, OFT) adds its own change f(W0) − W0, computed from the pristine W0, as A1111 does: so
    W' = W0 + Σ w_i·ΔW_i + Σ_j (f_j(W0, w_j) − W0), whatever the order, and a DoRA's magnitude is that of W0
    plus its own LoRA, never of another adapter's result. ``out`` is distinct from ``base``; it may have another
    dtype (the result is cast once, at the end) and another memory layout (a channels-last conv).
    """
    if not out.is_contiguous():  # summed in a contiguous buffer, then copied into the layout the layer has
        flat = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        write_patched(flat, base, contribs)
        out.copy_(flat)
        return
    device, rows = out.device, out.shape[0]
    base = base.to(device=device).reshape(rows, -1)
    ups, downs, others, transforms = [], [], [], []
    for _, _, ad, w in contribs:
        algo = ad.algo
        factors = algo.low_rank(ad.tensors) if algo.additive else None
        if factors is not None:
            up, down = factors
            ups.append(up.to(device=device, dtype=torch.float32).reshape(rows, -1) * (w * ad.scale))
            downs.append(down.to(device=device, dtype=torch.float32).reshape(ups[-1].shape[1], -1))
        elif algo.additive:
            others.append((ad, w))
        else:
            transforms.append((ad, w))
    flat = out.view(rows, -1)
    acc = flat if out.dtype == torch.float32 else torch.empty(flat.shape, dtype=torch.float32, device=device)
    if ups:
        up = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
        down = downs[0] if len(downs) == 1 else torch.cat(downs, dim=0)
        torch.addmm(base.float(), up, down, out=acc)
    else:
        acc.copy_(base)
    for ad, w in others:
        acc.add_(ad.delta(out.shape, dtype=torch.float32, device=device).reshape(rows, -1), alpha=w)
    if transforms:  # each from the pristine weight, as A1111 merges them: no order among them, none sees another
        w0 = base.float().reshape(out.shape)
        for ad, w in transforms:
            acc.add_((ad.apply(w0, w) - w0).reshape(rows, -1))
    if acc is not flat:
        flat.copy_(acc)
