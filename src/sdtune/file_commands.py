"""The commands that read and write adapter files without a model (``inspect``, ``convert``): what they do once
``cli`` has parsed their line. Apart from ``commands`` because they need neither diffusers nor transformers, whose
imports take seconds; a test keeps it so."""

from __future__ import annotations

import json
import sys

from .lora import inspect
from .lora.formats import convert, diffusers_refuses_kohya, word_files
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
    if a.output is None and a.out is None:
        raise SdtuneError("convert: no file to write; sdtune convert IN OUT --to LAYOUT")
    if a.output is not None and a.out is not None:
        raise SdtuneError(f"convert: the file to write is given twice ({a.output} and --out {a.out}); give one")
    output = a.output or a.out
    lora = convert(a.input, output, to=a.to)
    words = word_files(lora, output) if a.to == "diffusers" else {}
    refused = diffusers_refuses_kohya(lora) if a.to == "kohya" else None
    print(f"{output}: {len(lora)} modules in {a.to} layout"
          + "".join(f"; its word {emb.token} in {path} (diffusers loads it with load_textual_inversion)"
                    for path, emb in words.items())
          + (f"; A1111 and ComfyUI read it, diffusers' load_lora_weights does not ({refused}): --to diffusers "
             f"writes one it loads" if refused else ""))
