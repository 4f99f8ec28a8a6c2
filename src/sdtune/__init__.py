"""sdtune: personalise Stable Diffusion with LoRA and Textual Inversion.

    from sdtune import load_base, generate
"""

import importlib
import sys
import types

__version__ = "0.1.0"
__all__ = ["load_base", "generate", "load", "add_lora", "add_embedding", "SdtuneError"]

# Each name is imported on first use, not with the package: load_base and generate bring in diffusers and
# transformers (2 to 4 s), which commands such as `sdtune merge` of a diffusers folder never need.
_HOMES = {"load_base": "models", "generate": "api", "load": "api", "add_lora": "api", "add_embedding": "api",
          "SdtuneError": "safeio"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule sdtune.generate sets the attribute `generate` to it; here that name is the
        # function (the submodule stays importable as sdtune.generate).
        if not (name == "generate" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
