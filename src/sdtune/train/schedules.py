"""The learning rate at each step: a linear warm-up, then a named schedule (diffusers', kohya's and transformers'),
or a torch scheduler class (``lr_classes``). Rates are a function of the step alone, so a resumed run goes on with
the rates of the uninterrupted one."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..safeio import SdtuneError
from . import lr_classes
from .config import SCHEDULES, TrainSettings


def lr_factor(step: int, total: int, warmup: int, schedule: str, cycles: int = 1, power: float = 1.0,
              min_ratio: float = 0.0, decay: int = 0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up, then the schedule (diffusers'
    and kohya's: ``cycles`` cosines for cosine_with_restarts, (1 − progress)^``power`` for polynomial, which
    decays to 0 where diffusers' stops at 1e-7; transformers' cosine_with_min_lr and warmup_stable_decay, to
    ``min_ratio``, the latter over the last ``decay`` steps, and inverse_sqrt)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "cosine_with_restarts":
        return 0.0 if progress >= 1 else 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    if schedule == "polynomial":
        return max(0.0, 1.0 - progress) ** power
    if schedule == "cosine_with_min_lr":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "warmup_stable_decay":
        into = step - (total - decay)  # steps into the decay
        if into < 0:
            return 1.0
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, into / max(1, decay))))
    if schedule == "inverse_sqrt":  # (transformers' timescale: the warm-up, else 10000 steps)
        timescale = warmup or 10_000
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    raise SdtuneError(f"--lr-scheduler {schedule!r}: use one of {', '.join(SCHEDULES)}")


def learning_rates(settings: TrainSettings, total: int, base_rates: list[float]) -> Callable[[int], list[float]]:
    """Each optimizer group's rate at a step, from its base rate: sdtune's schedule (``lr_factor``), or a scheduler
    class's (``lr_classes``) times the warm-up."""
    s, warmup = settings, settings.warmup_steps(total)
    if lr_classes.is_class_name(s.lr_scheduler):
        schedule = lr_classes.ClassSchedule(s.lr_scheduler, s.lr_scheduler_args, base_rates)
        return lambda step: [rate * min(1.0, (step + 1) / warmup if warmup else 1.0) for rate in schedule.rates(step)]

    def rates(step: int) -> list[float]:
        factor = lr_factor(step, total, warmup, s.lr_scheduler, s.lr_scheduler_num_cycles, s.lr_scheduler_power,
                           s.lr_scheduler_min_lr_ratio, s.decay_steps(total))
        return [rate * factor for rate in base_rates]
    return rates
