"""The hashes LoRA tools key files by: kohya's ``sshs_*`` header entries, civitai's AutoV2/AutoV3, A1111's short hash.

- ``sshs_model_hash`` (kohya sd-scripts, sd-webui-additional-networks "new" hash): sha256 of the bytes after the
  safetensors header (the tensor data), so it names the weights whatever the metadata says. kohya computes it
  on a re-serialisation with only the ``ss_*`` metadata; the tensor bytes do not depend on the header, so it is
  also the tensor-data hash of the written file. civitai calls the same digest AutoV3; A1111's ``Lora hashes``
  infotext field uses its first 12 hex digits.
- ``sshs_legacy_hash`` (the "old" additional-networks hash): sha256 of the 64 KiB at offset 1 MiB of that
  ``ss_*``-only serialisation, 8 hex digits. It does depend on the header (the offset moves with it), which is
  why kohya pins the header to the training facts: user metadata edits must not change it either.
- AutoV2 (A1111 / civitai model hash): sha256 of the whole file, first 10 hex digits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ..safeio import SdtuneError, atomic_write_text, is_safetensors

_BLOCK = 1 << 20
_LEGACY_AT, _LEGACY_LEN = 0x100000, 0x10000
AUTOV2_LEN, SHORT_LEN = 10, 12


def _after_header(data: bytes) -> int:
    """Offset of the tensor data: 8-byte little-endian header length, then the JSON header."""
    return 8 + int.from_bytes(data[:8], "little")


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``{"sshs_model_hash": ..., "sshs_legacy_hash": ...}`` for a file about to be written with ``tensors``
    and ``metadata``, computed as kohya does (on the ``ss_*`` part of the metadata only)."""
    ss = {k: str(v) for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors_bytes({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=ss)  # kohya's: an empty header too
    return {"sshs_model_hash": hashlib.sha256(data[_after_header(data):]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[_LEGACY_AT:_LEGACY_AT + _LEGACY_LEN]).hexdigest()[:8]}


def _sha256_from(path: Path, offset: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def _header_end(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(8)
    size = path.stat().st_size
    if len(head) < 8 or 8 + int.from_bytes(head, "little") > size:
        raise SdtuneError(f"{path}: not a safetensors file (bad header length); the tensor-data hash needs one, "
                          f"re-export it as .safetensors")
    return _after_header(head)


def _cache_file() -> Path:
    root = os.environ.get("SDTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdtune")
    return Path(root) / "hashes.json"


CACHE_MIN_BYTES = 64 << 20  # smaller files hash faster than the cache is read


def file_sha256(path: str | Path) -> str:
    """sha256 of the whole file (AutoV2 is its first 10 hex digits). Big files' hashes are remembered across
    runs by (path, size, mtime): SD checkpoints are gigabytes."""
    path = Path(path).resolve()
    stat = path.stat()
    if stat.st_size < CACHE_MIN_BYTES:
        return _sha256_from(path, 0)
    stamp = [stat.st_size, stat.st_mtime_ns]
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(path))
    if isinstance(hit, dict) and hit.get("stamp") == stamp:
        return hit["sha256"]
    sha = _sha256_from(path, 0)
    cache = {k: v for k, v in cache.items() if Path(k).exists()}  # forget deleted files
    cache[str(path)] = {"stamp": stamp, "sha256": sha}
    try:
        atomic_write_text(json.dumps(cache), cache_file)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return sha


def old_model_hash(path: str | Path) -> str:
    """A1111's first "Model hash" (civitai's AutoV1, kohya's ``model_hash``): sha256 of the 64 KiB at offset
    1 MiB of the file, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(_LEGACY_AT)
        return hashlib.sha256(f.read(_LEGACY_LEN)).hexdigest()[:8]


def tensor_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's tensor data, after the header (AutoV3 / ``sshs_model_hash``)."""
    path = Path(path)
    return _sha256_from(path, _header_end(path))


def describe(path: str | Path) -> dict[str, str | None]:
    """Every hash ``sdtune inspect`` shows. Non-safetensors files have no tensor-data hash (None)."""
    path = Path(path)
    full = file_sha256(path)
    try:
        tensor = tensor_sha256(path) if is_safetensors(path) else None  # by content: a .pti can be one
    except SdtuneError:
        tensor = None
    return {"sha256": full, "autov2": full[:AUTOV2_LEN], "tensor_sha256": tensor,
            "autov3": tensor[:SHORT_LEN] if tensor else None}


_SHORT_CACHE: dict[tuple[str, str, int, int], str] = {}


def _cached(path: Path, kind: str, compute) -> str | None:
    """``compute(path)`` once per file version (path, size, mtime): generate asks for the short hashes on every
    call. None where the file cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (kind, str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHORT_CACHE:
        _SHORT_CACHE[key] = compute(path)
    return _SHORT_CACHE[key]


def short_hash(path: str | Path) -> str | None:
    """A1111's LoRA short hash: the tensor-data sha256 (its ``sshs_model_hash``), 12 hex digits; None where the
    file is not a safetensors file."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        return _cached(path, "tensor", lambda p: tensor_sha256(p)[:SHORT_LEN])
    except SdtuneError:
        return None


def file_short_hash(path: str | Path) -> str | None:
    """A1111's embedding short hash: the whole file's sha256, 12 hex digits; None where it is no readable file."""
    path = Path(path)
    return _cached(path, "file", lambda p: file_sha256(p)[:SHORT_LEN]) if path.is_file() else None


def ti_hashes_field(named_paths: list[tuple[str, str | os.PathLike]]) -> str:
    """The infotext value A1111 writes as ``TI hashes``: ``name: hash, ...``, each the first 12 hex digits of the
    embedding file's sha256 (an embedding that is no file, such as one being trained, is left out)."""
    hashed = [(_entry_name(name), file_short_hash(path)) for name, path in named_paths]
    return ", ".join(f"{name}: {h}" for name, h in hashed if h)


def _entry_name(name: str) -> str:
    """A name as A1111 writes it in a hashes field: without ':' and ',', which would end the entry when read."""
    return name.replace(":", "").replace(",", "")


def lora_hashes_field(named_paths: list[tuple[str, str | os.PathLike]]) -> str:
    """The infotext value A1111 writes as ``Lora hashes``: ``name: hash, name: hash`` (files without a hash are
    left out, as A1111 leaves out networks it could not hash)."""
    parts = []
    for name, path in named_paths:
        h = short_hash(path)
        if h:
            parts.append(f"{_entry_name(name)}: {h}")
    return ", ".join(dict.fromkeys(parts))  # a file loaded twice (a --lora and a tag of it) is one entry

