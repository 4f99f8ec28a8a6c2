"""OFT (kohya's ``networks.oft`` and LyCORIS's diag-oft): W' = Rᵀ·W0, R block-diagonal and orthogonal.

``oft_blocks`` [k, b, b] holds k free blocks (k·b = the layer's output width); each becomes skew-symmetric,
Q = B − Bᵀ, then orthogonal by the Cayley transform R = (I + Q)(I − Q)⁻¹. Block j of R mixes output rows
j·b … j·b + b − 1: kohya multiplies the layer's output by R from the right (y·R), which is W' = Rᵀ·W0, as
A1111's and LyCORIS's ``einsum("k n m, k n ... -> k m ...")`` merge does. The file's ``alpha`` is not a scale but
the constraint: Q is shrunk to norm alpha·out when its norm (over all blocks) is larger; alpha 0 leaves it free.

The user's strength w scales the change from W0 (A1111; kohya's own w·R + (1 − w)·I is the same weight):
W' = W0 + w·(Rᵀ·W0 − W0). Only output rows are mixed, so the tensors fit any input width: ``io`` leaves it None.
LyCORIS's butterfly BOFT (4-D ``oft_blocks``) and the ``rescale``/``oft_diag`` variants are not read.
"""

from __future__ import annotations

import torch

from .base import Algorithm, Io


class Oft(Algorithm):
    name = "oft"
    style = "lycoris-oft"
    roles = {"oft_blocks": "blocks"}
    network_algo = "diag-oft"
    label = "OFT"
    additive = False

    def build(self, roles):
        t = super().build(roles)
        blocks = t["blocks"]
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:  # BOFT's is 4-D
            raise ValueError(f"oft_blocks of shape {tuple(blocks.shape)} is not [blocks, size, size]")
        return t

    def scale(self, t, alpha):
        # ``apply`` receives the scale; for OFT that slot carries alpha, the constraint factor (0: none)
        return 0.0 if alpha is None else float(alpha)

    def io(self, t):
        k, b, _ = t["blocks"].shape
        return Io(k * b, None, None)

    def apply(self, weight, t, scale, strength):
        rows = weight.shape[0]
        r = rotation(t["blocks"], constraint=scale * rows)
        k, b, _ = r.shape
        w0 = weight.to(r.dtype).reshape(k, b, -1)
        rotated = (r.transpose(1, 2) @ w0).reshape(weight.shape).to(weight.dtype)
        return weight + strength * (rotated - weight)


def rotation(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """The orthogonal blocks R [k, b, b] (float32 at least) from the free ones, Q's norm held to ``constraint``."""
    dtype = torch.promote_types(blocks.dtype, torch.float32)
    q = blocks.to(dtype) - blocks.to(dtype).transpose(1, 2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q)
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))  # kohya's form: 1 below the bound
    eye = torch.eye(q.shape[1], dtype=dtype, device=q.device).expand_as(q)
    # (I + Q)(I − Q)⁻¹ = (I − Q)⁻¹(I + Q): the two commute, so one solve gives it
    return torch.linalg.solve(eye - q, eye + q)
