"""Where an adapter comes from: a local file, or a file in a hub repository (downloaded once, cached).

``owner/repo/path/in/repo.safetensors`` names one file in a hub repo; ``owner/repo`` alone takes the
repo's usual file name for that kind of adapter. Offline, a hub source fails with one clear line.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from .safeio import SdtuneError

DEFAULT_FILES = {
    "lora": ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"),
    "embedding": ("learned_embeds.safetensors", "learned_embeds.bin"),
}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt", ".pth", ".pti")


def split_suffix(spec: str) -> tuple[str, str | None]:
    """'path:extra' -> ('path', 'extra'); a spec that exists as a file, or has no ':', is left whole."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    head, tail = spec.rsplit(":", 1)
    if not head or "/" in tail or "\\" in tail:  # a drive letter or a path, not a suffix
        return spec, None
    return head, tail


def parse_weighted(spec: str, default: float = 1.0) -> tuple[str, float]:
    """'FILE[:WEIGHT]' -> (FILE, WEIGHT)."""
    src, tail = split_suffix(spec)
    if tail is None:
        return src, default
    try:
        return src, float(tail)
    except ValueError:
        raise SdtuneError(f"{spec}: the weight after ':' must be a number, e.g. {src}:0.8") from None


def hub_parts(source: str, kind: str) -> tuple[str, tuple[str, ...]]:
    """('owner/repo', candidate file names) for a hub source, or raise if it cannot be one."""
    parts = source.strip("/").split("/")
    if len(parts) < 2 or any(not p for p in parts):
        raise SdtuneError(f"{source}: no such file, and not a hub id (owner/repo[/file]); check the path")
    repo = "/".join(parts[:2])
    if len(parts) > 2:
        return repo, ("/".join(parts[2:]),)
    return repo, DEFAULT_FILES[kind]


def resolve(source: str | Path, kind: str = "lora", search_dirs: tuple = ()) -> Path:
    """A local path for ``source``: a file, a name in one of ``search_dirs``, or a hub download."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for name in DEFAULT_FILES[kind]:
            if (path / name).is_file():
                return path / name
        raise SdtuneError(f"{path}: folder has no {' or '.join(DEFAULT_FILES[kind])}; name the file itself")
    for d in search_dirs:
        for suffix in ("",) + WEIGHT_SUFFIXES:
            cand = Path(d) / f"{source}{suffix}"
            if cand.is_file():
                return cand
    looks_local = (path.is_absolute() or str(source).startswith((".", "~")) or path.parent.is_dir() and
                   str(path.parent) != "." or (path.suffix in WEIGHT_SUFFIXES and len(path.parts) < 3))
    if looks_local:
        raise SdtuneError(f"{source}: no such file; check the path")
    repo, names = hub_parts(str(source), kind)
    return _download(repo, names, str(source))


def _download(repo: str, names: tuple[str, ...], source: str) -> Path:
    last = None
    for name in names:
        try:
            return Path(hf_hub_download(repo, name))
        except LocalEntryNotFoundError:  # offline and not cached
            raise SdtuneError(
                f"{source}: not a local file, the model hub is unreachable and it is not in the hub cache; "
                f"download {repo}/{name} elsewhere and pass its local path") from None
        except EntryNotFoundError as e:
            last = e
            continue
        except RepositoryNotFoundError:
            raise SdtuneError(f"{source}: no such local file and no hub repo {repo}; check the name") from None
        except Exception as e:  # noqa: BLE001 - offline, DNS, proxy: all mean "cannot reach the hub"
            raise SdtuneError(
                f"{source}: not a local file, and the model hub is unreachable ({type(e).__name__}); "
                f"download {repo}/{name} elsewhere and pass its local path") from None
    raise SdtuneError(f"{source}: hub repo {repo} has none of {', '.join(names)}; name the file: {repo}/FILE "
                      f"({last})")
