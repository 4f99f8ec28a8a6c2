"""LyCORIS IA3: a learned scale on each output row of a layer, or (``on_input``) on each input column.

LyCORIS's module computes y = (W0·x)·(1 + w·v) per output feature, so merged

    W' = W0 + w·(v ⊙ W0)

with v [out] (a conv layer's [1, out, 1, 1]) scaling W0's rows; with ``on_input`` set, v [in] (a conv's
[1, in, 1, 1]) scales W0's input channels, whatever the kernel. There is no rank and no alpha. A1111 reads the
same tensors the same way; ComfyUI has no IA3. The change depends on W0, so IA3 is applied as DoRA and OFT are
(``additive = False``): restored exactly, baked, but not merged into a plain LoRA.

A file's ``<module>.weight`` key alone would also match every weight of a checkpoint given as a LoRA: IA3 is
read only where the ``on_input`` flag stands beside it, as LyCORIS always saves it (and A1111 requires it).
"""

from __future__ import annotations

import torch

from .base import Algorithm, Io


class Ia3(Algorithm):
    name = "ia3"
    style = "lycoris-ia3"
    roles = {"weight": "scale", "on_input": "on_input"}
    network_algo = "ia3"
    label = "IA3"
    uses_alpha = False
    additive = False
    in_comfyui = False  # ComfyUI has no IA3; its layout's bare ``.weight`` keys are a checkpoint's

    def build(self, roles):
        t = super().build(roles)
        if t["on_input"].numel() != 1:
            raise ValueError(f"on_input holds {t['on_input'].numel()} values, not one flag")
        scale = t["scale"]
        # LyCORIS: [n] for a linear layer, [1, n, 1, ...] for a conv
        if not (scale.dim() == 1 or (scale.dim() >= 2 and scale.shape[0] == 1 and scale[0].numel() == scale.shape[1])):
            raise ValueError(f"a scale of shape {tuple(scale.shape)} is no vector")
        return t

    def io(self, t):
        n = t["scale"].numel()
        if not _on_input(t):
            return Io(n, None, None)
        # a linear layer's input width is its flattened one; a conv's is not (the kernel): fits checks it
        return Io(None, n if t["scale"].dim() == 1 else None, None)

    def fits(self, t, shape):
        return len(shape) >= 2 and shape[1 if _on_input(t) else 0] == t["scale"].numel()

    def apply(self, weight, t, scale, strength):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        view = [1] * weight.dim()
        view[1 if _on_input(t) else 0] = -1  # along the input channels or the output rows
        v = t["scale"].to(dtype).reshape(view)
        return weight + (strength * v * weight.to(dtype)).to(weight.dtype)


def _on_input(t: dict[str, torch.Tensor]) -> bool:
    return bool(t["on_input"].reshape(()).item())
