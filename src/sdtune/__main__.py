"""``python -m sdtune``: the ``sdtune`` command."""

from .cli import run

if __name__ == "__main__":
    run()
