"""``sdtune demo --quick``: every file the report names exists, every number comes from the judge."""

import dataclasses
import json
import re
import shlex
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune import cli, demo, demo_report, families
from sdtune.generate import parse_infotext, read_infotext
from sdtune.safeio import SdtuneError
from sdtune.tiny import judge, world
from sdtune.train import presets
from sdtune.train.config import KINDS, load_settings


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    index = demo.run_demo(out, quick=True, progress=False)
    return out, index, time.time() - t0


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src"):
                self.links.append(v)


def _links(index: Path) -> list[str]:
    p = _Links()
    p.feed(index.read_text(encoding="utf-8"))
    return p.links


def test_every_file_the_report_names_exists(report):
    out, index, _ = report
    assert index == out / "index.html"
    links = _links(index)
    assert len(links) > 10
    for link in links:
        assert not re.match(r"^[a-z]+:|^/", link), f"{link} is not a relative link"
        assert (out / link).exists(), f"index.html links to {link}, which is missing"
    for needed in ("scores.json", "reproduce.sh", "phases.json", "data/ti-set.png", "data/lora-set.png",
                   "grids/ti.png", "grids/lora.png", "grids/sweep.png", "grids/mix.png"):
        assert needed in links
    # the trained files are linked, and are what the training API wrote
    phases = json.loads((out / "phases.json").read_text())
    assert phases["ti"]["file"] in links and phases["lora"]["file"] in links
    assert "train-ti/report.html" in links and "train-lora/report.html" in links  # each run's own page
    for p in demo.PHASES:
        assert phases[p]["done"]


def test_scores_are_the_judges_verdicts_on_the_saved_images(report):
    out, index, _ = report
    data = json.loads((out / "scores.json").read_text())
    plan = demo.QUICK
    expect_n = {"ti": plan.seeds, "ti_words": plan.seeds, "lora_style": plan.lora_prompts,
                "lora_content": plan.lora_prompts, "mix": plan.mix_seeds}
    html_text = index.read_text(encoding="utf-8")
    for row in data["scores"]:
        for side in ("before", "after"):
            items = row[side]["items"]
            assert len(items) == row[side]["n"] == expect_n[row["id"]]
            verdicts = judge.judge([Image.open(out / i["file"]).convert("RGB") for i in items])
            hits = [v.matches(**i["wanted"]) for v, i in zip(verdicts, items)]
            assert row[side]["value"] == sum(hits) / len(hits)
            assert [i["hit"] for i in items] == hits
            assert f"{100 * row[side]['value']:.0f}%" in html_text
    # what is scored is the right thing: the TI rows are the grid's rows, the concept as wanted
    ti = data["scores"][0]
    assert [i["file"] for i in ti["before"]["items"]] == [f"grids/ti-00-{c:02d}.png" for c in range(plan.seeds)]
    assert [i["file"] for i in ti["after"]["items"]] == [f"grids/ti-02-{c:02d}.png" for c in range(plan.seeds)]
    assert ti["after"]["items"][0]["wanted"] == {"shape": plan.shape, "colour": plan.colour}
    assert data["scores"][2]["after"]["items"][0]["wanted"] == {"style": plan.style}
    assert [s["weight"] for s in data["sweep"]] == list(plan.sweep_weights)
    assert demo.rescore(out) == {r["id"]: (r["before"]["value"], r["after"]["value"]) for r in data["scores"]}


def test_grids_have_their_axes_metadata_and_cells(report):
    out, _, _ = report
    plan = demo.QUICK
    shapes = {"ti": (3, plan.seeds), "lora": (2, plan.lora_prompts), "sweep": (plan.sweep_prompts,
              len(plan.sweep_weights)), "mix": (plan.mix_seeds, 5)}
    for name, (rows, cols) in shapes.items():
        rec = json.loads((out / "grids" / f"{name}.json").read_text())
        assert (rec["rows"], rec["cols"]) == (rows, cols)
        for r in range(rows):
            for c in range(cols):
                assert (out / "grids" / f"{name}-{r:02d}-{c:02d}.png").is_file()
        fields = parse_infotext(read_infotext(out / "grids" / f"{name}.png"))
        assert fields["Steps"] == str(plan.gen_steps) and "X Type" in fields and "Y Type" in fields
    assert parse_infotext(read_infotext(out / "grids" / "sweep.png"))["X Type"] == "LoRA weight (outline)"
    # weight 0 of the sweep is the base model exactly: the same pixels as the base row of the LoRA grid
    for r in range(plan.sweep_prompts):
        a = np.asarray(Image.open(out / "grids" / f"sweep-{r:02d}-00.png"))
        b = np.asarray(Image.open(out / "grids" / f"lora-00-{r:02d}.png"))
        assert np.array_equal(a, b)
        assert not np.array_equal(a, np.asarray(Image.open(out / "grids" / f"sweep-{r:02d}-02.png")))


