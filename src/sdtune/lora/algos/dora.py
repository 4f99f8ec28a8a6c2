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

A DoRA file's keys are LoRA's plus its own (``extends``): a module with both reads as one DoRA adapter.
"""

from __future__ import annotations

import torch

from ...safeio import SdtuneError
from .base import Algorithm, DiffusersRole
from .lora import Lora, fold_mid

_LORA = Lora()


class Dora(Algorithm):
    name = "dora"
    style = "kohya-dora"
    roles = {"dora_scale": "dora_scale"}
    diffusers_roles = (DiffusersRole(".lora_magnitude_vector", "magnitude", "peft"),
                       DiffusersRole(".lora_magnitude_vector.weight", "magnitude", "peft"))
    extends = "lora"
    label = "DoRA"
    additive = False
    peft_switch = "use_dora"

    def build(self, roles):
        norms = {"magnitude", "dora_scale"} & set(roles)
        if len(norms) != 1:
            raise KeyError("a DoRA needs exactly one magnitude (lora_magnitude_vector or dora_scale)")
        (norm,) = norms
        t = _LORA.build({k: v for k, v in roles.items() if k != norm})
        t[norm] = roles[norm]
        out, inner = t["up"].shape[0], t["down"].shape[1]
        if norm == "magnitude" and t[norm].numel() != out:
            raise ValueError(f"lora_magnitude_vector has {t[norm].numel()} values for {out} output rows")
        if norm == "dora_scale" and _scale_axis(t[norm], out, inner) is None:
            raise ValueError(f"dora_scale of shape {tuple(t[norm].shape)} fits neither [1, {inner}] nor [{out}, 1]")
        return t

    def rank(self, t):
        return _LORA.rank(t)

    def io(self, t):
        return _LORA.io(t)

    def file_key(self, role):
        if role == "magnitude":  # kohya/A1111 would read it as per-input-column: a different weight
            raise SdtuneError("a PEFT DoRA (magnitude per output row) has no kohya layout that A1111 reads the "
                              "same way; write it in the diffusers layout (format='diffusers', --to diffusers)")
        return super().file_key(role) if role in self.roles.values() else _LORA.file_key(role)

    # PEFT's layout goes back to PEFT/diffusers as it came; kohya's dora_scale (per input column by default) has no
    # PEFT equivalent, as PEFT normalises per output row.
    def peft_factors(self, t):
        return _LORA.peft_factors(t) if "magnitude" in t else None

    def peft_extras(self, t):
        return {".lora_magnitude_vector": t["magnitude"]}

    def apply(self, weight, t, scale, strength):
        return weight + strength * (self.merged(weight, t, scale) - weight)

    def merged(self, weight: torch.Tensor, t: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """W_dora at strength 1 (the tool's own merge), computed in float32 at least, in ``weight``'s shape."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        down = fold_mid(t["down"], t["mid"]) if "mid" in t else t["down"]
        rows = weight.shape[0]
        v = weight.to(dtype).reshape(rows, -1) + scale * (t["up"].to(dtype).flatten(1) @ down.to(dtype).flatten(1))
        v = v.reshape(weight.shape)
        rest = tuple(range(1, weight.dim()))
        if "magnitude" in t:
            norm = torch.linalg.vector_norm(v, dim=rest, keepdim=True)
            m = t["magnitude"].to(dtype).reshape(norm.shape)
        else:
            m = t["dora_scale"].to(dtype)
            per_column = _scale_axis(m, rows, weight.shape[1]) == "column"
            dims = (0, *rest[1:]) if per_column else rest
            norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True) + torch.finfo(torch.float32).eps
            m = m.reshape(norm.shape)
        return (v * (m / norm)).to(weight.dtype)


def _scale_axis(scale: torch.Tensor, out: int, inner: int) -> str | None:
    """Which axis a ``dora_scale`` is per: "column" ([1, in, 1...]: kohya's default), "row" ([out, 1, 1...]:
    LyCORIS's wd_on_out), None when it fits neither."""
    shape = tuple(scale.shape)
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == inner and all(d == 1 for d in shape[2:]):
        return "column"
    if len(shape) >= 2 and shape[0] == out and all(d == 1 for d in shape[1:]):
        return "row"
    return None
