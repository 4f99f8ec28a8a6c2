"""OFT and BOFT (kohya's ``networks.oft``, LyCORIS's diag-oft and boft): W0's output rows turned by an orthogonal R.

Three layouts, as A1111 reads them (``network_oft``):

- ``oft_blocks`` [k, b, b] (kohya, LyCORIS diag-oft): k free blocks (k·b = the layer's output width); each becomes
  skew-symmetric, Q = B − Bᵀ, then orthogonal by the Cayley transform R = (I + Q)(I − Q)⁻¹. Block j of R mixes
  output rows j·b … j·b + b − 1: kohya multiplies the layer's output by R from the right (y·R), which is
  W' = Rᵀ·W0, as A1111's and LyCORIS's ``einsum("k n m, k n ... -> k m ...")`` merge does. The file's ``alpha`` is
  not a scale but the constraint: Q is shrunk to norm alpha·out when its norm (over all blocks) is larger; alpha 0
  leaves it free.
- ``oft_diag`` [k, b, b] (older LyCORIS files): the orthogonal blocks R themselves, used as they are
  (no Cayley transform, no constraint), W' = Rᵀ·W0 per block as above.
- ``oft_blocks`` [m, k, b, b] (LyCORIS BOFT, butterfly OFT): m stages of k blocks, each R_i by the Cayley transform
  (one constraint over all stages). Stage i pairs rows 2^i·b/2 apart: the rows, grouped as (c, 2, 2^i·b/2), are
  reordered to (c, 2^i·b/2, 2), cut into blocks of b consecutive rows, each block multiplied by its R_i from the
  left (``einsum("b i j, b j ... -> b i ...")``), and put back in order. W' = S_{m-1}·…·S_0·W0.

LyCORIS's optional ``rescale`` [out, 1, …] then multiplies each output row of W'.

The user's strength w scales the change from W0 (A1111; kohya's own w·R + (1 − w)·I is the same weight for
diag-oft): W' = W0 + w·(R(W0) − W0). Only output rows are mixed, so the tensors fit any input width: ``io``
leaves it None.

``OftLayer`` trains diag-oft as LyCORIS does (its ``oft_blocks`` and ``alpha``, read back by ``Oft``).
"""

from __future__ import annotations

import torch

from ...safeio import SdtuneError
from .base import Algorithm, Io
from .delta_layer import DeltaLayer, ones, zeros
from .lokr import split

_ROTATIONS = ("blocks", "rotation")  # the free blocks (Cayley) or R itself; a file has exactly one


class Oft(Algorithm):
    name = "oft"
    style = "lycoris-oft"
    roles = {"oft_blocks": "blocks", "oft_diag": "rotation", "rescale": "rescale"}
    network_algo = "diag-oft"
    label = "OFT"
    additive = False
    alpha_is_constraint = True
    least_rank = 2  # 1 x 1 blocks turn nothing

    def build(self, roles):
        t = dict(roles)
        given = [r for r in _ROTATIONS if r in t]
        if len(given) != 1 or set(t) - {*_ROTATIONS, "rescale"}:
            raise KeyError("an OFT needs exactly one of oft_blocks or oft_diag (and optionally rescale)")
        blocks = t[given[0]]
        butterfly = given[0] == "blocks" and blocks.dim() == 4
        if blocks.dim() not in ((3, 4) if given[0] == "blocks" else (3,)) or blocks.shape[-1] != blocks.shape[-2]:
            raise ValueError(f"oft_{'blocks' if given[0] == 'blocks' else 'diag'} of shape {tuple(blocks.shape)} is "
                             f"not [blocks, size, size] (or BOFT's [stages, blocks, size, size])")
        if butterfly:
            stages, k, b, _ = blocks.shape
            if b % 2 or k % 2 ** (stages - 1):
                raise ValueError(f"BOFT oft_blocks of shape {tuple(blocks.shape)}: a butterfly of {stages} stages "
                                 f"needs an even block size and blocks in multiples of {2 ** (stages - 1)}")
        out = blocks.shape[-3] * blocks.shape[-1]
        if "rescale" in t and t["rescale"].numel() != out:
            raise ValueError(f"rescale has {t['rescale'].numel()} values for {out} output rows")
        return t

    def scale(self, t, alpha):
        # ``apply`` receives the scale; for OFT that slot carries alpha, the constraint factor (0: none)
        return 0.0 if alpha is None or "rotation" in t else float(alpha)

    def io(self, t):
        r = t["blocks"] if "blocks" in t else t["rotation"]
        return Io(r.shape[-3] * r.shape[-1], None, None)

    def block_size(self, t) -> int:
        """b of its b x b blocks: what an OFT has instead of a rank (``sdtune inspect`` shows it)."""
        return (t["blocks"] if "blocks" in t else t["rotation"]).shape[-1]

    def lycoris_label(self, t):
        return "BOFT" if _butterfly_blocks(t) else self.label

    def lycoris_algo(self, t):
        return "boft" if _butterfly_blocks(t) else self.network_algo

    def apply(self, weight, t, scale, strength):
        rows = weight.shape[0]
        dtype = torch.promote_types(weight.dtype, torch.float32)
        w0 = weight.to(dtype).reshape(rows, -1)
        if "rotation" in t:
            rotated = _rotate_blocks(t["rotation"].to(dtype), w0)
        elif t["blocks"].dim() == 3:
            rotated = _rotate_blocks(rotation(t["blocks"], constraint=scale * rows), w0)
        else:
            stages, k, b, _ = t["blocks"].shape
            r = rotation(t["blocks"].reshape(stages * k, b, b), constraint=scale * rows).reshape(stages, k, b, b)
            rotated = _butterfly(r, w0)
        if "rescale" in t:
            rotated = rotated * t["rescale"].to(dtype).reshape(rows, 1)
        return weight + strength * (rotated.reshape(weight.shape).to(weight.dtype) - weight)


