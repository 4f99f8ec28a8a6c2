"""Where an adapter comes from: a local file, or a file in a hub repository (downloaded once, cached).

``owner/repo/path/in/repo.safetensors`` names one file in a hub repo; ``owner/repo`` alone takes the
repo's usual file name for that kind of adapter. Offline, a hub source fails with one clear line.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from huggingface_hub import hf_hub_download, model_info
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from .safeio import SdtuneError, visible_paths

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
    # a drive letter or a path, not a suffix; after an existing file it is one (a token with '/', said by its check)
    if not head or (("/" in tail or "\\" in tail) and not os.path.isfile(head)):
        return spec, None
    return head, tail


def a1111_weights(numbers: list[str], named: dict[str, str], default: float = 1.0) -> tuple[float, float | None]:
    """(UNet weight, text encoders' weight or None where it is the same) as A1111 reads ``<lora:name:A:B>``: A is
    the text encoders' weight, and the UNet's too unless B gives the UNet its own; ``te=`` and ``unet=`` override
    them, and the UNet's default is the text encoders' weight after ``te=`` (so ``<lora:x:1:te=0.5>`` is 0.5 for
    both). Raises ValueError on a word that is no finite number."""
    te = float(named.get("te", numbers[0] if numbers else default))
    unet = float(named.get("unet", numbers[1] if len(numbers) > 1 else te))
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise ValueError
    return unet, None if te == unet else te


def parse_weighted(spec: str, default: float = 1.0) -> tuple[str, float | tuple[float, ...]]:
    """'FILE[:WEIGHT[:UNET_WEIGHT]]', also with A1111's named ``:unet=W`` / ``:te=W``, read as A1111 reads the
    same weights in a prompt's ``<lora:name:…>`` (``a1111_weights``), and ``:te2=W`` (SDXL's second text
    encoder, as in a prompt tag) -> (FILE, weight): one number, (unet, text encoders) where the two differ, or
    (unet, first text encoder, second text encoder) with te2=."""
    numbers, named, src = [], {}, spec
    while True:
        head, tail = split_suffix(src)
        key, eq, value = (tail or "").partition("=")
        if eq and key.strip() not in ("unet", "te", "te2"):
            raise SdtuneError(f"{spec}: unknown option {key.strip()!r}; after its file a LoRA takes :WEIGHT"
                              f"[:UNET_WEIGHT], :unet=W, :te=W, :te2=W (SDXL) and :lbw=BLOCK_WEIGHTS")
        if tail is None or (not eq and len(numbers) == 2):
            break
        if eq:
            named.setdefault(key.strip(), value)
        else:
            numbers.insert(0, tail)
        src = head
    extra = split_suffix(src)[1]
    if len(numbers) == 2 and extra is not None and re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", extra, re.I):
        raise SdtuneError(f"{spec}: a LoRA takes at most two weights, FILE:0.8 or FILE:0.5:0.8 (the text "
                          f"encoders', then the UNet's, as in A1111's <lora:name:0.5:0.8>)")
    try:
        unet, te = a1111_weights(numbers, named, default)
        te2 = float(named["te2"]) if "te2" in named else None
        if te2 is not None and not math.isfinite(te2):
            raise ValueError
    except ValueError:
        raise SdtuneError(f"{spec}: a weight after ':' must be a finite number (FILE:0.8, FILE:0.5:0.8 for the text "
                          f"encoders and the UNet as A1111 reads them, or FILE:te=0.5:unet=0.8:te2=0.3), "
                          f"e.g. {src}:0.8") from None
    if te2 is not None:
        return src, (unet, unet if te is None else te, te2)
    return src, unet if te is None else (unet, te)


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
    if search_dirs and not re.search(r"[/\\]", str(source)):
        found = _in_subfolders(str(source), search_dirs)
        if found is not None:
            return found
    looks_local = (path.is_absolute() or str(source).startswith((".", "~")) or path.parent.is_dir() and
                   str(path.parent) != "." or (path.suffix in WEIGHT_SUFFIXES and len(path.parts) < 3))
    if looks_local:
        raise SdtuneError(f"{source}: no such file; check the path")
    repo, names = hub_parts(str(source), kind)
    return _download(repo, names, str(source))


def _in_subfolders(name: str, search_dirs) -> Path | None:
    """The file named ``name`` (with or without its weight suffix) in a subfolder of the first of ``search_dirs``
    that has one, as A1111 finds a LoRA or embedding by its file name wherever it sits in its folder; two of that
    name are refused, naming both."""
    for d in search_dirs:
        if not Path(d).is_dir():
            continue
        found = [p for p in visible_paths(Path(d)) if p.suffix in WEIGHT_SUFFIXES and name in (p.stem, p.name)]
        if len(found) > 1:
            shown = ", ".join(p.relative_to(d).as_posix() for p in found[:3])
            raise SdtuneError(f"{name}: {len(found)} files of that name in {d} ({shown}); name one by its path "
                              f"there, e.g. {found[0].relative_to(d).with_suffix('').as_posix()}")
        if found:
            return found[0]
    return None


def _cached(repo: str, names: tuple[str, ...]) -> Path | None:
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or no cache): the hub decides
            continue
    return None


def _unreachable(source: str, repo: str, name: str, e: Exception) -> SdtuneError:
    return SdtuneError(f"{source}: not a local file, the model hub is unreachable ({type(e).__name__}) and it is "
                       f"not in the hub cache; download {repo}/{name} elsewhere and pass its local path")


def _no_repo(source: str, repo: str) -> SdtuneError:
    return SdtuneError(f"{source}: no such local file and no hub repo {repo}; check the name")


def _download(repo: str, names: tuple[str, ...], source: str) -> Path:
    cached = _cached(repo, names)
    if cached is not None:
        return cached
    try:  # one request first: a file download retries an unreachable hub for half a minute, saying so each time
        model_info(repo)
    except RepositoryNotFoundError:
        raise _no_repo(source, repo) from None
    except Exception as e:  # noqa: BLE001 - offline, DNS, proxy: all mean "cannot reach the hub"
        raise _unreachable(source, repo, names[0], e) from None
    last = None
    for name in names:
        try:
            return Path(hf_hub_download(repo, name))
        except EntryNotFoundError as e:
            last = e
        except RepositoryNotFoundError:
            raise _no_repo(source, repo) from None
        except Exception as e:  # noqa: BLE001 - offline (not cached), DNS, proxy: "cannot reach the hub"
            raise _unreachable(source, repo, name, e) from None
    raise SdtuneError(f"{source}: hub repo {repo} has none of {', '.join(names)}; name the file: {repo}/FILE "
                      f"({last})")
