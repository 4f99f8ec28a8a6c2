"""LyCORIS LoKr: ΔW = scale · kron(w1, w2), each factor whole (``w1``) or split in two (``w1a @ w1b``).

The scale is alpha / rank when a factor is split (the rank is the split's), else 1: a whole factor has no rank.
A Tucker ``lokr_t2`` core is folded into ``w2a``/``w2b`` on reading (same ΔW, same rank).
"""

from __future__ import annotations

import math

import torch

from .base import Algorithm, Io, flat_inner, kernel_of, tucker_to_pair
from .delta_layer import DeltaLayer, kaiming, zeros

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


def split(dim: int, factor: int = -1) -> tuple[int, int]:
    """``dim`` as m · n with m <= n: m the largest divisor up to sqrt(dim) (and up to ``factor`` when it is
    positive; a ``factor`` that divides ``dim`` is taken as it is), as LyCORIS factorises a LoKr layer."""
    if factor > 0 and dim % factor == 0:
        m, n = sorted((factor, dim // factor))
        return m, n
    limit = math.isqrt(dim) if factor <= 0 else min(math.isqrt(dim), factor)
    m = max(d for d in range(1, limit + 1) if dim % d == 0)
    return m, dim // m


class LokrLayer(DeltaLayer):
    """LoKr's trainable layer, shaped as LyCORIS shapes it: a whole w1 over the small factors of the output and
    input widths, and w2 over the large ones, split into w2a @ w2b at ``rank`` unless the rank is at least half
    of w2's larger side (then whole). The part of w2 that starts at zero makes ΔW = 0; the other factors start as
    LyCORIS's (Kaiming). The scale is alpha / rank where a factor is split, else 1 (``Lokr.scale``, as LyCORIS).

    LyCORIS's options: ``full_matrix`` keeps both factors whole at any rank; ``decompose_both`` splits w1 as well,
    into w1a @ w1b at ``rank``, where the rank is below half of w1's larger side; ``unbalanced`` gives w1 the
    output width's larger factor (its unbalanced_factorization); ``tucker`` gives a convolution's split w2 a core
    with the kernel, t2 [r, r, kh, kw] between w2a [r, out] and w2b [r, in]; ``scalar`` starts the zero factor
    random (Kaiming) and a learned scalar on ΔW at 0."""

    algo = Lokr()
    linear_roles = (("w1", "w1a"), ("w2", "w2a"))  # ΔW = w1 ⊗ w2, each whole or a product (w1a @ w1b)
    cores = frozenset({"t2"})

    def shapes_and_inits(self, shape, rank, factor: int = -1, full_matrix: bool = False,
                         decompose_both: bool = False, unbalanced: bool = False, tucker: bool = False,
                         scalar: bool = False):
        (out_small, out_large), (in_small, in_large) = split(shape[0], factor), split(shape[1], factor)
        if unbalanced:
            out_small, out_large = out_large, out_small
        kernel = tuple(shape[2:])
        if decompose_both and not full_matrix and rank < max(out_small, in_small) / 2:
            roles = {"w1a": ((out_small, rank), kaiming), "w1b": ((rank, in_small), kaiming)}
        else:
            roles = {"w1": ((out_small, in_small), kaiming)}
        last = kaiming if scalar else zeros  # (the scalar at 0 holds ΔW at zero instead)
        if rank < max(out_large, in_large) / 2 and not full_matrix:
            if tucker and any(k != 1 for k in kernel):  # LyCORIS's Tucker w2: a core between [r, out] and [r, in]
                roles |= {"t2": ((rank, rank, *kernel), kaiming), "w2a": ((rank, out_large), kaiming),
                          "w2b": ((rank, in_large), last)}
            else:
                roles |= {"w2a": ((out_large, rank), kaiming), "w2b": ((rank, in_large * math.prod(kernel)), last)}
        else:
            roles["w2"] = ((out_large, in_large, *kernel), last)
        return roles


Lokr.layer = LokrLayer  # (the layer needs the algorithm first)
