"""LyCORIS norm-layer adapters (``train_norm``): the full change of a LayerNorm's or GroupNorm's scale, ΔW =
w_norm, and of its bias, Δb = b_norm; no rank, and no alpha (A1111's and ComfyUI's reading)."""

from __future__ import annotations

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