def _butterfly_blocks(t) -> bool:
    return "blocks" in t and t["blocks"].dim() == 4


def butterfly_split(width: int, rank: int) -> tuple[int, int] | None:
    """(b, k) of a BOFT layer of output ``width`` at ``rank`` as LyCORIS splits it (its lora_dim): b the largest even
    block size up to ``rank`` with width = b·k and k a power of two (the butterfly then has log2(k) + 1 stages of k
    blocks); None where no such b exists."""
    found = None
    for b in range(2, rank + 1, 2):
        k, rest = divmod(width, b)
        if not rest and k & (k - 1) == 0:
            found = (b, k)
    return found


def _rotate_blocks(r: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Rᵀ·W0 for block-diagonal R [k, b, b] and W0 [k·b, inner]."""
    k, b, _ = r.shape
    return (r.transpose(1, 2) @ w0.reshape(k, b, -1)).reshape(w0.shape)


def _butterfly(r: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """BOFT: each stage's blocks [stages, k, b, b] applied to W0 [k·b, inner] in that stage's row order."""
    stages, k, b, _ = r.shape
    x = w0
    for i in range(stages):
        half = 2 ** i * (b // 2)  # rows paired in this stage are this far apart
        # rows (c, 2, half) -> (c, half, 2): each block of b consecutive rows then holds pairs `half` apart
        x = x.reshape(-1, 2, half, x.shape[-1]).transpose(1, 2).reshape(k, b, -1)
        x = r[i] @ x
        x = x.reshape(-1, half, 2, x.shape[-1]).transpose(1, 2).reshape(w0.shape)
    return x


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


class OftLayer(DeltaLayer):
    """LyCORIS diag-oft's trainable layer: free blocks [k, b, b] that start at zero (R = I: the base exactly), with
    b the smaller factor of the output width as LyCORIS factorises it at ``rank`` (its lora_dim: ``lokr.split``)
    and k = out / b. ``alpha`` is the constraint (Q's norm held to alpha · out; 0: free), which the file stores as
    its alpha, as LyCORIS and kohya's OFT store it. The layer computes with R(W0) = Rᵀ·W0, made by ``Oft.apply``,
    the function that applies the saved file; training goes through the Cayley transform. ``rescaled`` (LyCORIS's
    option) learns a factor per output row as well (``rescale``, starting at 1). ``butterfly``: LyCORIS's BOFT
    instead, blocks [log2(k) + 1, k, b, b] (``butterfly_split``), one constraint over all stages. ``blocks``
    (kohya's ``networks.oft``, whose network_dim counts blocks): k = ``blocks`` in every layer, b = out / k."""

    algo = Oft()
    linear_roles = ()  # R is no product of factors: max-norm (--scale-weight-norms) is not offered

    def shapes_and_inits(self, shape, rank, rescaled: bool = False, butterfly: bool = False, blocks: int = 0,
                         **options):
        if blocks:
            if shape[0] % blocks:
                raise SdtuneError(f"OFT in {blocks} blocks: an output width of {shape[0]} does not split into "
                                  f"{blocks} equal blocks (kohya's networks.oft would fail on it too); give a "
                                  f"count that divides every width trained (4 or 8 suit SD's widths)")
            roles = {"blocks": ((blocks, shape[0] // blocks, shape[0] // blocks), zeros)}
        elif butterfly:
            found = butterfly_split(shape[0], rank)
            if found is None:
                raise SdtuneError(f"BOFT at rank {rank}: an output width of {shape[0]} has no even block size up to "
                                  f"{rank} that leaves a power-of-two number of blocks (LyCORIS's rule); give a larger "
                                  f"rank (16 suits SD's widths)")
            size, count = found
            roles = {"blocks": ((count.bit_length(), count, size, size), zeros)}
        else:
            size, count = split(shape[0], rank)
            roles = {"blocks": ((count, size, size), zeros)}
        if rescaled:
            roles["rescale"] = ((shape[0], *[1] * (len(shape) - 1)), ones)
        return roles

    def delta(self):
        w0 = self.base.weight.float()
        return self.algo.apply(w0, dict(self.factors), self.scale, 1.0) - w0


Oft.layer = OftLayer  # (the layer needs the algorithm first)
