"""DoRA: a LoRA whose result is renormalised to a learned magnitude, W_dora = m · V / ‖V‖ with V = W0 + s·up@down.

Two layouts, and they normalise along different axes (LyCORIS issue #216), so both are kept as they were stored:

- PEFT / diffusers: ``lora_A``/``lora_B`` plus ``lora_magnitude_vector`` (role ``magnitude``): one value per
  *output* row of V, the norm taken over the input dimension (and kernel). PEFT stores it as [out] for a linear
  layer and [1, out, 1, 1] for a convolution; only its out elements matter.
- kohya / LyCORIS: ``lora_down``/``lora_up`` plus ``dora_scale`` (role ``dora_scale``): by default one value per
  *input* column, shape [1, in] (conv [1, in, 1, 1]), the norm taken over the output dimension (and kernel);
  LyCORIS's ``wd_on_out`` writes [out, 1(, 1, 1)] instead, normalised per output row. The shape tells which.
  LyCORIS adds float32 eps to that norm; so does sdtune, for this layout only (PEFT does not).

s = alpha / rank goes inside V, as PEFT and LyCORIS compute it. The user's strength w scales the change from W0,
as A1111 does: W' = W0 + w · (W_dora − W0), so w = 0 is the base and w = 1 the tool's own merge.

A DoRA file's keys are LoRA's plus its own (``combines``): a module with both reads as one DoRA adapter. LyCORIS
also puts a ``dora_scale`` beside LoHa's and LoKr's keys (``dora_wd``): ``DoraLoha`` and ``DoraLokr`` are the same
renormalisation of V = W0 + s·ΔW with that algorithm's ΔW, as A1111 (its generic ``apply_weight_decompose``) and
LyCORIS apply them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...safeio import SdtuneError
from .base import Algorithm, DiffusersRole
from .loha import Loha
from .lokr import Lokr
from .lora import Lora, LoraLayer, fold_mid

_LORA = Lora()


class Dora(Algorithm):
    name = "dora"
    style = "kohya-dora"
    roles = {"dora_scale": "dora_scale"}
    diffusers_roles = (DiffusersRole(".lora_magnitude_vector", "magnitude", "peft"),
                       DiffusersRole(".lora_magnitude_vector.weight", "magnitude", "peft"))
    combines = frozenset({"dora", "lora"})
    label = "DoRA"
    additive = False
    peft_switch = "use_dora"
    network_args = {"dora_wd": "True"}  # LyCORIS's switch for DoRA ("weight decompose")
    base: ClassVar[Algorithm] = _LORA  # the algorithm whose ΔW is renormalised

    def build(self, roles):
        norms = {"magnitude", "dora_scale"} & set(roles)
        if len(norms) != 1:
            raise KeyError("a DoRA needs exactly one magnitude (lora_magnitude_vector or dora_scale)")
        (norm,) = norms
        t = self.base.build({k: v for k, v in roles.items() if k != norm})
        t[norm] = roles[norm]
        out, inner, _ = self.base.io(t)
        if norm == "magnitude" and t[norm].numel() != out:
            raise ValueError(f"lora_magnitude_vector has {t[norm].numel()} values for {out} output rows")
        if norm == "dora_scale" and not _may_fit(t[norm], out, inner):
            raise ValueError(f"dora_scale of shape {tuple(t[norm].shape)} fits neither [1, in] nor [{out}, 1]")
        return t

    def fits(self, t, shape):
        # the layer's input channels, which a per-column dora_scale has one value each of
        return "dora_scale" not in t or _scale_axis(t["dora_scale"], shape[0], shape[1]) is not None

    def _base(self, t):
        """The base algorithm's tensors: all but the magnitude."""
        return {k: v for k, v in t.items() if k not in ("magnitude", "dora_scale")}

    def rank(self, t):
        return self.base.rank(self._base(t))

    def scale(self, t, alpha):
        return self.base.scale(self._base(t), alpha)

    def io(self, t):
        return self.base.io(self._base(t))

    def file_key(self, role):
        if role == "magnitude":  # kohya/A1111 would read it as per-input-column: a different weight
            raise SdtuneError("a PEFT DoRA (magnitude per output row) has no kohya layout that A1111 reads the "
                              "same way; write it in the diffusers layout (format='diffusers', --to diffusers)")
        return "dora_scale" if role == "dora_scale" else self.base.file_key(role)

    # PEFT's layout goes back to PEFT/diffusers as it came, and so does a per-row dora_scale (LyCORIS's wd_on_output,
    # PEFT's axis: its norm without LyCORIS's float32 eps, a difference at float32 rounding); kohya's default dora_scale,
    # per input column, has no PEFT equivalent.
    def peft_factors(self, t):
        if self.peft_switch is None:  # (a LoHa's or LoKr's DoRA: PEFT's DoRA is on LoRA only)
            return None
        return _LORA.peft_factors(t) if "magnitude" in t or _per_row(t.get("dora_scale")) else None

    def peft_extras(self, t):
        if "magnitude" in t:
            return {".lora_magnitude_vector": t["magnitude"]}
        m = t["dora_scale"]  # [out, 1] -> PEFT's [out]; a convolution's [out, 1, 1, 1] -> its [1, out, 1, 1]
        return {".lora_magnitude_vector": m.flatten() if m.dim() == 2 else m.reshape(1, -1, *m.shape[2:])}

    def apply(self, weight, t, scale, strength):
        return weight + strength * (self.merged(weight, t, scale) - weight)

    def base_delta(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The base algorithm's ΔW (before the scale) in ``dtype``, flattened to [out, in·kh·kw]."""
        down = fold_mid(t["down"], t["mid"]) if "mid" in t else t["down"]
        return t["up"].to(dtype).flatten(1) @ down.to(dtype).flatten(1)

    def merged(self, weight: torch.Tensor, t: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """W_dora at strength 1 (the tool's own merge), computed in float32 at least, in ``weight``'s shape."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        rows = weight.shape[0]
        v = weight.to(dtype).reshape(rows, -1) + scale * self.base_delta(t, dtype).reshape(rows, -1)
        v = v.reshape(weight.shape)
        rest = tuple(range(1, weight.dim()))
        if "magnitude" in t:
            norm = torch.linalg.vector_norm(v, dim=rest, keepdim=True)
            m = t["magnitude"].to(dtype).reshape(norm.shape)
        else:
            m = t["dora_scale"].to(dtype)
            per_column = _scale_axis(m, rows, weight.shape[1]) == "column"
            norm = _column_norms(v) if per_column else \
                torch.linalg.vector_norm(v, dim=rest, keepdim=True) + torch.finfo(torch.float32).eps
            m = m.reshape(norm.shape)
        return (v * (m / norm)).to(weight.dtype)


class DoraLoha(Dora):
    """LyCORIS LoHa with ``dora_wd``: its keys (``hada_*``) plus ``dora_scale``."""

    name = "dora-loha"
    style = "lycoris-loha-dora"
    roles = {}  # its keys are LoHa's and DoRA's own: read as those, then combined
    diffusers_roles = ()
    combines = frozenset({"dora", "loha"})
    label = "LoHa + DoRA"
    network_algo = "loha"
    peft_switch = None
    base = Loha()

    def base_delta(self, t, dtype):
        return self.base.delta({k: v.to(dtype) for k, v in self._base(t).items()}).flatten(1)


class DoraLokr(DoraLoha):
    """LyCORIS LoKr with ``dora_wd``: its keys (``lokr_*``) plus ``dora_scale``."""

    name = "dora-lokr"
    style = "lycoris-lokr-dora"
    combines = frozenset({"dora", "lokr"})
    label = "LoKr + DoRA"
    network_algo = "lokr"
    base = Lokr()


def _per_row(scale: torch.Tensor | None) -> bool:
    """Whether a ``dora_scale`` is per output row ([out, 1(, 1, 1)], LyCORIS's wd_on_output), which PEFT holds."""
    return scale is not None and scale.dim() >= 2 and scale.shape[0] > 1 and all(d == 1 for d in scale.shape[1:])


def _row_norms(v: torch.Tensor) -> torch.Tensor:
    """LyCORIS's wd_on_output norm: over the input columns (and the kernel), one per output row, plus its eps."""
    return torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True) + torch.finfo(torch.float32).eps


def _column_norms(v: torch.Tensor) -> torch.Tensor:
    """kohya's DoRA norm: over the output rows (and the kernel), one per input column, plus LyCORIS's float32 eps."""
    return torch.linalg.vector_norm(v, dim=(0, *range(2, v.dim())), keepdim=True) + torch.finfo(torch.float32).eps


def _may_fit(scale: torch.Tensor, out: int, flat_inner: int) -> bool:
    """Whether a ``dora_scale`` can belong to a ΔW of ``out`` rows and ``flat_inner`` inputs over the kernel (a
    LoHa's tensors do not say the kernel; ``fits`` checks the layer's own input channels)."""
    shape = tuple(scale.shape)
    column = len(shape) >= 2 and shape[0] == 1 and shape[1] and flat_inner % shape[1] == 0
    return bool(column) or _scale_axis(scale, out, flat_inner) == "row"


def _scale_axis(scale: torch.Tensor, out: int, inner: int) -> str | None:
    """Which axis a ``dora_scale`` is per: "column" ([1, in, 1...]: kohya's default), "row" ([out, 1, 1...]:
    LyCORIS's wd_on_out), None when it fits neither."""
    shape = tuple(scale.shape)
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == inner and all(d == 1 for d in shape[2:]):
        return "column"
    if len(shape) >= 2 and shape[0] == out and all(d == 1 for d in shape[1:]):
        return "row"
    return None


_DORA = Dora()


class DoraLayer(LoraLayer):
    """DoRA's trainable layer, in kohya's form (what A1111, ComfyUI and LyCORIS read): LoRA's factors plus a learned
    ``dora_scale``, one per input column, the layer computing with W_dora (``Dora.merged``, the function that
    applies a saved file) in one product. PEFT's form (a magnitude per output row) is another function of the same
    factors, which A1111 would misread; diffusers reads only that one: ``on_output`` trains it instead (LyCORIS's
    wd_on_output: a dora_scale of [out, 1], which the diffusers layout holds as PEFT's magnitude). The scale starts
    at W0's norms plus the eps the form adds to them, so that W_dora = W0 exactly at the start; the norm is not
    detached, as LyCORIS trains it (PEFT detaches it, a memory saving that changes the gradient)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, generator: torch.Generator,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, on_output: bool = False,
                 tucker: bool = False, scalar: bool = False):
        if dropout:
            raise SdtuneError("DoRA computes with the whole weight, which takes no dropout on the LoRA's input; "
                              "use --lora-dropout 0")
        super().__init__(base, rank, alpha, dropout, generator, rank_dropout, module_dropout, tucker, scalar)
        norms = _row_norms if on_output else _column_norms
        self.dora_scale = nn.Parameter(norms(base.weight.detach().float()))  # merged's own norm of W0

    def forward(self, x, *args, **kwargs):
        # LyCORIS's dropouts on its DoRA, in training mode: module dropout computes with W0 alone; rank dropout
        # zeroes output rows of ΔW (rows of up) before the renormalisation, the rest scaled by 1/(1 − p)
        b = self.base
        if self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout:
            return b(x)
        t = {**self.live_factors(), "dora_scale": self.dora_scale}
        if self.training and self.rank_dropout:
            keep = torch.rand(t["up"].shape[0], device=t["up"].device) >= self.rank_dropout
            t["up"] = t["up"] * (keep.to(t["up"].dtype) / (1 - self.rank_dropout)).view(-1, *[1] * (t["up"].dim() - 1))
        weight = _DORA.merged(b.weight.float(), t, self.scale)
        bias = None if b.bias is None else b.bias.float()
        x = x.to(weight.dtype)
        if weight.dim() == 4:  # (a convolution's, also while --fp8-base stands in a twin for it)
            return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation)
        return F.linear(x, weight, bias)

    def take(self, tensors):
        given = tensors.get("dora_scale", tensors.get("magnitude"))  # (PEFT's magnitude: per output row)
        per_row = "magnitude" in tensors or _per_row(given)
        if per_row != _per_row(self.dora_scale):
            theirs, mine = ("per output row", "per input column") if per_row else ("per input column",
                                                                                   "per output row")
            raise SdtuneError(f"its DoRA magnitude is {theirs}, and this run trains one {mine}; "
                              f"{'add' if per_row else 'leave out'} --dora-wd-on-output")
        super().take({k: v for k, v in tensors.items() if k not in ("dora_scale", "magnitude")})
        with torch.no_grad():
            self.dora_scale.copy_(given.reshape(self.dora_scale.shape))

    def parts(self):
        return {**super().parts(), "dora_scale": self.dora_scale}

    def tensors(self):
        return {**super().tensors(), "dora_scale": self.dora_scale.detach().float().cpu().clone()}


Dora.layer = DoraLayer  # (the layer needs the algorithm first)
DoraLoha.layer = None  # (LyCORIS's LoHa/LoKr with dora_wd are read, not trained)