def test_scored_cells_are_found_by_label_not_position(report):
    out, _, _ = report
    rec = demo._cells(out, "mix")
    anything = lambda r: {}
    full = demo._col(rec, demo.MIX_FULL, anything)
    assert [f for f, _ in full] == [f"grids/mix-{r:02d}-04.png" for r in range(rec["rows"])]
    # the same plot with its columns in another order: the headline still scores the same images
    order = [4, 2, 0, 3, 1]
    moved = {**rec, "x": {**rec["x"], **{k: [rec["x"][k][c] for c in order] for k in ("labels", "values")}},
             "cells": [[row[c] for c in order] for row in rec["cells"]]}
    assert demo._col(moved, demo.MIX_FULL, anything) == full
    assert demo._col(moved, demo.BASE, anything) == demo._col(rec, demo.BASE, anything)
    sweep = demo._cells(out, "sweep")  # a weight axis: found by value
    assert demo._col(sweep, 0.5, anything)[0][0] == "grids/sweep-00-01.png"
    with pytest.raises(SdtuneError, match="no 'TI \\+ LoRA 3'.*rerun it with --fresh"):
        demo._col(rec, "TI + LoRA 3", anything)


def test_report_page_escapes_text_and_has_every_section(tmp_path):
    score = {"value": 0.5, "n": 2, "items": []}
    scores = {"scores": [{"id": "x", "grid": "grids/x.png", "what": "a <b> & c", "before_label": "base",
                          "after_label": "after", "before": score, "after": {**score, "value": 1.0}}],
              "sweep": [{"weight": 0.25, "style": score, "content": score}],
              "mix": [{"label": "TI + <LoRA>", "concept": score, "style": score}]}
    files = {"grids": [{"name": "x", "title": "T <1>", "file": "grids/x.png", "json": "grids/x.json", "cells": 4,
                        "command": "sdtune grid --x 'a|b'"}], "outputs": [("LoRA", "train-lora/a.safetensors")]}
    index = demo_report.write_report(tmp_path, demo.QUICK, True, "tiny", "h4sh", scores,
                                     [("step <1>", "sdtune train ti --token '<sks>'")], files,
                                     {"data": {"seconds": 2.4}, "ti": {"seconds": 10.0, "reused": True}})
    text = index.read_text(encoding="utf-8")
    for heading in ("1. Training data", "2. Before and after", "LoRA weight sweep", "Mixing", "3. Comparison grids",
                    "4. Files", "5. Reproduce it step by step", "6. Time"):
        assert heading in text
    assert "a &lt;b&gt; &amp; c" in text and "TI + &lt;LoRA&gt;" in text and "--token &#x27;&lt;sks&gt;&#x27;" in text
    assert '<td class="num up">100%</td>' in text and '<td class="num">0.25</td>' in text
    assert '<tr><th>total</th><td class="num">12</td>' in text  # seconds, summed
    # "before" and "after" head both their cells (label and value: the value's heading was empty, the next
    # label's said "after"); each table's heading spans as many columns as its rows have
    assert '<th colspan="2">before</th><th colspan="2">after</th><th>images</th>' in text
    for table in re.findall(r"<table>(.*?)</table>", text, re.S):
        heading, *rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
        width = sum(int(span or 1) for span in re.findall(r'<th(?: colspan="(\d+)")?>', heading))
        assert rows and all(len(re.findall(r"<t[dh][ >]", row)) == width for row in rows), table
    assert "The training images (section 1) are drawn by the shapes" in text
    assert "<b>quick</b> run" in text and "$" not in text


def test_training_sets_teach_what_they_claim(report):
    out, _, _ = report
    plan = demo.QUICK
    ti_imgs = [Image.open(p) for p in sorted((out / "data" / "ti").glob("*.png"))]
    assert len(ti_imgs) == plan.ti_images and not list((out / "data" / "ti").glob("*.txt"))  # TI templates
    assert judge.score(ti_imgs, shape=plan.shape, colour=plan.colour)["all"] == 1.0
    lora_caps = [p.read_text().strip() for p in sorted((out / "data" / "lora").glob("*.txt"))]
    assert len(lora_caps) == plan.lora_images and not any(plan.style in c for c in lora_caps)
    lora_imgs = [Image.open(p) for p in sorted((out / "data" / "lora").glob("*.png"))]
    assert judge.score(lora_imgs, style=plan.style)["style"] == 1.0
    for s in demo.style_scenes(20):
        assert s.style == "outline" and s.shape not in world.HELD_OUT_SHAPES
        assert (s.colour, s.shape) not in world.HELD_OUT_PAIRS


