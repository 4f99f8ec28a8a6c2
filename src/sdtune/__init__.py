"""sdtune: personalise Stable Diffusion with LoRA and Textual Inversion.

    from sdtune import load_base, generate
"""

__version__ = "0.1.0"

import gc  # noqa: E402, I001

# Importing torch, diffusers and transformers creates about 400 thousand objects, and Python's cyclic
# collector walked the growing heap in full 7 times on the way (a quarter of the import's time, measured on
# the shared 2-core test machine).
# Import-time objects are nearly all alive for good, so the collector waits until the imports below are
# done; the state it had is then restored (the ``sdtune`` command then freezes them, see ``cli.run``).
_collecting = gc.isenabled()
gc.disable()
try:
    # First: silences library import-time messages before diffusers/transformers are imported below.
    from . import console  # noqa: E402, F401, I001

    # Imported after the submodule `sdtune.generate` so that the name `generate` here is the function.
    from .api import add_embedding, add_embeddings, add_lora, generate, load  # noqa: E402
    from .models import load_base  # noqa: E402
    from .safeio import SdtuneError  # noqa: E402
finally:
    if _collecting:
        gc.enable()

__all__ = ["load_base", "generate", "load", "add_lora", "add_embedding", "add_embeddings", "SdtuneError"]
