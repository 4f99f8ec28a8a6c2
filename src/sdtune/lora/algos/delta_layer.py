"""The trainable layer of an algorithm whose ΔW is not a plain low-rank product (LoHa, LoKr).

It holds the algorithm's factors, by their roles, and computes ΔW with the algorithm's own ``delta`` and
``scale``: the functions that apply a saved file, so what a run trains is what the file loads as. The whole ΔW
is built at each forward pass, as LyCORIS's own layers build it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...safeio import SdtuneError
from .base import Algorithm


class DeltaLayer(nn.Module):
    """A frozen Linear/Conv2d plus a trainable change: y = W x + ΔW (dropout(x)), ΔW = scale · delta(factors).

    Subclasses set ``algo`` and make the factors (``shapes_and_inits``), one of which starts at zero so that
    training starts from the base model exactly.
    """

    algo: ClassVar[Algorithm]

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, generator: torch.Generator,
                 **options):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)) or getattr(base, "groups", 1) != 1:
            raise SdtuneError(f"{self.algo.label} trains on linear and (ungrouped) convolution layers only")
        self.base, self.rank, self.alpha = base, rank, alpha
        w = base.weight
        self.factors = nn.ParameterDict()
        for role, (shape, init) in self.shapes_and_inits(tuple(w.shape), rank, **options).items():
            t = torch.empty(shape, dtype=torch.float32)
            init(t, generator)
            self.factors[role] = nn.Parameter(t.to(w.device))
        self.scale = self.algo.scale(dict(self.factors), alpha)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def shapes_and_inits(self, shape: tuple, rank: int, **options) -> dict:
        """{role: (factor shape, init(tensor, generator))} for a weight of ``shape``."""
        raise NotImplementedError

    def forward(self, x, *args, **kwargs):
        y = self.base(x)
        delta = (self.algo.delta(dict(self.factors)) * self.scale).reshape(self.base.weight.shape)
        x = self.dropout(x.to(delta.dtype))
        if isinstance(self.base, nn.Conv2d):
            b = self.base
            branch = F.conv2d(x, delta, None, b.stride, b.padding, b.dilation)
        else:
            branch = F.linear(x, delta)
        return y + branch.to(y.dtype)

    def parts(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by role (what the optimizer steps and a resume state keeps)."""
        return dict(self.factors)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The learned factors as the adapter's roles (float32, on the CPU, detached copies)."""
        return {role: p.detach().float().cpu().clone() for role, p in self.factors.items()}


def kaiming(t: torch.Tensor, generator: torch.Generator) -> None:
    """As a fresh layer's weight (what LyCORIS starts most factors from)."""
    nn.init.kaiming_uniform_(t, a=5 ** 0.5, generator=generator)


def zeros(t: torch.Tensor, generator: torch.Generator) -> None:
    t.zero_()


def normal(std: float):
    def init(t: torch.Tensor, generator: torch.Generator) -> None:
        nn.init.normal_(t, std=std, generator=generator)
    return init
