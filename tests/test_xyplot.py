"""X/Y plots: grid geometry, metadata, single images, and exact adapter switching between cells."""

import itertools
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune import api, cli
from sdtune.generate import generate, parse_infotext, read_infotext
from sdtune.lora.formats import save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import Embedding, save_embedding
from sdtune.xyplot import GAP, Axis, _Cell, _runs, axes_from_specs, parse_axis, parse_values, xy_plot

STEPS = 2


def _random_lora(base, seed: int, scale: float = 0.5) -> Lora:
    """A LoRA on every attention linear of the UNet and text encoder, strong enough to change the picture."""
    g = torch.Generator().manual_seed(seed)
    lora = Lora(format="test")
    for comp, root in (("unet", base.unet), ("text_encoder", base.text_encoder)):
        for path, m in root.named_modules():
            if isinstance(m, torch.nn.Linear) and any(s in path for s in ("attn1.", "attn2.", "self_attn.")):
                out_f, in_f = m.weight.shape
                lora.modules[comp][path] = Adapter("lora", {"down": torch.randn(4, in_f, generator=g) * scale,
                                                            "up": torch.randn(out_f, 4, generator=g) * scale}, 4.0)
    return lora


@pytest.fixture(scope="module")
def lora_files(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    paths = []
    for seed, name in ((1, "style"), (2, "detail")):
        save_lora(_random_lora(base, seed), folder / f"{name}.safetensors", format="kohya")
        paths.append(folder / f"{name}.safetensors")
    return paths


@pytest.fixture(scope="module")
def partial_file(base, tmp_path_factory):
    """A LoRA with one module the model does not have (a down block past the last one) besides fitting ones."""
    lora = _random_lora(base, 5)
    path, adapter = next(iter(lora.modules["unet"].items()))
    lora.modules["unet"][path.replace("down_blocks.0", "down_blocks.7", 1)] = Adapter(
        adapter.kind, {k: t.clone() for k, t in adapter.tensors.items()}, adapter.alpha)
    out = tmp_path_factory.mktemp("partial") / "partial.safetensors"
    save_lora(lora, out, format="kohya")
    return out


@pytest.fixture(scope="module")
def emb_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("emb") / "thing.safetensors"
    vec = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 3
    save_embedding(Embedding("<thing>", vec, "test", "diffusers"), path)
    return path


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_seed_by_prompt_grid_geometry_metadata_and_cells(base, tmp_path):
    x = Axis("seed", [5, 6, 7])
    y = Axis("prompt", ["a red circle", "a blue square, on white"])
    grid_path = xy_plot(base, "unused", x, y, steps=STEPS, guidance=5.0, out_dir=tmp_path, cell=96, progress=False)
    assert grid_path == tmp_path / "xy.png"
    text = read_infotext(grid_path)
    fields = parse_infotext(text)
    assert fields["X Type"] == "Seed" and fields["X Values"] == "5, 6, 7"
    assert fields["Y Type"] == "Prompt" and fields["Y Values"] == "a red circle | a blue square, on white"
    assert fields["Steps"] == str(STEPS) and fields["CFG scale"] == "5.0" and fields["Sampler"] == "DDIM"
    grid = Image.open(grid_path)
    # 3 columns and 2 rows of 96x96 cells, plus the label margins on the left and top
    record = json.loads((tmp_path / "xy.json").read_text())
    assert (record["rows"], record["cols"]) == (2, 3)
    step = 96 + GAP
    left, top = grid.width - 3 * step + GAP, grid.height - 2 * step + GAP
    assert 0 < left < 400 and 0 < top < 100
    for r, prompt in enumerate(y.values):
        # a row of consecutive seeds is one batch: the same pixels as one generate() call for those seeds
        row = generate(base, prompt, steps=STEPS, guidance=5.0, seed=5, num_images=3, progress=False)
        for c, seed in enumerate(x.values):
            cell_file = tmp_path / record["cells"][r][c]
            assert cell_file.name == f"xy-{r:02d}-{c:02d}.png" and cell_file.is_file()
            info = parse_infotext(read_infotext(cell_file))
            assert info["prompt"] == prompt and info["Seed"] == str(seed)
            want = row[c].image
            assert np.array_equal(_pixels(cell_file), np.asarray(want))
            tile = grid.crop((left + c * step, top + r * step, left + c * step + 96, top + r * step + 96))
            assert np.array_equal(np.asarray(tile), np.asarray(want.resize((96, 96), Image.Resampling.NEAREST)))
    # the label margins hold drawn text (not just white)
    assert (np.asarray(grid.convert("L"))[:top, left:] < 128).any()
    assert (np.asarray(grid.convert("L"))[top:, :left] < 128).any()


def test_weight_sweep_zero_is_base_exactly_and_cells_change_with_weight(base, lora_files, tmp_path):
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    grid_path = xy_plot(base, "a red circle", Axis("weight", [0, 0.5, 1.0, 1.5]), seed=3, steps=STEPS,
                        loras=[str(lora_files[0])], out_dir=tmp_path, name="sweep", progress=False)
    fields = parse_infotext(read_infotext(grid_path))
    assert fields["X Type"] == "LoRA weight (style)" and fields["X Values"] == "0, 0.5, 1, 1.5"
    cells = [_pixels(tmp_path / f"sweep-00-{c:02d}.png") for c in range(4)]
    plain = np.asarray(generate(base, "a red circle", steps=STEPS, seed=3, progress=False)[0].image)
    assert np.array_equal(cells[0], plain)  # weight 0: the base model, bit for bit
    for a, b in itertools.pairwise(cells):
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0  # every step in weight shows
    assert parse_infotext(read_infotext(tmp_path / "sweep-00-02.png"))["Lora weights"] == "style=1"
    # the plot unloaded its LoRA: the model is back to its exact weights
    assert len(base.loras) == 0
    for k, v in base.unet.state_dict().items():
        assert torch.equal(v, before[k])


def test_weight_sweep_reweights_without_reloading(base, lora_files, tmp_path, monkeypatch):
    from sdtune.lora import patch

    adds, reweights = [], []
    orig_add, orig_set = patch.LoraSet.add, patch.LoraSet.set_weights
    monkeypatch.setattr(patch.LoraSet, "add", lambda self, *a, **k: (adds.append(a[0]), orig_add(self, *a, **k))[1])
    monkeypatch.setattr(patch.LoraSet, "set_weights",
                        lambda self, w: (reweights.append(dict(w)), orig_set(self, w))[1])
    xy_plot(base, "a red circle", Axis("weight", [0.25, 0.5, 1.0]), y=Axis("seed", [1, 2]), steps=1,
            loras=[str(lora_files[0])], out_dir=tmp_path, progress=False)
    assert adds == ["style"]  # loaded once
    assert [w["style"] for w in reweights[:3]] == [0.25, 0.5, 1.0]  # one reweight per column (seeds batched)


def test_adapter_sets_axis_matches_direct_patching(base, lora_files, tmp_path):
    style, detail = map(str, lora_files)
    x = parse_axis(f"loras=none|{style}|{style}:0.5+{detail}:1.0")
    grid_path = xy_plot(base, "a blue star", x, seed=2, steps=STEPS, out_dir=tmp_path, progress=False)
    assert parse_infotext(read_infotext(grid_path))["X Type"] == "LoRAs"
    got = [_pixels(tmp_path / f"xy-00-{c:02d}.png") for c in range(3)]
    lset = base.loras
    want = [np.asarray(generate(base, "a blue star", steps=STEPS, seed=2, progress=False)[0].image)]
    lset.add("s", lora_files[0], 1.0)
    want.append(np.asarray(generate(base, "a blue star", steps=STEPS, seed=2, progress=False)[0].image))
    lset.add("d", lora_files[1], 1.0)
    lset.set_weights({"s": 0.5})
    want.append(np.asarray(generate(base, "a blue star", steps=STEPS, seed=2, progress=False)[0].image))
    lset.remove_all()
    for g, w in zip(got, want):
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 1  # same merge, up to float summation order
    assert not np.array_equal(got[1], got[2])
    # each cell credits (Lora hashes) only the LoRAs it drew with: none for the base cell
    credited = [parse_infotext(read_infotext(tmp_path / f"xy-00-{c:02d}.png")).get("Lora hashes", "") for c in range(3)]
    assert credited[0] == "" and credited[1].count(": ") == 1 and credited[2].count(": ") == 2


def test_named_loras_and_embedding_on_off(base, lora_files, emb_file, tmp_path):
    x = Axis("adapters", ["none", "<thing>", "style:0.5+<thing>"])
    y = Axis("guidance", [3, 7.5])
    tokens_before = base.text_encoder.get_input_embeddings().weight.shape[0]
    xy_plot(base, "a photo of <thing>", x, y, seed=4, steps=STEPS, loras=[str(lora_files[0])],
            embeddings=[str(emb_file)], out_dir=tmp_path, progress=False)
    # the embedding-off cell reads "<thing>" as plain text: the same as the base model without the file
    plain = np.asarray(generate(base, "a photo of <thing>", steps=STEPS, guidance=3, seed=4, progress=False)[0].image)
    assert np.array_equal(_pixels(tmp_path / "xy-00-00.png"), plain)
    assert not np.array_equal(_pixels(tmp_path / "xy-00-00.png"), _pixels(tmp_path / "xy-00-01.png"))
    assert not np.array_equal(_pixels(tmp_path / "xy-00-01.png"), _pixels(tmp_path / "xy-00-02.png"))
    assert parse_infotext(read_infotext(tmp_path / "xy-01-02.png"))["CFG scale"] == "7.5"
    # everything the plot loaded is gone again
    assert base.text_encoder.get_input_embeddings().weight.shape[0] == tokens_before
    assert len(base.loras) == 0 and "<thing>" not in base.embeddings


def test_embedding_folder_words_in_the_prompt_are_loaded_as_generate_loads_them(base, tmp_path):
    """A word of the prompt naming a file of the embedding folder loads it in every cell, as generate does (the
    grid drew the cells without it); an axis that turns the same word on and off keeps it its own."""
    folder = [tmp_path / "emb"]
    folder[0].mkdir()
    vec = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 3
    save_embedding(Embedding("zqthing", vec, "test", "diffusers"), folder[0] / "zqthing.safetensors")
    [plain] = generate(base, "a photo of zqthing", steps=STEPS, seed=4, progress=False)
    [single] = api.generate(base, "a photo of zqthing", steps=STEPS, seed=4, progress=False, embedding_dirs=folder)
    base.embeddings.remove("zqthing")
    assert "TI hashes" in parse_infotext(single.infotext)
    xy_plot(base, "a photo of zqthing", Axis("guidance", [7.5, 3]), seed=4, steps=STEPS, embedding_dirs=folder,
            out_dir=tmp_path, progress=False)  # (cells one at a time: seeds in one batch differ by 1/255)
    assert np.array_equal(_pixels(tmp_path / "xy-00-00.png"), np.asarray(single.image))
    assert parse_infotext(read_infotext(tmp_path / "xy-00-00.png"))["TI hashes"] == \
        parse_infotext(single.infotext)["TI hashes"]
    assert "zqthing" not in base.embeddings  # the plot's own load is undone
    xy_plot(base, "a photo of zqthing", parse_axis("embeddings=none|zqthing"), seed=4, steps=STEPS,
            embedding_dirs=folder, out_dir=tmp_path, name="ax", progress=False)
    assert np.array_equal(_pixels(tmp_path / "ax-00-00.png"), np.asarray(plain.image))
    assert np.array_equal(_pixels(tmp_path / "ax-00-01.png"), np.asarray(single.image))


def test_preloaded_adapter_gets_its_weight_back(base, lora_files, tmp_path):
    lset = base.loras
    lset.add("mine", lora_files[1], 0.7)
    try:
        xy_plot(base, "a red circle", Axis("weight", [0, 1.2], target="mine"), steps=1, out_dir=tmp_path,
                progress=False)
        assert lset.list()[0]["unet_weight"] == 0.7 and lset.names() == ["mine"]
        with pytest.raises(SdtuneError, match=r"^mnie.safetensors: no such file; check the path \(the LoRAs loaded "
                                              r"before the plot are named: mine\)$"):
            xy_plot(base, "a red circle", parse_axis("loras=none|mnie.safetensors"), steps=1, out_dir=tmp_path,
                    progress=False)
    finally:
        lset.remove_all()


def test_prompt_sr_steps_and_sampler_axes(base, tmp_path):
    xy_plot(base, "a red star", Axis("sr", ["red", "blue"]), Axis("sampler", ["ddim", "euler"]), seed=1,
            steps=STEPS, out_dir=tmp_path, progress=False)
    assert parse_infotext(read_infotext(tmp_path / "xy-00-01.png"))["prompt"] == "a blue star"
    assert parse_infotext(read_infotext(tmp_path / "xy-01-00.png"))["Sampler"] == "Euler"
    # samplers labelled and listed by A1111's names, which its X/Y script reads back
    assert json.loads((tmp_path / "xy.json").read_text())["y"]["labels"] == ["DDIM", "Euler"]
    assert parse_infotext(read_infotext(tmp_path / "xy.png"))["Y Values"] == "DDIM, Euler"
    xy_plot(base, "a red star", Axis("steps", [1, 2]), seed=1, out_dir=tmp_path, name="st", progress=False)
    assert parse_infotext(read_infotext(tmp_path / "st-00-01.png"))["Steps"] == "2"
    assert parse_infotext(read_infotext(tmp_path / "st.png"))["Steps"] == "1"  # the first cell's, as A1111 writes
    assert json.loads((tmp_path / "st.json").read_text())["y"] is None
    # A1111's "Clip skip" axis: each cell is what generate draws at that skip, and its PNG says which
    grid = xy_plot(base, "a red star", parse_axis("clip_skip=1-2"), seed=1, steps=1, out_dir=tmp_path, name="cs",
                   progress=False)
    cells = [parse_infotext(read_infotext(tmp_path / f"cs-00-0{i}.png")) for i in (0, 1)]
    assert "Clip skip" not in cells[0] and cells[1]["Clip skip"] == "2"
    assert parse_infotext(read_infotext(grid))["X Type"] == "Clip skip"
    direct = generate(base, "a red star", seed=1, steps=1, clip_skip=2, progress=False)[0].image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cs-00-01.png")), np.asarray(direct))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "cs-00-00.png")), np.asarray(direct))
    with pytest.raises(SdtuneError, match="clip_skip axis value 0: must be at least 1"):
        parse_axis("clip_skip=0,1")
    # a skip deeper than the encoder is refused before the first cell is drawn (it failed at its own cell)
    with pytest.raises(SdtuneError, match=r"--clip-skip 99: text_encoder has only \d+ layers"):
        xy_plot(base, "a red star", parse_axis("clip_skip=1,99"), seed=1, steps=1, out_dir=tmp_path / "deep",
                progress=False)
    assert not (tmp_path / "deep").exists() or not any((tmp_path / "deep").iterdir())
    with pytest.raises(SdtuneError, match="cfg axis value 'nan': must be a finite number"):
        parse_axis("cfg=nan,3")  # not "--guidance nan", a flag not typed, after the first cell was drawn


def test_parsing_and_errors(base, tmp_path):
    assert parse_values("seed", "1-4") == [1, 2, 3, 4]
    assert parse_values("seed", "1-10(+3)") == [1, 4, 7, 10]
    # A1111's other range forms, on every numeric axis, and its sampler names
    assert parse_values("seed", "1-10[4]") == [1, 4, 7, 10] and parse_values("cfg", "3-7(+2)") == [3.0, 5.0, 7.0]
    assert parse_values("weight", "0-1[5]") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_values("weight", "-0.5,0.5") == ["-0.5", "0.5"]  # single values, not a range
    assert parse_axis("sampler=Euler a|DPM++ 2M Karras|ddim").values == ["euler_a", "dpmpp_2m_karras", "ddim"]
    drawn = parse_axis("seed=-1,5")  # -1: a seed drawn now, so that the label names it
    assert 0 <= drawn.values[0] and drawn.values[1] == 5 and drawn.label(0) == f"seed {drawn.values[0]}"
    for typo in ("seed=-5", "seed=-3-2"):  # other negatives: a typo, not three random seeds
        with pytest.raises(SdtuneError, match=r"^seed axis value -[35]: a seed is 0 or more, or -1 for a random one$"):
            parse_axis(typo)
    with pytest.raises(SdtuneError, match=r"cfg axis range|guidance axis range"):
        parse_values("cfg", "7-3")
    with pytest.raises(SdtuneError, match=r"guidance axis range '1-9{400}': write low-high"):  # (inf: a traceback)
        parse_values("cfg", "1-" + "9" * 400)
    assert parse_values("prompt", "a, b|c") == ["a, b", "c"]
    assert parse_axis("cfg=3,7.5").values == [3.0, 7.5] and parse_axis("cfg=3,7.5").kind == "guidance"
    with pytest.raises(SdtuneError, match=r"^cfg axis value 'abc' is not a number; e.g. cfg=3,5,7.5$"):
        parse_axis("cfg=abc")  # named as the user wrote it
    with pytest.raises(SdtuneError, match="unknown axis kind 'nope'"):
        Axis("nope", [1])
    with pytest.raises(SdtuneError, match="KIND=VALUES"):
        parse_axis("1,2,3")
    with pytest.raises(SdtuneError, match="not a number"):
        parse_axis("weight=0,half")
    with pytest.raises(SdtuneError, match="choose from"):
        parse_axis("sampler=ddim,warp")
    with pytest.raises(SdtuneError, match="say which LoRA"):
        xy_plot(base, "x", Axis("weight", [0, 1]), steps=1, out_dir=tmp_path, progress=False)
    with pytest.raises(SdtuneError, match="not in the prompt"):
        xy_plot(base, "a red star", Axis("sr", ["green", "blue"]), steps=1, out_dir=tmp_path, progress=False)
    with pytest.raises(SdtuneError, match="no such file"):
        xy_plot(base, "x", parse_axis("loras=none|missing.safetensors"), steps=1, out_dir=tmp_path, progress=False)
    assert len(base.loras) == 0
    # a seed range of 100,000 filled the machine's memory as one batch: a grid has a size limit, batches too
    with pytest.raises(SdtuneError, match="3600 cells: a grid takes at most 2500"):
        xy_plot(base, "x", Axis("seed", list(range(60))), Axis("guidance", list(range(1, 61))), steps=1,
                out_dir=tmp_path / "big", progress=False)
    # a range longer than that is refused as written, before its list is made (1-100000000 took a minute)
    for spec, n in (("seed=1-100000000", 100000000), ("cfg=3-7[100000000]", 100000000), ("weight=0-1(+0.0001)", 10001)):
        with pytest.raises(SdtuneError, match=rf"^{spec.split('=')[0]} axis range '{re.escape(spec.split('=')[1])}': "
                                              rf"{n} values; a grid takes at most 2500 cells$"):
            parse_axis(spec)
    assert [len(r) for r in _runs([_Cell(0, i, "x", "", i, 1, 7.5, "ddim", 1) for i in range(20)])] == [8, 8, 4]
    with pytest.raises(SdtuneError, match=r"--name '../up': a file name stem"):
        xy_plot(base, "x", Axis("seed", [1]), steps=1, out_dir=tmp_path, name="../up", progress=False)
    with pytest.raises(SdtuneError, match="--cell 0: must be at least 8"):
        xy_plot(base, "x", Axis("seed", [1]), steps=1, out_dir=tmp_path, cell=0, progress=False)


def test_weights_shorthand(base, lora_files, tmp_path):
    """``weights`` (``sdtune grid --weights``) is a weight axis in front: the columns, the other axis the rows."""
    x, y = axes_from_specs(y="seed=1,2", weights="0,1")
    path = xy_plot(base, "a red star", x, y, seed=1, steps=1, loras=[str(lora_files[0])], out_dir=tmp_path, cell=64,
                   progress=False)
    fields = parse_infotext(read_infotext(path))
    assert fields["X Type"] == "LoRA weight (style)" and fields["Y Type"] == "Seed"
    # the columns name the LoRA they sweep (the only one loaded), not "LoRA"
    assert json.loads((tmp_path / "xy.json").read_text())["x"]["labels"] == ["style 0", "style 1"]
    assert sorted(p.name for p in tmp_path.glob("xy-*.png")) == ["xy-00-00.png", "xy-00-01.png", "xy-01-00.png",
                                                                  "xy-01-01.png"]
    x, y = axes_from_specs("cfg=3,7", weights="0,1", sweep="style")
    assert (x.kind, x.values, x.target, y.kind, y.values) == ("weight", [0.0, 1.0], "style", "guidance", [3.0, 7.0])
    with pytest.raises(SdtuneError, match="give --x KIND=VALUES"):
        axes_from_specs(y="seed=1,2")
    with pytest.raises(SdtuneError, match="third axis"):
        axes_from_specs("seed=1,2", "cfg=3,7", weights="0,1")


def test_command_line_allow_partial(partial_file, tmp_path, capsys):
    """``sdtune grid``: a LoRA with unmatched keys is refused, and applied (with a warning) under --allow-partial."""
    args = ["grid", "--model", "tiny-random", "--prompt", "a red star", "--lora", str(partial_file),
            "--weights", "0,1", "--steps", "1", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "down_blocks.7" in err[0] and "--allow-partial" in err[0]
    assert not list(tmp_path.glob("*.png"))
    with pytest.warns(UserWarning, match="applying only the"):
        assert cli.main([*args, "--allow-partial"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "xy.png")
    # the modules that fit were applied: weight 1 draws something else than weight 0 (the base)
    assert not np.array_equal(_pixels(tmp_path / "xy-00-00.png"), _pixels(tmp_path / "xy-00-01.png"))


def test_a_replaced_grid_leaves_none_of_its_cells_behind(base, tmp_path):
    """A grid drawn again under its name with fewer cells (a rerun of the demo, --quick after a full one): the
    folder holds the new grid's cells only, as its JSON lists them; another grid's cells stay."""
    xy_plot(base, "a red circle", Axis("seed", [1, 2, 3]), y=Axis("cfg", [1.0, 2.0]), seed=1, steps=1,
            out_dir=tmp_path, progress=False, name="g")
    xy_plot(base, "a red circle", Axis("seed", [1]), seed=1, steps=1, out_dir=tmp_path, progress=False, name="other")
    xy_plot(base, "a red circle", Axis("seed", [1, 2]), seed=1, steps=1, out_dir=tmp_path, progress=False, name="g")
    listed = {f for row in json.loads((tmp_path / "g.json").read_text())["cells"] for f in row}
    assert {p.name for p in tmp_path.glob("g-*.png")} == listed == {"g-00-00.png", "g-00-01.png"}
    assert (tmp_path / "other-00-00.png").is_file()


def test_command_line_adapters_axis_as_the_readme_writes_it(base, lora_files, emb_file, tmp_path, capsys):
    """``--x "adapters=none|<tok>|a|a:0.5+<tok>"`` (the README's line, the demo's mix grid): LoRAs named by file stem
    and embeddings by token on one axis; the 'none' cell is the base model, the last credits both adapters."""
    args = ["grid", "--model", "tiny-random", "--prompt", "a photo of <thing>", "--lora", str(lora_files[0]),
            "--embedding", f"{emb_file}:<thing>", "--x", "adapters=none|<thing>|style|style:0.5+<thing>",
            "--steps", "1", "--seed", "4", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "xy.png")
    cells = [_pixels(tmp_path / f"xy-00-{c:02d}.png") for c in range(4)]
    [plain] = generate(base, "a photo of <thing>", steps=1, seed=4, progress=False)
    assert np.array_equal(cells[0], np.asarray(plain.image))
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(cells, 2))
    fields = parse_infotext(read_infotext(tmp_path / "xy-00-03.png"))
    assert "Lora hashes" in fields and "TI hashes" in fields
    assert parse_infotext(read_infotext(tmp_path / "xy.png"))["X Type"] == "Adapters"


def test_the_grid_png_names_its_fixed_loras_as_a_cell_does_and_one_name_twice_is_refused(lora_files, tmp_path, capsys):
    """A LoRA given to every cell: the grid's PNG carries its block weights and hash (it said style=0.8 only, so
    its settings redrew another image); a file given twice, or two files of one name (the cells' prompt tags would
    name both 'style'), is one line before any cell."""
    args = ["grid", "--model", "tiny-random", "--prompt", "a red star", "--x", "seed=1,2", "--steps", "1",
            "--no-progress", "--out", str(tmp_path / "g")]
    assert cli.main([*args, "--lora", f"{lora_files[0]}:0.8:lbw=INALL"]) == 0
    grid = parse_infotext(read_infotext(tmp_path / "g" / "xy.png"))
    cell = parse_infotext(read_infotext(tmp_path / "g" / "xy-00-00.png"))
    assert grid["Lora weights"] == "style=0.8:lbw=INALL" and grid["Lora hashes"] == cell["Lora hashes"]
    assert cell["Lora weights"].startswith("style=0.8:lbw=1,0,1,")
    other = tmp_path / "b" / "style.safetensors"
    other.parent.mkdir()
    other.write_bytes(lora_files[1].read_bytes())
    capsys.readouterr()
    for second in (f"{lora_files[0]}:0.3", str(other)):
        assert cli.main([*args, "--lora", str(lora_files[0]), "--lora", second]) == 2
        assert capsys.readouterr().err.strip() == (
            f"sdtune: error: --lora {second}: a LoRA named style is given already (--lora {lora_files[0]}); give "
            f"each file once, with the weight it should have, and rename one of two files of one name (prompt tags "
            f"and PNGs name a LoRA by its file name)")
    assert not (tmp_path / "g" / "xy-2.png").exists()
