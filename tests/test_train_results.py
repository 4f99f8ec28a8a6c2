"""What a run shows: the validation loss (held out, deterministic, comparable)."""

import random

import pytest
from safetensors import safe_open

from sdtune.models import load_base
from sdtune.safeio import SdtuneError
from sdtune.tiny import world
from sdtune.train.config import LoraSettings
from sdtune.train.data import scan_folder, split_validation
from sdtune.train.lora import train_lora


def settings(dataset, out, **kw):
    """A short run with two saves, and a fifth of the images held out."""
    return LoraSettings(**{**dict(data=str(dataset), out=str(out), steps=4, batch_size=2, rank=4, alpha=4, lr=5e-3,
                                  save_every=2, validation_split=0.2, progress=False), **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """10 outline renders captioned without the style word."""
    scenes = world.concept_scenes(10, seed=7, style="outline")
    return world.write_dataset(tmp_path_factory.mktemp("data"), scenes, template=None, with_style=False)


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-random")


@pytest.fixture(scope="module")
def lora_run(base, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_lora(base, settings(dataset, out))
    return out


# ---------------------------------------------------------------- validation

def test_validation_split_holds_out_the_same_images_whatever_the_order(dataset):
    scan = scan_folder(dataset)
    train, held = split_validation(scan, 0.2, dataset)
    assert len(held.examples) == 2 and len(train.examples) == 8
    assert not {e.path for e in held.examples} & {e.path for e in train.examples}
    assert train.folders == {".": {"n_repeats": 1, "img_count": 8}}
    random.Random(1).shuffle(scan.examples)
    assert {e.path for e in split_validation(scan, 0.2, dataset)[1].examples} == {e.path for e in held.examples}
    assert len(split_validation(scan, 0.01, dataset)[1].examples) == 1  # at least one
    with pytest.raises(SdtuneError, match=r"--validation-split 0.95 holds out all 10 image\(s\)"):
        split_validation(scan, 0.95, dataset)
    with pytest.raises(SdtuneError, match=r"--validation-split 1.0: must be in \[0, 1\)"):
        settings(dataset, "o", validation_split=1.0).check()


def test_held_out_images_are_not_trained_on(lora_run):
    with safe_open(str(lora_run / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "8"


def test_validation_loss_is_deterministic_and_comparable(base, dataset, tmp_path, capsys):
    def printed(out, **kw):
        capsys.readouterr()
        train_lora(base, settings(dataset, tmp_path / out, **kw))
        return [ln for ln in capsys.readouterr().err.splitlines() if "validation loss" in ln]

    first = printed("a")
    assert printed("b") == first  # to the last printed digit
    assert [ln.split(":")[0] for ln in first] == ["step 0", "step 2", "step 4"]  # step 0, each save, the end
    # another seed and Min-SNR weighting change training, not the yardstick: step 0 (the base) reads the same
    other = printed("c", seed=1, min_snr_gamma=5.0)
    assert other[0] == first[0] and other[2] != first[2]


def test_without_held_out_images_training_images_stand_in(base, dataset, tmp_path, capsys):
    train_lora(base, settings(dataset, tmp_path, validation_split=0.0, steps=2))
    err = capsys.readouterr().err
    assert "validation on 8 training image(s): nothing was held out" in err and "step 0: validation loss" in err


def test_a_validation_folder(base, dataset, tmp_path, capsys):
    held = world.write_dataset(tmp_path / "held", world.concept_scenes(3, seed=9, style="outline"), template=None,
                               with_style=False)
    train_lora(base, settings(dataset, tmp_path / "out", validation_split=0.0, validation_dir=str(held), steps=2))
    assert "validation on 3 held-out image(s)" in capsys.readouterr().err
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "10"  # all of --data trains
