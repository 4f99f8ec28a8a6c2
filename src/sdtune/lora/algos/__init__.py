"""The adapter algorithms sdtune reads, writes, patches and trains, by name (``Adapter.kind``).

Each module holds one algorithm (``base.Algorithm`` says what one must tell); ``ALGORITHMS`` is the registry
``formats``, ``keys``, ``patch``, ``inspect`` and ``neutral`` read, so a new algorithm is one module and one
``register`` line below. Key suffixes must stay unique across algorithms: a file key names its algorithm.
"""

from __future__ import annotations

from .base import Algorithm, Io
from .diff import Diff
from .dora import Dora
from .loha import Loha
from .lokr import Lokr
from .lora import Lora
from .oft import Oft
from .peft_oft import PeftOft

__all__ = ["ALGORITHMS", "Algorithm", "Io", "get", "kohya_roles", "register"]

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


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown adapter kind {name!r}; known: {', '.join(ALGORITHMS)}") from None


def kohya_roles() -> dict[str, tuple[str, str]]:
    """kohya/LyCORIS key suffix -> (algorithm name, tensor role), over every registered algorithm."""
    return {suffix: (a.name, role) for a in ALGORITHMS.values() for suffix, role in a.roles.items()}


register(Lora())
register(Loha())
register(Lokr())
register(Diff())
register(Dora())
register(Oft())
register(PeftOft())
