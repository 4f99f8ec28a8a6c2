"""Training data: a folder of images and captions in, cached latents and per-step batches out.

Layout (kohya-compatible): images with a same-name ``.txt`` (or ``.caption``) file beside them, or listed in a
``metadata.jsonl``/``metadata.csv`` (Hugging Face's imagefolder layout, which diffusers' scripts read: ``file_name``
and a ``text``/``caption``/``prompt`` column); a subfolder named ``N_name`` repeats its images N times per epoch,
and ``name`` is the caption of its images that have no caption file. A kohya dataset config given as the data
names such folders itself (``kohya_dataset``: each subset's folder, repeats and class tokens). Any image Pillow
reads is accepted (RGBA, palette, grayscale, 16-bit, EXIF-rotated): it becomes 8-bit RGB, transparency composited
on white. Unreadable files are skipped and listed.

Each image is resized to cover its bucket (one square size, or with bucketing the size whose aspect ratio
is closest) and cropped. With a center crop it is encoded once by the frozen VAE and the latent
distribution kept (mean and std), so every step draws a fresh sample from it at no VAE cost; flipped
copies are encoded too when flipping is on. A random crop changes every step, so those images are kept as
pixels and encoded per step.

Each image's upright size and its crop (the corner cut from the resized image, mirrored when flipped) are
kept: SDXL's UNet is conditioned on them (``time_ids``: original size, crop top-left, target size), as it
was trained, so a batch carries one row of time ids per image.

Batches are a pure function of (seed, batch number): epoch e shuffles every bucket with seed (seed, e),
chunks it into global batches (the last one filled by wrapping around) and shuffles the batch order. That
makes resuming exact, and lets each of several processes take its slice of the same global batch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import console
from ..console import note
from ..safeio import SdtuneError
from . import kohya_dataset, masks
from .config import TOKEN_LENGTHS
from .latent_cache import LatentCache

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff"}  # AVIF: Pillow 11.3+
CAPTION_SUFFIXES = (".txt", ".caption")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


def seed_for(*parts) -> int:
    """A 63-bit seed from any parts (seed, step, purpose...); the same in every process and Python run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------- the folder

@dataclass
class Example:
    path: Path
    caption: str | None  # None: no caption file, no folder name, no default
    repeats: int = 1
    name: str = ""  # its path inside the data ("10_cat/a.png"): the same wherever the folder is moved
    group: str = "."  # the folder kohya's metadata counts it in (ss_dataset_dirs): its N_name folder, or "."
    # its own settings, over the run's (a dataset config's subset: caption options, its dataset's resolution)
    options: dict = field(default_factory=dict)


@dataclass
class Scan:
    examples: list[Example]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images, and why
    folders: dict[str, dict] = field(default_factory=dict)  # folder -> {"n_repeats", "img_count"} (kohya metadata)
    unused: list[str] = field(default_factory=list)  # notes on caption files that are not used as they stand


METADATA_FILES = ("metadata.jsonl", "metadata.csv")
METADATA_COLUMNS = ("text", "caption", "prompt")  # diffusers' scripts default to "text"


def caption_file(image: Path) -> Path | None:
    """The caption file of ``image``: ``.txt``, else ``.caption``, in lower or upper case (``A.PNG`` + ``A.TXT``)."""
    for suffix in CAPTION_SUFFIXES:
        for case in (suffix, suffix.upper()):
            if image.with_suffix(case).is_file():
                return image.with_suffix(case)
    return None


def read_caption(image: Path, read: dict[Path, list[str]] | None = None, all_lines: bool = False) -> str | None:
    """The first non-empty line of the image's caption file ("" for an empty file), or with ``all_lines`` every
    non-empty one joined by newlines (--wildcards); None without one. ``read`` collects each file's lines, for
    ``_caption_notes``."""
    path = caption_file(image)
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise SdtuneError(f"{path}: caption is not UTF-8 text; re-save it as UTF-8") from None
    if read is not None:
        read[path] = lines
    if all_lines:
        return "\n".join(ln.strip() for ln in lines if ln.strip())
    return next((ln.strip() for ln in lines if ln.strip()), "")


