"""Masked loss: a mask per image (alpha channel or NAME.mask.png) weights the loss per latent pixel; what is
masked to 0 adds nothing to the loss or its gradient."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from torch import nn

from sdtune.console import SdtuneWarning
from sdtune.lora.formats import load_lora
from sdtune.train.config import LoraSettings
from sdtune.train.data import seed_for, training_set
from sdtune.train.lora import train_lora
from sdtune.train.objective import Objective
from sdtune.train.scan import scan_folder


class FixedPrediction(nn.Module):
    """A stand-in UNet whose prediction is a parameter: the loss's gradient per pixel is read off it."""

    def __init__(self, shape):
        super().__init__()
        self.pred = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, noisy, timesteps, context):
        return SimpleNamespace(sample=self.pred + 0 * noisy)


def test_a_region_masked_to_zero_adds_nothing_to_the_loss_or_its_gradient():
    shape = (2, 4, 8, 8)
    unet = FixedPrediction(shape)
    objective = Objective(unet, None, DDPMScheduler(num_train_timesteps=1000))
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t, context = torch.tensor([10, 900]), torch.zeros(2, 3, 5)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :3] = 0.0  # the left three latent columns
    mask[1, :, 0, 5] = 0.25  # a grey pixel weighs a quarter

    loss = objective(latents, noise, t, context=context, mask=mask)
    want = ((unet.pred.detach() - noise) ** 2 * mask).mean()
    assert torch.allclose(loss, want, rtol=1e-6, atol=0)
    loss.backward()
    grad = unet.pred.grad
    assert torch.count_nonzero(grad[..., :3]) == 0 and torch.count_nonzero(grad[..., 3:]) == grad[..., 3:].numel()
    full = 2 * (unet.pred.detach() - noise) / unet.pred.numel()
    assert torch.allclose(grad[1, :, 0, 5], 0.25 * full[1, :, 0, 5], rtol=1e-5)
    with torch.no_grad():  # whatever is predicted under the mask, the loss is the same
        unet.pred[..., :3] += 100.0
    assert torch.equal(objective(latents, noise, t, context=context, mask=mask), loss.detach())
    # an all-white mask is no mask
    assert torch.equal(objective(latents, noise, t, context=context, mask=torch.ones(2, 1, 8, 8)),
                       objective(latents, noise, t, context=context))


def _image(path, alpha=None):
    rgb = Image.new("RGB", (64, 64), (200, 30, 30))
    if alpha is not None:
        rgb.putalpha(alpha)
    rgb.save(path)


def _halves(left: int, right: int) -> Image.Image:
    mask = Image.new("L", (64, 64), right)
    mask.paste(left, (0, 0, 32, 64))
    return mask


def test_masks_from_alpha_or_mask_files_on_the_latent_grid(base, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _image(data / "a.png", alpha=_halves(0, 255))  # transparent left half
    _image(data / "b.png")
    _halves(255, 0).save(data / "b.mask.png")  # masked right half, from a file
    _image(data / "c.png")  # no mask: all of it is learned
    for name in "abc":
        (data / f"{name}.txt").write_text("a red square")
    scan = scan_folder(data)
    assert [ex.path.name for ex in scan.examples] == ["a.png", "b.png", "c.png"]  # the mask file is no image
    s = LoraSettings(data=str(data), out=str(tmp_path / "o"), masked_loss=True, flip=True)
    images = training_set(base, s, scan, None)
    masks = images.masks[images.sizes[0]]
    h, w = masks.shape[-2:]
    assert masks.shape == (3, 1, h, w) and w % 2 == 0
    assert torch.equal(masks[0, 0, :, : w // 2], torch.zeros(h, w // 2))
    assert torch.equal(masks[0, 0, :, w // 2:], torch.ones(h, w // 2))
    assert torch.equal(masks[1], masks[0].flip(-1)) and torch.equal(masks[2], torch.ones(1, h, w))
    # batches carry each image's mask, flipped with its image
    for number in range(4):
        batch = images.batch(number, global_batch=3)
        assert batch.mask.shape == (3, 1, h, w)
        ids = images.plan(number // images.batches_per_epoch(3), 3)[number % images.batches_per_epoch(3)]
        g = torch.Generator().manual_seed(seed_for(images.seed, "batch", number))
        flips = (torch.rand(3, generator=g) < 0.5).tolist()
        for k, (i, f) in enumerate(zip(ids, flips)):
            assert torch.equal(batch.mask[k], masks[i].flip(-1) if f else masks[i])
    # random crops cut the mask where they cut the image (64-px images at 64 px: the whole of it)
    cropped = training_set(base, LoraSettings(data=str(data), out=str(tmp_path / "o"), masked_loss=True,
                                              crop="random"), scan, None)
    batch = cropped.batch(0, global_batch=3)
    ids = cropped.plan(0, 3)[0]
    for k, i in enumerate(ids):
        assert torch.equal(batch.mask[k], masks[i])

    # with --masked-loss off the masks are unused, and a note says so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        off = training_set(base, LoraSettings(data=str(data), out=str(tmp_path / "o")), scan, None)
    said = [str(w.message) for w in caught if issubclass(w.category, SdtuneWarning)]
    assert len(said) == 1 and "1 with a NAME.mask file and 1 with transparency of 3 images" in said[0]
    assert "--masked-loss" in said[0] and off.batch(0, 3).mask is None


def test_masked_loss_with_nothing_to_mask_says_so(base, tmp_path):
    """It trained exactly as without the flag, and the user believed the loss masked."""
    data = tmp_path / "data"
    data.mkdir()
    for name in "ab":
        _image(data / f"{name}.png")
        (data / f"{name}.txt").write_text("a red square")
    s = LoraSettings(data=str(data), out=str(tmp_path / "o"), masked_loss=True)
    with pytest.warns(UserWarning, match=r"data: no image has a NAME\.mask\.png or transparency, so --masked-loss "
                                         r"has nothing to mask: the whole of each image is learned"):
        training_set(base, s, scan_folder(data), None)


def test_an_image_masked_out_entirely_trains_nothing(base, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        _image(data / f"{name}.png", alpha=Image.new("L", (64, 64), 0))
        (data / f"{name}.txt").write_text("a red square")
    losses = []
    s = LoraSettings(data=str(data), out=str(tmp_path / "o"), steps=2, batch_size=2, rank=2, lr=1e-2,
                     progress=False, report=False, masked_loss=True)
    path = train_lora(base, s, callback=lambda step, loss: losses.append(loss))
    assert losses == [0.0, 0.0]
    # so is the validation loss: the same masks weight it
    assert [row.split(",")[3] for row in (tmp_path / "o" / "loss.csv").read_text().splitlines()[1:]
            if row.split(",")[3]] == ["0.0", "0.0"]
    lora = load_lora(path)
    assert all(torch.count_nonzero(ad.tensors["up"]) == 0 for _, _, ad in lora.items())  # ΔW stays 0
