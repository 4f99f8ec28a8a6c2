"""sdtune's version: what ``sdtune --version`` prints and what a trained file records of the tool that made it."""

__version__ = "0.1.0"  # (pyproject.toml's version too)