def test_commands_reproduce_the_steps(report, tmp_path):
    """The commands in reproduce.sh parse with the real CLI into exactly the settings the demo used."""
    out, _, _ = report
    script = (out / "reproduce.sh").read_text()
    lines = [shlex.split(ln) for ln in script.splitlines() if ln.startswith("sdtune ")]
    parser = cli.build_parser()
    train = [w for w in lines if w[1] == "train"]
    assert [w[2] for w in train] == ["ti", "lora"]
    for words in train:
        a = parser.parse_args(words[1:])
        names = {f.name for f in dataclasses.fields(KINDS[a.kind])}
        got = load_settings(a.config, {k: v for k, v in vars(a).items() if k in names}, kind=a.kind)
        make = demo.ti_settings if a.kind == "ti" else demo.lora_settings
        assert got == make(demo.QUICK, out / "data" / a.kind, out / f"train-{a.kind}", "tiny", True)
    grids = [parser.parse_args(w[1:]) for w in lines if w[1] == "grid"]
    assert [a.name for a in grids] == ["ti", "lora", "sweep", "mix"]
    for a in grids:
        assert Path(a.out) == out / "grids" and a.steps == demo.QUICK.gen_steps and a.handler == "commands.cmd_grid"
        assert all(Path(f).is_file() for f in a.lora + a.embedding)
    # running one of them (into another folder) gives the demo's images exactly
    words = next(w for w in lines if w[1] == "grid" and "mix" in w)
    words[words.index("--out") + 1] = str(tmp_path)
    assert cli.main([*words[1:], "--no-progress"]) == 0
    for f in ("mix-00-00.png", "mix-01-03.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f)), np.asarray(Image.open(out / "grids" / f)))
    # the data commands are Python calls of the functions the demo used
    data_lines = [ln for ln in script.splitlines() if ln.startswith("python -c")]
    assert any("write_ti_set" in ln for ln in data_lines) and any("write_style_set" in ln for ln in data_lines)


def test_the_full_plan_trains_with_the_models_preset_and_says_so(tmp_path):
    """The full demo (the README's main job) names no preset: it trains with the model's own (it trained with
    bare defaults, which learn nothing on the tiny model), and its printed command reruns those settings."""
    parser = cli.build_parser()
    for family, preset in ((families.TINY, "tiny"), (families.TINY_XL, "tiny-xl")):
        for kind, make in (("ti", demo.ti_settings), ("lora", demo.lora_settings)):
            settings = make(demo.FULL, tmp_path / "d", tmp_path / "o", family.name, True, family)
            assert settings.preset == preset and settings.steps == presets.get(kind, preset).values["steps"]
            a = parser.parse_args(shlex.split(demo.train_command(kind, settings))[1:])
            names = {f.name for f in dataclasses.fields(KINDS[kind])}
            assert load_settings(None, {k: v for k, v in vars(a).items() if k in names}, kind=kind) == settings


def test_rerun_reuses_finished_phases(report):
    out, index, first_seconds = report
    phases_before = json.loads((out / "phases.json").read_text())
    trained = out / phases_before["lora"]["file"]
    stamp = trained.stat().st_mtime_ns
    cell_stamp = (out / "grids" / "mix-00-00.png").stat().st_mtime_ns
    t0 = time.time()
    assert demo.run_demo(out, quick=True, progress=False) == index
    assert time.time() - t0 < max(15.0, first_seconds / 3)
    assert trained.stat().st_mtime_ns == stamp and (out / "grids" / "mix-00-00.png").stat().st_mtime_ns == cell_stamp
    after = json.loads((out / "phases.json").read_text())
    for p in ("data", "ti", "lora", "grids"):
        assert after[p]["signature"] == phases_before[p]["signature"]
    assert "reused from an earlier run" in index.read_text()


def test_phase_chain_invalidates_later_phases(tmp_path):
    ph = demo._Phases(tmp_path, fresh=False)
    sigs = {p: ph.signature(p, "a") for p in demo.PHASES}
    for p in demo.PHASES:
        ph.mark(p, sigs[p], True)
    again = demo._Phases(tmp_path, fresh=False)
    assert again.reusable("data", again.signature("data", "a"), [])
    assert not again.reusable("ti", again.signature("ti", "changed"), [])
    assert not again.reusable("lora", again.signature("lora", "a"), [])  # after a redone phase: redo
    assert not demo._Phases(tmp_path, fresh=True).reusable("data", sigs["data"], [])
    missing = demo._Phases(tmp_path, fresh=False)
    assert not missing.reusable("data", missing.signature("data", "a"), [tmp_path / "gone.png"])


@pytest.mark.slow
def test_demo_on_tiny_xl_writes_sdxl_files_and_the_same_report(tmp_path):
    """``sdtune demo --model tiny-xl``: the same phases on the SDXL-architecture built-in model; its TI file holds
    both encoders' vectors (clip_l, clip_g) and its LoRA is a kohya SDXL file."""
    assert cli.main(["demo", "--model", "tiny-xl", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["model"] == "tiny-xl" and scores["quick"] is True
    phases = json.loads((tmp_path / "phases.json").read_text())
    emb = load_file(tmp_path / phases["ti"]["file"])
    assert sorted(emb) == ["clip_g", "clip_l"] and emb["clip_l"].shape[-1] == 64 and emb["clip_g"].shape[-1] == 32
    with safe_open(tmp_path / phases["lora"]["file"], "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_unet_") for k in f.keys())
    links = _links(tmp_path / "index.html")
    assert phases["ti"]["file"] in links and phases["lora"]["file"] in links
    assert "train-ti/report.html" in links and "train-lora/report.html" in links  # each run's own page
    assert all((tmp_path / link).exists() for link in links)
