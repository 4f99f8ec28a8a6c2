"""The LoRA toolbox: merge several LoRAs into one file, resize one, extract one from two checkpoints.

All three end in the same place: per layer a ΔW (or exact low-rank factors of it), written back as plain LoRA
factors, so the file says exactly the ΔW it was given, in any layout ``save_lora`` writes. The file has one alpha
(``_one_alpha``): diffusers applies a single alpha to a kohya file, as its per-layer ones go by module names it
builds wrongly for SDXL and transformers 5's text encoders, so a layer of another rank gets its scale in its up.
Low-rank approximations are SVD truncations: ΔW ≈ U_r diag(S_r) V_rᵀ, with up = U_r diag(S_r) and
down = V_rᵀ (kohya's split), which is the best rank-r approximation in the Frobenius norm.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import modelspec
from ..console import note
from ..models import load_base
from ..safeio import SdtuneError, is_safetensors
from . import blocks as block_weights
from . import keys
from .bake import StoredWeights
from .formats import check_output, load_lora, sampling_metadata, save_lora
from .neutral import TEXT_COMPONENTS, Adapter, Lora, text_path
from .patch import as_weights
from .ranks import DYNAMIC, dynamic_rank

MIN_SV = 1e-6  # sd-scripts' resize_lora: a layer whose largest singular value is below this is taken as zero


@dataclass
class LayerReport:
    """What a low-rank step kept of one layer: its new rank and the share of ΔW's Frobenius norm retained."""

    component: str
    path: str
    rank: int
    old_rank: int | None
    fro: float  # ‖ΔW_r‖_F / ‖ΔW‖_F