def read_metadata_captions(folder: Path) -> dict[Path, str]:
    """{image path: caption} from the folder's ``metadata.jsonl`` or ``metadata.csv`` (Hugging Face imagefolder:
    a ``file_name`` relative to the folder and a caption column); {} without one."""
    path = next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SdtuneError(f"{path}: is not UTF-8 text; re-save it as UTF-8") from None
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise SdtuneError(f"{path}: line {number} is not JSON; each line must be an object such as "
                                  f'{{"file_name": "0.png", "text": "a red circle"}}') from None
    captions = {}
    for row in rows:
        if not isinstance(row, dict) or "file_name" not in row:
            raise SdtuneError(f"{path}: a row without file_name ({str(row)[:60]}); give each image's file_name and "
                              f"its {' or '.join(METADATA_COLUMNS)}")
        column = next((c for c in METADATA_COLUMNS if c in row), None)
        if column is None:
            raise SdtuneError(f"{path}: no caption column ({', '.join(METADATA_COLUMNS)}) for {row['file_name']}; "
                              f"name the captions' column text")
        captions[(folder / str(row["file_name"])).resolve()] = str(row[column] or "").strip()
    return captions


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not masks.is_mask_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _caption_notes(folder: Path, recursive: bool, images: list[Path], read: dict[Path, list[str]],
                   all_lines: bool = False) -> list[str]:
    """What a user would not see happen to the caption files of ``folder``: one with no image beside it (not
    used), an image with both a .txt and a .caption (the .txt is used), an empty one (an empty caption), one of
    several lines (the first is used). ``read``: the lines of the files the scan read (the others: of images
    that were skipped) are not read again."""
    stems = {p.with_suffix("") for p in images}
    files = folder.rglob("*") if recursive else folder.iterdir()
    captions = sorted(p for p in files if p.suffix.lower() in CAPTION_SUFFIXES and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    orphans = [p for p in captions if p.with_suffix("") not in stems]
    both = [p for p in captions if p.suffix.lower() == CAPTION_SUFFIXES[1] and p.with_suffix("") in stems
            and caption_file(p.with_suffix("")) != p]
    used = [p for p in captions if p not in orphans and p not in both]
    def lines(p: Path) -> list[str]:
        return read[p] if p in read else p.read_text(encoding="utf-8", errors="replace").splitlines()
    filled = {p: [line for line in lines(p) if line.strip()] for p in used}
    empty = [p for p in used if not filled[p]]
    # only the first line is read, as kohya reads it: a captioner's further lines would go unseen
    multi = [] if all_lines else [p for p in used if len(filled[p]) > 1]

    def named(paths: list[Path]) -> str:
        return ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    notes = []
    if orphans:
        notes.append(f"{folder}: {len(orphans)} caption file(s) have no image beside them and are not used "
                     f"({named(orphans)})")
    if both:
        notes.append(f"{folder}: {len(both)} image(s) have both a .txt and a .caption file; the .txt is used "
                     f"({named(both)} not)")
    if empty:
        notes.append(f"{folder}: {len(empty)} caption file(s) are empty, so their images train with an empty "
                     f"caption ({named(empty)})")
    if multi:
        notes.append(f"{folder}: {len(multi)} caption file(s) have more than one line; only the first is used, as "
                     f"kohya does ({named(multi)}); join the lines to keep them, or give --wildcards to draw one "
                     f"of them each time")
    return notes


@dataclass(frozen=True)
class _Source:
    """One folder of images read alike: their repeats, the caption of an image without one, whether its
    subfolders are read, and where its images' names start (their ``Example.name``) and how kohya counts them."""
    folder: Path
    repeats: int
    caption: str | None
    recursive: bool
    group: str
    names_from: Path
    prefix: str = ""
    options: dict = field(default_factory=dict)  # its images' own settings (``Example.options``)
    # a fine-tuning subset's {image key: caption} (``kohya_dataset.Subset.captions``) and its metadata file
    listed: dict[str, str | None] | None = None
    listing: Path | None = None


def scan_data(data: str | Path, default_caption: str | None = None, require_captions: bool = True,
              option: str = "--data", all_lines: bool = False, reg: bool = False) -> Scan:
    """``scan_folder`` of a folder; of a kohya dataset config (``kohya_dataset``), its training subsets' images, or
    with ``reg`` its class images'."""
    if not kohya_dataset.is_dataset_file(data):
        return scan_folder(data, default_caption, require_captions, option, all_lines)
    dataset = kohya_dataset.read(data)
    subsets = dataset.images(reg)
    if not subsets:
        raise SdtuneError(f"{data}: has no {'is_reg ' if reg else ''}subsets to read as {option}; give one")
    scan = Scan([])
    groups, taken = [], set()
    for s in subsets:  # each named by its folder, as ss_dataset_dirs names it (a second of a name: numbered)
        group = next(g for g in (s.image_dir.name, *(f"{s.image_dir.name}-{i}" for i in range(2, 10**6)))
                     if g not in taken)
        taken.add(group)
        groups.append(_Source(s.image_dir, s.repeats, s.class_tokens, False, group, s.image_dir, group + "/",
                              dataset.own_options(s), s.captions, s.metadata))
        deeper = [p for p in s.image_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and _image_files(p, True)] if s.captions is None else []
        if deeper:  # sd-scripts reads a subset's own folder, not its subfolders
            scan.unused.append(f"{s.image_dir}: images in its subfolders ({', '.join(p.name for p in deeper[:3])}) are "
                               f"not read, as sd-scripts reads a subset; give each folder as a subset")
    return _scan(Path(data), groups, scan, default_caption, require_captions, all_lines)


def scan_folder(folder: str | Path, default_caption: str | None = None, require_captions: bool = True,
                option: str = "--data", all_lines: bool = False) -> Scan:
    """Every readable image under ``folder`` (given as ``option``) with its caption and repeat count.

    Caption order: same-name caption file, then the folder's metadata.jsonl/csv, then the ``N_name`` folder's
    name, then ``default_caption``. With ``require_captions`` an image left without one is an error (TI uses
    prompt templates instead). ``all_lines``: a caption file's every line, as alternatives (--wildcards)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SdtuneError(f"{folder}: {option} is not a folder; point it at a folder of images and captions (or at a "
                          f"kohya dataset config)")
    groups = [_Source(folder, 1, None, False, ".", folder)]
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    kohya = any(REPEAT_FOLDER.match(sub.name) for sub in subfolders)
    scan = Scan([])
    for sub in subfolders:
        m = REPEAT_FOLDER.match(sub.name)
        repeats, caption = (int(m.group(1)), m.group(2).strip() or None) if m else (1, None)
        groups.append(_Source(sub, repeats, caption, True, sub.name, folder))
        # kohya's layout read as sd-scripts reads it, but said: it skips an unprefixed folder, which trains here
        if m and int(m.group(1)) == 0:
            scan.unused.append(f"{sub}: 0 repeats (its N_ prefix), so its images are not used")
        elif not m and kohya:
            scan.unused.append(f"{sub}: no N_ repeat prefix among kohya-style folders, so its images train once per "
                               f"epoch (kohya sd-scripts skips such a folder)")
    return _scan(folder, groups, scan, default_caption, require_captions, all_lines)


def _scan(where: Path, groups: list[_Source], scan: Scan, default_caption: str | None, require_captions: bool,
          all_lines: bool) -> Scan:
    """``scan`` filled with the images of ``groups`` (of the data at ``where``, named in messages)."""
    missing: list[Path] = []
    for source in groups:
        fine_tuning = source.listed is not None
        if fine_tuning:
            listed = _fine_tuning_captions(source, all_lines, scan)
            files = sorted(listed)
        else:
            files = _image_files(source.folder, source.recursive)
            listed = read_metadata_captions(source.folder)
        read: dict[Path, list[str]] = {}
        count = 0
        for image in files:
            why = check_image(image)
            if why:
                scan.skipped.append((image, why))
                continue
            caption = None if fine_tuning else read_caption(image, read, all_lines)
            if caption is None:
                caption = listed.get(image.resolve())
            if caption is None:
                caption = source.caption if source.caption is not None else default_caption
            if caption is None and require_captions:
                missing.append(image)
            inside = image.is_relative_to(source.names_from)  # (a fine-tuning key may name an image elsewhere)
            name = source.prefix + (image.relative_to(source.names_from) if inside else image).as_posix().lstrip("/")
            scan.examples.append(Example(image, caption, source.repeats, name, source.group, source.options))
            count += 1
        if count and source.repeats > 0:
            scan.folders[source.group] = {"n_repeats": source.repeats, "img_count": count}
        if fine_tuning:
            continue
        scan.unused += _caption_notes(source.folder, source.recursive, files, read, all_lines)
        unlisted = sorted(p.name for p in listed if not p.is_file())
        if unlisted:  # a typo, or an image renamed or deleted since the metadata was written
            scan.unused.append(f"{source.folder}: {len(unlisted)} row(s) of its metadata name no image there and "
                               f"are not used ({', '.join(unlisted[:3])}{', ...' if len(unlisted) > 3 else ''})")
    zero = [e for e in scan.examples if e.repeats == 0]
    scan.examples = [e for e in scan.examples if e.repeats > 0]
    if missing:
        shown = ", ".join(p.name for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        fix = "give their subset class_tokens" if where.is_file() else "pass --default-caption TEXT"
        raise SdtuneError(f"{where}: {len(missing)} image(s) have no caption ({shown}); add same-name .txt files "
                          f"(or a metadata.jsonl), or {fix}")
    if not scan.examples:
        if zero:  # kohya's 0_ folders hold regularisation or held-back images, nothing to train on
            name = zero[0].group
            raise SdtuneError(f"{where}: its {len(zero)} image(s) are all in folders of 0 repeats ({name}); give "
                              f"a folder a count of repeats, e.g. 10_{REPEAT_FOLDER.match(name).group(2)}")
        if scan.skipped:
            raise SdtuneError(f"{where}: none of its {len(scan.skipped)} image(s) could be read (e.g. "
                              f"{scan.skipped[0][0].name}: {scan.skipped[0][1]}); check the files")
        raise SdtuneError(f"{where}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))}); put the training "
                          f"images there, with same-name .txt captions")
    return scan


def image_named(key: str, folder: Path, names: set[str] | None = None) -> Path | None:
    """The image a fine-tuning metadata key names, found as sd-scripts finds it: an image at that path, else one of
    that name in the subset's ``folder``, with or without its extension; None where there is none. ``names``: the
    file names in ``folder``, listed once for all its keys (else each name tried is a file-system lookup)."""
    def named(name: str) -> bool:
        path = folder / name
        return name in names if names is not None and path.parent == folder else path.is_file()
    given = Path(key).expanduser()
    if given.suffix.lower() in IMAGE_SUFFIXES and given.is_file():
        return given.resolve()
    tried = [key, *(key + case for suffix in sorted(IMAGE_SUFFIXES) for case in (suffix, suffix.upper()))]
    return next(((folder / n).resolve() for n in tried if Path(n).suffix.lower() in IMAGE_SUFFIXES and named(n)),
                None)


def _fine_tuning_captions(source: _Source, all_lines: bool, scan: Scan) -> dict[Path, str | None]:
    """{image: caption} of a fine-tuning subset, the images its metadata names (not its folder's other images nor
    caption files, as sd-scripts reads it); a caption of several lines read as a caption file's. What is not used
    goes into ``scan.unused``."""
    captions, lost, multi = {}, [], 0
    with os.scandir(source.folder) as entries:  # (the listing's own file types: no lookup per file)
        names = {entry.name for entry in entries if entry.is_file()}
    for key, caption in source.listed.items():
        image = image_named(key, source.folder, names)
        if image is None:
            lost.append(key)
            continue
        if caption is not None:
            lines = [line.strip() for line in caption.splitlines() if line.strip()]
            multi += len(lines) > 1 and not all_lines
            caption = "\n".join(lines) if all_lines else (lines[0] if lines else "")
        captions[image] = caption

    def named(items: list[str]) -> str:
        return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
    if lost:  # (sd-scripts also trains on its own cached .npz latents without the image: sdtune needs the image)
        scan.unused.append(f"{source.listing}: {len(lost)} of its images are neither a file nor in {source.folder} "
                           f"and are not used ({named(lost)})")
    if multi:
        scan.unused.append(f"{source.listing}: {multi} caption(s) have more than one line; only the first is used, as "
                           f"kohya reads a caption file; give --wildcards to draw one of them each time")
    others = [p.name for p in _image_files(source.folder, False) if p.resolve() not in captions]
    if others:
        scan.unused.append(f"{source.folder}: {len(others)} image(s) its metadata_file does not name are not used, as "
                           f"sd-scripts reads a fine-tuning subset ({named(others)})")
    return captions


def _subset(scan: Scan, keep: list[Example]) -> Scan:
    """``scan`` reduced to ``keep``, with its per-folder image counts recounted."""
    folders = {}
    for ex in keep:
        folders.setdefault(ex.group, {"n_repeats": ex.repeats, "img_count": 0})["img_count"] += 1
    return Scan(keep, scan.skipped, folders={k: folders[k] for k in scan.folders if k in folders})


def held_out_order(scan: Scan) -> list[Example]:
    """The images in a fixed order that depends only on their names in the data (not on the seed or the file
    system): the validation images are the first of it, the same ones in every run on that folder."""
    return sorted(scan.examples, key=lambda ex: hashlib.sha256(ex.name.encode()).hexdigest())


def fingerprint(scan: Scan, root: str | Path | None = None) -> dict:
    """What identifies a folder's training data for a resume: its images (by path inside ``root``, so that a moved
    or copied folder still matches), their captions and repeats, and the images' bytes (an edited image keeps its
    name and often its size), with a dataset config's settings per subset. {"images": n, "sha256": of the
    names and captions, "content": of the bytes}. Reading
    every image once costs little beside the training that decodes them all. ``root`` defaults to the folder the
    images share."""
    root = Path(root or os.path.commonpath([ex.path.parent for ex in scan.examples] or ["."]))
    examples = sorted(scan.examples, key=lambda ex: ex.path)
    rows = sorted((ex.path.relative_to(root).as_posix() if ex.path.is_relative_to(root) else ex.name or ex.path.name,
                   ex.path.stat().st_size, ex.caption, ex.repeats)
                  + ((repr(sorted(ex.options.items())),) if ex.options else ()) for ex in examples)
    content = hashlib.sha256()
    for ex in examples:
        with open(ex.path, "rb") as f:
            content.update(hashlib.file_digest(f, "sha256").digest())
    return {"images": len(rows), "sha256": hashlib.sha256(repr(rows).encode()).hexdigest(),
            "content": content.hexdigest()}


def split_validation(scan: Scan, fraction: float, root: str | Path, origin: str = "") -> tuple[Scan, Scan]:
    """(training, validation): ``fraction`` of the images (at least one) held out, with all their repeats.
    ``origin``: where the fraction came from, for the message ("the tiny preset's "), when not from the user."""
    root = Path(root)
    n = len(scan.examples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise SdtuneError(f"{origin}--validation-split {fraction:g} holds out all {n} image(s) of {root}; add images, "
                          f"give --validation-split 0 (the loss is then measured on training images), or give "
                          f"held-out images with --validation-dir")
    held = {id(ex) for ex in held_out_order(scan)[:k]}
    return (_subset(scan, [ex for ex in scan.examples if id(ex) not in held]),
            _subset(scan, [ex for ex in scan.examples if id(ex) in held]))


def first_prompts(texts, n: int = 4) -> list[str]:
    """The first ``n`` distinct non-empty texts: the prompts of samples and the report when none are given
    (the empty prompt when every text is empty)."""
    return list(dict.fromkeys(t for t in texts if t))[:n] or [""]


# ---------------------------------------------------------------- images

def check_image(path: Path) -> str | None:
    """None if Pillow can decode ``path``, else the reason."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                return "empty image"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Grayscale of more than 8 bits (I;16*, I, F) as 8-bit L, scaled rather than clipped."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "F":
        arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
    elif arr.size and arr.max() > 255:  # "I": 16-bit data in a 32-bit container
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def open_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB, upright (EXIF orientation applied), transparency composited on white."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)
        has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the sides. Reads only the header."""
    return _header(path)[0]


def _header(path: Path) -> tuple[tuple[int, int], bool]:
    """(upright (width, height), whether the file is animated: GIF, APNG, WebP) from its header."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
        animated = bool(getattr(img, "is_animated", False))
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), animated


