"""PEFT's OFT (``peft.OFTConfig``): W0's *input columns* turned by a block-diagonal orthogonal R.

A PEFT OFT file holds one ``<module>.oft_R.weight`` [k, n] per layer: for each of k blocks of size b, the
n = b(b − 1)/2 entries above the diagonal of a b×b matrix (row by row, as ``torch.triu_indices(b, b, 1)`` orders
them). Q = M − Mᵀ is skew-symmetric and R_j = cayley(Q_j). k = 1 with ``block_share`` (one block repeated over
the whole width); without it k·b is the layer's input width (a conv's in·kh·kw, in the weight's own flattening).

How R comes from Q depends on the ``adapter_config.json`` (or the diffusers header), so the reader hands the
config to ``configure``, which folds it in and keeps only R:

- ``coft`` (constrained OFT): each block's Q is first shrunk to Frobenius norm eps/√k where it is larger
  (``eps`` from the config; k the number of stored blocks), as PEFT projects it before every merge;
- ``use_cayley_neumann`` (PEFT's default, with ``num_cayley_neumann_terms`` = N, default 5):
  R = I + 2Q + 2Q² + … + 2Q^(N−2) + Q^(N−1) (for N = 3 and 4 alike: I + 2Q + 2Q² + Q³; N = 2: I + 2Q; N ≤ 1: I),
  the series PEFT sums: not exactly orthogonal, so the file's own maths is kept rather than the exact transform;
- otherwise the exact Cayley transform PEFT solves for: R = (I − Q)(I + Q)⁻¹. (The series above expands
  (I + Q)(I − Q)⁻¹, its transpose: PEFT's two settings turn opposite ways, and each file is read as PEFT reads it.)

PEFT's forward rotates the input x by R before the layer (x·R per block), so its merge is W' = W0·blockdiag(R)ᵀ:
only input columns are mixed, and the tensors fit any output width (``io`` leaves ``out`` None). The user's
strength w scales the change from W0, as for LyCORIS OFT: W' = W0 + w·(W0·Rᵀ − W0).

There is no kohya/LyCORIS layout for it (LyCORIS's OFT turns output rows), and diffusers' ``load_lora_weights``
reads no OFT: sdtune reads these files and patches/bakes them, but writes them in no other layout.
"""

from __future__ import annotations

import math

import torch

from ...safeio import SdtuneError
from .base import Algorithm, DiffusersRole, Io

# OFTConfig's defaults (peft 0.21), for a file saved without its config
DEFAULTS = {"coft": False, "eps": 6e-5, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5}


class PeftOft(Algorithm):
    name = "peft-oft"
    style = "peft-oft"
    roles = {}  # no kohya/LyCORIS keys
    diffusers_roles = (DiffusersRole(".oft_R.weight", "oft_R", "peft"),)
    uses_alpha = False
    additive = False

    def configure(self, roles, config):
        if "oft_R" not in roles:
            return roles
        t = dict(roles)
        t["rotation"] = rotation(t.pop("oft_R"), {**DEFAULTS, **{k: config[k] for k in DEFAULTS if k in config}})
        return t

    def build(self, roles):
        t = self.configure(roles, {})  # tensors given without a config: PEFT's defaults
        if set(t) != {"rotation"}:
            raise KeyError("a PEFT OFT needs exactly one oft_R.weight")
        r = t["rotation"]
        if r.dim() != 3 or r.shape[1] != r.shape[2]:
            raise ValueError(f"PEFT OFT rotation of shape {tuple(r.shape)} is not [blocks, size, size]")
        return t

    def io(self, t):
        k, b, _ = t["rotation"].shape
        return Io(None, None if k == 1 else k * b, None)  # one block: shared over any multiple of b

    def fits(self, t, shape):
        return math.prod(shape[1:]) % t["rotation"].shape[1] == 0  # a shared block repeats a whole number of times

    def file_key(self, role):
        raise SdtuneError("a PEFT OFT (turning input columns) has no kohya/LyCORIS layout that A1111 reads the same "
                          "way; keep it in its PEFT adapter files")

    def apply(self, weight, t, scale, strength):
        rows = weight.shape[0]
        dtype = torch.promote_types(weight.dtype, torch.float32)
        w0 = weight.to(dtype).reshape(rows, -1)
        r = t["rotation"].to(dtype)
        k, b, _ = r.shape
        cols = w0.shape[1]
        if cols % b or (k != 1 and k * b != cols):
            raise SdtuneError(f"a PEFT OFT of {k} block(s) of {b} does not fit a layer {cols} inputs wide; the "
                              f"adapter is for another model")
        r = r.expand(cols // b, b, b)
        # W'[:, j·b + c] = Σ_d W0[:, j·b + d] · R_j[c, d]
        rotated = torch.einsum("rnd,ncd->rnc", w0.reshape(rows, cols // b, b), r).reshape(weight.shape)
        return weight + strength * (rotated.to(weight.dtype) - weight)


def rotation(vec: torch.Tensor, config: dict) -> torch.Tensor:
    """R [k, b, b] (float32 at least) from PEFT's ``oft_R.weight`` [k, b(b−1)/2] and its config (``DEFAULTS``'s
    keys)."""
    if vec.dim() != 2:
        raise ValueError(f"oft_R.weight of shape {tuple(vec.shape)} is not [blocks, entries]")
    k, n = vec.shape
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if b < 2 or b * (b - 1) // 2 != n:
        raise ValueError(f"oft_R.weight has {n} entries per block: not b(b-1)/2 for any block size b")
    try:
        coft, eps = bool(config["coft"]), float(config["eps"])
        neumann, terms = bool(config["use_cayley_neumann"]), int(config["num_cayley_neumann_terms"])
    except (TypeError, ValueError) as e:
        raise SdtuneError(f"PEFT OFT config: {e}; fix coft/eps/use_cayley_neumann/num_cayley_neumann_terms in "
                          f"adapter_config.json") from None
    dtype = torch.promote_types(vec.dtype, torch.float32)
    upper = torch.zeros(k, b, b, dtype=dtype, device=vec.device)
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    upper[:, rows, cols] = vec.to(dtype)
    q = upper - upper.transpose(1, 2)
    if coft:
        bound = eps / math.sqrt(k)
        norm = torch.linalg.matrix_norm(q, keepdim=True)  # Frobenius, per block
        q = torch.where(norm <= bound, q, q * (bound / norm))
    eye = torch.eye(b, dtype=dtype, device=vec.device).expand(k, b, b)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q)  # (I + Q)⁻¹(I − Q) = (I − Q)(I + Q)⁻¹: they commute
    # the coefficient of each power of Q, from Q¹ on
    coefficients = [] if terms <= 1 else [2.0] if terms == 2 else [2.0] * (max(terms - 1, 3) - 1) + [1.0]
    r, power = eye.clone(), eye
    for c in coefficients:
        power = power @ q
        r = r + c * power
    return r
