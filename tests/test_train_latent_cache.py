"""--cache-latents-to-disk (kohya's): encodings kept in the data folder, found again by the image's bytes, its
bucket and the VAE; a second run encodes nothing and trains the same weights bit for bit; an edited image or another
VAE is encoded again; a folder that cannot take the cache is one note, and the run goes on."""

import pytest
import torch
from PIL import Image
from small_runs import Stop, factors, outline_dataset, settings, stop_at

from sdtune.console import SdtuneWarning
from sdtune.models import load_base
from sdtune.safeio import SdtuneError
from sdtune.train import data
from sdtune.train.latent_cache import FOLDER
from sdtune.train.lora import train_lora
from sdtune.train.scan import scan_folder


@pytest.fixture
def encodes(monkeypatch):
    """The number of images each VAE call of the training code encodes."""
    calls = []
    real = data.encode

    def spy(vae, pixels):
        calls.append(len(pixels))
        return real(vae, pixels)
    monkeypatch.setattr(data, "encode", spy)
    return calls


def test_a_second_run_encodes_nothing_and_trains_the_same_weights(base, tmp_path, encodes):
    dataset = outline_dataset(tmp_path / "data")
    kw = dict(cache_latents_to_disk=True, flip=True)
    first = factors(train_lora(base, settings(dataset, tmp_path / "a", **kw)))
    assert sum(encodes) > 0 and len(list((dataset / FOLDER).glob("*.safetensors"))) == 4  # one per image
    encodes.clear()
    second = factors(train_lora(base, settings(dataset, tmp_path / "b", **kw)))
    assert encodes == []
    assert all(torch.equal(x, y) for k in first for x, y in zip(first[k], second[k]))
    # the cache folder is not training data: the scan does not see it
    assert len(scan_folder(dataset).examples) == 4

    # an edited image is encoded again (twice: plain and flipped), the others are found
    edited = sorted(dataset.glob("*.png"))[0]
    Image.open(edited).transpose(Image.Transpose.ROTATE_90).save(edited)
    train_lora(base, settings(dataset, tmp_path / "c", **kw))
    assert encodes == [1, 1]
    # another VAE: every image again
    encodes.clear()
    other = load_base("tiny-random")
    with torch.no_grad():
        next(other.vae.parameters()).add_(0.01)
    train_lora(other, settings(dataset, tmp_path / "d", **kw))
    assert sum(encodes) == 8


def test_a_folder_that_cannot_take_the_cache_is_one_note(base, tmp_path, encodes):
    dataset = outline_dataset(tmp_path / "data")
    (dataset / FOLDER).write_text("a file where the cache folder would be")
    with pytest.warns(SdtuneWarning, match=f"--cache-latents-to-disk: cannot write in {dataset / FOLDER}"):
        train_lora(base, settings(dataset, tmp_path / "o", cache_latents_to_disk=True))
    assert (tmp_path / "o" / "lora.safetensors").is_file()
    with pytest.raises(SdtuneError, match="--cache-latents-to-disk with --crop random: its images are encoded "
                                          "every step"):
        settings(dataset, tmp_path / "x", cache_latents_to_disk=True, crop="random").check()


def test_a_run_resumed_with_the_cache_turned_on_equals_the_uninterrupted_run(base, tmp_path):
    dataset = outline_dataset(tmp_path / "data")
    whole = factors(train_lora(base, settings(dataset, tmp_path / "whole")))
    with pytest.raises(Stop):
        train_lora(base, settings(dataset, tmp_path / "cut"), callback=stop_at(3))
    resumed = factors(train_lora(base, settings(dataset, tmp_path / "cut", cache_latents_to_disk=True)))
    assert all(torch.equal(x, y) for k in whole for x, y in zip(whole[k], resumed[k]))
