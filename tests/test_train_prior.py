"""Prior preservation: class images drawn once by the base and reused; loss = instance + weight x prior."""

import io

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from test_train_masked import FixedPrediction  # the same stand-in UNet

from sdtune.safeio import SdtuneError
from sdtune.tiny import world
from sdtune.train.config import LoraSettings
from sdtune.train.diffusion import Loss
from sdtune.train.lora import train_lora
from sdtune.train.objective import Objective
from sdtune.train.prior import make_class_images, prior_set
from sdtune.train.scan import Scan, scan_data

CLASS = "a photo of a shape"


def _pixels(source) -> np.ndarray:
    with Image.open(source) as img:
        return np.asarray(img.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    world.write_dataset(folder, world.concept_scenes(2, seed=3, style="outline"), template=None, with_style=False)
    return folder


def settings(data, out, **kw):
    return LoraSettings(**{**dict(data=str(data), out=str(out), steps=1, batch_size=2, rank=2, lr=1e-3,
                                  sample_steps=2, progress=False, report=False), **kw})


def test_class_images_are_drawn_once_and_reused(base, dataset, tmp_path):
    s = settings(dataset, tmp_path / "run", class_prompt=CLASS, num_class_images=3)
    made = make_class_images(base, s)
    folder = tmp_path / "run" / "class_images"
    assert [p.name for p in made] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([p.name for p in made] +
                                                             [p.with_suffix(".txt").name for p in made])
    assert all(p.with_suffix(".txt").read_text().strip() == CLASS for p in made)
    first = {p.name: p.read_bytes() for p in made}
    assert make_class_images(base, s) == []  # a second run draws none
    assert {p.name: p.read_bytes() for p in made} == first
    # more wanted: only the missing ones are drawn; a deleted one comes back the same (image i: seed + i)
    (folder / "class-00001.png").unlink()
    again = make_class_images(base, settings(dataset, tmp_path / "run", class_prompt=CLASS, num_class_images=4))
    assert [p.name for p in again] == ["class-00001.png", "class-00003.png"]
    redrawn, before = _pixels(folder / "class-00001.png"), _pixels(io.BytesIO(first["class-00001.png"]))
    assert np.abs(redrawn - before).max() <= 2  # drawn in a batch of 1 instead of 3: the same up to rounding
    assert np.abs(redrawn - _pixels(folder / "class-00000.png")).max() > 20  # and not just any class image
    # the training set of them: four images captioned with the class prompt
    trained = scan_data(dataset)
    prior = prior_set(base, settings(dataset, tmp_path / "run", class_prompt=CLASS, num_class_images=4), trained)
    assert len(prior) == 4 and prior.possible_captions() == [CLASS]
    # the training images as class images: refused (the class loss would pull towards what the run learns)
    with pytest.raises(SdtuneError, match=rf"^--reg-dir {dataset}: \d+ of its \d+ image\(s\) are training images too "
                                          rf"\(.*\); class images show what the model draws of the class, apart from "
                                          rf"--data: give another folder, or --class-prompt to draw them$"):
        prior_set(base, settings(dataset, tmp_path / "run", reg_dir=str(dataset)), trained)
    # --reg-dir names the cache folder
    reg = tmp_path / "reg"
    make_class_images(base, settings(dataset, tmp_path / "other", class_prompt=CLASS, num_class_images=1,
                                     reg_dir=str(reg)))
    assert sorted(p.name for p in reg.iterdir()) == ["class-00000.png", "class-00000.txt"]
    assert not (tmp_path / "other").exists()


def test_the_objective_adds_the_weighted_prior_loss():
    objective = Objective(FixedPrediction((2, 4, 8, 8)), None, DDPMScheduler(num_train_timesteps=1000),
                          Loss(min_snr_gamma=5.0))
    g = torch.Generator().manual_seed(1)

    def inputs():
        return dict(latents=torch.randn(2, 4, 8, 8, generator=g), noise=torch.randn(2, 4, 8, 8, generator=g),
                    timesteps=torch.tensor([30, 700]), context=torch.zeros(2, 3, 5))

    mine, prior = inputs(), inputs()
    alone, prior_alone = objective(**mine), objective(**prior)
    assert not torch.isclose(alone, prior_alone)
    for w in (0.0, 0.5, 2.0):
        assert torch.equal(objective(**mine, prior=prior, prior_weight=w), alone + w * prior_alone)


def test_a_training_step_adds_the_class_images_loss_times_its_weight(base, dataset, tmp_path):
    reg = tmp_path / "reg"
    world.write_dataset(reg, world.concept_scenes(3, seed=5), template=None, with_style=False)
    first = {}
    for w in (0.0, 1.0, 2.5):
        losses = []
        train_lora(base, settings(dataset, tmp_path / f"w{w}", reg_dir=str(reg), prior_loss_weight=w),
                   callback=lambda step, loss: losses.append(loss))
        first[w] = losses[0]
    plain = []
    train_lora(base, settings(dataset, tmp_path / "plain"), callback=lambda step, loss: plain.append(loss))
    # the first step's loss, before any update: instance + w x prior, the draws the same for every w
    prior_loss = first[1.0] - first[0.0]
    assert prior_loss > 0
    assert first[2.5] == pytest.approx(first[0.0] + 2.5 * prior_loss, rel=1e-5)
    assert first[0.0] == pytest.approx(plain[0], rel=1e-5)  # weight 0: the plain run's loss


def test_prior_settings_are_checked(tmp_path):
    with pytest.raises(SdtuneError, match="--num-class-images 0"):
        settings("d", "o", class_prompt=CLASS, num_class_images=0).check()
    with pytest.raises(SdtuneError, match="--prior-loss-weight -1"):
        settings("d", "o", reg_dir="r", prior_loss_weight=-1).check()
    with pytest.raises(SdtuneError, match="--reg-dir is not a folder"):
        prior_set(None, settings("d", "o", reg_dir=str(tmp_path / "nothing")), Scan([]))
    with pytest.raises(SdtuneError, match="nothing: no such class-image folder; check --reg-dir"):  # before the model
        settings("d", "o", reg_dir=str(tmp_path / "nothing")).check()
