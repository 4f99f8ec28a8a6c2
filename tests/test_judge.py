"""The judge: accuracy on fresh renders (clean and blurred, held-out concepts included), inputs, score, loading."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdtune.safeio import SdtuneError, load_state
from sdtune.tiny import judge as J
from sdtune.tiny import world
from sdtune.tiny.world import Scene

CORE = ("shape", "colour", "style")


@pytest.fixture(scope="module")
def fresh():
    return J.fresh_renders(300, seed=2024)  # a seed neither the trainer nor --eval uses


def test_shipped_weights_are_small_and_tagged():
    assert J.WEIGHTS_PATH.is_file()
    assert J.WEIGHTS_PATH.stat().st_size < 1_000_000
    net = J.load_judge()
    assert net is J.load_judge()  # cached
    assert not net.training


def test_accuracy_on_fresh_renders(fresh):
    scenes, images = fresh
    acc = J.accuracy(scenes, images)
    for k in CORE + ("background",):
        assert acc[k] >= 0.95, (k, acc)


def test_accuracy_on_held_out_concepts(fresh):
    scenes, images = fresh
    for name, keep in [("heart", lambda s: s.shape == "heart"), ("outline", lambda s: s.style == "outline"),
                       ("pairs", lambda s: (s.colour, s.shape) in world.HELD_OUT_PAIRS)]:
        idx = [i for i, s in enumerate(scenes) if keep(s)]
        assert len(idx) >= 3, name
        acc = J.accuracy([scenes[i] for i in idx], [images[i] for i in idx])
        assert min(acc[k] for k in CORE) >= 0.95, (name, acc)


def test_accuracy_on_blurred_renders():
    scenes, images = J.fresh_renders(300, seed=2025, blur=1.0)  # PIL gaussian blur, radius 1
    acc = J.accuracy(scenes, images)
    for k in CORE:
        assert acc[k] >= 0.95, (k, acc)


def test_verdict_fields_and_confidence():
    scene = Scene("star", "purple", background="gray", style="striped")
    (v,) = J.judge(world.render(scene))
    assert (v.shape, v.colour, v.style, v.background) == ("star", "purple", "striped", "gray")
    assert set(v.confidence) == {"shape", "colour", "style", "background"}
    assert all(0.9 < p <= 1.0 for p in v.confidence.values())
    assert v.matches(shape="star", colour="purple", style=None)
    assert not v.matches(shape="heart")


def test_every_input_form_gives_the_same_verdict(tmp_path):
    scenes = [Scene("heart", "green", "black"), Scene("diamond", "orange", "white", style="outline")]
    pil = [world.render(s) for s in scenes]
    hwc = np.stack([np.asarray(im) for im in pil])                   # diffusers "np"-like, uint8
    nchw = torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255  # diffusers "pt"
    expect = J.judge(pil)
    assert [(v.shape, v.colour, v.style) for v in expect] == [(s.shape, s.colour, s.style) for s in scenes]
    forms = [(hwc, (0, 1)), (list(hwc), (0, 1)), (nchw, (0, 1)), (list(nchw), (0, 1)), (nchw * 2 - 1, (-1, 1))]
    for form, value_range in forms:
        got = J.judge(form, value_range=value_range)
        assert [(v.shape, v.colour, v.style, v.background) for v in got] == \
            [(v.shape, v.colour, v.style, v.background) for v in expect]
    pil[0].save(tmp_path / "heart.png")
    assert J.judge(tmp_path / "heart.png")[0].shape == "heart"  # image files are read too
    big = [im.resize((128, 128)) for im in pil]  # other sizes are resized to 64x64
    assert [v.shape for v in J.judge(big)] == ["heart", "diamond"]
    probs = J.probabilities(nchw)
    assert probs["shape"].shape == (2, len(world.SHAPES))
    assert torch.allclose(probs["colour"].sum(1), torch.ones(2))


@pytest.mark.parametrize("bad, message", [
    ([], "no images"),
    (torch.rand(2, 64, 64, 3), "channel-first"),
    (np.zeros((3, 64, 64), np.uint8), "channel-last"),
    (torch.rand(1, 3, 64, 64) * 2 - 1, "value_range"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.int64), "dtype"),
    ("no-such-image.png", "cannot open"),
    ([42], "cannot read an image from int"),
    (42, "cannot read an image from int"),
])
def test_bad_inputs_are_refused(bad, message):
    with pytest.raises(SdtuneError, match=message):
        J.judge(bad)


def test_score_fractions():
    reds = [world.render(s) for s in world.concept_scenes(4, seed=1, shape="circle", colour="red", style="flat")]
    blues = [world.render(s) for s in world.concept_scenes(2, seed=2, shape="circle", colour="blue", style="flat")]
    out = J.score(reds + blues, shape="circle", colour="red")
    assert out == {"n": 6, "shape": 1.0, "colour": 4 / 6, "all": 4 / 6}
    out = J.score(reds + blues, colour="blue", style="outline")
    assert out == {"n": 6, "colour": 2 / 6, "style": 0.0, "all": 0.0}
    with pytest.raises(SdtuneError, match="unknown colour 'teal'"):
        J.score(reds, colour="teal")
    with pytest.raises(SdtuneError, match="at least one"):
        J.score(reds)


def test_missing_or_foreign_weights_are_refused(tmp_path):
    with pytest.raises(SdtuneError, match="--train"):
        J.load_judge(tmp_path / "none.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(SdtuneError, match="not sdtune judge weights"):
        J.load_judge(foreign)
    other_world = tmp_path / "other.safetensors"
    classes = dict(J.ATTRIBUTES, shape=J.ATTRIBUTES["shape"][:-1])
    save_file({"w": torch.zeros(2)}, str(other_world), {"format": J.FORMAT, "classes": json.dumps(classes)})
    with pytest.raises(SdtuneError, match="retrain"):
        J.load_judge(other_world)


def test_training_recipe_is_reproducible(tmp_path):
    threads = torch.get_num_threads()
    kw = {"steps": 3, "batch": 8, "pool": 24, "log": lambda s: None}
    J.train(tmp_path / "a.safetensors", seed=5, **kw)
    J.train(tmp_path / "b.safetensors", seed=5, **kw)
    J.train(tmp_path / "c.safetensors", seed=6, **kw)
    (a, meta_a), (b, meta_b), (c, _) = (load_state(tmp_path / f"{n}.safetensors") for n in "abc")
    assert meta_a == meta_b and meta_a["seed"] == "5"  # (metadata order in the header is not fixed)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())  # shipped in fp16
    assert torch.get_num_threads() == threads  # the trainer's one-thread setting does not leak
    net = J.load_judge(tmp_path / "a.safetensors")  # what train writes, load_judge reads
    assert len(J.judge(world.render(Scene("circle", "red")), model=net)) == 1


def test_augment_keeps_range_and_follows_the_generator():
    x = torch.rand(6, 3, 64, 64)
    a = J.augment(x, torch.Generator().manual_seed(1))
    b = J.augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