def _note_image_sizes(scan: Scan, sizes: list[tuple[int, int]], buckets: list[tuple[int, int]],
                      animated: list[bool]) -> None:
    """What training does to an image that the user may not expect: an animated one trains on its first frame,
    and one far smaller than its training size is upscaled (so it trains blurred)."""
    moving = [ex.path for ex, a in zip(scan.examples, animated) if a]
    if moving:
        note(f"{moving[0]}" + (f" and {len(moving) - 1} more" if len(moving) > 1 else "") + ": animated; only the "
             "first frame is trained on")
    small = [(ex.path, wh, b) for ex, wh, b in zip(scan.examples, sizes, buckets)
             if wh[0] * 2 <= b[0] or wh[1] * 2 <= b[1]]
    if small:
        path, (w, h), (bw, bh) = small[0]
        note(f"{path}" + (f" and {len(small) - 1} more" if len(small) > 1 else "") + f": {w}x{h}, at most half "
             f"the {bw}x{bh} it is trained at; it is upscaled, so it trains blurred (use larger images, or a "
             f"smaller --resolution)")


def cover_box(width: int, height: int, size: tuple[int, int], where: tuple[float, float] = (0.5, 0.5)
              ) -> tuple[int, int, int, int]:
    """What ``fit`` does to a ``width`` x ``height`` image: (resized width, resized height, crop left, crop top),
    the crop's corner in the resized image's pixels (what SDXL's crop time ids hold)."""
    w, h = size
    scale = max(w / width, h / height)
    nw, nh = max(w, round(width * scale)), max(h, round(height * scale))
    return nw, nh, round((nw - w) * where[0]), round((nh - h) * where[1])


