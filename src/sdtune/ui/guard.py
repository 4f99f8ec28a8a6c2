"""What a web request may touch: names inside the configured folders, and uploads of the expected kind.

The web UI is a server: anything typed into a field or sent to its HTTP API may be hostile. Every path it
reads or writes is a *name relative to one configured folder* (model, LoRA, embedding, output), resolved here
and refused when it leaves that folder by ``..``, an absolute path, or a symlink. Uploads are checked for
size and for their first bytes (not their file name) before anything parses them; weight files are then read
only by ``safeio.load_state``, which never unpickles code.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..safeio import SdtuneError, is_safetensors, output_folder
from ..train.captions import CAPTION_SUFFIXES
from ..train.images import IMAGE_SUFFIXES

LABELS = {"model": "model", "models": "model", "loras": "LoRA", "embeddings": "embedding", "out": "output"}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# upload kind -> (accepted suffixes, what to ask for)
UPLOADS = {
    "image": (tuple(sorted(IMAGE_SUFFIXES)), "a PNG, JPEG, WebP, AVIF, BMP, GIF or TIFF image"),  # what training reads
    "weights": ((".safetensors", ".pt", ".pth", ".bin", ".ckpt"), "a .safetensors or .pt weight file"),
    "caption": (CAPTION_SUFFIXES, "a .txt caption"),
    "queue": ((".toml",), "a .toml queue file (as sdtune train queue reads)"),
    "settings": ((".toml", ".safetensors"), "a .toml settings file or a .safetensors file sdtune trained"),
}
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
# AVIF is an ISO media file: a box size, "ftyp", then its brand (a still image, a sequence, or HEIF's general one)
_AVIF_BRANDS = (b"avif", b"avis", b"mif1")


class Refused(SdtuneError):
    """A request for a path outside the configured folders, or an upload that is not what it claims."""


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class Folders:
    """The folders the server may use. ``model`` is the model file or folder (None for the built-in model);
    ``models`` the folder of models the page may switch to (``--model-dir``; None: none)."""

    out: Path
    loras: Path
    embeddings: Path
    model: Path | None = None
    models: Path | None = None

    @classmethod
    def make(cls, out, loras=None, embeddings=None, model: str | None = None, models=None) -> Folders:
        """Folders from the command line; the LoRA and embedding folders default to ones inside ``out``."""
        for flag, given in (("--lora-dir", loras), ("--embedding-dir", embeddings), ("--model-dir", models)):
            if given and not Path(given).expanduser().is_dir():  # a typo must not become a new empty folder
                what = "is a file, not a folder" if Path(given).expanduser().exists() else "no such folder"
                raise SdtuneError(f"{flag} {given}: {what}; check the path (or leave it out: the default is a folder "
                                  f"inside --out)")
        out = output_folder(Path(out).expanduser(), "--out").resolve()  # a file in the way: said as for every --out
        builtin = model is None or model in ("tiny", "tiny-xl") or model.endswith("-random")
        model_path = None if builtin else Path(model).expanduser()
        folders = cls(out=out,
                      loras=Path(loras).expanduser().resolve() if loras else out / "loras",
                      embeddings=Path(embeddings).expanduser().resolve() if embeddings else out / "embeddings",
                      model=model_path.resolve() if model_path is not None and model_path.exists() else None,
                      models=Path(models).expanduser().resolve() if models else None)
        for d in (folders.out, folders.loras, folders.embeddings):
            d.mkdir(parents=True, exist_ok=True)
        return folders

    def root(self, kind: str) -> Path:
        if kind == "model":
            if self.model is None:
                raise Refused("the model is built in or a hub id; there is no model folder to read from")
            return self.model if self.model.is_dir() else self.model.parent
        if kind == "models" and self.models is None:
            raise Refused("no model folder; start the UI with --model-dir DIR to switch between the models in it")
        return getattr(self, kind)

    def child(self, kind: str, name: str, *, must_exist: bool = True) -> Path:
        """``name`` (relative, as typed) inside folder ``kind``; refused if it leads anywhere else."""
        label, root = LABELS[kind], self.root(kind)
        text = str(name or "").strip()
        if not text:
            raise Refused(f"no {label} file named; pick one from the list")
        if "\x00" in text:
            raise Refused(f"{text!r}: refused: not a valid name")
        rel = Path(text)
        if rel.is_absolute() or text.startswith(("~", "\\")) or re.match(r"^[A-Za-z]:", text):
            raise Refused(f"{text}: refused: absolute paths are not allowed; give a name inside the {label} "
                          f"folder ({root})")
        if ".." in rel.parts:
            raise Refused(f"{text}: refused: '..' leaves the {label} folder ({root}); give a name inside it")
        return self.inside(root / rel, kind, shown=text, must_exist=must_exist)

    def inside(self, path: Path, *kinds: str, shown: str | None = None, must_exist: bool = True) -> Path:
        """``path`` itself, after checking that it (symlinks followed) lies in one of the folders ``kinds``."""
        real = Path(os.path.realpath(path))
        roots = [Path(os.path.realpath(self.root(k))) for k in kinds]
        if not any(_within(real, r) for r in roots):
            where = " or ".join(f"the {LABELS[k]} folder" for k in kinds)
            raise Refused(f"{shown or path}: refused: it leads outside {where} (a symlink or a path out of it)")
        if must_exist and not real.exists():
            raise Refused(f"{shown or path}: no such file in the {LABELS[kinds[0]]} folder")
        return Path(path)

    def new_name(self, name: str, what: str = "name") -> str:
        """A plain file or folder name for something the UI writes (letters, digits, '.', '_', '-')."""
        text = str(name or "").strip()
        if not PLAIN_NAME.fullmatch(text) or text in (".", ".."):
            raise Refused(f"{what} {text!r}: use letters, digits, '.', '_' or '-' (no folders, no '..')")
        return text


def upload_file_name(name: str) -> str:
    """An uploaded file's name as a plain name (``new_name``'s): each run of other characters becomes '_', so
    that a phone's or a browser's names ("my pic (1).png", "été.jpg") are kept, and an image and its caption
    (the same stem) still pair."""
    path = Path(str(name))
    ascii_stem = unicodedata.normalize("NFKD", path.stem).encode("ascii", "ignore").decode()  # été -> ete
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_stem).strip("._-")[:90] or "upload"
    return stem + re.sub(r"[^A-Za-z0-9.]+", "", path.suffix)


def check_upload(path: str | Path, kind: str, max_bytes: int) -> Path:
    """An uploaded file's path, after its size and type check; refused with the reason otherwise."""
    path = Path(path)
    suffixes, wanted = UPLOADS[kind]
    try:
        size = path.stat().st_size
    except OSError:
        raise Refused(f"{path.name}: the upload did not arrive; try again") from None
    if size > max_bytes:
        raise Refused(f"{path.name}: {size / 2**20:.1f} MB is over the upload limit of {max_bytes / 2**20:.0f} MB "
                      f"(--max-upload-mb)")
    if path.suffix.lower() not in suffixes:
        raise Refused(f"{path.name}: not {wanted} ({', '.join(suffixes)})")
    with open(path, "rb") as f:
        head = f.read(16)
    if kind == "image":
        ok = (head.startswith(_IMAGE_MAGIC) and (not head.startswith(b"RIFF") or head[8:12] == b"WEBP")
              or head[4:8] == b"ftyp" and head[8:12] in _AVIF_BRANDS)
    elif kind == "weights" or (kind == "settings" and path.suffix.lower() == ".safetensors"):
        # safetensors (a JSON header), or what torch.save writes: a zip archive or a bare pickle (protocol 2+)
        ok = is_safetensors(path) or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    else:
        try:
            path.read_text(encoding="utf-8")
            ok = True
        except UnicodeDecodeError:
            ok = False
    if not ok:
        raise Refused(f"{path.name}: its contents are not {wanted}")
    return path
