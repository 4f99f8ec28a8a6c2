"""The adapter algorithms sdtune reads, writes, patches and trains, by name (``Adapter.kind``).

Each module holds one algorithm (``base.Algorithm`` says what one must tell); ``ALGORITHMS`` is the registry
``formats``, ``keys``, ``patch``, ``inspect`` and ``neutral`` read, so a new algorithm is one module and one
``register`` line below. Key suffixes must stay unique across algorithms: a file key names its algorithm.
"""

from __future__ import annotations

from .base import Algorithm, Io
from .diff import Diff
from .dora import Dora, DoraLoha, DoraLokr
from .glora import Glora
from .ia3 import Ia3
from .loha import Loha
from .lokr import Lokr
from .lora import Lora
from .norm import Norm
from .oft import Oft
from .peft_oft import PeftOft

__all__ = ["ALGORITHMS", "READ", "Algorithm", "Io", "combined", "get", "kohya_roles", "not_read", "register"]

ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add (or replace) an algorithm under its ``name``; its kohya suffixes must not be another's."""
    taken = {suffix for other in ALGORITHMS.values() if other.name != algorithm.name for suffix in other.roles}
    clash = taken & set(algorithm.roles)
    if clash:
        raise ValueError(f"adapter algorithm {algorithm.name!r}: key suffixes {sorted(clash)} already belong to "
                         f"another algorithm")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


# the names other tools give an algorithm (LyCORIS's algo=full trains what its files call diff)
ALIASES = {"full": "diff"}


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown adapter kind {name!r}; known: {', '.join(ALGORITHMS)}") from None


READ = ("LoRA, LoCon, LoHa, LoKr, DoRA (on LoRA, LoHa and LoKr), OFT, BOFT, GLoRA, IA3, LyCORIS full weight and "
        "bias differences and norm-layer adapters")
# Layouts other tools write that sdtune knows by their key endings but does not apply: (ending, what it is). A
# file holding them is refused (or, allowed partial, applied without them) with their name, not as "no such
# layer" or "not a LoRA"
_NOT_READ = (
    (".oft_r", "PEFT's older OFT (oft_r/oft_s)"),
    (".oft_s", "PEFT's older OFT (oft_r/oft_s)"),
    # LyCORIS's tensor names under PEFT's module paths (base_model.model.…), as PEFT's LoHa/LoKr save_pretrained
    # writes them; their alpha lives in adapter_config.json, and PEFT's LoKr scales whole factors as LyCORIS does not
    (".hada_w1_a", "a PEFT LoHa (hada_ tensors on PEFT's module paths)"),
    (".lokr_w1", "a PEFT LoKr (lokr_ tensors on PEFT's module paths)"),
    (".lokr_w1_a", "a PEFT LoKr (lokr_ tensors on PEFT's module paths)"),
    (".boft_R", "PEFT's BOFT (boft_R/boft_s)"),
)


def not_read(keys) -> str | None:
    """What known adapter type the unread file ``keys`` are, None when they are no type sdtune knows of."""
    keys = list(keys)
    for ending, what in _NOT_READ:
        if any(k.endswith(ending) for k in keys):
            return what
    return None


def combined(kinds: set[str]) -> str | None:
    """The algorithm a module holding keys of all ``kinds`` is (a DoRA on LoHa: {"dora", "loha"}), None if none."""
    kinds = frozenset(kinds)
    return next((a.name for a in ALGORITHMS.values() if a.combines == kinds), None)


def kohya_roles(comfy: bool = False) -> dict[str, tuple[str, str]]:
    """kohya/LyCORIS key suffix -> (algorithm name, tensor role), over every registered algorithm (``comfy``:
    those that ComfyUI's key layout may hold)."""
    return {suffix: (a.name, role) for a in ALGORITHMS.values() if a.in_comfyui or not comfy
            for suffix, role in a.roles.items()}


register(Lora())
register(Loha())
register(Lokr())
register(Diff())
register(Norm())
register(Dora())
register(DoraLoha())
register(DoraLokr())
register(Oft())
register(PeftOft())
register(Glora())
register(Ia3())