def fit(img: Image.Image, size: tuple[int, int], where: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Resize to cover ``size`` (w, h) keeping the aspect ratio, then crop; ``where`` places the crop (0..1)."""
    w, h = size
    nw, nh, left, top = cover_box(img.width, img.height, size, where)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    return img.crop((left, top, left + w, top + h))


COLOR_AUG_TURN = 8 / 180  # kohya's color_aug: up to 8 of OpenCV's 180 hue steps either way


def shift_hue(img: Image.Image, turn: float) -> Image.Image:
    """``img`` with its hue turned by ``turn`` of the colour circle (kohya's color_aug, in Pillow's 256 steps)."""
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(turn * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def time_ids(original: tuple[int, int], box: tuple[int, int, int, int], size: tuple[int, int],
             flipped: bool = False) -> list[float]:
    """SDXL's size and crop conditioning of one training image: (original height, original width, crop top,
    crop left, target height, target width), as SDXL was trained. ``original``, ``size``: (w, h); ``box``: from
    ``cover_box``. A flipped image's crop is mirrored: its left edge is the distance from the right."""
    nw, _, left, top = box
    if flipped:
        left = nw - size[0] - left
    return [float(original[1]), float(original[0]), float(top), float(left), float(size[1]), float(size[0])]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def bucket_sizes(resolution: int, step: int, min_side: int | None = None, max_side: int | None = None
                 ) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of ``step``, of area at most resolution², sides within [min_side, max_side]."""
    min_side = min_side or max(step, (resolution // 2) // step * step)
    max_side = max_side or resolution * 2
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def _own_bucket(size: tuple[int, int], step: int) -> tuple[int, int]:
    """An image's own size rounded down to multiples of ``step`` (at least one step a side)."""
    return max(step, size[0] - size[0] % step), max(step, size[1] - size[1] % step)


def pick_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The size whose aspect ratio is closest to the image's (ties: the larger area)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


# ---------------------------------------------------------------- captions

def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")  # {a|b|c}: one of the options (kohya's enable_wildcard)


