"""The one in-memory form of a LoRA, whatever file it came from.

A ``Lora`` maps component ("unet" | "text_encoder" | "text_encoder_2", SDXL's second encoder) -> module path ->
``Adapter``. Module paths use the model's own naming: diffusers naming for the UNet
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), transformers-5 ``CLIPTextModel`` naming for
both text encoders (``encoder.layers.0.self_attn.q_proj``, no ``text_model.``: files and
``CLIPTextModelWithProjection`` keep that level, and readers and the patcher accept both).
File formats convert to and from this form at the edges (``formats``); ``patch`` only ever sees this.

Each adapter's ``kind`` names its algorithm in the ``algos`` registry, which says how its tensors make the
weight difference ΔW (``lora``, ``loha``, ``lokr``, ``diff``; ``dora`` maps W itself: one module each in
``algos/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..families import TEXT_MODEL
from . import algos

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def text_path(path: str) -> str:
    """A text-encoder module path in the neutral form: without the ``text_model.`` level."""
    return path.removeprefix(TEXT_MODEL)


def text_paths(path: str) -> tuple[str, str]:
    """Both spellings of a neutral text-encoder path; ``text_projection`` sits outside ``text_model``, so the
    prefixed spelling is the one files and ``CLIPTextModelWithProjection`` use for everything else."""
    bare = text_path(path)
    return (bare, bare) if bare.startswith("text_projection") else (bare, TEXT_MODEL + bare)


@dataclass
class Adapter:
    kind: str  # an ``algos.ALGORITHMS`` name: "lora" | "loha" | "lokr" | "diff" | ...
    tensors: dict[str, torch.Tensor]  # by the algorithm's roles: lora down, up (+ mid); loha w1a w1b w2a w2b; ...
    alpha: float | None = None  # None: alpha = rank (scale 1)

    @property
    def algo(self) -> algos.Algorithm:
        return algos.get(self.kind)

    @property
    def rank(self) -> int | None:
        return self.algo.rank(self.tensors)

    @property
    def scale(self) -> float:
        return self.algo.scale(self.tensors, self.alpha)

    def io(self) -> algos.Io:
        """(out, inner, kernel) of ΔW: what a layer must have for the adapter to fit."""
        return self.algo.io(self.tensors)

    def cast(self, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
        return {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}

    def delta(self, shape: torch.Size | tuple, dtype=torch.float32, device=None) -> torch.Tensor:
        """ΔW (scale included, user weight not) reshaped to the target weight's ``shape``."""
        return (self.algo.delta(self.cast(dtype, device)) * self.scale).reshape(shape)

    def bias_part(self) -> Adapter | None:
        """The change to the layer's bias as an adapter of its own (a ``diff`` of the bias, at this adapter's
        scale), which patches the bias as any additive adapter patches a weight; None: the bias stays."""
        bias = self.algo.bias_delta(self.tensors)
        return None if bias is None else Adapter("diff", {"diff": bias * self.scale if self.scale != 1 else bias})

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """W' = f(W, tensors, strength) in ``weight``'s dtype and device (W + strength · ΔW for additive ones)."""
        return self.algo.apply(weight, self.cast(weight.dtype, weight.device), self.scale, strength)


@dataclass
class Lora:
    modules: dict[str, dict[str, Adapter]] = field(default_factory=lambda: {c: {} for c in COMPONENTS})
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata (e.g. ss_*)
    format: str = ""  # where it came from: "kohya", "diffusers", "peft", "diffusers-old", "lycoris-loha", ...
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # TI vectors bundled in the same file
    unknown: list[str] = field(default_factory=list)  # file keys no reader understood (reported, never applied)

    def items(self):
        for comp, mods in self.modules.items():
            for path, ad in mods.items():
                yield comp, path, ad

    def __len__(self) -> int:
        return sum(len(m) for m in self.modules.values())
