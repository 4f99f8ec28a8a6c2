"""--lr-scheduler given as a learning-rate scheduler class (kohya's --lr_scheduler_type and --lr_scheduler_args):
a bare name of ``torch.optim.lr_scheduler`` (``CosineAnnealingWarmRestarts``), as sd-scripts reads one, or any
package's ``module.Class``, with ``--lr-scheduler-args key=value ...`` as its keyword arguments.

sdtune's own schedules are functions of the step (``schedules.lr_factor``), which is what makes a resume exact. A class
is made one: it is built on a stand-in optimizer holding the run's groups at their base rates and stepped there, so
the rates of step N are what N of its steps give, whether the run got there in one go or was resumed (the steps
are replayed, a few microseconds each). Only the rates are taken from it: a class that also moves an optimizer's
momentum (OneCycleLR's cycle_momentum) moves the stand-in's."""

from __future__ import annotations

import importlib
import warnings

import torch

from ..safeio import SdtuneError
from .optimizers import DOTTED, keyword_args

TORCH = "torch.optim.lr_scheduler"  # where sd-scripts looks for a name without a module
_OWN = {"optimizer": "", "last_epoch": "", "verbose": ""}  # what the run gives, not --lr-scheduler-args


def is_class_name(name: str) -> bool:
    """A ``module.Class`` name, or a class name (capitalised, as torch's are; sdtune's schedules are lower case)."""
    return bool(DOTTED.match(name)) or (name[:1].isupper() and name.isidentifier())


def scheduler_class(name: str):
    """The class ``name`` names, importing its module; one line where it cannot be imported or is no
    step-driven learning-rate scheduler."""
    module, _, cls_name = name.rpartition(".") if "." in name else (TORCH, ".", name)
    try:
        cls = getattr(importlib.import_module(module), cls_name, None)
    except ImportError as e:
        raise SdtuneError(f"--lr-scheduler {name}: {module} cannot be imported ({e}); install its package, or choose "
                          f"another --lr-scheduler") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)):
        what = "has no" if cls is None else "holds no learning-rate scheduler named"
        raise SdtuneError(f"--lr-scheduler {name}: {module} {what} {cls_name} (a torch.optim.lr_scheduler.LRScheduler "
                          f"class); give module.Class of one, or one of sdtune's schedules")
    if issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise SdtuneError(f"--lr-scheduler {name}: it steps on a measured loss, not on the step count, which a run "
                          f"could not resume exactly; choose a schedule of the steps")
    return cls


def parse_args(name: str, items: list[str]) -> dict:
    """``--lr-scheduler-args`` (``["T_0=100", "eta_min=1e-6"]``) as keyword arguments of ``name``'s class."""
    return keyword_args("--lr-scheduler-args", items, scheduler_class(name), _OWN, "T_0=100")


class ClassSchedule:
    """The rates a scheduler class gives a run's groups at each step (``rates``), from their base rates."""

    def __init__(self, name: str, items: list[str], base_rates: list[float]):
        self.cls, self.kwargs, self.base_rates = scheduler_class(name), parse_args(name, items), base_rates
        self.name, self.items = name, items
        self._restart()

    def _restart(self) -> None:
        groups = [{"params": [torch.zeros(0, requires_grad=True)], "lr": rate} for rate in self.base_rates]
        self._stand_in = torch.optim.SGD(groups, lr=self.base_rates[0])
        with warnings.catch_warnings():  # (torch's notes on a stand-in that never steps)
            warnings.simplefilter("ignore")
            try:
                self._scheduler = self.cls(self._stand_in, **self.kwargs)
            except (TypeError, ValueError, RuntimeError) as e:  # a value the class refuses
                raise SdtuneError(f"--lr-scheduler {self.name} --lr-scheduler-args {' '.join(self.items) or '(none)'}: "
                                  f"{e}") from None
        self._at = 0

    def rates(self, step: int) -> list[float]:
        """Each group's rate at ``step`` (0-based): after ``step`` steps of the class."""
        if step < self._at:
            self._restart()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while self._at < step:
                self._scheduler.step()
                self._at += 1
        return [float(group["lr"]) for group in self._stand_in.param_groups]


def check(name: str, items: list[str]) -> None:
    """Refuse, before a model is loaded, a class that cannot be found or built with ``items``, or whose first steps
    fail (a value it reads only there)."""
    schedule = ClassSchedule(name, items, [1e-3])
    try:
        schedule.rates(3)
    except Exception as e:  # noqa: BLE001 - whatever the class raises for a value it cannot use
        raise SdtuneError(f"--lr-scheduler {name} --lr-scheduler-args {' '.join(items) or '(none)'}: "
                          f"{type(e).__name__}: {e}") from None