def pick_wildcards(text: str, rng: random.Random | None) -> str:
    """One of the caption's lines (--wildcards: each line an alternative) and one option of each ``{a|b|c}`` in
    it, drawn from ``rng``; with ``rng`` None the first of each (the steady caption samples read)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [""]
    line = lines[0] if rng is None or len(lines) == 1 else rng.choice(lines)

    def option(match: re.Match) -> str:
        options = match.group(1).split("|")
        return options[0] if rng is None else rng.choice(options)
    return WILDCARD.sub(option, line)


def has_wildcards(text: str) -> bool:
    return "\n" in text or WILDCARD.search(text) is not None


def process_caption(text: str, rng: random.Random, shuffle: bool = False, keep_tokens: int = 0,
                    dropout: float = 0.0, tag_dropout: float = 0.0, separator: str = "", group: str = "",
                    prefix: str = "", suffix: str = "", wildcards: bool = False,
                    warm: tuple[int, int, int] | None = None) -> str:
    """kohya's caption options: drop the whole caption with probability ``dropout``; shuffle the
    comma-separated tags, the first ``keep_tokens`` staying in front; then drop each of the others with
    probability ``tag_dropout``. In a caption holding ``separator`` (kohya's keep_tokens_separator) the tags
    before it stay in front and those after its last one at the end, instead of ``keep_tokens``; tags joined
    by ``group`` (kohya's secondary_separator) move and drop as one; ``prefix`` and ``suffix`` are put around
    what is left, joined by a space as kohya joins them. ``wildcards``: one line of the text and one option of each
    {a|b|c} first (``pick_wildcards``). ``warm``: (step, least, steps) of kohya's token warm-up: before ``steps``,
    only the first ``least`` + step x (n − ``least``) / ``steps`` of the n tags that may move are kept (before
    the shuffle)."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if wildcards:
        text = pick_wildcards(text, rng)
    held = bool(separator) and separator in text
    warming = warm is not None and warm[0] < warm[2]
    if shuffle or tag_dropout > 0 or held or warming:
        if held:
            parts = text.split(separator)
            head, end = _tags(parts[0]), _tags(parts[-1]) if len(parts) > 2 else []
            tail = _tags(",".join(parts[1:-1] if len(parts) > 2 else parts[1:]))
        else:
            tags = _tags(text)
            head, tail, end = tags[:keep_tokens], tags[keep_tokens:], []
        if warming:  # (kohya's count, floored)
            step, least, steps = warm
            tail = tail[:max(0, math.floor(step * (len(tail) - least) / steps) + least)]
        if shuffle:
            rng.shuffle(tail)
        if tag_dropout > 0:
            tail = [t for t in tail if rng.random() >= tag_dropout]
        text = ", ".join(head + tail + end)
    if group:
        text = ", ".join(_tags(text.replace(group, ",")))
    if prefix or suffix:
        text = " ".join(t for t in (prefix, text, suffix) if t)
    return text


# ``process_caption``'s options -> the settings that give them
CAPTION_SETTINGS = {"shuffle": "shuffle_captions", "keep_tokens": "keep_tokens", "dropout": "caption_dropout",
                    "tag_dropout": "caption_tag_dropout", "separator": "keep_tokens_separator",
                    "group": "secondary_separator", "prefix": "caption_prefix", "suffix": "caption_suffix",
                    "wildcards": "wildcards"}


def caption_options(settings, own: dict | None = None) -> dict:
    """The ``process_caption`` options of a run's settings, ``own`` (an example's ``options``) over them."""
    own = own or {}
    return {option: own.get(name, getattr(settings, name)) for option, name in CAPTION_SETTINGS.items()}


def steady_caption(text: str, settings, own: dict | None = None) -> str:
    """A caption as training reads it less its random parts (dropouts, shuffling): separators out, prefix and
    suffix on (``own``: an example's own caption settings). What the samples, the report and the validation loss
    use."""
    opts = caption_options(settings, own) | dict(shuffle=False, dropout=0.0, tag_dropout=0.0, wildcards=False)
    return process_caption(pick_wildcards(text, None) if settings.wildcards else text, random.Random(0), **opts)


# ---------------------------------------------------------------- latents

@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 2C, h, w]: mean and std of the scaled latent distribution of ``pixels`` ([N, 3, H, W], [-1, 1]).

    A VAE whose config asks for it (``force_upcast``, diffusers' default, which SDXL's states: its VAE overflows to
    NaN in fp16) encodes in fp32, as diffusers' SDXL pipeline and training scripts do: only the parts encoding
    uses (the encoder and its quant conv, under half the VAE: with ``--crop random`` this runs every step), their
    fp16 weights put back exactly afterwards."""
    param = next(vae.parameters())
    upcast = param.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    parts = [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None] if upcast else []
    for part in parts:  # plain modules: no diffusers warning about fp32-only modules, as ModelMixin.to gives
        part.to(torch.float32)
    try:
        dist = vae.encode(pixels.to(param.device, torch.float32 if upcast else param.dtype)).latent_dist
    finally:
        for part in parts:
            part.to(torch.float16)
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return torch.cat([(dist.mean - shift) * scale, dist.std * scale], 1).float().cpu()


@dataclass
class Batch:
    latents: torch.Tensor  # [b, C, h, w] a sample of each image's latent distribution (this process's slice)
    captions: list[str]
    size: tuple[int, int]  # (w, h) in pixels
    time_ids: torch.Tensor  # [b, 6] SDXL's (original h, w, crop top, left, target h, w) of each image (``time_ids``)
    mask: torch.Tensor | None = None  # [b, 1, h, w] loss weights per latent pixel (``masks``), with --masked-loss


class TrainingSet:
    """The scanned images resized into buckets, encoded once, and served as reproducible batches."""

    def __init__(self, scan: Scan, vae, resolution: int, seed: int, *, bucket_step: int = 64, buckets: bool = False,
                 min_bucket_reso: int = 0, max_bucket_reso: int = 0, no_upscale: bool = False, crop: str = "center",
                 cache=None, flip: bool = False, captions: dict | None = None, empty_every: int = 0,
                 templates: list[str] | None = None, encode_batch: int = 8, progress: bool = False,
                 masked: bool = False, color_aug: bool = False):
        """``captions``: the ``process_caption`` options (``caption_options``), an example's own ``options`` over
        them (a dataset config's subset may give its own); ``empty_every``: every Nth epoch
        trains with empty captions (kohya's caption_dropout_every_n_epochs); ``cache``: a ``LatentCache`` that
        keeps the encodings on disk; ``color_aug``: kohya's hue shifts (``shift_hue``), drawn per image and step."""
        if crop not in ("center", "random"):
            raise SdtuneError(f"--crop {crop!r}: use center or random")
        # each image's training size: the run's, or its dataset's where a dataset config gives several
        sides = [ex.options.get("resolution", resolution) for ex in scan.examples]
        for side in sorted({resolution, *sides}):
            what = "--resolution" if side == resolution else "a dataset's resolution"
            if side % bucket_step:
                raise SdtuneError(f"{what} {side}: must be a multiple of {bucket_step} for this model")
            if buckets and (min_bucket_reso > side or (max_bucket_reso and max_bucket_reso < side)):
                raise SdtuneError(f"{what} {side}: outside --min-bucket-reso {min_bucket_reso} .. --max-bucket-reso "
                                  f"{max_bucket_reso}; widen them, or leave them out (half to twice each size)")
        self.scan, self.vae, self.seed, self.resolution = scan, vae, seed, resolution
        # each image's crop and colour shift (a dataset config's subset may give its own); random crops and colour
        # shifts change every step: where any image has one, the images are kept as pixels and encoded per batch,
        # and its draws made for every image (the same draws as a run where all have it)
        self.crops = [ex.options.get("crop", crop) for ex in scan.examples]
        self.color_augs = [bool(ex.options.get("color_aug", color_aug)) for ex in scan.examples]
        self.crop = "random" if "random" in self.crops else "center"
        self.color_aug = any(self.color_augs)
        self.per_step = self.crop == "random" or self.color_aug
        # each image's flip_aug (a dataset config's subset may give its own); mirrored copies are encoded where any
        # image flips, and its draws are made for every image then (the same draws as a run where all flip)
        self.flips = [bool(ex.options.get("flip", flip)) for ex in scan.examples]
        self.flip = flip = any(self.flips)
        self.caption_opts = dict(captions or {})
        # each example's: the run's, its own caption settings over them
        self.example_opts = [self.caption_opts | {option: ex.options[name] for option, name in CAPTION_SETTINGS.items()
                                                  if name in ex.options} for ex in scan.examples]
        self.empty_every = empty_every
        self.templates = templates
        # kohya's token warm-up: (steps, least tags, micro-batches a step), set by ``warm_tokens``
        self.token_warmup: tuple[int, int, int] | None = None
        sizes = {side: bucket_sizes(side, bucket_step, min_bucket_reso or None, max_bucket_reso or None) if buckets
                 else [(side, side)] for side in set(sides)}
        # each image's bucket, from its upright size (no decoding); then one bucket at a time, in chunks, so
        # only ``encode_batch`` decoded images are held at once
        # each image's upright size, kept for SDXL's time ids (what the image was before resizing and cropping)
        headers = [_header(ex.path) for ex in scan.examples]
        self.original_size = [wh for wh, _ in headers]
        # kohya's bucket_no_upscale: an image of less than the training area keeps its size (rounded down to the step)
        self.bucket_of = [_own_bucket(wh, bucket_step) if no_upscale and wh[0] * wh[1] <= side ** 2
                          else pick_bucket(*wh, sizes[side]) for wh, side in zip(self.original_size, sides)]
        self.resolutions = sorted(set(sides))  # (one: the run's; several: a dataset config's)
        _note_image_sizes(scan, self.original_size, self.bucket_of, [a for _, a in headers])
        members: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.bucket_of):
            members.setdefault(size, []).append(i)
        self.row_of = [0] * len(scan.examples)
        for ids in members.values():
            for row, i in enumerate(ids):
                self.row_of[i] = row
        self.sizes = sorted(members)
        # per bucket: latents [n, 2C, h, w] (and flipped) when cached, else cover-resized images (random crop)
        self.latents: dict[tuple[int, int], torch.Tensor] = {}
        self.flipped: dict[tuple[int, int], torch.Tensor] = {}
        self.pixels: dict[tuple[int, int], list[Image.Image]] = {}
        # with ``masked``: per bucket the loss masks on the latent grid [n, 1, h, w] (cached latents), or the
        # cover-resized mask images (random crop; None: no mask), cropped like their images every step
        self.masked = masked
        self.masks: dict[tuple[int, int], torch.Tensor] = {}
        self.mask_pixels: dict[tuple[int, int], list[Image.Image | None]] = {}
        bar = console.progress(len(scan.examples), "encoding images", "img", enabled=progress, leave=False)
        for size, ids in members.items():
            paths = [scan.examples[i].path for i in ids]
            if self.per_step:
                self.pixels[size] = [_cover_resize(open_rgb(path), size) for path in paths]
                if masked:
                    self.mask_pixels[size] = [None if m is None else _cover_resize(m, size)
                                              for m in (masks.open_mask(path, IMAGE_SUFFIXES) for path in paths)]
                bar.update(len(paths))
                continue
            plain, flipped, marks = [], [], []
            for k in range(0, len(paths), encode_batch):
                chunk = paths[k:k + encode_batch]
                found = [cache.get(path, size, flip) if cache is not None else None for path in chunk]
                todo = [i for i, entry in enumerate(found) if entry is None]
                if todo:  # the images not cached, encoded together
                    x = torch.stack([to_tensor(fit(open_rgb(chunk[i]), size)) for i in todo])
                    latents = encode(vae, x)
                    mirrored = encode(vae, x.flip(-1)) if flip else None
                    for j, i in enumerate(todo):
                        found[i] = (latents[j], mirrored[j] if flip else None)
                        if cache is not None:
                            cache.put(chunk[i], size, *found[i])
                plain.append(torch.stack([entry[0] for entry in found]))
                if flip:
                    flipped.append(torch.stack([entry[1] for entry in found]))
                if masked:
                    grid = tuple(plain[-1].shape[-2:])
                    marks.append(torch.stack([masks.to_latent(_fitted_mask(path, size), grid) for path in chunk]))
                bar.update(len(chunk))
            self.latents[size] = torch.cat(plain)
            if masked:
                self.masks[size] = torch.cat(marks)
            if flip:
                self.flipped[size] = torch.cat(flipped)
        bar.close()
        self.entries = [i for i, ex in enumerate(scan.examples) for _ in range(ex.repeats)]
        self.counts = {size: sum(1 for i in self.entries if self.bucket_of[i] == size) for size in self.sizes}
        self._plan_cache: tuple[int, int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def warm_tokens(self, steps: int, least: int, grad_accum: int) -> None:
        """kohya's token warm-up: over the first ``steps`` optimizer steps (of ``grad_accum`` batches each) the
        captions grow from ``least`` tags to all of them (``process_caption``'s ``warm``); 0 steps: none."""
        self.token_warmup = (steps, least, grad_accum) if steps else None

    @property
    def captions_vary(self) -> bool:
        """Whether a caption can differ from step to step (text-encoder outputs can't be cached then)."""
        if self.token_warmup is not None:
            return True
        for opts, texts in self._texts():
            if opts.get("wildcards") and any(has_wildcards(t) for t in texts):
                return True
            if opts.get("shuffle", False) or opts.get("tag_dropout", 0) > 0:
                return True
        return False

    def _texts(self) -> list[tuple[dict, set[str]]]:
        """The texts a batch draws from, each set with the caption options they are read with."""
        if self.templates is not None:  # (prompt templates: the run's options)
            return [(self.caption_opts, set(self.templates))]
        by_opts: dict[str, tuple[dict, set[str]]] = {}
        for ex, opts in zip(self.scan.examples, self.example_opts):
            by_opts.setdefault(repr(sorted(opts.items())), (opts, set()))[1].add(ex.caption or "")
        return list(by_opts.values())

    def possible_captions(self) -> list[str]:
        """Every caption a batch can hold (when they don't vary), for caching text-encoder outputs."""
        found = set()
        for opts, texts in self._texts():  # (they do not vary: no shuffling, tag dropout or wildcards)
            found |= {process_caption(t, random.Random(0), **(opts | dict(dropout=0.0))) for t in texts}
            if opts.get("dropout", 0) > 0:
                found.add("")
        if self.empty_every:
            found.add("")
        return sorted(found)

    def time_ids(self, i: int, flipped: bool = False, where: tuple[float, float] = (0.5, 0.5)) -> list[float]:
        """SDXL time ids of image ``i`` cropped at ``where`` (center crops: the middle), flipped or not."""
        size = self.bucket_of[i]
        if self.per_step:  # cut from the cover-resized image: the same box as from the original
            img = self.pixels[size][self.row_of[i]]
            box = cover_box(img.width, img.height, size, where)
        else:
            box = cover_box(*self.original_size[i], size, where)
        return time_ids(self.original_size[i], box, size, flipped)

    def batches_per_epoch(self, global_batch: int) -> int:
        return sum(math.ceil(n / global_batch) for n in self.counts.values())

    def plan(self, epoch: int, global_batch: int) -> list[list[int]]:
        """The epoch's global batches (example indices), each from one bucket and exactly ``global_batch`` long."""
        if self._plan_cache and self._plan_cache[:2] == (epoch, global_batch):
            return self._plan_cache[2]
        rng = random.Random(seed_for(self.seed, "epoch", epoch))
        batches = []
        for size in self.sizes:
            ids = [i for i in self.entries if self.bucket_of[i] == size]
            rng.shuffle(ids)
            n = math.ceil(len(ids) / global_batch) * global_batch
            ids = [ids[k % len(ids)] for k in range(n)]  # fill the last batch by wrapping around
            batches += [ids[k:k + global_batch] for k in range(0, n, global_batch)]
        rng.shuffle(batches)
        self._plan_cache = (epoch, global_batch, batches)
        return batches

    def batch(self, number: int, global_batch: int, rank: int = 0, world: int = 1) -> Batch:
        """Global batch ``number`` (counting from 0 over the whole run), this process's slice of it."""
        per_epoch = self.batches_per_epoch(global_batch)
        ids = self.plan(number // per_epoch, global_batch)[number % per_epoch]
        size = self.bucket_of[ids[0]]
        g = torch.Generator().manual_seed(seed_for(self.seed, "batch", number))
        rng = random.Random(seed_for(self.seed, "captions", number))
        drawn = (torch.rand(len(ids), generator=g) < 0.5).tolist() if self.flip else [False] * len(ids)
        flips = [f and self.flips[i] for f, i in zip(drawn, ids)]
        per = global_batch // world
        part = slice(rank * per, (rank + 1) * per)
        if self.per_step:  # only this process's images are encoded; the draws cover the global batch
            where = torch.rand(len(ids), 2, generator=g).tolist() if self.crop == "random" else [(0.5, 0.5)] * len(ids)
            where = [w if self.crops[i] == "random" else (0.5, 0.5) for w, i in zip(where, ids)]
            hues = (torch.rand(len(ids), generator=g) * 2 - 1).tolist() if self.color_aug else [0.0] * len(ids)
            hues = [h if self.color_augs[i] else 0.0 for h, i in zip(hues, ids)]
            conditions = [self.time_ids(i, f, tuple(w)) for i, f, w in list(zip(ids, flips, where))[part]]
            x = []
            for i, f, (fx, fy), hue in list(zip(ids, flips, where, hues))[part]:
                img = fit(self.pixels[size][self.row_of[i]], size, (fx, fy))
                img = shift_hue(img, hue * COLOR_AUG_TURN) if hue else img
                x.append(to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else img))
            mean, std = encode(self.vae, torch.stack(x)).chunk(2, 1)
            eps = torch.randn((len(ids), *mean.shape[1:]), generator=g)[part]
            mask = None
            if self.masked:
                grid = tuple(mean.shape[-2:])
                mask = torch.stack([masks.to_latent(_crop_mask(self.mask_pixels[size][self.row_of[i]], size, (fx, fy),
                                                               f), grid)
                                    for i, f, (fx, fy) in list(zip(ids, flips, where))[part]])
        else:
            conditions = [self.time_ids(i, f) for i, f in list(zip(ids, flips))[part]]
            stats = torch.stack([(self.flipped if f else self.latents)[size][self.row_of[i]]
                                 for i, f in list(zip(ids, flips))[part]])
            mean, std = stats.chunk(2, 1)
            eps = torch.randn((len(ids), *mean.shape[1:]), generator=g)[part]
            mask = None
            if self.masked:
                mask = torch.stack([self.masks[size][self.row_of[i]].flip(-1) if f else self.masks[size][self.row_of[i]]
                                    for i, f in list(zip(ids, flips))[part]])
        latents = mean + std * eps
        captions = []
        empty = bool(self.empty_every) and (number // per_epoch + 1) % self.empty_every == 0  # kohya counts from 1
        warm = None
        if self.token_warmup is not None:  # (the optimizer steps done before this batch's, as kohya counts them)
            steps, least, grad_accum = self.token_warmup
            warm = (number // grad_accum, least, steps)
        for i in ids:
            text = rng.choice(self.templates) if self.templates is not None else (self.scan.examples[i].caption or "")
            opts = self.caption_opts if self.templates is not None else self.example_opts[i]
            captions.append("" if empty else process_caption(text, rng, **opts, warm=warm))
        return Batch(latents, captions[part], size, torch.tensor(conditions, dtype=torch.float32), mask)


def _fitted_mask(path: Path, size: tuple[int, int]) -> Image.Image | None:
    """The image's mask resized and center-cropped as ``fit`` does the image; None: it has none."""
    mask = masks.open_mask(path, IMAGE_SUFFIXES)
    return None if mask is None else fit(mask, size)


def _crop_mask(mask: Image.Image | None, size: tuple[int, int], where: tuple[float, float], flipped: bool):
    """A random crop's mask: cut where its image was cut, flipped with it."""
    if mask is None:
        return None
    mask = fit(mask, size, where)
    return mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else mask


def _cover_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` resized to just cover ``size`` (random crops are cut from it per step)."""
    scale = max(size[0] / img.width, size[1] / img.height)
    return fit(img, (max(size[0], round(img.width * scale)), max(size[1], round(img.height * scale))))


# ---------------------------------------------------------------- from settings

def vae_scale(base) -> int:
    """Pixels per latent pixel along each side (8 for SD's VAE)."""
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


def model_steps(base) -> tuple[int, int]:
    """(native resolution, size granularity): images must be multiples of VAE x UNet downsampling."""
    return config_steps(base.unet.config, base.vae.config)


def config_steps(unet_config, vae_config) -> tuple[int, int]:
    """``model_steps`` from the UNet's and the VAE's configs (a family's shipped ones, before a model loads)."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(unet_config["block_out_channels"]) - 1)
    return int(unet_config["sample_size"]) * vae_factor, vae_factor * unet_factor


BATCH_REPEATS = 16  # the most times a batch may hold each training image over (see training_set)


def bucket_options(base, settings) -> dict:
    """The training size and the ``TrainingSet`` bucket arguments of a run's settings (the training set's and the
    validation images', which must fall in the same buckets), checked against the model."""
    native, step = model_steps(base)
    size = settings.resolution or native
    if settings.bucket_step and size % settings.bucket_step:  # said by its own flag
        raise SdtuneError(f"--bucket-step {settings.bucket_step}: the training size {size} must be a multiple of it; "
                          f"use a divisor of it such as {step}")
    step = settings.bucket_step or step
    sides = dict(min_bucket_reso=settings.min_bucket_reso, max_bucket_reso=settings.max_bucket_reso)
    if settings.bucket_no_upscale and not settings.buckets:
        raise SdtuneError("--bucket-no-upscale: keeps small images at their own size in buckets, and buckets are off; "
                          "add --buckets")
    for name, side in sides.items():
        if side and not settings.buckets:
            raise SdtuneError(f"--{name.replace('_', '-')} {side}: sets the buckets' sides, and buckets are off; "
                              f"add --buckets")
        if side % step or (side and (side > size if name.startswith("min") else side < size)):
            raise SdtuneError(f"--{name.replace('_', '-')} {side}: must be a multiple of {step} (the bucket step) "
                              f"and {'at most' if name.startswith('min') else 'at least'} the training size {size}")
    return dict(resolution=size, bucket_step=step, buckets=settings.buckets, **sides,
                no_upscale=settings.bucket_no_upscale)


def latent_cache(base, settings) -> LatentCache | None:
    """--cache-latents-to-disk: the run's cache of encodings, in its data folder (None without the option)."""
    return LatentCache.at(settings.data, base.vae) if getattr(settings, "cache_latents_to_disk", False) else None


def training_set(base, settings, scan: Scan, templates: list[str] | None, seed: int | None = None) -> TrainingSet:
    """The images of ``scan`` ready to train on, with the settings' size, crops, flips, captions and masks
    (``seed``: the batches' seed when not the run's, e.g. the class images' of prior preservation)."""
    sizing = bucket_options(base, settings)
    masked = getattr(settings, "masked_loss", False)
    images = sum(ex.repeats for ex in scan.examples)
    # A batch past the images repeats them (a preset's batch of 8 on 4 images is fine); far past them, it takes the
    # memory of many images for the use of a few, and a typo (100000) was killed by the system with no word
    if settings.batch_size > BATCH_REPEATS * images and seed is None:
        raise SdtuneError(f"--batch-size {settings.batch_size}: far more than the {images} training image(s) of "
                          f"{settings.data}" + (" (with their repeats)" if images > len(scan.examples) else "")
                          + f", which each batch would repeat; use at most {images}")
    if masked and seed is None:
        files, alpha = masks.count([ex.path for ex in scan.examples], IMAGE_SUFFIXES)
        if not files and not alpha:
            note(f"{settings.data}: no image has a NAME.mask.png or transparency, so --masked-loss has nothing to "
                 f"mask: the whole of each image is learned")
    if not masked:
        files, alpha = masks.count([ex.path for ex in scan.examples], IMAGE_SUFFIXES)
        if files or alpha:
            found = " and ".join(f"{n} {what}" for n, what in ((files, "with a NAME.mask file"),
                                                              (alpha, "with transparency")) if n)
            folder = os.path.commonpath([str(ex.path.parent) for ex in scan.examples])
            note(f"{folder}: {found} of {len(scan.examples)} images; --masked-loss would train only where "
                 f"their masks are white (now the whole image is learned, transparency on white)")
    _note_long_captions(base.tokenizer, scan, settings.max_token_length // 75)
    return TrainingSet(scan, base.vae, seed=seed if seed is not None else settings.seed, **sizing, crop=settings.crop,
                       cache=latent_cache(base, settings),
                       flip=settings.flip, color_aug=settings.color_aug, captions=caption_options(settings),
                       empty_every=settings.caption_dropout_every_epochs, templates=templates,
                       progress=settings.progress, masked=masked)


def _note_long_captions(tokenizer, scan: Scan, chunks: int = 1) -> None:
    """Training reads a caption's first 75 tokens (the text encoder's window, as kohya's default), or 75 x
    ``chunks`` (--max-token-length): say so for the captions it cuts, which samples and the report still draw
    whole, in A1111's 75-token chunks."""
    window = (tokenizer.model_max_length - 2) * chunks  # less each chunk's start and end tokens
    # (verbose=False: transformers logs every over-long text otherwise)
    long = [ex for ex in scan.examples if ex.caption and any(  # (--wildcards: each line is a caption)
        len(tokenizer(line, verbose=False).input_ids) - 2 > window for line in ex.caption.splitlines())]
    if long:
        longer = [str(n) for n in TOKEN_LENGTHS if n > window]
        more = f", or --max-token-length {' or '.join(longer)}" if longer else ""
        note(f"{long[0].path}" + (f" and {len(long) - 1} more" if len(long) > 1 else "") + f": caption longer than "
             f"the {window} tokens training reads; the rest is not learned (shorten it, or put what matters first"
             f"{more})")


def report_skipped(scan: Scan) -> None:
    for line in scan.unused:
        note(line)
    if scan.skipped:
        print(f"sdtune: warning: skipped {len(scan.skipped)} unreadable image(s):", file=sys.stderr)
        for path, why in scan.skipped:
            print(f"  {path}: {why}", file=sys.stderr)