def _factors_to_adapter(up: torch.Tensor, down: torch.Tensor, kernel: tuple | None, dtype: torch.dtype) -> Adapter:
    """Plain LoRA (or LoCon) factors from flat ``up`` [out, r] and ``down`` [r, inner]; alpha = r (scale 1)."""
    r = down.shape[0]
    if kernel:  # kohya LoCon: down carries the kernel, up is 1x1
        down = down.reshape(r, down.shape[1] // math.prod(kernel), *kernel)
        up = up.reshape(up.shape[0], r, 1, 1)
    return Adapter("lora", {"down": down.to(dtype).contiguous(), "up": up.to(dtype).contiguous()}, alpha=float(r))


def _one_alpha(lora: Lora) -> None:
    """Give every plain LoRA layer of ``lora`` the alpha most of them have, folding the change of scale into its up
    factor: the same ΔW = alpha/rank · up @ down, and a file whose per-layer ranks vary (merge, --dynamic resize,
    --conv-rank) patches in diffusers as in A1111 and ComfyUI."""
    alphas = [float(ad.alpha) for _, _, ad in lora.items() if ad.kind == "lora" and ad.alpha is not None]
    if len(set(alphas)) < 2:
        return
    common = max(sorted(set(alphas)), key=alphas.count)
    for comp, path, ad in list(lora.items()):
        if ad.kind == "lora" and ad.alpha is not None and float(ad.alpha) != common:
            up = ad.tensors["up"]
            lora.modules[comp][path] = Adapter("lora", {**ad.tensors, "up": (up.double() * (float(ad.alpha) / common))
                                                        .to(up.dtype).contiguous()}, alpha=common)


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float64: the ranks the dynamic modes pick compare cumulative sums to a threshold; keep them stable
    delta = delta.double()
    rows, cols = delta.shape
    if cols <= rows:
        return torch.linalg.svd(delta, full_matrices=False)
    # A wide ΔW (a 3x3 conv's out x 9·in, a feed-forward's output projection): ΔWᵀ = QR first, then the SVD of the
    # small square Rᵀ. The same singular values to 1e-15 of the largest, 2.5-5x faster on these shapes (a 1280 x
    # 11520 conv: 10 s -> 2 s on 2 cores), where LAPACK's SVD of the wide matrix does not take that route itself.
    q, r = torch.linalg.qr(delta.T)
    u, s, vh = torch.linalg.svd(r.T)
    return u, s, vh @ q.T


def _svd_factored(up: torch.Tensor, down: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of ΔW = scale · up @ down without forming ΔW: QR of each factor, then the SVD of the r x r core.
    The same singular values (float64), at a cost of r² · width instead of width³ per layer."""
    q_up, r_up = torch.linalg.qr(up.flatten(1).double())
    q_down, r_down = torch.linalg.qr(down.flatten(1).double().T)
    u, s, vh = torch.linalg.svd(scale * r_up @ r_down.T)
    return q_up @ u, s, vh @ q_down.T


def _svd_kron(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of ΔW = scale · kron(a, b) (LoKr) from the factors' SVDs: kron(Ua Sa Vaᵀ, Ub Sb Vbᵀ) =
    kron(Ua, Ub) kron(Sa, Sb) kron(Va, Vb)ᵀ, so the singular values are the products sa_i · sb_j, sorted. The
    dense SVD of a 1280 x 11520 ΔW in float64 takes seconds; the factors' take milliseconds."""
    ua, sa, vha = torch.linalg.svd(a.double(), full_matrices=False)
    ub, sb, vhb = torch.linalg.svd(b.double(), full_matrices=False)
    s = torch.kron(sa, sb) * abs(scale)
    order = torch.argsort(s, descending=True, stable=True)
    u = torch.kron(ua, ub)[:, order]
    return (-u if scale < 0 else u), s[order], torch.kron(vha, vhb)[order]


def _adapter_svd(ad: Adapter, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of weight · ΔW of one adapter: from its factors where it has them (a LoRA's up and down, a LoKr's
    Kronecker pair), from the dense ΔW otherwise (LoHa, full)."""
    factors, kron = ad.algo.low_rank(ad.tensors), ad.algo.kron_factors(ad.tensors)
    if factors:
        return _svd_factored(*factors, ad.scale * weight)
    if kron:
        return _svd_kron(*kron, ad.scale * weight)
    out_f, inner, _ = ad.io()
    return _svd(weight * ad.delta((out_f, inner)))


def _truncate(u, s, vh, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (u[:, :r] * s[:r]).float(), vh[:r].float()


def fro_share(s: torch.Tensor, r: int) -> float:
    total = float(s.pow(2).sum())
    return 1.0 if total == 0 else math.sqrt(float(s[:r].pow(2).sum()) / total)


def _dtype(loras: list[Lora]) -> torch.dtype:
    dtypes = {t.dtype for lora in loras for _, _, ad in lora.items() for t in ad.tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _read(path: str | Path, drop_biases: bool = False) -> Lora:
    """The file's adapters, each one LoRA factors can hold; ``drop_biases``: its changes to biases and norm layers
    (LyCORIS full's diff_b, train_norm's) left out, said in a note, instead of refused."""
    lora = load_lora(path)
    if lora.unknown:
        raise SdtuneError(f"{path}: {len(lora.unknown)} keys sdtune cannot read (e.g. {lora.unknown[0]}); a merge "
                          f"or resize would drop them. Convert or clean the file first")
    kept_apart = [(comp, p) for comp, p, ad in lora.items() if ad.algo.vector or ad.bias_part() is not None]
    if kept_apart and not drop_biases:
        raise SdtuneError(f"{path}: changes the biases or norm layers of {len(kept_apart)} layers (e.g. "
                          f"{':'.join(kept_apart[0])}: LyCORIS full's diff_b, norm w_norm/b_norm), which LoRA factors "
                          f"cannot hold: a merge or resize would drop them. Add --drop-biases to leave them out, "
                          f"apply the file as it is, or bake it into a checkpoint with sdtune merge")
    for comp, p in kept_apart:
        ad = lora.modules[comp][p]
        if ad.algo.vector:  # a norm layer's change: nothing left
            del lora.modules[comp][p]
        else:  # the weight's change stays, in its place
            lora.modules[comp][p] = replace(ad, tensors={r: t for r, t in ad.tensors.items() if r != "bias"})
    if kept_apart:
        note(f"{path}: the changes to the biases and norm layers of {len(kept_apart)} layers are left out "
             f"(--drop-biases)")
    # (named as inspect names them: OFT, DoRA...)
    weight_bound = sorted({ad.algo.label or ad.kind for _, _, ad in lora.items() if not ad.algo.additive})
    if weight_bound:  # said before any layer is worked on, naming the file
        raise SdtuneError(f"{path}: holds {'/'.join(weight_bound)} adapters, which change the weight itself, not by "
                          f"a fixed ΔW: a merge or resize into LoRA factors is not possible. Apply the file as it "
                          f"is, or bake it into a checkpoint with sdtune merge")
    return lora


def _family(loras: list[tuple[str, Lora]]):
    found = {}
    for path, lora in loras:
        fam = keys.guess_family(lora)
        if fam is not None:
            found.setdefault(fam, path)
    if len(found) > 1:
        names = ", ".join(f"{p} ({f.title})" for f, p in found.items())
        raise SdtuneError(f"these LoRAs are for different model families: {names}; merge LoRAs of one family")
    return next(iter(found), None)


# ================================================================= merge

# what LoRAs say of the base model they were made on (a Pony or Illustrious file names it), kept in a merge where
# all its inputs say the same: the mix is for that model too
BASE_FACTS = ("ss_base_model_version", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_clip_skip",
              "ss_v2", "ss_v_parameterization", "ss_zero_terminal_snr", "modelspec.architecture",
              "modelspec.prediction_type", "modelspec.resolution")

def merge_loras(specs: list[tuple], out: str | Path, *, rank: int | None = None, to: str = "kohya",
                drop_biases: bool = False) -> tuple[Lora, list[LayerReport]]:
    """One LoRA file equal to loading each (file, weight) or (file, weight, blocks) of ``specs`` at once.

    ``blocks`` (a preset name, "1,0,…" or numbers: ``lora.blocks``) bakes block weights in: each layer's weight is
    multiplied by its block's, so the file at weight 1 patches as its source loaded with those block weights.
    Layers all of whose contributions are then 0 are left out.

    Default: exact concatenation per layer, up = [w₁s₁·up₁ | w₂s₂·up₂ | …], down = [down₁; down₂; …],
    alpha = total rank (scale 1): the patched weight is W + Σ wᵢsᵢ upᵢ downᵢ, as with each LoRA loaded (only the
    summation order differs). A layer that one LoHa/LoKr/full adapter alone changes stays that adapter, its
    weight folded into its first factor (kohya layout, no ``rank``); one where it meets another file's adapter is
    merged through its ΔW and SVD, keeping every singular value above fp32 noise (exact to rounding). ``rank``:
    SVD of each layer's summed ΔW to that rank (at most), reported per layer. ``drop_biases``: the inputs' bias and norm-layer changes are left out
    (LoRA factors cannot hold them), not refused.
    """
    if not specs:
        raise SdtuneError("lora merge needs at least one FILE[:WEIGHT]")
    check_output(out, inputs=[spec[0] for spec in specs])
    if rank is not None and rank < 1:
        raise SdtuneError(f"--rank {rank}: the rank must be 1 or more")
    # a weight per component (the UNet's, the text encoders'), as a LoRA loaded with (unet_w, te_w) patches
    loaded = [(str(p), _read(p, drop_biases), as_weights(w, two_encoders=True)) for p, w, *_ in specs]
    family = _family([(p, lora) for p, lora, _ in loaded])
    dtype = _dtype([lora for _, lora, _ in loaded])
    layers: dict[tuple[str, str], list[tuple[Adapter, float]]] = {}
    for (p, lora, w), spec in zip(loaded, specs):
        factors = _block_factors(p, lora, spec[2] if len(spec) > 2 else None, family)
        for comp, path, ad in lora.items():
            layers.setdefault((comp, path), []).append((ad, w[comp] * factors.get((comp, path), 1.0)))
    mix, reports = Lora(), []
    # a layer one LoHa/LoKr/full adapter alone changes stays one, its weight folded in (exact, as small as it was),
    # where the output layout holds it (kohya's: A1111, ComfyUI and sdtune read it) and no --rank asks for LoRA
    own_kinds = rank is None and to == "kohya"
    kept: dict[tuple[str, str], Adapter] = {}
    for layer, contribs in layers.items():
        (ad, w), *others = contribs
        if own_kinds and not others and ad.kind != "lora" and (tensors := ad.algo.weighted(ad.tensors, w)):
            kept[layer] = replace(ad, tensors=tensors)
    dense = sum(any(ad.kind != "lora" for ad, _ in c) and layer not in kept for layer, c in layers.items())
    if dense:  # the one slow case: say so rather than sit silent for minutes
        why = "meets another file's adapter" if own_kinds else (
            "is made LoRA factors" + (f" (--to {to})" if to != "kohya" else ""))
        cap = "" if rank is not None else ", and its rank may be far above the inputs' (give --rank to cap it)"
        note(f"layers where a LoHa/LoKr/full adapter {why}: {dense}; each is merged through the SVD of its full "
             f"ΔW, about a second per layer at SD 1.x size{cap}")
    for (comp, path), contribs in layers.items():
        if all(w == 0 for _, w in contribs):  # e.g. a block weighted 0: nothing to write
            continue
        if (comp, path) in kept:
            mix.modules.setdefault(comp, {})[path] = kept[comp, path]
            continue
        kernel = keys.kernel_of(comp, path, contribs[0][0], family)
        if all(ad.kind == "lora" for ad, _ in contribs):
            up, down = _stacked(contribs)
            if rank is None:
                mix.modules.setdefault(comp, {})[path] = _factors_to_adapter(up, down, kernel, dtype)
                continue
            # the SVD of the stack's ΔW from its factors: two SD 1.x LoRAs to --rank 8 took 472 s through the
            # dense ΔW of each of their 128 layers, and take under a second so
            u, s, vh = _svd_factored(up, down, 1.0)
        elif len(contribs) == 1:  # one adapter: its own SVD (a LoKr's from its factors, seconds -> milliseconds)
            u, s, vh = _adapter_svd(*contribs[0])
        else:
            out_f, inner, _ = contribs[0][0].io()
            u, s, vh = _svd(sum(w * ad.delta((out_f, inner)) for ad, w in contribs))
        if rank is None:  # exact: every singular value above float32 rounding of the largest
            r = max(1, int((s > s[0] * 1e-6).sum())) if s[0] > 0 else 1
        else:
            r = min(rank, len(s))
        up, down = _truncate(u, s, vh, r)
        mix.modules.setdefault(comp, {})[path] = _factors_to_adapter(up, down, kernel, dtype)
        reports.append(LayerReport(comp, path, r, None, fro_share(s, r)))
    names = {}
    for p, lora, _ in loaded:
        for name, emb in lora.embeddings.items():
            if name in names and not torch.equal(mix.embeddings[name], emb):
                raise SdtuneError(f"{p}: bundles an embedding {name!r} that {names[name]} bundles too, with other "
                                  f"values; merge LoRAs without clashing embeddings")
            names[name] = p
            mix.embeddings[name] = emb
    agreed = {k: v for k in BASE_FACTS if len({lora.metadata.get(k) for _, lora, _ in loaded}) == 1
              and (v := loaded[0][1].metadata.get(k)) is not None}
    mix.metadata = {**agreed, "ss_training_comment": "sdtune lora merge: " + " + ".join(
        f"{Path(p).name}:{_weight_text(w)}" for p, _, w in loaded)}
    _one_alpha(mix)
    save_lora(mix, out, format=to, family=family)
    return mix, reports


def _stacked(contribs: list[tuple[Adapter, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (up, down) of plain LoRAs side by side: up = [w₁s₁·up₁ | w₂s₂·up₂ | …], down = [down₁; down₂; …], so
    up @ down = Σ wᵢsᵢ upᵢ downᵢ, the layer's summed ΔW."""
    ups, downs = [], []
    for ad, w in contribs:
        down, up = ad.algo.peft_factors(ad.cast())  # a Tucker core folds into down: same ΔW, same rank
        ups.append(up.flatten(1) * (w * ad.scale))
        downs.append(down.flatten(1))
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _weight_text(weights: dict[str, float]) -> str:
    """A merge input's weights as its spec gives them: "0.8", "unet=0.8:te=0.5" where the encoders' differ from
    the UNet's, and ":te2=0.3" after it where SDXL's second encoder's differs from the first's."""
    unet, te, te2 = weights["unet"], weights["text_encoder"], weights["text_encoder_2"]
    text = f"{unet:g}" if te == unet else f"unet={unet:g}:te={te:g}"
    return text if te2 == te else f"{text}:te2={te2:g}"


def _block_factors(path: str, lora: Lora, blocks, family) -> dict[tuple[str, str], float]:
    """Each layer's block weight for ``blocks`` (none: {}), in the family's layout."""
    if blocks is None:
        return {}
    if family is None:
        raise SdtuneError(f"{path}: cannot tell which model family this LoRA is for, so not where its blocks are; "
                          f"block weights need an SD 1.x, SD 2.x or SDXL LoRA")
    weights = block_weights.parse(blocks, family)
    return block_weights.layer_factors(weights, [(c, p) for c, p, _ in lora.items()],
                                       family.component_configs()["unet"])


# ================================================================= resize

def resize_lora(path: str | Path, out: str | Path, *, rank: int | None = None, dynamic: str | None = None,
                param: float | None = None, to: str = "kohya", conv_rank: int | None = None,
                drop_biases: bool = False) -> tuple[Lora, list[LayerReport]]:
    """Lower each layer's rank by SVD of its ΔW: to ``rank`` (fixed), or as sd-scripts' ``resize_lora.py``
    dynamic modes pick it (``rank`` then caps it; default cap: the layer's own rank). ``conv_rank``: the same for
    convolutions with a kernel above 1x1 (LoCon's 3x3 layers; default ``rank``), as sd-scripts' new_conv_rank.
    ``drop_biases``: a file's bias and norm-layer changes left out (a LyCORIS full run made a LoRA), not refused."""
    if dynamic is None and rank is None:
        raise SdtuneError(f"{path}: give --rank R, or --dynamic {'|'.join(DYNAMIC)} with --param X")
    if dynamic is None and param is not None:
        raise SdtuneError(f"{path}: --param {param:g} is the target of a --dynamic mode; add --dynamic "
                          f"{'|'.join(DYNAMIC)}, or leave --param out")
    if dynamic is not None and (dynamic not in DYNAMIC or param is None or not param > 0 or param == math.inf):
        raise SdtuneError(f"{path}: --dynamic takes one of {', '.join(DYNAMIC)} and a positive --param "
                          f"(sv_ratio: e.g. 2; sv_fro, sv_cumulative: a share, e.g. 0.9)")
    if dynamic in ("sv_fro", "sv_cumulative") and param > 1:
        raise SdtuneError(f"{path}: --param {param:g}: {dynamic} keeps a share of the layer, from 0 to 1 (e.g. 0.9)")
    for flag, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise SdtuneError(f"{path}: {flag} {value}: the rank must be 1 or more")
    check_output(out, inputs=[path])
    lora = _read(path, drop_biases)
    family = keys.guess_family(lora)
    dtype = _dtype([lora])
    small, reports = Lora(metadata=dict(lora.metadata), embeddings=dict(lora.embeddings)), []
    for comp, p, ad in lora.items():
        u, s, vh = _adapter_svd(ad)
        kernel = keys.kernel_of(comp, p, ad, family)
        want = conv_rank if conv_rank is not None and kernel and math.prod(kernel) > 1 else rank
        # a plain LoRA's ΔW has no more than its rank; a LoHa/LoKr's may have more (up to its full width)
        own = ad.rank if ad.kind == "lora" else len(s)
        cap = min(want, own) if want is not None else own
        r = dynamic_rank(s, dynamic, param) if dynamic else cap
        # a zero layer keeps rank 1, as in sd-scripts, which tests s₀ of up @ down before alpha / rank scales it
        if s[0] <= MIN_SV * (abs(ad.scale) if ad.kind == "lora" else 1.0):
            r = 1
        r = min(r, cap, len(s))
        if ad.kind == "lora" and r == ad.rank:  # nothing to cut: its own factors, bit for bit (not an SVD's)
            small.modules.setdefault(comp, {})[p] = ad
        else:
            up, down = _truncate(u, s, vh, r)
            small.modules.setdefault(comp, {})[p] = _factors_to_adapter(up, down, kernel, dtype)
        reports.append(LayerReport(comp, p, r, ad.rank, fro_share(s, r)))
    # as sd-scripts' resize_lora.py notes it, ahead of the file's own comment
    ranks = sorted({r.old_rank for r in reports if r.old_rank is not None})
    was = "/".join(map(str, ranks)) or "?"
    whole = bool(reports) and all(small.modules[c][p] is lora.modules[c][p] for c, p, _ in lora.items())
    if not dynamic and whole:
        note(f"{path}: --rank {rank} is not below its rank ({was}); every layer is written as it was")
    how = (f"Dynamic resize with {dynamic}: {param:g} from {was}" if dynamic
           else f"dimension is resized from {was} to {rank}")
    comment = lora.metadata.get("ss_training_comment")
    small.metadata["ss_training_comment"] = f"{how}; {comment}" if comment else how
    if not whole:  # (a file kept whole keeps its alphas too)
        _one_alpha(small)
    save_lora(small, out, format=to, family=family)
    return small, reports


# ================================================================= extract

def _layers(module: torch.nn.Module, comp: str) -> dict[str, torch.nn.Module]:
    found = {}
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and getattr(m, "weight", None) is not None:
            found[text_path(name) if comp in TEXT_COMPONENTS else name] = m
    return found


class _LoadedWeights:
    """Both models' weights for ``extract_lora`` from a loaded model (a folder, a built-in model, a hub id, a .ckpt):
    the whole model in memory, fp32 on the CPU."""

    def __init__(self, spec: str):
        self.base = load_base(spec, device="cpu", dtype="fp32")
        self.family, self.scheduler_config = self.base.family, self.base.scheduler.config
        self._layers: dict[str, dict] = {}

    def __enter__(self) -> _LoadedWeights:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def module(self, comp: str) -> torch.nn.Module:
        return getattr(self.base, comp)

    def weight(self, comp: str, path: str, shape) -> torch.Tensor | None:
        layers = self._layers.setdefault(comp, _layers(self.module(comp), comp))
        m = layers.get(path)
        return None if m is None or tuple(m.weight.shape) != tuple(shape) else m.weight.detach()


def _weights_of(spec: str):
    """A single .safetensors checkpoint or a diffusers folder of safetensors files is read layer by layer (two
    SD 1.5 files held whole took 12.9 GB peak RSS); anything else is loaded."""
    path = Path(str(spec)).expanduser()
    if path.is_file() and is_safetensors(path):
        return StoredWeights.single_file(path)
    folder = StoredWeights.folder(path) if path.is_dir() else None
    return folder or _LoadedWeights(spec)


def extract_lora(base_spec: str, tuned_spec: str, out: str | Path, *, rank: int, conv_rank: int | None = None,
                 text_encoder: bool = False, min_diff: float = 0.0,
                 to: str = "kohya") -> tuple[Lora, list[LayerReport]]:
    """A LoRA of ``tuned - base`` (two checkpoints of one family): per Linear/Conv2d layer the SVD of
    W_tuned − W_base to ``rank`` (``conv_rank`` for kernels above 1x1; default ``rank``). Layers whose largest
    difference is at most ``min_diff`` are left out. The text encoders only with ``text_encoder``."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise SdtuneError(f"--rank {rank}" + (f" / --conv-rank {conv_rank}" if conv_rank is not None else "")
                          + ": must be 1 or more")
    if not math.isfinite(min_diff) or min_diff < 0:
        raise SdtuneError(f"--min-diff {min_diff}: must be a number from 0 (the largest change a layer must exceed "
                          f"to be kept)")
    check_output(out, inputs=[base_spec, tuned_spec])
    base, tuned = _weights_of(base_spec), _weights_of(tuned_spec)
    if base.family != tuned.family:
        raise SdtuneError(f"{tuned_spec} is for {tuned.family.title}, {base_spec} for {base.family.title}; "
                          f"extract from two checkpoints of one family")
    comps = ["unet"] + ([te.component for te in base.family.text_encoders] if text_encoder else [])
    lora, reports = Lora(metadata={"ss_training_comment": f"sdtune lora extract: {Path(str(tuned_spec)).name} - "
                                                          f"{Path(str(base_spec)).name}"}), []
    with base, tuned:
        for comp in comps:
            for p, m in _layers(base.module(comp), comp).items():
                shape = tuple(m.weight.shape)
                wa, wb = base.weight(comp, p, shape), tuned.weight(comp, p, shape)
                if wa is None or wb is None:
                    raise SdtuneError(f"{tuned_spec if wb is None else base_spec}: layer {comp}.{p} is missing or has "
                                      f"another shape than in {base_spec if wb is None else tuned_spec}; extract "
                                      f"from two checkpoints of one architecture")
                # float64: the difference of two fp16 weights would lose the small changes a fine-tune makes
                delta = wb.double() - wa.double()
                del wa, wb
                if float(delta.abs().max()) <= min_diff:
                    continue
                kernel = tuple(delta.shape[2:]) if delta.dim() == 4 else None
                u, s, vh = _svd(delta.flatten(1))
                want = conv_rank if (kernel and math.prod(kernel) > 1 and conv_rank) else rank
                r = min(want, len(s))
                up, down = _truncate(u, s, vh, r)
                lora.modules.setdefault(comp, {})[p] = _factors_to_adapter(up, down, kernel, torch.float32)
                reports.append(LayerReport(comp, p, r, None, fro_share(s, r)))
    if not len(lora):
        raise SdtuneError(f"{tuned_spec}: no layer differs from {base_spec} by more than {min_diff}; nothing to "
                          f"extract (lower --min-diff, or check the two paths)")
    _one_alpha(lora)
    # ModelSpec as sd-scripts' extract_lora_from_models.py writes it: the file's name as its title, the base's size
    spec = modelspec.metadata(base.family, base.scheduler_config, "lora", title=Path(out).stem,
                              resolution=_native_resolution(base), created=time.time())
    save_lora(lora, out, format=to, family=base.family,
              metadata=sampling_metadata(base.family, base.scheduler_config) | spec)
    return lora, reports


def _native_resolution(weights) -> int:
    """The side in pixels a model draws at: its UNet's sample size times its family's VAE downscaling."""
    vae = weights.family.component_configs()["vae"]
    return int(weights.module("unet").config.sample_size) * 2 ** (len(vae["block_out_channels"]) - 1)


def report_table(reports: list[LayerReport]) -> str:
    """One row per layer: component, module, rank (old -> new where it changed), retained Frobenius share."""
    if not reports:
        return "every layer merged exactly (concatenated factors)"
    width = max(len(f"{r.component}.{r.path}") for r in reports)
    lines = [f"{'layer':<{width}}  {'rank':>9}  fro kept"]
    for r in reports:
        ranks = f"{r.old_rank}->{r.rank}" if r.old_rank is not None else str(r.rank)
        lines.append(f"{r.component + '.' + r.path:<{width}}  {ranks:>9}  {r.fro:8.4f}")
    total = sum(r.fro for r in reports) / len(reports)
    lines.append(f"{len(reports)} layers, mean Frobenius share kept {total:.4f}")
    return "\n".join(lines)
