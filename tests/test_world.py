"""The shapes world: deterministic pixels, documented captions, held-out logic, dataset folders."""

import random

import numpy as np
import pytest
from PIL import Image

from sdtune.tiny import world
from sdtune.tiny.world import Scene


def test_render_is_deterministic_and_64px_rgb():
    rng = random.Random(7)
    for _ in range(20):
        scene = world.random_scene(rng)
        a, b = world.render(scene), world.render(scene)
        assert a.mode == "RGB" and a.size == (64, 64)
        assert a.tobytes() == b.tobytes()
    # and the pixels depend on the description
    base = Scene("circle", "red")
    assert world.render(base).tobytes() != world.render(world.replace(base, colour="blue")).tobytes()
    assert world.render(base).tobytes() != world.render(world.replace(base, shape="square")).tobytes()


def test_render_paints_the_described_colours():
    scene = Scene("circle", "red", background="black", style="flat", cx=0.5, cy=0.5)
    px = np.asarray(world.render(scene)).astype(int)
    assert tuple(px[32, 32]) == world.COLOURS["red"]
    assert tuple(px[1, 1]) == world.BACKGROUNDS["black"]
    # an outline leaves the middle as background; a flat fill covers it
    ring = np.asarray(world.render(world.replace(scene, style="outline"))).astype(int)
    assert tuple(ring[32, 32]) == world.BACKGROUNDS["black"]


def test_unknown_shape_or_style_is_refused():
    with pytest.raises(ValueError, match="unknown shape"):
        world.render(Scene("blob", "red"))
    with pytest.raises(ValueError, match="unknown style"):
        world.render(Scene("circle", "red", style="dotted"))


def test_captions_as_documented():
    assert Scene("circle", "red").caption() == "a red circle on a white background"
    assert Scene("star", "blue", style="outline").caption(1) == "a blue star, outline style"
    assert world.caption(Scene("star", "blue", style="outline"), 1, with_style=False) == "a blue star"
    assert world.caption(Scene("cross", "green", background="gray", style="striped"), 3) == \
        "green cross, gray background, striped style"
    # flat is the default look: never named
    assert "flat" not in Scene("square", "pink", style="flat").caption(2)
    # templates wrap around
    assert world.caption(Scene("heart", "cyan"), world.n_templates()) == world.caption(Scene("heart", "cyan"), 0)


def test_held_out_rules():
    assert world.is_held_out(Scene("heart", "red"))
    assert world.is_held_out(Scene("circle", "red", style="outline"))
    for colour, shape in world.HELD_OUT_PAIRS:
        assert world.is_held_out(Scene(shape, colour))
        assert not world.is_held_out(Scene(shape, "red" if colour != "red" else "blue"))
    assert not world.is_held_out(Scene("circle", "red", style="striped"))


def test_random_scene_held_in_only_never_returns_held_out():
    rng = random.Random(0)
    scenes = [world.random_scene(rng, held_in_only=True) for _ in range(3000)]
    assert not any(world.is_held_out(s) for s in scenes)
    # ... while the unrestricted sampler does produce held-out scenes, and covers every class
    rng = random.Random(0)
    free = [world.random_scene(rng) for _ in range(3000)]
    assert any(world.is_held_out(s) for s in free)
    assert {s.shape for s in free} == set(world.SHAPES)
    assert {s.colour for s in free} == set(world.COLOURS)
    assert {s.style for s in free} == set(world.STYLES)


def test_fixed_attributes_are_kept():
    scenes = world.concept_scenes(10, seed=3, shape="star", colour="purple")
    assert all(s.shape == "star" and s.colour == "purple" for s in scenes)
    assert len({(s.cx, s.cy, s.size) for s in scenes}) == 10  # jitter differs
    assert world.concept_scenes(10, seed=3, shape="star") == world.concept_scenes(10, seed=3, shape="star")


def test_write_dataset_writes_png_txt_pairs(tmp_path):
    scenes = world.concept_scenes(4, seed=1, colour="orange")
    out = world.write_dataset(tmp_path / "set", scenes, template=0)
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    for png, scene in zip(pngs, scenes):
        txt = png.with_suffix(".txt")
        assert txt.read_text(encoding="utf-8") == scene.caption(0) + "\n"
        with Image.open(png) as im:
            assert im.size == (64, 64)
            assert im.convert("RGB").tobytes() == world.render(scene).tobytes()  # PNG is lossless
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in pngs] + [p.stem + ".txt" for p in pngs])


def test_write_dataset_random_templates_follow_the_seed(tmp_path):
    scenes = world.concept_scenes(12, seed=2)
    a = world.write_dataset(tmp_path / "a", scenes, template=None, seed=5)
    b = world.write_dataset(tmp_path / "b", scenes, template=None, seed=5)
    caps_a = [p.read_text(encoding="utf-8") for p in sorted(a.glob("*.txt"))]
    assert caps_a == [p.read_text(encoding="utf-8") for p in sorted(b.glob("*.txt"))]
    used = []
    for cap, scene in zip(caps_a, scenes):
        options = [world.caption(scene, t) + "\n" for t in range(world.n_templates())]
        assert cap in options
        used.append(options.index(cap))
    assert len(set(used)) > 1  # templates vary across images
