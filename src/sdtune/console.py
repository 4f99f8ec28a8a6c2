"""What sdtune prints besides its results: its own warnings as one line each, and nothing from libraries.

Imported first by the package, before diffusers and transformers, so that the filters below are in place
when those libraries print their import-time messages.
"""

from __future__ import annotations

import logging
import warnings


class SdtuneWarning(UserWarning):
    """Something the user should know that does not stop the command (a skipped file, a fallback name)."""


def note(message: str) -> None:
    """Tell the user about a fallback or a skipped input; the command goes on."""
    warnings.warn(message, SdtuneWarning, stacklevel=2)


class _DropTorchvisionFallback(logging.Filter):
    """transformers 5 announces, on import, that ``CLIPImageProcessor`` and ``SiglipImageProcessor`` fall back
    to their PIL versions when torchvision is missing. sdtune uses neither class (the safety checker is off),
    so the message is noise before every answer; other transformers messages still come through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


# A filter on a logger that transformers has not created yet is kept: getLogger returns the same object later.
logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"sdtune: warning: {message}\n"


def cli_warnings() -> None:
    """For the command line: every warning as one ``sdtune: warning:`` line (no source line under it), and
    the libraries' deprecation notices, which a user of the command cannot act on, not at all."""
    warnings.formatwarning = _one_line
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
