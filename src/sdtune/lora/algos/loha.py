"""LyCORIS LoHa: ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b), a Hadamard product of two low-rank products.

Tucker files (``hada_t1``/``hada_t2`` cores for convolutions) are folded into the plain two-factor form on
reading: the same ΔW with the same rank.
"""

from __future__ import annotations

import math

from .base import Algorithm, Io, tucker_to_pair
from .delta_layer import DeltaLayer, normal, zeros

_FACTORS = {"w1a", "w1b", "w2a", "w2b"}


class Loha(Algorithm):
    name = "loha"
    style = "lycoris-loha"
    roles = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
             "hada_t1": "t1", "hada_t2": "t2"}
    network_algo = "loha"
    label = "LoHa"

    def build(self, roles):
        t = dict(roles)
        if "t1" in t or "t2" in t:
            t["w1a"], t["w1b"] = tucker_to_pair(t.pop("t1"), t["w1a"], t["w1b"])
            t["w2a"], t["w2b"] = tucker_to_pair(t.pop("t2"), t["w2a"], t["w2b"])
        if set(t) != _FACTORS:
            raise KeyError("incomplete LoHa")
        return {k: (v.flatten(1) if k.endswith("b") else v) for k, v in t.items()}  # conv b factors as matrices

    def rank(self, t):
        return t["w1b"].shape[0]

    def delta(self, t):
        return (t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"])

    def io(self, t):
        return Io(t["w1a"].shape[0], t["w1b"].flatten(1).shape[1], None)


class LohaLayer(DeltaLayer):
    """LoHa's trainable layer: w2a starts at zero (ΔW = 0; with ``scalar``, random as w1a, the scalar at 0), the
    others random, as LyCORIS starts them. With ``tucker`` a convolution with a kernel gets LyCORIS's Tucker form:
    each pair a core t [r, r, kh, kw] between wa [r, out] and wb [r, in] (cores from N(0, 0.1²))."""

    algo = Loha()
    linear_roles = (("w1a",), ("w2a",))  # ΔW = (w1a @ w1b) ∘ (w2a @ w2b)
    cores = frozenset({"t1", "t2"})

    def shapes_and_inits(self, shape, rank, tucker: bool = False, scalar: bool = False):
        out, inner, kernel = shape[0], math.prod(shape[1:]), tuple(shape[2:])
        w2a_init = normal(0.1) if scalar else zeros
        if tucker and any(k != 1 for k in kernel):
            return {"t1": ((rank, rank, *kernel), normal(0.1)), "w1a": ((rank, out), normal(0.1)),
                    "w1b": ((rank, shape[1]), normal(1.0)), "t2": ((rank, rank, *kernel), normal(0.1)),
                    "w2a": ((rank, out), w2a_init), "w2b": ((rank, shape[1]), normal(1.0))}
        # a conv's b factors span its input and kernel
        return {"w1a": ((out, rank), normal(0.1)), "w1b": ((rank, inner), normal(1.0)),
                "w2a": ((out, rank), w2a_init), "w2b": ((rank, inner), normal(1.0))}


Loha.layer = LohaLayer  # (the layer needs the algorithm first)
