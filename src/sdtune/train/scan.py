"""The training folder: its images with their captions and repeats (``scan_data``), and the validation split.

Layout (kohya-compatible): images with a same-name ``.txt`` (or ``.caption``) file beside them, or listed in a
``metadata.jsonl``/``metadata.csv`` (Hugging Face's imagefolder layout, which diffusers' scripts read: ``file_name``
and a ``text``/``caption``/``prompt`` column); a subfolder named ``N_name`` repeats its images N times per epoch,
and ``name`` is the caption of its images that have no caption file. A kohya dataset config given as the data
names such folders itself (``kohya_dataset``: each subset's folder, repeats and class tokens). Unreadable images
are skipped and listed (``report_skipped``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..console import note
from ..safeio import SdtuneError
from . import kohya_dataset, masks
from .captions import CAPTION_SUFFIXES
from .images import IMAGE_SUFFIXES, check_image

REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


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


def shared_images(some: Scan, others: Scan) -> list[Path]:
    """The images of ``some`` that ``others`` holds too (the same files, wherever each was found from)."""
    theirs = {e.path.resolve() for e in others.examples}
    return [e.path for e in some.examples if e.path.resolve() in theirs]


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
    others = [name for name in sorted(names) if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")
              and not masks.is_mask_file(Path(name)) and (source.folder / name).resolve() not in captions]
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


def report_skipped(scan: Scan) -> None:
    """Say what the scan left aside: caption files not used as they stand, and the unreadable images."""
    for line in scan.unused:
        note(line)
    if scan.skipped:
        print(f"sdtune: warning: skipped {len(scan.skipped)} unreadable image(s):", file=sys.stderr)
        for path, why in scan.skipped:
            print(f"  {path}: {why}", file=sys.stderr)
