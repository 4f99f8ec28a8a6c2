"""The optimizer a run steps with (``--optimizer``, ``--optimizer-args``): torch's AdamW by default, or one of
those kohya's and diffusers' users train LoRAs with. Each is a class in a package, built on the job's parameter
groups with the run's ``lr`` (per group) and ``weight_decay``; ``--optimizer-args`` gives its other keyword
arguments as ``key=value`` (kohya's ``--optimizer_args``), each checked against the class's own.

The packages outside sdtune's dependencies (bitsandbytes, prodigyopt, schedulefree, dadaptation) are imported when
a run asks for them.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.metadata
import inspect
import itertools
import re
from dataclasses import dataclass, field

import torch

from ..console import note
from ..safeio import SdtuneError


@dataclass(frozen=True)
class Optimizer:
    module: str  # where the class lives
    cls: str
    package: str  # what pip installs it as, for the line that says it is missing
    what: str  # for --help
    defaults: dict = field(default_factory=dict)  # sdtune's keyword arguments, under --optimizer-args
    # It finds its own step size, and a learning rate is a factor on it: 1.0 unless given (Prodigy, D-Adaptation)
    finds_step: bool = False
    # How it takes the groups' learning rates (the text encoders', the blocks', LoRA+'s): "own" each its own; "one"
    # one for all (0 aside: a group that stopped), so a run whose rates differ is refused; "layer_scale" one for
    # all, with D-Adaptation Adam's layer_scale per group holding the ratios (the same steps as rates of their own)
    group_lrs: str = "own"


OPTIMIZERS = {
    "adamw": Optimizer("torch.optim", "AdamW", "torch", "torch's, fused on the CPU"),
    "adamw8bit": Optimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "AdamW with 8-bit moments in "
                           "tensors of 4096 values or more: its state in a quarter of the memory"),
    "pagedadamw8bit": Optimizer("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", "AdamW 8-bit whose state "
                                "a GPU pages out to the CPU's memory when its own runs short"),
    "lion": Optimizer("bitsandbytes.optim", "Lion", "bitsandbytes",
                      "the sign of the momentum: usually a 3-10x lower --lr and higher --weight-decay than AdamW"),
    "lion8bit": Optimizer("bitsandbytes.optim", "Lion8bit", "bitsandbytes", "Lion with its momentum in 8 bits"),
    # kohya's SGDNesterov: Nesterov momentum, 0.9 unless --optimizer-args gives another
    "sgdnesterov": Optimizer("torch.optim", "SGD", "torch", "SGD with Nesterov momentum (0.9)",
                             {"nesterov": True, "momentum": 0.9}),
    "sgdnesterov8bit": Optimizer("bitsandbytes.optim", "SGD8bit", "bitsandbytes",
                                 "SGD with Nesterov momentum (0.9) kept in 8 bits",
                                 {"nesterov": True, "momentum": 0.9}),
    "prodigy": Optimizer("prodigyopt", "Prodigy", "prodigyopt",
                         "finds its own step size: each learning rate is a factor on it, 1.0 unless given",
                         finds_step=True),
    # D-Adaptation (Defazio and Mishchenko 2023), as kohya names its classes: each finds its own step size, as
    # Prodigy does after it
    "dadaptation": Optimizer("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation", "D-Adaptation's Adam "
                             "as its paper's first version has it (kohya's DAdaptation): finds its own step size; one "
                             "learning rate for every group", finds_step=True, group_lrs="one"),
    "dadaptadam": Optimizer("dadaptation", "DAdaptAdam", "dadaptation", "D-Adaptation's Adam: finds its own step "
                            "size; each learning rate a factor on it", finds_step=True, group_lrs="layer_scale"),
    "dadaptadagrad": Optimizer("dadaptation", "DAdaptAdaGrad", "dadaptation", "D-Adaptation's AdaGrad: one "
                               "learning rate for every group", finds_step=True, group_lrs="one"),
    "dadaptadan": Optimizer("dadaptation", "DAdaptAdan", "dadaptation", "D-Adaptation's Adan", finds_step=True),
    "dadaptadanip": Optimizer("dadaptation.experimental", "DAdaptAdanIP", "dadaptation", "D-Adaptation's Adan, "
                              "the inverse-preconditioned variant", finds_step=True),
    "dadaptlion": Optimizer("dadaptation", "DAdaptLion", "dadaptation", "D-Adaptation's Lion: one learning rate "
                            "for every group", finds_step=True, group_lrs="one"),
    "dadaptsgd": Optimizer("dadaptation", "DAdaptSGD", "dadaptation", "D-Adaptation's SGD: one learning rate for "
                           "every group", finds_step=True, group_lrs="one"),
    # schedule-free (Defazio et al. 2024): the gradient is taken at one point (y) and the weights used and saved
    # are an average (x), which stands in for a decaying schedule (``set_averaged``)
    "adamwschedulefree": Optimizer("schedulefree", "AdamWScheduleFree", "schedulefree", "AdamW with no schedule: "
                                   "the saved weights are an average of the steps (--lr-scheduler constant; a warm-up "
                                   "as usual)"),
    "radamschedulefree": Optimizer("schedulefree", "RAdamScheduleFree", "schedulefree", "schedule-free RAdam: no "
                                   "warm-up needed either"),
    "sgdschedulefree": Optimizer("schedulefree", "SGDScheduleFree", "schedulefree", "schedule-free SGD with momentum "
                                 "(0.9): a --lr near 1, as for SGD"),
    # kohya's advice for LoRA: a fixed learning rate, no scaling by the size of the weights (which would leave a
    # LoRA's zero-initialised up matrices almost still)
    "adafactor": Optimizer("transformers.optimization", "Adafactor", "transformers", "factored second moments",
                           {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
}
# arguments the run's own settings give, not --optimizer-args
_OWN = {"params": "", "lr": "--lr", "weight_decay": "--weight-decay"}


DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def known(name: str) -> bool:
    """A registry name, or an optimizer class as ``module.Class`` (kohya's optimizer_type takes one too:
    ``torch.optim.RAdam``, ``pytorch_optimizer.CAME``)."""
    return name in OPTIMIZERS or bool(DOTTED.match(name))


def spec(name: str) -> Optimizer:
    """The registry's entry of ``name``, or one made for a ``module.Class`` name."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    module, _, cls = name.rpartition(".")
    return Optimizer(module, cls, module.split(".")[0], name)


