"""Write each family's module table, src/sdtune/families/modules/<name>.json.gz (see ``Family.modules``).

    python tools/module_tables.py

Run it after a family's configs change; tests/test_families.py checks the shipped tables against what the
installed diffusers and transformers build. gzip with a fixed timestamp, so the same table gives the same bytes.
"""

from __future__ import annotations

import gzip
import json

from sdtune import families
from sdtune.families.build import module_table


def main() -> None:
    families.MODULES.mkdir(exist_ok=True)
    for family in families.FAMILIES.values():
        path = families.MODULES / f"{family.name}.json.gz"
        table = module_table(family)
        text = json.dumps(table, separators=(",", ":"))
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(text.encode())
        print(f"{path}: {sum(map(len, table.values()))} modules, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
