"""What every adapter algorithm says about itself, and the defaults most of them share.

An algorithm is a stateless object; the tensors of one adapter stay in ``neutral.Adapter`` and are handed to
its methods as a {role: tensor} dict. Roles are the algorithm's own names (``down``/``up``, ``w1a``...), the
same whichever file layout the tensors came from.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch

from ...safeio import SdtuneError


class Io(NamedTuple):
    """The shape of an adapter's ΔW: what a target layer must have for it to fit."""

    out: int | None  # output features / channels; None: any (PEFT OFT mixes input columns only)
    inner: int | None  # input features, flattened over the kernel; None: any (OFT mixes output rows only)
    kernel: tuple | None  # (kh, kw) when the tensors tell it; None: a linear layer or not known


class DiffusersRole(NamedTuple):
    """One diffusers/PEFT key ending an algorithm reads: ``<module path><suffix>``."""

    suffix: str
    role: str
    style: str  # what the key says about the file's layout (``peft``, ``diffusers-old``)


class Algorithm:
    """One adapter algorithm: its file keys, how its tensors are checked, its rank and scale, and how it changes a
    weight. Subclasses set the class fields and override what differs; adding an algorithm is one subclass in its
    own module plus one ``register`` line in ``algos/__init__``."""

    name: ClassVar[str]  # the neutral kind (``Adapter.kind``)
    style: ClassVar[str]  # the layout name kohya-style keys of this algorithm give a file (``Lora.format``)
    roles: ClassVar[dict[str, str]]  # kohya/LyCORIS key suffix (after ``<module>.``) -> tensor role
    diffusers_roles: ClassVar[tuple[DiffusersRole, ...]] = ()  # diffusers/PEFT key endings, where it has them
    network_algo: ClassVar[str | None] = None  # LyCORIS ``ss_network_args`` ``algo``; None: kohya's plain LoRA
    label: ClassVar[str | None] = None  # its LyCORIS type as ``sdtune inspect`` names it; None: not LyCORIS
    uses_alpha: ClassVar[bool] = True  # whether a file's ``.alpha`` key belongs to it
    # Whether that alpha bounds the change (OFT's constraint on its rotation, 0: none) instead of scaling ΔW by
    # alpha / rank: then it has no scale to show, none for rsLoRA to change and no factors for max-norm to shrink
    alpha_is_constraint: ClassVar[bool] = False
    least_rank: ClassVar[int] = 1  # the smallest --rank a run trains something with (OFT's is a block size)
    # Whether W' = W0 + strength · ΔW. Additive adapters of one layer are summed (and plain LoRAs share one GEMM);
    # a non-additive one (DoRA, OFT) overrides ``apply``, and its change apply(W0) − W0 is added to that sum.
    additive: ClassVar[bool] = True
    layer: ClassVar[type[torch.nn.Module] | None] = None  # the trainable layer (``train``), where there is one
    # The algorithms whose file keys together make this one (DoRA: LoRA's plus a magnitude, {"dora", "lora"}):
    # a module holding keys of exactly these reads as this one.
    combines: ClassVar[frozenset[str]] = frozenset()
    network_args: ClassVar[dict[str, str]] = {}  # LyCORIS ``ss_network_args`` a file of it needs (dora_wd)
    peft_switch: ClassVar[str | None] = None  # the LoraConfig option its PEFT layout needs on ("use_dora")
    optional: ClassVar[frozenset[str]] = frozenset()  # roles a file may leave out (a bias change)
    # Whether it changes a vector weight (a norm layer's scale) rather than a matrix or a kernel
    vector: ClassVar[bool] = False
    # Whether ComfyUI reads it, and so whether its key layout (``diffusion_model.<path>.<suffix>``) may hold it
    # (IA3's bare ``weight`` suffix there would match every weight of a ComfyUI UNet checkpoint given as a LoRA)
    in_comfyui: ClassVar[bool] = True

    def configure(self, roles: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """The roles of a diffusers/PEFT-style file with what its PEFT config (``adapter_config.json`` or the
        diffusers header; {} when it has none) says folded in, before ``build``. Most algorithms need nothing from
        it (LoRA's alpha is read apart); PEFT OFT's rotation depends on it."""
        return roles

    def build(self, roles: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's tensors from the roles a file gave (folding what the neutral form does not keep); raises
        ``KeyError`` or ``ValueError`` when they do not make a complete, consistent adapter."""
        every = set(self.roles.values())
        missing = every - self.optional - set(roles)
        if missing or not set(roles) <= every:
            said = f"no {', '.join(sorted(self.file_key(r) for r in missing))}" if missing else "unknown parts"
            raise KeyError(f"incomplete {self.label or self.name}: {said}")
        return dict(roles)

    def rank(self, t: dict[str, torch.Tensor]) -> int | None:
        return None

    def scale(self, t: dict[str, torch.Tensor], alpha: float | None) -> float:
        """The factor ΔW is multiplied by: alpha / rank, 1 without an alpha or a rank."""
        rank = self.rank(t)
        return 1.0 if alpha is None or not rank else float(alpha) / rank

    def delta(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """ΔW before the scale, in any shape with the target weight's number of elements."""
        # DoRA and OFT change W itself: their ΔW depends on the weight, which a LoRA file alone does not hold
        raise SdtuneError(f"{self.name} adapters change the weight itself, not by a fixed ΔW: merging, resizing "
                          f"or re-saving them as a plain LoRA is not possible; bake them into a checkpoint with "
                          f"sdtune merge, or apply them as they are")

    def bias_delta(self, t: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Δb, the change to the layer's bias (added at the user's strength, as A1111 and ComfyUI add it), or None:
        the bias stays. LyCORIS full and norm adapters may carry one, under the role ``bias``."""
        return t.get("bias")

    def low_rank(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) with ΔW = up @ down (flattened), for adapters ``patch.write_patched`` may stack into one
        GEMM with the layer's other such adapters; None for the others."""
        return None

    def kron_factors(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a, b) with ΔW = kron(a, b) (flattened) for Kronecker adapters, whose SVD follows from the factors'
        (``tools.resize_lora``); None for the others."""
        return None

    def weighted(self, t: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor] | None:
        """The tensors of ``weight`` x this adapter's ΔW in its own form: the first factor group of its trainable
        layer's ``linear_roles``, in which ΔW is linear, multiplied (a LoKr's w1, a LoHa's w1a, a full diff); None
        where no role scales ΔW so (an adapter that is not additive, or one without such a layer)."""
        groups = getattr(self.layer, "linear_roles", ()) if self.additive else ()
        role = next((r for r in groups[0] if r in t), None) if groups else None
        if role is None:
            return None
        return {**t, role: (t[role].double() * weight).to(t[role].dtype)}

    def apply(self, weight: torch.Tensor, t: dict[str, torch.Tensor], scale: float, strength: float) -> torch.Tensor:
        """W' from W (``weight``), at the user's ``strength``. The additive form; DoRA/OFT-like algorithms
        override it (and set ``additive = False``)."""
        return weight + strength * (self.delta(t) * scale).reshape(weight.shape)

    def io(self, t: dict[str, torch.Tensor]) -> Io:
        raise NotImplementedError

    def fits(self, t: dict[str, torch.Tensor], shape: tuple) -> bool:
        """Whether the adapter fits a weight of ``shape`` beyond what ``io`` says (checked before any layer is
        patched); most algorithms need nothing more."""
        return True

    def peft_factors(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lora_A, lora_B) for the diffusers/PEFT layout; None: the algorithm has no layout diffusers loads."""
        return None

    def peft_extras(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What its diffusers/PEFT layout stores beside lora_A/lora_B: module key suffix -> tensor."""
        return {}

    def lycoris_label(self, t: dict[str, torch.Tensor]) -> str | None:
        """The LyCORIS type these tensors are, as ``sdtune inspect`` names it; None: kohya's plain LoRA."""
        return self.label

    def lycoris_algo(self, t: dict[str, torch.Tensor]) -> str | None:
        """LyCORIS's ``algo`` for these tensors (``ss_network_args``); None: kohya's plain LoRA."""
        return self.network_algo

    def file_key(self, role: str) -> str:
        """The kohya/LyCORIS suffix a role is written under."""
        return next(suffix for suffix, r in self.roles.items() if r == role)


def kernel_of(weight: torch.Tensor) -> tuple | None:
    """The (kh, kw) of a conv weight, None for a matrix."""
    return tuple(weight.shape[2:]) if weight.dim() == 4 else None


def tucker_to_pair(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LyCORIS Tucker factors (core t [r, r, kh, kw], wa [r, out], wb [r, in]) as an equal product A @ B.

    LyCORIS rebuilds W[p, q, k, l] = Σ_ij t[i, j, k, l] wa[i, p] wb[j, q]; grouping the j-sum into B gives
    A = waᵀ [out, r] and B = Σ_j t[i, j] wb[j, q] flattened to [r, in·kh·kw], with the same rank r (and so the
    same alpha / rank scale).
    """
    b = torch.einsum("ijkl,jq->iqkl", t.float(), wb.float()).flatten(1).to(wb.dtype)
    return wa.t().contiguous(), b


def flat_inner(w: torch.Tensor) -> int:
    """A factor's input width flattened over any kernel."""
    return math.prod(w.shape[1:])
