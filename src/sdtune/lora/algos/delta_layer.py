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

    LyCORIS's ``scalar`` option multiplies ΔW by a learned scalar that starts at 0, so that the zero factor can
    start random instead (``shapes_and_inits`` is told); the saved first factor of ``linear_roles`` holds it, as
    LyCORIS saves it. Its ``tucker`` option gives a convolution's factors a core with the kernel (``cores``: the
    roles ``algo.build`` folds away before ``delta``).

    LyCORIS's two other dropouts, in training mode only: ``rank_dropout`` zeroes each output row of ΔW with that
    probability (one draw per forward, as LyCORIS draws it) and scales the rest by 1/(1 − p), so that ΔW is
    unchanged on average (LyCORIS's rank_dropout_scale); ``module_dropout`` skips ΔW in a forward with its
    probability.
    """

    algo: ClassVar[Algorithm]
    # groups of roles, one factor of each present: ΔW is linear in each of them and the product across groups, so
    # scaling each by √r scales ΔW by r (max-norm's split, as LyCORIS scales two factors)
    linear_roles: ClassVar[tuple[tuple[str, ...], ...]]
    cores: ClassVar[frozenset[str]] = frozenset()  # Tucker cores, where the algorithm has them

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, generator: torch.Generator,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, scalar: bool = False, **options):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)) or getattr(base, "groups", 1) != 1 \
                or getattr(base, "padding_mode", "zeros") != "zeros":
            raise SdtuneError(f"{self.algo.label} trains on linear and (ungrouped) convolution layers only")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        w = base.weight
        self.factors = nn.ParameterDict()
        if scalar:
            options["scalar"] = True
        for role, (shape, init) in self.shapes_and_inits(tuple(w.shape), rank, **options).items():
            t = torch.empty(shape, dtype=torch.float32)
            init(t, generator)
            self.factors[role] = nn.Parameter(t.to(w.device))
        self.scalar = nn.Parameter(torch.zeros((), device=w.device)) if scalar else None
        self.scale = self.algo.scale(dict(self.factors), alpha)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def shapes_and_inits(self, shape: tuple, rank: int, **options) -> dict:
        """{role: (factor shape, init(tensor, generator))} for a weight of ``shape``."""
        raise NotImplementedError

    def forward(self, x, *args, **kwargs):
        b = self.base
        if self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout:
            return b(x)
        delta, bias_delta = self.delta(), self.bias_delta()
        if self.training and self.rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) >= self.rank_dropout).to(delta.dtype)
            rows = keep / (1 - self.rank_dropout)
            delta = delta * rows.view(-1, *[1] * (delta.dim() - 1))
            bias_delta = None if bias_delta is None else bias_delta * rows  # (a row's bias goes with it)
        if isinstance(self.dropout, nn.Identity):
            # one product with W + ΔW, as LyCORIS computes it: half the work of W x plus ΔW x, the same gradients
            weight = b.weight.to(delta.dtype) + delta
            bias = None if b.bias is None else b.bias.to(delta.dtype)
            if bias_delta is not None:
                bias = bias + bias_delta
            return self._op(x.to(delta.dtype), weight, bias).to(x.dtype)
        y = b(x)  # dropout acts on the change's input only: two products
        return y + self._op(self.dropout(x.to(delta.dtype)), delta, bias_delta).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """ΔW, in the base weight's shape."""
        t = dict(self.factors)
        if self.cores & t.keys():
            t = self.algo.build(t)
        scale = self.scale if self.scalar is None else self.scalar * self.scale
        return (self.algo.delta(t) * scale).reshape(self.base.weight.shape)

    def bias_delta(self) -> torch.Tensor | None:
        """Δb, where the layer trains a bias change (LyCORIS full's ``bias`` role), read as a file's is
        (``Algorithm.bias_delta``); None: the bias stays."""
        return self.algo.bias_delta(dict(self.factors))

    @torch.no_grad()
    def limit_norm(self, limit: float) -> torch.Tensor:
        """kohya's max-norm (--scale-weight-norms): where ΔW's Frobenius norm is above ``limit``, one factor of each
        ``linear_roles`` group is scaled so that ΔW is scaled by limit/norm (LoHa's and LoKr's two groups by its
        square root each, IA3's one by all of it), which brings ΔW to ``limit`` in the same direction. Returns the
        norm before (a tensor: no read-back, a GPU would wait on each layer)."""
        norm = torch.linalg.vector_norm(self.delta())
        ratio = (limit / norm).clamp(max=1)  # a layer within the limit is multiplied by exactly 1
        ratio = ratio.sqrt() if len(self.linear_roles) == 2 else ratio
        for group in self.linear_roles:
            self.factors[next(role for role in group if role in self.factors)].mul_(ratio)
        return norm

    def _op(self, x, weight, bias):
        b = self.base
        if weight.dim() == 4:  # (a convolution's, also while --fp8-base stands in a twin for it)
            return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation)
        return F.linear(x, weight, bias)

    def take(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from an adapter's factors instead of the fresh ones (their shapes may differ: a LoKr's split; a
        Tucker file's as the reader folded them); a learned scalar starts at 1 (the file's factors hold it)."""
        device = self.base.weight.device
        self.factors = nn.ParameterDict({role: nn.Parameter(t.detach().float().clone().to(device))
                                         for role, t in tensors.items()})
        self.scale = self.algo.scale(dict(self.factors), self.alpha)
        if self.scalar is not None:
            with torch.no_grad():
                self.scalar.fill_(1.0)

    def parts(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by role (what the optimizer steps and a resume state keeps)."""
        return dict(self.factors) | ({} if self.scalar is None else {"scalar": self.scalar})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The learned factors as the adapter's roles (float32, on the CPU, detached copies), a learned scalar
        in the first factor of ``linear_roles`` (as LyCORIS saves it)."""
        made = dict(self.factors)
        if self.scalar is not None:
            holder = next(role for role in self.linear_roles[0] if role in made)
            made[holder] = made[holder] * self.scalar
        return {role: p.detach().float().cpu().clone() for role, p in made.items()}


def kaiming(t: torch.Tensor, generator: torch.Generator) -> None:
    """As a fresh layer's weight (what LyCORIS starts most factors from)."""
    nn.init.kaiming_uniform_(t, a=5 ** 0.5, generator=generator)


def zeros(t: torch.Tensor, generator: torch.Generator) -> None:
    t.zero_()


def ones(t: torch.Tensor, generator: torch.Generator) -> None:
    t.fill_(1.0)


def normal(std: float):
    def init(t: torch.Tensor, generator: torch.Generator) -> None:
        nn.init.normal_(t, std=std, generator=generator)
    return init
