"""LyCORIS GLoRA (generalised LoRA): a low-rank change of the layer's input plus a LoRA beside it.

LyCORIS's module computes y = W0·(x + s·a1·a2·x) + s·b1·b2·x with s = alpha / rank, so merged

    W' = W0 + w·s·(W0·a1·a2 + b1·b2)

with a1 [in, r] and a2 [r, in] (1x1 convolutions for a conv layer: they act on W0's input channels, whatever
its kernel), b1 [out, r] and b2 [r, in·kh·kw] (the kernel lives in b2; LyCORIS's Tucker files hold it in a core
``bm`` [r, r, kh, kw] between 1x1 factors, folded into b2 on reading). Files of LyCORIS before 2.0 (which A1111
reads) name the factors the other way round: a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r] with
W' = W0 + w·s·(W0·a2·a1 + b2·b1). Which one a file is follows from the shapes, as ComfyUI tells them; an old file
is read as the same factors renamed. The change depends on W0, so GLoRA is applied as DoRA and OFT are
(``additive = False``): restored exactly, baked, but not merged into a plain LoRA.
"""

from __future__ import annotations

import torch

from .base import Algorithm, Io, tucker_to_pair


class Glora(Algorithm):
    name = "glora"
    style = "lycoris-glora"
    roles = {"a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2", "bm.weight": "bm"}
    network_algo = "glora"
    label = "GLoRA"
    additive = False
    optional = frozenset({"bm"})

    def build(self, roles):
        t = super().build(roles)
        a1, a2, b1, b2 = (t[k].flatten(1) for k in ("a1", "a2", "b1", "b2"))
        if "bm" in t:  # Tucker: b1 [out, r] · bm [r, r, kh, kw] · b2 [r, in] as one pair, b2 taking the kernel
            b1, b2 = tucker_to_pair(t["bm"], b1.t(), b2)
        if not _current(a1, a2, b1, b2):
            if not _current(a2, a1, b2, b1):
                raise ValueError(f"GLoRA factors of shapes a1 {tuple(a1.shape)}, a2 {tuple(a2.shape)}, b1 "
                                 f"{tuple(b1.shape)}, b2 {tuple(b2.shape)} share no rank")
            a1, a2, b1, b2 = a2, a1, b2, b1  # a file of LyCORIS before 2.0
        return {"a1": a1, "a2": a2, "b1": b1, "b2": b2}

    def rank(self, t):
        return t["a2"].shape[0]

    def io(self, t):
        return Io(t["b1"].shape[0], t["b2"].shape[1], None)

    def fits(self, t, shape):
        return len(shape) >= 2 and t["a1"].shape[0] == shape[1]  # a1·a2 acts on the input channels alone

    def apply(self, weight, t, scale, strength):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        w0 = weight.to(dtype)
        a1, a2, b1, b2 = (t[k].to(dtype) for k in ("a1", "a2", "b1", "b2"))
        # W0·a1·a2 over the input channels (dim 1), whatever the kernel
        mixed = torch.einsum("oi...,ir->or...", w0, a1)
        mixed = torch.einsum("or...,ri->oi...", mixed, a2)
        change = mixed + (b1 @ b2).reshape(weight.shape)
        return weight + (strength * scale * change).to(weight.dtype)


def _current(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> bool:
    """Whether the (flattened) factors have LyCORIS 2's shapes: a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, …]."""
    r = a2.shape[0]
    return a1.shape[1] == b1.shape[1] == b2.shape[0] == r and a1.shape[0] == a2.shape[1]
