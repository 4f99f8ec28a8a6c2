"""kohya sd-scripts' dataset config (the ``.toml`` or ``.json`` its ``--dataset_config`` reads): image folders
("subsets"), each with its repeats and its ``class_tokens``, and the caption and bucket options of the images.

    [general]                      # options of every subset
    shuffle_caption = true
    [[datasets]]                   # resolution, batch size, buckets (and the general options, overridden)
    resolution = 512
      [[datasets.subsets]]
      image_dir = "/data/cat"      # read as a "10_cat" folder of --data: repeats, and the caption of an image
      num_repeats = 10             # without a caption file
      class_tokens = "sks cat"
      [[datasets.subsets]]
      image_dir = "/data/cats"     # is_reg: class images for prior preservation (as --reg-dir)
      is_reg = true
      class_tokens = "cat"

A subset with a ``metadata_file`` (sd-scripts' fine-tuning subset, written by its finetune/ scripts) trains the
images its JSON names, with the captions and tags it gives them, not the folder's caption files or other images.

A subset's caption options (after [general] and its dataset's) are its own where they differ from another
subset's (``VARYING``: shuffling, kept tags, separators, prefix and suffix, dropouts, flips, random crops and
colour shifts), as in sd-scripts: each image trains with its subset's (``scan.Example.options``), and a subset
that gives none takes the run's (its training config's or a flag's: sd-scripts falls back to its command line);
so is its dataset's resolution (several resolutions in one run: each image bucketed at its own). Its other
options (buckets, crops, batch size...) must agree with every other training subset's: a file that gives two
values is refused in one line. The class images (``is_reg``) take the training images' other options; where theirs
differ, that is said. This module reads the file's structure; ``kohya_config.dataset_settings`` reads its options
as sdtune's settings, and ``scan.scan_data`` its folders. A relative ``image_dir`` is found from the current
folder, as sd-scripts finds it, else from the file's.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..safeio import SdtuneError
from .captions import CAPTION_SUFFIXES

SUFFIXES = (".toml", ".json")
# what makes a subset, not how its images train
STRUCTURE = {"image_dir", "num_repeats", "class_tokens", "is_reg", "metadata_file"}
# what sdtune reads otherwise: masks (or ControlNet's images) in another folder
REFUSED = {"conditioning_data_dir": "the subset's masks (--masked_loss) in another folder; sdtune reads an image's "
                                    "mask beside it, as NAME.mask.png (or its transparency): put the masks there"}


# sd-scripts' dataset settings: in [general] or a [[datasets]] table, never in a subset
DATASET_ONLY = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "bucket_no_upscale", "network_multiplier"}
# the options a subset may give its own images, its caption options, its augmentations and its dataset's
# resolution (kohya's name -> sdtune's setting)
VARYING = {"shuffle_caption": "shuffle_captions", "keep_tokens": "keep_tokens",
           "keep_tokens_separator": "keep_tokens_separator", "secondary_separator": "secondary_separator",
           "caption_prefix": "caption_prefix", "caption_suffix": "caption_suffix",
           "caption_dropout_rate": "caption_dropout", "caption_tag_dropout_rate": "caption_tag_dropout",
           "resolution": "resolution", "flip_aug": "flip", "random_crop": "crop", "color_aug": "color_aug"}
# (sd-scripts' switch as sdtune's choice)
VARYING_VALUES = {"random_crop": lambda on: "random" if on else "center"}


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    repeats: int
    class_tokens: str | None  # the caption of an image without a caption file
    is_reg: bool
    options: dict  # kohya's caption and bucket options for its images, [general] and its dataset's included
    # a fine-tuning subset's (sd-scripts' metadata_file, which its finetune/ scripts write): {image key: caption or
    # None} of the images it trains (``data`` finds them, in image_dir or by path), and the file
    captions: dict[str, str | None] | None = None
    metadata: Path | None = None


@dataclass
class Dataset:
    path: Path
    subsets: list[Subset]
    options: dict  # the training subsets' options (one value each), less those ``varying``
    notes: list[str] = field(default_factory=list)
    varying: list[str] = field(default_factory=list)  # the VARYING options that differ between subsets

    def images(self, reg: bool) -> list[Subset]:
        return [s for s in self.subsets if s.is_reg == reg]

    def own_options(self, subset: Subset) -> dict:
        """The settings (sdtune's names) the images of ``subset`` train with instead of the run's: its values of
        the options that vary between subsets (one it does not give: the run's, as sd-scripts falls back to its
        command line)."""
        return {VARYING[k]: VARYING_VALUES.get(k, lambda v: v)(subset.options[k]) for k in self.varying
                if k in subset.options}

    def every_own(self, key: str) -> bool:
        """Whether every subset gives ``key`` (a ``VARYING`` option) its own value: the run's is then unused."""
        return key in self.varying and all(key in s.options for s in self.subsets)


def is_dataset(table: dict) -> bool:
    return isinstance(table.get("datasets"), list)


def is_dataset_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES and Path(path).is_file()


def holds_datasets(path: str | Path) -> bool:
    """Whether the file at ``path`` is a dataset config (read, whatever its name)."""
    try:
        return is_dataset(_table(Path(path)))
    except (SdtuneError, OSError):
        return False


def _table(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")
        return json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as e:  # (tomllib's and json's errors are ValueErrors)
        raise SdtuneError(f"{path}: not a readable dataset config ({e}); fix the file") from None
    except OSError as e:
        raise SdtuneError(f"{path}: cannot be read ({e.strerror or e}); check the file") from None


def read(path: str | Path) -> Dataset:
    """The dataset config at ``path``, checked: every subset an existing folder, one set of options."""
    path = Path(path)
    table = _table(path)
    if not is_dataset(table):
        raise SdtuneError(f"{path}: not a kohya dataset config (it has no [[datasets]]); give a folder of images, "
                          f"or a file with [[datasets.subsets]] image_dir = ...")
    general = table.get("general", {})
    shape = f"{path}: a dataset config holds a [general] table and [[datasets]] tables, each with [[datasets.subsets]]"
    if not isinstance(general, dict) or not all(isinstance(d, dict) for d in table["datasets"]):
        raise SdtuneError(f"{shape}; fix its layout")
    subsets = []
    for dataset in table["datasets"]:
        shared = general | {k: v for k, v in dataset.items() if k != "subsets"}
        entries = dataset.get("subsets", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SdtuneError(f"{shape}; fix its layout")
        for entry in entries:
            up = sorted(DATASET_ONLY & entry.keys())
            if up:  # sd-scripts' schema refuses them there; taken, one would change its whole dataset unsaid
                raise SdtuneError(f"{path}: {', '.join(up)} in the subset of {entry.get('image_dir')!r}: a dataset's "
                                  f"setting in sd-scripts, which refuses it in a subset; move it to its [[datasets]] "
                                  f"table (or [general])")
            subsets.append(_subset(path, shared | entry))
    if not subsets:
        raise SdtuneError(f"{path}: no [[datasets.subsets]]; give each image folder as one, with image_dir = ...")
    train = [s for s in subsets if not s.is_reg]
    if not train:
        raise SdtuneError(f"{path}: every subset is is_reg (class images); give the training images' folder as a "
                          f"subset without is_reg")
    # (a subset's value of a caption option that another gives otherwise, or does not give: its own, the class
    # images' too; where every subset gives the same, it is the run's)
    varying = sorted(k for k in VARYING if len({repr(s.options[k]) if k in s.options else None for s in subsets}) > 1)
    if "resolution" in varying:  # several: each subset's own, so each must say its own
        vague = next((s for s in subsets if "resolution" not in s.options), None)
        if vague is not None:
            raise SdtuneError(f"{path}: its datasets train at several resolutions and {vague.image_dir} gives none; "
                              f"give each [[datasets]] its resolution")
    options = {k: v for k, v in train[0].options.items() if k not in varying}
    for s in train[1:]:
        for key in sorted((options.keys() | s.options.keys()) - set(varying)):
            if options.get(key) != s.options.get(key):
                raise SdtuneError(f"{path}: {key} is {options.get(key)!r} for {train[0].image_dir} and "
                                  f"{s.options.get(key)!r} for {s.image_dir}; sdtune trains every image with one "
                                  f"{key}: give it once, in [general]")
    notes = []
    for s in subsets:
        if s.is_reg:
            differ = sorted(k for k in s.options.keys() - set(varying) if options.get(k) != s.options[k])
            if differ:
                notes.append(f"{path}: the class images of {s.image_dir} train with the training images' "
                             f"options, not their own {', '.join(differ)}")
    return Dataset(path, subsets, options, notes, varying)


def square_side(value, where) -> int:
    """kohya's resolution, "W,H" or [W, H] (or one number), as a square side; another shape is refused (sdtune's
    buckets keep the area of the square)."""
    given = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)  # a dataset config's [W, H]
    try:
        sides = [int(v) for v in re.split(r"[,x ]+", given.strip()) if v]
    except ValueError:
        sides = []
    if not sides or len(sides) > 2:
        raise SdtuneError(f"{where}: resolution = {value!r}: give a size in pixels, e.g. resolution = 512")
    if len(sides) == 2 and sides[0] != sides[1]:
        side = math.isqrt(sides[0] * sides[1])
        raise SdtuneError(f"{where}: resolution = {value!r}: sdtune trains at a square size whose area its buckets "
                          f"keep; give resolution = {side - side % 64} (or the side you want)")
    return sides[0]


def _subset(path: Path, entry: dict) -> Subset:
    for key, why in REFUSED.items():
        if entry.get(key):
            raise SdtuneError(f"{path}: {key} = {entry[key]!r}: {why}")
    metadata, captions = _metadata(path, str(entry["metadata_file"])) if entry.get("metadata_file") else (None, None)
    if metadata is not None and entry.get("is_reg"):
        raise SdtuneError(f"{path}: metadata_file {str(metadata)!r} with is_reg: a fine-tuning subset holds training "
                          f"images (as in sd-scripts); give the class images as a subset of their own")
    if metadata is not None and not entry.get("image_dir"):  # its keys are the images' paths
        entry["image_dir"] = str(metadata.parent)
    if not entry.get("image_dir"):
        raise SdtuneError(f"{path}: a subset without image_dir; give each subset its folder of images")
    extension = entry.pop("caption_extension", ".txt")  # each subset's own: sdtune reads .txt, else .caption
    if extension not in CAPTION_SUFFIXES:
        raise SdtuneError(f"{path}: caption_extension = {extension!r} for {entry['image_dir']}: sdtune reads captions "
                          f"from .txt and .caption files beside the images; rename the captions")
    if "resolution" in entry:  # (one spelling, to compare)
        entry["resolution"] = square_side(entry["resolution"], path)
    repeats = entry.get("num_repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise SdtuneError(f"{path}: num_repeats = {repeats!r} for {entry['image_dir']}: must be a whole number, "
                          f"1 or more")
    return Subset(_folder(path, str(entry["image_dir"])), repeats, entry.get("class_tokens") or None,
                  bool(entry.get("is_reg", False)), {k: v for k, v in entry.items() if k not in STRUCTURE},
                  captions, metadata)


def _metadata(path: Path, given: str) -> tuple[Path, dict[str, str | None]]:
    """(the file, {image key: caption}) of a fine-tuning subset's metadata_file: sd-scripts' JSON object of image keys,
    each with its "caption" and "tags" (the tags follow the caption after a comma, as sd-scripts joins them; one
    without a caption is its tags; neither: None). Found as an image_dir is found."""
    file = Path(given).expanduser()
    if not file.is_absolute() and not file.is_file() and (path.parent / file).is_file():
        file = path.parent / file
    if not file.is_file():
        raise SdtuneError(f"{path}: metadata_file {given!r} is not a file; give the path of the subset's metadata "
                          f"JSON")
    try:
        table = json.loads(file.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SdtuneError(f"{file}: not a readable metadata file ({e}); fix the file") from None
    except OSError as e:
        raise SdtuneError(f"{file}: cannot be read ({e.strerror or e}); check the file") from None
    if not isinstance(table, dict) or not all(isinstance(row, dict) for row in table.values()):
        raise SdtuneError(f"{file}: not sd-scripts' fine-tuning metadata (an object of image keys, each an object "
                          f"with its caption and tags); fix the file")
    captions = {}
    for key, row in table.items():
        caption, tags = row.get("caption"), row.get("tags")
        if caption is None:
            caption, tags = tags, None
        if caption is not None and tags:  # (tags are one line: a caption's every line gets them, for --wildcards)
            tags = ", ".join(str(t).strip() for t in (tags if isinstance(tags, list) else str(tags).splitlines())
                             if str(t).strip())
            caption = "\n".join(f"{line}, {tags}" for line in str(caption).splitlines() if line.strip()) or tags
        captions[str(key)] = None if caption is None else str(caption)
    return file.resolve(), captions


def _folder(path: Path, given: str) -> Path:
    folder = Path(given).expanduser()
    if not folder.is_absolute() and not folder.is_dir() and (path.parent / folder).is_dir():
        folder = path.parent / folder
    if not folder.is_dir():
        raise SdtuneError(f"{path}: image_dir {given!r} is not a folder; give the folder of the subset's images")
    return folder.resolve()
