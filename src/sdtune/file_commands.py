"""The commands that read and write adapter files without a model (``inspect``, ``convert``): what they do once
``cli`` has parsed their line. Apart from ``commands`` because they need neither diffusers nor transformers, whose
imports take seconds; a test keeps it so."""

from __future__ import annotations

import json
import sys

from .lora import inspect
from .lora.formats import convert, word_files
from .safeio import SdtuneError


def cmd_inspect(a) -> None:
    if len(a.file) == 1:
        info = inspect.describe(a.file[0])
        print(json.dumps(info, indent=1, default=str) if a.json else inspect.render(info))
        return
    # several files: each as one alone, as it comes; one that cannot be read is its one line and the rest go on
    found, failed = [], []
    for number, name in enumerate(a.file):
        try:
            info = inspect.describe(name)
        except SdtuneError as e:
            if a.debug:
                raise
            print(f"sdtune: error: {e}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        if a.json:
            found.append(info)
        else:
            print(("\n" if number else "") + inspect.render(info), flush=True)
    if a.json:
        print(json.dumps(found, indent=1, default=str))
    if failed:
        raise SdtuneError(f"{len(failed)} of {len(a.file)} files could not be inspected (said above): "
                          f"{', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}")


def cmd_convert(a) -> None:
    if (a.output is None) == (a.out is None):
        raise SdtuneError("convert: name the file to write once: sdtune convert IN OUT --to LAYOUT (or --out OUT)")
    output = a.output or a.out
    lora = convert(a.input, output, to=a.to)
    words = word_files(lora, output) if a.to == "diffusers" else {}
    print(f"{output}: {len(lora)} modules in {a.to} layout"
          + "".join(f"; its word {emb.token} in {path} (diffusers loads it with load_textual_inversion)"
                    for path, emb in words.items()))