def optimizer_class(name: str):
    """The class of optimizer ``name``, importing its package; one line where the package is missing, or where a
    ``module.Class`` name is not an optimizer."""
    choice = spec(name)
    try:
        cls = getattr(importlib.import_module(choice.module), choice.cls, None)
    except ImportError as e:
        raise SdtuneError(f"--optimizer {name} needs {choice.package}, which is not installed ({e}); pip install "
                          f"{choice.package}, or choose another --optimizer") from None
    if name not in OPTIMIZERS and not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        what = "has no" if cls is None else "holds no optimizer named"
        raise SdtuneError(f"--optimizer {name}: {choice.module} {what} {choice.cls} (a torch.optim.Optimizer "
                          f"class); give module.Class of an optimizer, or one of {', '.join(OPTIMIZERS)}")
    return cls


def _version(package: str) -> tuple[int, ...]:
    """An installed package's version as numbers (``0.50.2`` -> (0, 50, 2)); a suffix (rc1, .dev0) ends it."""
    numbers = []
    for part in importlib.metadata.version(package).split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:
            break
    return tuple(numbers)


def literal(text: str):
    """A Python literal (0.9, (0.9, 0.99), True), else the text itself; TOML's true/false read as booleans."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def keyword_args(flag: str, items: list[str], cls, own: dict[str, str], example: str) -> dict:
    """``items`` (``["d_coef=2", "betas=(0.9,0.99)"]``, given as ``flag``) as keyword arguments of class ``cls``,
    each value a Python literal; a malformed item, one of ``own`` (set by the run: {name: the flag that sets it, or
    ""}) or a name the class does not take (unless it takes any) is one line."""
    parameters = inspect.signature(cls.__init__).parameters
    accepted = [p for p in parameters if p != "self" and p not in own]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    kwargs = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SdtuneError(f"{flag} {item!r}: give each as key=value (e.g. {example})")
        if key in own:
            raise SdtuneError(f"{flag} {item!r}: {key} is set by {own[key] or 'the run'}"
                              + ("; use that" if own[key] else ""))
        if key not in accepted and not open_ended:
            meant = difflib.get_close_matches(key, accepted, n=1)
            raise SdtuneError(f"{flag} {item!r}: {cls.__name__} takes no {key!r}"
                              f"{f' (did you mean {meant[0]}?)' if meant else ''}; it takes {', '.join(accepted)}")
        kwargs[key] = literal(text.strip())
    return kwargs


def parse_args(name: str, items: list[str]) -> dict:
    """``--optimizer-args`` as keyword arguments of ``name``'s class (``keyword_args``), over sdtune's own defaults
    for it."""
    return dict(spec(name).defaults) | keyword_args("--optimizer-args", items, optimizer_class(name), _OWN,
                                                    "betas=(0.9,0.99)")


def check(name: str, items: list[str]) -> None:
    """Refuse, before a model is loaded, an optimizer whose package is missing or whose arguments it does not
    take: it is built and stepped once on a small tensor, as a bad value (``betas=(0.9,)``) fails only there."""
    if not items:  # sdtune's own arguments: only the package to find
        optimizer_class(name)
        return
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = build(name, items, [{"params": [weight]}], 1e-3, 0.0, torch.device("cpu"))
    set_averaged(optimizer, False)
    weight.grad = torch.full_like(weight, 0.5)
    try:
        optimizer.step()
    except Exception as e:  # whatever the class raises for a value it cannot use
        raise SdtuneError(f"--optimizer {name} --optimizer-args {' '.join(items) or '(none)'}: "
                          f"{type(e).__name__}: {e}") from None


def build(name: str, items: list[str], param_groups: list[dict], lr: float, weight_decay: float,
          device: torch.device) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``param_groups`` (each with its own ``lr``); a value its class refuses is one line."""
    kwargs = parse_args(name, items)
    package = spec(name).package
    if package == "bitsandbytes" and device.type == "cpu" and _version(package) < (0, 50):
        raise SdtuneError(f"--optimizer {name}: bitsandbytes {importlib.metadata.version(package)} steps on CUDA "
                          f"only (0.50 added the CPU); pip install -U bitsandbytes, or train on a GPU")
    if name == "adamw" and device.type == "cpu" and "fused" not in kwargs:
        # its CPU default is a Python loop over the tensors (1,120 for an SDXL LoRA on the attention layers); fused
        # is one kernel for all, 4x faster than foreach and equal to it to the last bit or so
        kwargs["fused"] = True
    cls = optimizer_class(name)
    if _takes_weight_decay(name, cls):
        kwargs["weight_decay"] = weight_decay
    elif weight_decay:  # (a module.Class without one, e.g. LBFGS)
        note(f"--weight-decay {weight_decay:g}: {cls.__name__} takes no weight decay; not used")
    try:
        return cls(param_groups, lr=lr, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise SdtuneError(f"--optimizer {name} --optimizer-args {' '.join(items) or '(none)'}: {e}") from None


def _takes_weight_decay(name: str, cls) -> bool:
    """Whether optimizer ``name``'s class ``cls`` takes a weight decay (the registry's all do)."""
    if name in OPTIMIZERS:
        return True
    parameters = inspect.signature(cls.__init__).parameters
    return "weight_decay" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def describe(name: str, items: list[str], weight_decay: float) -> str:
    """The optimizer as kohya's metadata names it (``ss_optimizer``): ``prodigyopt.Prodigy(weight_decay=0.01,
    d_coef=2)``."""
    choice = spec(name)
    args = {"weight_decay": weight_decay} if _takes_weight_decay(name, optimizer_class(name)) else {}
    args |= parse_args(name, items)
    return f"{choice.module}.{choice.cls}({','.join(f'{k}={v}' for k, v in args.items())})"


def finds_step(name: str) -> bool:
    """Whether optimizer ``name`` finds its own step size (its learning rates are factors on it, 1.0 by default)."""
    return known(name) and spec(name).finds_step


def fit_group_lrs(name: str, groups: list[dict]) -> None:
    """The groups' learning rates as optimizer ``name`` takes them (``Optimizer.group_lrs``), before the run sets
    them at each step: one rate, with D-Adaptation Adam's layer_scale holding each group's ratio to it, or one line
    where an optimizer of one rate is given several."""
    how = spec(name).group_lrs
    rates = sorted({g["lr"] for g in groups if g["lr"] > 0})
    if how == "own" or len(rates) < 2:
        return
    if how == "one":
        raise SdtuneError(f"--optimizer {name}: {spec(name).cls} steps every group at one learning rate, and this "
                          f"run's differ ({', '.join(f'{r:g}' for r in rates)}: --te-lr, --te2-lr, --ti-lr, "
                          f"--block-lr or --loraplus-lr-ratio give them); give them one, or use --optimizer "
                          f"dadaptadam, which scales each group")
    for g in groups:
        if g["lr"] > 0:
            g["layer_scale"], g["lr"] = g["lr"] / rates[-1], rates[-1]


def schedule_free(name: str) -> bool:
    return spec(name).module == "schedulefree"


def set_averaged(optimizer, on: bool) -> None:
    """A schedule-free optimizer's parameters at their average x (``on``: what validation, the samples and the saved
    files use) or at the point its gradients are taken (y, for the steps); no change when already there, none for
    other optimizers, which have one point. x and y are each a blend of the other and the optimizer's z, so a switch
    there and back is not exact to the last bit: a run switches at its saves, validations and samples only, and a
    resumed run (saved at x) does the same from there."""
    inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate's wrapper)
    if "train_mode" in inner.param_groups[0]:  # schedulefree's mark of the point its parameters are at
        (inner.eval if on else inner.train)()


def step_size(group: dict) -> float:
    """The learning rate a group steps with: its ``lr``, times the step size Prodigy or D-Adaptation finds (``d``)
    and D-Adaptation Adam's ``layer_scale``."""
    return group["lr"] * group.get("d", 1.0) * group.get("layer_scale", 1.0)
