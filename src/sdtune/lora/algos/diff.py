"""A full weight difference (LyCORIS ``full``): ΔW = diff, stored whole, and the bias's Δb (``diff_b``) where
the layer has a bias; no rank, and no alpha."""

from __future__ import annotations

from .base import Algorithm, Io, kernel_of


class Diff(Algorithm):
    name = "diff"
    style = "lycoris-full"
    roles = {"diff": "diff", "diff_b": "bias"}
    optional = frozenset({"bias"})
    network_algo = "full"
    label = "full (diff)"
    uses_alpha = False

    def delta(self, t):
        return t["diff"]

    def io(self, t):
        d = t["diff"]
        return Io(d.shape[0], d[0].numel(), kernel_of(d))
