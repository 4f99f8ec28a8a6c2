"""Prior preservation (DreamBooth): train on class images beside your own, so the class keeps its look.

    loss = loss(your images) + prior_loss_weight · loss(class images)

Every step draws a batch of each (``loop.Session.prior_inputs``). The class images come from ``--reg-dir``
(a folder captioned like ``--data``, or a kohya dataset config's is_reg subsets; images without a caption take
``--class-prompt``), or are made by the base model itself: ``--class-prompt "a photo of a dog"
--num-class-images N`` draws the missing ones of N into ``--reg-dir`` (default ``OUT/class_images``) with the
sampling settings, each with the prompt as its caption. They are drawn once: a second run, or a resumed one, finds them there and draws none (only the
ones still missing when N grows). Image ``i`` is drawn with seed ``seed + i``, so a deleted file comes back
the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..generate import generate, save_png
from ..safeio import SdtuneError, atomic_write_text
from .config import LoraSettings
from .data import TrainingSet, model_steps, seed_for, training_set
from .images import IMAGE_SUFFIXES
from .kohya_dataset import is_dataset_file
from .masks import is_mask_file
from .scan import Scan, scan_data, shared_images

CLASS_DIR = "class_images"
CLASS_NAME = "class-{:05d}"
GENERATE_BATCH = 8


def class_folder(settings: LoraSettings) -> Path:
    return Path(settings.reg_dir) if settings.reg_dir else Path(settings.out) / CLASS_DIR


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not is_mask_file(p) and not p.name.startswith("."))


def make_class_images(base, settings: LoraSettings) -> list[Path]:
    """Draw the class images ``--class-prompt`` still lacks (up to ``--num-class-images``); returns the new
    files. Call before anything is trained into ``base``: they show what the base model draws."""
    folder = class_folder(settings)
    have = _images_in(folder)
    missing = settings.num_class_images - len(have)
    if missing <= 0:
        print(f"prior preservation: {len(have)} class images in {folder} (none drawn)", file=sys.stderr)
        return []
    native, _ = model_steps(base)
    size = settings.resolution or native
    taken = {p.stem for p in have}
    free = (i for i in range(10**6) if CLASS_NAME.format(i) not in taken)
    numbers = [next(free) for _ in range(missing)]
    print(f"prior preservation: drawing {missing} class images of {settings.class_prompt!r} into {folder} "
          f"(once; later runs reuse them)", file=sys.stderr)
    made = []
    runs: list[list[int]] = []  # consecutive numbers, drawn in one call (image i of a call: seed + first + i)
    for number in numbers:
        if runs and runs[-1][-1] == number - 1 and len(runs[-1]) < GENERATE_BATCH:
            runs[-1].append(number)
        else:
            runs.append([number])
    for run in runs:
        results = generate(base, settings.class_prompt, steps=settings.sample_steps, guidance=settings.sample_guidance,
                           seed=settings.seed + run[0], clip_skip=settings.clip_skip, width=size, height=size,
                           num_images=len(run),
                           batch_size=len(run), progress=False)
        for number, result in zip(run, results):
            path = folder / f"{CLASS_NAME.format(number)}.png"
            atomic_write_text(settings.class_prompt + "\n", path.with_suffix(".txt"))
            save_png(result.image, path, result.infotext)  # the image last: it is what counts as done
            made.append(path)
    return made


def prior_set(base, settings: LoraSettings, training: Scan) -> TrainingSet | None:
    """The class images as a training set (None without prior preservation), once ``make_class_images`` has
    drawn them for a --class-prompt; none of them one of the ``training`` images."""
    if not settings.prior:
        return None
    folder = class_folder(settings)
    if not folder.is_dir() and not is_dataset_file(folder):
        raise SdtuneError(f"{folder}: --reg-dir is not a folder; point it at class images, or give --class-prompt "
                          f"to draw them")
    # (a kohya dataset config's class images are its is_reg subsets)
    scan = scan_data(folder, default_caption=settings.class_prompt or None, require_captions=True,
                     option="--reg-dir", reg=True)
    shared = shared_images(scan, training)
    if shared:  # the class loss would pull the run back towards the very images it learns
        raise SdtuneError(f"--reg-dir {settings.reg_dir}: {len(shared)} of its {len(scan.examples)} image(s) are "
                          f"training images too ({shared[0]}); class images show what the model draws of the class, "
                          f"apart from --data: give another folder, or --class-prompt to draw them")
    return training_set(base, settings, scan, templates=None, seed=seed_for(settings.seed, "prior"))
