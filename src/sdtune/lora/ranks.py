"""How many singular values a layer keeps when a LoRA is resized: sd-scripts' dynamic modes (``resize_lora.py``).
Math on the values only, so that the command line names the modes without loading a model's libraries."""

from __future__ import annotations

import torch

from ..safeio import SdtuneError

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """sd-scripts ``resize_lora``'s rank for one layer's singular values ``s`` (descending), before the cap.

    The script picks an index i in [0, n − 1] and keeps rank i + 1:
    sv_ratio: i = (count of singular values > s₀ / param) − 1, so the rank is that count (at least 1);
    sv_cumulative: i = the first index where the running sum of S reaches ``param`` of the total;
    sv_fro: the same on S², against param² (so ‖ΔW_r‖_F ≥ param · ‖ΔW‖_F).
    "Reaches" is ≥ (a left binary search), so a share met exactly at index i keeps i + 1 values.
    """
    n = len(s)
    if method == "sv_ratio":
        index = int((s > s[0] / param).sum()) - 1
    elif method in ("sv_cumulative", "sv_fro"):
        v = s if method == "sv_cumulative" else s.pow(2)
        target = float(param) if method == "sv_cumulative" else float(param) ** 2
        index = int(torch.searchsorted(torch.cumsum(v, 0) / v.sum(), torch.tensor(target, dtype=s.dtype)))
    else:
        raise SdtuneError(f"--dynamic {method}: unknown mode; use one of {', '.join(DYNAMIC)}")
    return max(0, min(index, n - 1)) + 1
