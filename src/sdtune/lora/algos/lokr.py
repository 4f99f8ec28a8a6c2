"""LyCORIS LoKr: ΔW = scale · kron(w1, w2), each factor whole (``w1``) or split in two (``w1a @ w1b``).

The scale is alpha / rank when a factor is split (the rank is the split's), else 1: a whole factor has no rank.
A Tucker ``lokr_t2`` core is folded into ``w2a``/``w2b`` on reading (same ΔW, same rank).
"""

from __future__ import annotations

import torch

from .base import Algorithm, Io, flat_inner, kernel_of, tucker_to_pair

_SPLITS = ("w1b", "w2b")


class Lokr(Algorithm):
    name = "lokr"
    style = "lycoris-lokr"
    roles = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
             "lokr_w2_b": "w2b", "lokr_t2": "t2"}
    network_algo = "lokr"
    label = "LoKr"

    def build(self, roles):
        t = dict(roles)
        if "t2" in t:
            t["w2a"], t["w2b"] = tucker_to_pair(t.pop("t2"), t["w2a"], t["w2b"])
        whole_or_split = all((f"w{i}" in t) != ({f"w{i}a", f"w{i}b"} <= set(t)) for i in (1, 2))
        if not whole_or_split or set(t) - {"w1", "w1a", "w1b", "w2", "w2a", "w2b"}:
            raise KeyError("incomplete LoKr")
        if "w2b" in t:  # LyCORIS's functional API writes a conv's as [rank, in, kh, kw]: a matrix over in·kh·kw
            t["w2b"] = t["w2b"].flatten(1)
        return t

    def rank(self, t):
        return next((t[k].shape[0] for k in _SPLITS if k in t), None)

    def scale(self, t, alpha):
        if not any(k in t for k in _SPLITS):
            return 1.0
        return super().scale(t, alpha)

    def kron_factors(self, t):
        w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
        w2 = t["w2"] if "w2" in t else t["w2a"] @ t["w2b"]
        # a conv's kernel is w2's: kron(w1, w2) flattened is kron(w1, w2 flattened) (input index, then kernel)
        return w1.flatten(1) if w1.dim() > 2 else w1, w2.flatten(1)

    def delta(self, t):
        return torch.kron(*self.kron_factors(t))

    def io(self, t):
        w1 = (t["w1"].shape[0], t["w1"].shape[1]) if "w1" in t else (t["w1a"].shape[0], t["w1b"].shape[1])
        w2 = t.get("w2")
        if w2 is not None:
            return Io(w1[0] * w2.shape[0], w1[1] * flat_inner(w2), kernel_of(w2))
        return Io(w1[0] * t["w2a"].shape[0], w1[1] * flat_inner(t["w2b"]), None)

