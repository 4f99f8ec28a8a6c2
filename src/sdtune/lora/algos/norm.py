"""LyCORIS norm-layer adapters (``train_norm``): the full change of a LayerNorm's or GroupNorm's scale, ΔW =
w_norm, and of its bias, Δb = b_norm; no rank, and no alpha (A1111's and ComfyUI's reading); and its trainable
layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...safeio import SdtuneError
from .base import Algorithm, Io


class Norm(Algorithm):
    name = "norm"
    style = "lycoris-norm"
    roles = {"w_norm": "weight", "b_norm": "bias"}
    optional = frozenset({"bias"})  # a norm without a bias has no b_norm
    label = "norm (w_norm/b_norm)"
    uses_alpha = False
    vector = True
    network_args = {"train_norm": "True"}  # LyCORIS's switch for its norm-layer modules

    def delta(self, t):
        return t["weight"]

    def io(self, t):
        return Io(t["weight"].shape[0], None, None)

    def build(self, roles):
        roles = super().build(roles)
        if roles["weight"].dim() != 1 or ("bias" in roles and roles["bias"].shape != roles["weight"].shape):
            raise ValueError("a norm adapter's w_norm and b_norm are vectors of one length")
        return roles


class NormLayer(nn.Module):
    """LyCORIS's norm-layer module (``train_norm``), trainable: a frozen LayerNorm/GroupNorm whose scale and bias
    get a learned change each, from zero (the base exactly), y = norm(x; W + w_norm, b + b_norm), as LyCORIS's
    NormModule computes it. ``module_dropout`` skips the change in a forward with its probability; a norm has no
    rank, so rank dropout leaves it alone."""

    algo = Norm()

    def __init__(self, base: nn.Module, module_dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.LayerNorm, nn.GroupNorm)) or base.weight is None or base.bias is None:
            raise SdtuneError("train_norm trains LayerNorm and GroupNorm layers with a scale and a bias only")
        self.base, self.module_dropout = base, module_dropout
        self.alpha = None  # (no alpha: the change is whole)
        zeros = torch.zeros(base.weight.shape, dtype=torch.float32, device=base.weight.device)
        self.w_norm, self.b_norm = nn.Parameter(zeros.clone()), nn.Parameter(zeros.clone())

    def forward(self, x, *args, **kwargs):
        b = self.base
        if self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout:
            return b(x)
        weight = b.weight.to(self.w_norm.dtype) + self.w_norm
        bias = b.bias.to(self.b_norm.dtype) + self.b_norm
        h = x.to(weight.dtype)
        if isinstance(b, nn.GroupNorm):
            return F.group_norm(h, b.num_groups, weight, bias, b.eps).to(x.dtype)
        return F.layer_norm(h, b.normalized_shape, weight, bias, b.eps).to(x.dtype)

    def take(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from an adapter's changes instead of zero."""
        with torch.no_grad():
            self.w_norm.copy_(tensors["weight"].reshape(self.w_norm.shape))
            if "bias" in tensors:
                self.b_norm.copy_(tensors["bias"].reshape(self.b_norm.shape))

    def parts(self) -> dict[str, nn.Parameter]:
        return {"weight": self.w_norm, "bias": self.b_norm}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {role: p.detach().float().cpu().clone() for role, p in self.parts().items()}


Norm.layer = NormLayer  # (the layer needs the algorithm first)
