"""Rebuild the CLIP BPE tokenizer files (vocab.json, merges.txt) shipped with sdtune.

SD 1.x uses OpenAI's CLIP tokenizer: 49,408 tokens built from the byte-level BPE merges in
`bpe_simple_vocab_16e6.txt.gz`. That file ships inside the `open-clip-torch` wheel; this script reads
it from a wheel (or a plain .gz), derives the Hugging Face tokenizer files and writes them under
`src/sdtune/tiny/assets/tokenizer/`.

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    python tools/build_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
"""

import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/sdtune/tiny/assets/tokenizer"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in CLIP's vocabulary order:
    bytes that are printable themselves first, then the others mapped to chr(256 + n)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def read_merges(src: Path) -> list[str]:
    if src.suffix == ".whl":
        with zipfile.ZipFile(src) as z:
            name = next(n for n in z.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
            raw = z.read(name)
    else:
        raw = src.read_bytes()
    text = gzip.open(io.BytesIO(raw)).read().decode("utf-8")
    return text.split("\n")[1 : N_MERGES + 1]  # first line is a version header


def main(src: str) -> None:
    merges = read_merges(Path(src))
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/build_clip_tokenizer.py OPEN_CLIP_WHEEL_OR_BPE_GZ")
    main(sys.argv[1])
