"""LyCORIS IA3: a learned scale on each output row of a layer, or (``on_input``) on each input column.

LyCORIS's module computes y = (W0·x)·(1 + w·v) per output feature, so merged

    W' = W0 + w·(v ⊙ W0)

with v [out] (a conv layer's [1, out, 1, 1]) scaling W0's rows; with ``on_input`` set, v [in] (a conv's
[1, in, 1, 1]) scales W0's input channels, whatever the kernel. There is no rank and no alpha. A1111 reads the
same tensors the same way; ComfyUI has no IA3. The change depends on W0, so IA3 is applied as DoRA and OFT are
(``additive = False``): restored exactly, baked, but not merged into a plain LoRA.

A file's ``<module>.weight`` key alone would also match every weight of a checkpoint given as a LoRA: IA3 is
read only where the ``on_input`` flag stands beside it, as LyCORIS always saves it (and A1111 requires it).

``Ia3Layer`` trains it as LyCORIS does (its ``train_on_input`` option as ``on_input``).
"""

from __future__ import annotations

import torch

from ...safeio import SdtuneError
from .base import Algorithm, Io
from .delta_layer import DeltaLayer, zeros


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


class Ia3Layer(DeltaLayer):
    """LyCORIS IA3's trainable layer: a scale per output row (``on_input``: per input channel) that starts at zero
    (the base exactly), in LyCORIS's shape ([n], a conv's [1, n, 1, 1]); it computes with ``Ia3.apply``, the
    function that applies the saved file, which carries LyCORIS's ``on_input`` flag beside it. No rank, no alpha."""

    algo = Ia3()
    linear_roles = (("scale",),)  # ΔW = v ⊙ W0 is linear in v: max-norm scales v itself

    def shapes_and_inits(self, shape, rank, on_input: bool = False, **options):
        self.on_input = on_input
        self.flag = torch.tensor(int(on_input))  # LyCORIS's buffer (an int), made once: each forward reads it
        n = shape[1] if on_input else shape[0]
        return {"scale": ((n,) if len(shape) == 2 else (1, n, *[1] * (len(shape) - 2)), zeros)}

    def delta(self):
        w0 = self.base.weight.float()
        return self.algo.apply(w0, {"scale": self.factors["scale"], "on_input": self.flag}, 1.0, 1.0) - w0

    def take(self, tensors):
        flag = tensors.get("on_input")
        if flag is not None and bool(flag.reshape(()).item()) != self.on_input:
            mine, theirs = ("input channel", "output row") if self.on_input else ("output row", "input channel")
            raise SdtuneError(f"its IA3 scales each {theirs}, and this run scales each {mine}; "
                              f"{'leave out' if self.on_input else 'add'} --ia3-on-input")
        super().take({"scale": tensors["scale"]})

    def tensors(self):
        return {**super().tensors(), "on_input": self.flag.clone()}


Ia3.layer = Ia3Layer  # (the layer needs the algorithm first)
