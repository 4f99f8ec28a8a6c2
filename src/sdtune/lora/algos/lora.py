"""Plain LoRA and LoCon: ΔW = (alpha / rank) · up @ down.

Convolutions (LoCon) flatten ``down`` [r, in, kh, kw] and reshape the product to the kernel. LyCORIS's Tucker
LoCon adds a core ``mid`` [r, r, kh, kw] between a 1x1 ``down`` [r, in, 1, 1] and ``up`` [out, r, 1, 1]; it is
kept as it is (so files round-trip) and folded into ``down`` where one product is needed (``fold_mid``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...safeio import SdtuneError
from .base import Algorithm, DiffusersRole, Io, flat_inner, kernel_of


def fold_mid(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """The Tucker core folded into ``down``: [r, in, kh, kw], so that ΔW = up @ result (flattened)."""
    return torch.einsum("ri,srkl->sikl", down.flatten(1), mid)


class LoraLayer(nn.Module):
    """A frozen Linear/Conv2d plus a trainable low-rank branch: y = W x + scale · up(down(dropout(x))).

    ``down`` starts like a fresh layer and ``up`` at zero, so training starts from the base model exactly.
    Convolutions get a ``down`` conv with the layer's kernel, stride and padding and a 1x1 ``up`` (LoCon).

    LyCORIS's two options: ``tucker`` gives a convolution with a kernel a 1x1 ``down``, a ``mid`` core [r, r, kh,
    kw] with the kernel, stride and padding, and the 1x1 ``up`` (its Tucker LoCon, saved as ``lora_mid``);
    ``scalar`` multiplies the branch by a learned scalar that starts at 0, so that ``up`` can start random as
    ``down`` does (the saved ``up`` holds the scalar: the file is a plain LoRA).

    kohya's two other dropouts, in training mode only: ``rank_dropout`` zeroes each of the r branch channels
    per sample with that probability and scales the branch by 1/(1 − p) (as if the rank changed), and
    ``module_dropout`` skips the whole branch of a forward with its probability.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, generator: torch.Generator,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, tucker: bool = False,
                 scalar: bool = False):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scale = alpha / rank
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        w = base.weight
        self.mid = None
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            if base.groups != 1:
                raise SdtuneError(f"grouped convolutions cannot take a LoRA (groups={base.groups})")
            if tucker and tuple(base.kernel_size) != (1, 1):  # (a 1x1 has no kernel to hold in a core)
                self.down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
                self.mid = nn.Conv2d(rank, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                     bias=False)
            else:
                self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                      base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        # the scalar, where learned, is a parameter of its own; else no tensor at all (1)
        self.scalar = nn.Parameter(torch.zeros((), device=w.device)) if scalar else None
        with torch.no_grad():
            for factor in (self.down, self.mid, self.up):
                if factor is None:
                    continue
                factor.to(device=w.device, dtype=torch.float32)
                if factor is self.up and not scalar:
                    factor.weight.zero_()  # ΔW = 0 at the start
                else:  # as a fresh layer (PEFT, kohya, LyCORIS)
                    init = torch.empty(factor.weight.shape, dtype=torch.float32)
                    nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
                    factor.weight.copy_(init)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x, *args, **kwargs):
        y = self.base(x)
        if self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout:
            return y
        h = self.down(self.dropout(x.to(self.down.weight.dtype)))
        if self.mid is not None:
            h = self.mid(h)
        scale = self.scale
        if self.training and self.rank_dropout:
            keep = torch.rand(h.shape[0], self.rank, device=h.device) >= self.rank_dropout
            # the rank is dim 1 of a conv's [b, r, h, w] and the last one of a linear's [b, (tokens,) r]
            shape = (h.shape[0], self.rank, *[1] * (h.dim() - 2)) if isinstance(self.down, nn.Conv2d) else \
                (h.shape[0], *[1] * (h.dim() - 2), self.rank)
            h = h * keep.view(shape).to(h.dtype)
            scale = scale / (1 - self.rank_dropout)
        change = self.up(h)
        if self.scalar is not None:
            change = change * self.scalar
        return y.add(change.to(y.dtype), alpha=scale)

    def _down(self) -> torch.Tensor:
        """``down`` as one factor spanning the kernel: the Tucker core folded in (same ΔW = up @ it)."""
        return self.down.weight if self.mid is None else fold_mid(self.down.weight, self.mid.weight)

    @torch.no_grad()
    def limit_norm(self, limit: float) -> torch.Tensor:
        """kohya's max-norm (--scale-weight-norms): where ΔW = scale · up @ down has a Frobenius norm above
        ``limit``, both factors are scaled by √(limit/norm), which brings it to ``limit``. Returns the norm before
        (a tensor: no read-back, a GPU would wait on each layer)."""
        up, down = self.up.weight.flatten(1), self._down().flatten(1)
        # ||U D||² = sum((UᵀU) ∘ (D Dᵀ)): rank x rank products instead of the out x in matrix
        norm = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0).sqrt() * self.scale
        if self.scalar is not None:
            norm = norm * self.scalar.abs()
        ratio = (limit / norm).clamp(max=1).sqrt()  # a layer within the limit is multiplied by exactly 1
        self.up.weight.mul_(ratio)
        self.down.weight.mul_(ratio)
        return norm

    def take(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from an adapter's factors (of this layer's rank) instead of the fresh ones; a learned scalar
        starts at 1 (the file's ``up`` holds it)."""
        if ("mid" in tensors) != (self.mid is not None):
            fix = "add --tucker" if "mid" in tensors else "leave out --tucker"
            raise SdtuneError(f"its LoCon layers {'have' if 'mid' in tensors else 'have no'} Tucker cores, and "
                              f"this run trains {'none' if self.mid is None else 'some'}; {fix}")
        with torch.no_grad():
            for role, factor in (("down", self.down), ("mid", self.mid), ("up", self.up)):
                if factor is not None:
                    factor.weight.copy_(tensors[role].reshape(factor.weight.shape))
            if self.scalar is not None:
                self.scalar.fill_(1.0)

    def parts(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by role (what the optimizer steps and a resume state keeps)."""
        parts = {"down": self.down.weight, "up": self.up.weight}
        if self.mid is not None:
            parts["mid"] = self.mid.weight
        if self.scalar is not None:
            parts["scalar"] = self.scalar
        return parts

    def live_factors(self) -> dict[str, torch.Tensor]:
        """The factors as the adapter's roles, live (gradients flow): the scalar, as LyCORIS saves it, in ``up``."""
        made = {"down": self.down.weight, "up": self.up.weight if self.scalar is None else self.up.weight * self.scalar}
        if self.mid is not None:
            made["mid"] = self.mid.weight
        return made

    def tensors(self) -> dict[str, torch.Tensor]:
        """The learned factors as the adapter's roles (float32, on the CPU, detached copies)."""
        return {role: t.detach().float().cpu().clone() for role, t in self.live_factors().items()}


class Lora(Algorithm):
    name = "lora"
    style = "kohya"
    roles = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"}
    diffusers_roles = (
        DiffusersRole(".lora_A.weight", "down", "peft"), DiffusersRole(".lora_B.weight", "up", "peft"),
        DiffusersRole(".lora.down.weight", "down", "diffusers-old"),
        DiffusersRole(".lora.up.weight", "up", "diffusers-old"),
        DiffusersRole(".lora_linear_layer.down.weight", "down", "diffusers-old"),
        DiffusersRole(".lora_linear_layer.up.weight", "up", "diffusers-old"),
    )
    layer = LoraLayer

    def build(self, roles):
        if not {"down", "up"} <= set(roles) or set(roles) - {"down", "up", "mid"}:
            raise KeyError("incomplete LoRA")
        return dict(roles)

    def rank(self, t):
        return t["down"].shape[0]

    def delta(self, t):
        down = fold_mid(t["down"], t["mid"]) if "mid" in t else t["down"]
        return t["up"].flatten(1) @ down.flatten(1)

    def low_rank(self, t):
        return None if "mid" in t else (t["up"], t["down"])

    def io(self, t):
        down = t["down"]
        if "mid" in t:  # down is 1x1; the kernel is the core's
            kernel = tuple(t["mid"].shape[2:])
            return Io(t["up"].shape[0], down.shape[1] * math.prod(kernel), kernel)
        return Io(t["up"].shape[0], flat_inner(down), kernel_of(down))

    def lycoris_label(self, t):
        return "LoCon (Tucker)" if "mid" in t else None  # a LoRA with a Tucker core only LyCORIS makes

    def peft_factors(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) for the diffusers/PEFT layout, which has no Tucker core: it is folded into lora_A
        (same ΔW, same rank), computed in float32 and stored in ``down``'s dtype."""
        down = t["down"]
        if "mid" in t:
            down = fold_mid(down.float(), t["mid"].float()).to(down.dtype)
        return down, t["up"]
