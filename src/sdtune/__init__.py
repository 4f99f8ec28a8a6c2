"""sdtune: personalise Stable Diffusion with LoRA and Textual Inversion.

    from sdtune import load_base, generate
"""

# First: silences library import-time messages before diffusers/transformers are imported, and makes a Ctrl-C
# during those imports one line for the command.
from .console import imports_without_gc, quiet_interrupt_while_starting  # noqa: I001
from .version import __version__  # noqa: F401

import importlib
import sys
import types

quiet_interrupt_while_starting()

# The API's names, each with the module that holds it. They are imported when first used: they load torch,
# diffusers and transformers (seconds), which the command line's parser, its --help and its refusals of a
# mistyped flag do without.
_API = {"load_base": "models", "generate": "api", "load": "api", "add_lora": "api", "add_embedding": "api",
        "add_embeddings": "api", "SdtuneError": "safeio"}
__all__ = list(_API)


class _Package(types.ModuleType):
    """The package module, whose API names are looked up in their modules on first use."""

    def __getattr__(self, name: str):
        if name not in _API:
            raise AttributeError(f"module 'sdtune' has no attribute {name!r}")
        with imports_without_gc():
            value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        self.__dict__[name] = value  # looked up once
        return value

    def __setattr__(self, name: str, value) -> None:
        # `generate` is also a submodule's name: importing the submodule sets the package's attribute to it,
        # and `from sdtune import generate` must keep giving the function (the submodule is still imported by
        # its full name, `from sdtune.generate import ...`)
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_API})


sys.modules[__name__].__class__ = _Package
