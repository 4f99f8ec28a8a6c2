"""A small LoRA run on the random-init model and its kill-and-resume check, shared by the tests of training options
(optimizers, the objective's options, kohya's LoRA options)."""

from pathlib import Path

import pytest
import torch

from sdtune.lora.formats import load_lora
from sdtune.tiny import world
from sdtune.train.config import LoraSettings
from sdtune.train.lora import train_lora


def outline_dataset(folder: Path) -> Path:
    """Four captioned renders in the outline style."""
    scenes = world.concept_scenes(4, seed=3, style="outline")
    return world.write_dataset(folder, scenes, template=None, with_style=False)


def settings(dataset, out, **kw) -> LoraSettings:
    """4 steps of 2 images at rank 4, a save every 2 steps, no samples or report."""
    defaults = dict(data=str(dataset), out=str(out), steps=4, batch_size=2, rank=4, alpha=4, lr=2e-3,
                    save_every=2, sample_every=0, report=False, progress=False)
    return LoraSettings(**{**defaults, **kw})


class Stop(Exception):
    pass


def stop_at(at: int):
    """A training callback that stops the run (as a kill would, past the last save) when step ``at`` is done."""
    def callback(step, loss):
        if step == at:
            raise Stop()
    return callback


def factors(path) -> dict:
    """Each layer's tensors of a LoRA file, by "COMPONENT.PATH", in the roles' order (a LoRA's: down, up)."""
    return {f"{comp}.{p}": tuple(a.tensors[role] for role in sorted(a.tensors)) for comp, p, a in load_lora(path).items()}


def resumes_exactly(base, dataset, folder: Path, **kw) -> Path:
    """Train ``kw``'s run whole, and again stopped after step 3 (saved at 2) then resumed: the two LoRAs must be
    equal bit for bit. Returns the whole run's file."""
    whole = train_lora(base, settings(dataset, folder / "whole", **kw))
    with pytest.raises(Stop):
        train_lora(base, settings(dataset, folder / "cut", **kw), callback=stop_at(3))
    resumed = train_lora(base, settings(dataset, folder / "cut", **kw))
    a, b = factors(whole), factors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    return whole

