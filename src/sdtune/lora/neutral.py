"""The one in-memory form of a LoRA, whatever file it came from.

A ``Lora`` maps component ("unet" | "text_encoder" | "text_encoder_2", SDXL's second encoder) -> module path ->
``Adapter``. Module paths use the model's own naming: diffusers naming for the UNet
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), transformers-5 ``CLIPTextModel`` naming for
both text encoders (``encoder.layers.0.self_attn.q_proj``, no ``text_model.``: files and
``CLIPTextModelWithProjection`` keep that level, and readers and the patcher accept both).
File formats convert to and from this form at the edges (``formats``); ``patch`` only ever sees this.

Each adapter algorithm says how to build its weight difference ΔW (before the user's weight):
- ``lora``: ΔW = (alpha / rank) · up @ down  (conv: flattened, then reshaped to the kernel)
- ``loha``: ΔW = (alpha / rank) · (w1a @ w1b) ⊙ (w2a @ w2b)        (LyCORIS LoHa, Hadamard product)
- ``lokr``: ΔW = scale · kron(w1, w2), w1 = w1 or w1a @ w1b, w2 likewise (LyCORIS LoKr);
            scale = alpha / rank when a factor is split into a/b, else 1
- ``diff``: ΔW = diff (a full weight difference)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
TEXT_MODEL = "text_model."  # the level transformers 4 (and CLIPTextModelWithProjection in 5) put around the encoder


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
    kind: str  # "lora" | "loha" | "lokr" | "diff"
    tensors: dict[str, torch.Tensor]  # lora: down, up (+ mid); loha: w1a w1b w2a w2b; lokr: w1|w1a,w1b, w2|w2a,w2b
    alpha: float | None = None  # None: alpha = rank (scale 1)

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["w1b"].shape[0]
        if self.kind == "lokr":
            for k in ("w1b", "w2b"):
                if k in t:
                    return t[k].shape[0]
        return None

    @property
    def scale(self) -> float:
        rank = self.rank
        if self.alpha is None or not rank:
            return 1.0
        if self.kind == "lokr" and "w1b" not in self.tensors and "w2b" not in self.tensors:
            return 1.0
        return float(self.alpha) / rank

    def delta(self, shape: torch.Size | tuple, dtype=torch.float32, device=None) -> torch.Tensor:
        """ΔW (scale included, user weight not) reshaped to the target weight's ``shape``."""
        t = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        if self.kind == "lora":
            down, up = t["down"].flatten(1), t["up"].flatten(1)
            if "mid" in t:  # LoCon tucker core: down [r, in,1,1], mid [r_out, r_in, kh, kw] (a conv), up [out, r,1,1]
                core = torch.einsum("ri,srkl->sikl", t["down"].flatten(1), t["mid"])  # [r, in, kh, kw]
                d = up @ core.flatten(1)
            else:
                d = up @ down
        elif self.kind == "loha":
            d = (t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"])
        elif self.kind == "lokr":
            w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
            w2 = t["w2"] if "w2" in t else t["w2a"] @ t["w2b"]
            d = torch.kron(w1.flatten(1) if w1.dim() > 2 else w1, w2.flatten(1))
        elif self.kind == "diff":
            d = t["diff"]
        else:
            raise ValueError(f"unknown adapter kind {self.kind!r}")
        return (d * self.scale).reshape(shape)


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
