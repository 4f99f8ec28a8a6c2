"""sdtune: personalise Stable Diffusion with LoRA and Textual Inversion.

    from sdtune import load_base, generate
"""

# First: silences library import-time messages before diffusers/transformers are imported below, and makes a
# Ctrl-C during those imports one line for the command.
from .console import imports_without_gc, quiet_interrupt_while_starting  # noqa: E402, I001
from .version import __version__  # noqa: F401

quiet_interrupt_while_starting()

with imports_without_gc():
    # Imported after the submodule `sdtune.generate` so that the name `generate` here is the function.
    from .api import add_embedding, add_embeddings, add_lora, generate, load  # noqa: E402
    from .models import load_base  # noqa: E402
    from .safeio import SdtuneError  # noqa: E402

__all__ = ["load_base", "generate", "load", "add_lora", "add_embedding", "add_embeddings", "SdtuneError"]
