"""Block weights (the A1111 lora-block-weight extension's lbw=): which layers each block weight scales, on the real
SD 1.x block structure (``sd1-small-random``), SDXL's (``sdxl-small-random``) and the tiny model's (three levels of one
resnet), its presets, the prompt/CLI/API forms, ``lora merge --blocks`` and the errors.

The oracle for "which block is this layer in" is written here from the LDM UNet's numbering (input_blocks: conv_in,
then per level ``layers_per_block`` (resnet, attention) entries and a downsampler; output_blocks: per level
``layers_per_block + 1`` entries, the upsampler in the last), with the extension's rule that text-encoder layers
are BASE and layers outside the blocks keep the plain weight; sdtune finds blocks through ``ldm.unet_module_map``.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from sdtune import api
from sdtune.cli import main
from sdtune.lora import blocks
from sdtune.lora.formats import load_lora, save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.models import load_base
from sdtune.safeio import SdtuneError

W = 0.8  # the adapter's own weight in every test

# The extension's default presets (lora_block_weight.py, DEF_WEIGHT_PRESET), 17 weights each.
EXTENSION_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "ALL0.5": ",".join(["0.5"] * 17),
}
# The extension's block ids of the 17- and 12-weight vectors (BLOCKID17, BLOCKID12).
ID17 = "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11".split()
ID12 = "BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05".split()
# The tiny model's blocks with attention (one resnet + attention per level, the deepest level without)
ID8 = "BASE IN01 IN03 M00 OUT02 OUT03 OUT04 OUT05".split()


@pytest.fixture(scope="module")
def sd1():
    return load_base("sd1-small-random", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def xl():
    return load_base("sdxl-small-random", device="cpu", dtype="fp32")


def expected_block(comp: str, path: str, per_level: int = 2) -> str | None:
    """The extension's block of a layer, from the LDM numbering (see the module docstring)."""
    if comp != "unet":
        return "BASE"
    p = path.split(".")
    if p[0] == "conv_in":
        return "IN00"
    if p[0] == "mid_block":
        return "M00"
    if p[0] == "down_blocks":
        level = int(p[1])
        j = per_level if p[2] == "downsamplers" else int(p[3])
        return f"IN{1 + level * (per_level + 1) + j:02d}"
    if p[0] == "up_blocks":
        level = int(p[1])
        j = per_level if p[2] == "upsamplers" else int(p[3])
        return f"OUT{level * (per_level + 1) + j:02d}"
    return None  # time_embedding, add_embedding, conv_out


def layers_of(base) -> list[tuple[str, str]]:
    """One small layer per UNet part (each resnet, attention, sampler and top-level module), plus one per text
    encoder: every block and the layers outside them, at little patching cost."""
    smallest: dict[str, tuple[int, str]] = {}
    for name, m in base.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            p = name.split(".")
            part = ".".join(p[:4] if p[0] in ("down_blocks", "up_blocks") else p[:3] if p[0] == "mid_block" else p[:1])
            if part not in smallest or m.weight.numel() < smallest[part][0]:
                smallest[part] = (m.weight.numel(), name)
    layers = [("unet", name) for _, name in smallest.values()]
    return layers + [(te.component, "encoder.layers.0.self_attn.q_proj") for te in base.family.text_encoders]


def module(base, comp, path):
    root = getattr(base, comp)
    try:
        return root.get_submodule(path)
    except AttributeError:  # CLIPTextModelWithProjection keeps the text_model level
        return root.get_submodule("text_model." + path)


def lora_file(base, path, seed=0) -> str:
    """A rank-1 LoRA/LoCon on ``layers_of(base)``."""
    g = torch.Generator().manual_seed(seed)
    lora = Lora()
    for comp, p in layers_of(base):
        w = module(base, comp, p).weight
        down_shape = (1, *w.shape[1:]) if w.dim() == 4 else (1, w.shape[1])
        up_shape = (w.shape[0], 1, 1, 1) if w.dim() == 4 else (w.shape[0], 1)
        lora.modules[comp][p] = Adapter("lora", {"down": torch.randn(*down_shape, generator=g) * 0.1,
                                                 "up": torch.randn(*up_shape, generator=g) * 0.1}, 1.0)
    save_lora(lora, path)
    return str(path)


def weights(base) -> dict:
    return {(c, p): module(base, c, p).weight.detach().clone() for c, p in layers_of(base)}


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    return case(load_base("tiny-random"), tmp_path_factory.mktemp("tiny") / "a.safetensors")


@pytest.fixture(scope="module")
def sd1_case(sd1, tmp_path_factory):
    return case(sd1, tmp_path_factory.mktemp("sd1") / "a.safetensors")


@pytest.fixture(scope="module")
def xl_case(xl, tmp_path_factory):
    return case(xl, tmp_path_factory.mktemp("xl") / "a.safetensors")


def case(base, path):
    """(base, file, pristine weights, weights with the file applied plainly at W)."""
    f = lora_file(base, path)
    w0 = weights(base)
    base.loras.add("plain", f, W)
    plain = weights(base)
    base.loras.remove_all()
    assert all(not torch.equal(w0[k], plain[k]) for k in w0)  # the LoRA changes every chosen layer
    return base, f, w0, plain


def applied(base, f, blocks_spec, weight=W) -> dict:
    base.loras.add("a", f, weight, blocks=blocks_spec)
    out = weights(base)
    base.loras.remove_all()
    return out


@pytest.mark.parametrize("which", ["sd1_case", "xl_case", "tiny_case"])
def test_every_block_weight_scales_its_own_layers(which, request):
    """One distinct weight per block: each layer's change is the plain one times its block's weight."""
    base, f, w0, plain = request.getfixturevalue(which)
    ids = blocks.layout(base.family).blocks
    per_block = {b: 0.1 + 0.03 * i for i, b in enumerate(ids)}
    got = applied(base, f, [per_block[b] for b in ids])
    seen = set()
    for key in w0:
        block = expected_block(*key, per_level=base.unet.config.layers_per_block)
        factor = 1.0 if block is None else per_block[block]
        seen.add(block)
        change, full = (got[key] - w0[key]).double(), (plain[key] - w0[key]).double()
        ratio = float((change * full).sum() / (full * full).sum())
        assert ratio == pytest.approx(factor, rel=1e-4), (key, block)
    assert set(ids) <= seen and None in seen  # every block and the layers outside them were checked
    assert all(torch.equal(module(base, c, p).weight, w0[(c, p)]) for c, p in w0)  # restored bit for bit


@pytest.mark.parametrize("which, block", [("sd1_case", "OUT11"), ("xl_case", "BASE"), ("xl_case", "M00"),
                                          ("xl_case", "OUT02"), ("xl_case", "IN03")])
def test_one_block_at_zero_and_half_touches_only_its_layers(which, block, request):
    base, f, w0, plain = request.getfixturevalue(which)
    ids = blocks.layout(base.family).blocks
    in_block = {k for k in w0 if expected_block(*k) == block}
    assert in_block
    off = applied(base, f, [0.0 if b == block else 1.0 for b in ids])
    half = applied(base, f, [0.5 if b == block else 1.0 for b in ids])
    at_half = applied(base, f, None, weight=W * 0.5)  # W · 0.5 is exact in floating point
    for k in w0:
        if k in in_block:
            assert torch.equal(off[k], w0[k]) and torch.equal(half[k], at_half[k]), k
        else:  # every other layer bit for bit as the plain apply
            assert torch.equal(off[k], plain[k]) and torch.equal(half[k], plain[k]), k


def test_short_vectors_leave_out_blocks_as_the_extension(sd1_case, xl_case, tiny_case):
    """17 (SD), 12 (SDXL) and 8 (tiny) weights: the blocks they do not list get 0 (the extension's to26)."""
    for base, f, w0, plain in (sd1_case, xl_case, tiny_case):
        listed = set({"sd1": ID17, "sdxl": ID12, "tiny": ID8}[base.family.name])
        got = applied(base, f, "ALL")
        for k in w0:
            block = expected_block(*k, per_level=base.unet.config.layers_per_block)
            want = w0[k] if block is not None and block not in listed else plain[k]
            assert torch.equal(got[k], want), (k, block)


def test_presets_expand_to_the_extensions_vectors():
    from sdtune import families

    for name, text in EXTENSION_PRESETS.items():
        want = dict(zip(ID17, map(float, text.split(","))))
        got = blocks.parse(name, families.SD1)
        assert got == blocks.parse(text, families.SD2)
        assert {b: got[b] for b in ID17} == want and all(v == 0 for b, v in got.items() if b not in ID17)
    xl = {name: blocks.parse(name, families.SDXL) for name in EXTENSION_PRESETS}
    on = {name: {b for b, v in vec.items() if v == 1} for name, vec in xl.items()}
    assert on["INALL"] == {"BASE", "IN04", "IN05", "IN07", "IN08"}
    assert on["OUTALL"] == {"BASE", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"}
    assert on["MIDD"] == {"BASE", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02"}
    assert on["NONE"] == set() and set(xl["ALL0.5"].values()) == {0.0, 0.5}
    assert len(blocks.parse(",".join(["1"] * 20), families.SDXL)) == 20
    tiny = {name: {b for b, v in blocks.parse(name, families.TINY).items() if v == 1} for name in EXTENSION_PRESETS}
    assert tiny["INALL"] == {"BASE", "IN01", "IN03"} and tiny["OUTALL"] == {"BASE", "OUT02", "OUT03", "OUT04", "OUT05"}
    assert tiny["MIDD"] == {"BASE", "IN03", "M00", "OUT02", "OUT03"} and tiny["ALL"] == set(ID8)
    assert len(blocks.parse(",".join(["1"] * 14), families.TINY)) == 14


def test_prompt_tag_and_cli_flag_give_the_api_weights(xl_case, tmp_path, monkeypatch):
    base, f, w0, _ = xl_case
    vector = "1,0,0.5,1,0,1,0.25,1,0,1,1,0.75"
    want = applied(base, f, vector)
    seen = []
    monkeypatch.setattr(api, "_generate", lambda b, *a, **k: seen.append(weights(b)) or [])
    clean, tags = api.lora_tags(f"a cat, <lora:a:{W}:lbw={vector}>")
    assert clean == "a cat, " and tags == [api.LoraTag("a", W, None, vector)]  # only the tag goes, as in A1111
    api.generate(base, f"a cat, <lora:a:{W}:lbw={vector}>", lora_dirs=(str(Path(f).parent),))
    assert all(torch.equal(module(base, c, p).weight, w0[(c, p)]) for c, p in w0)  # the tag's LoRA is gone after
    assert main(["generate", "--model", "sdxl-small-random", "--device", "cpu", "--dtype", "fp32", "--prompt", "a",
                 "--lora", f"{f}:{W}:lbw={vector}", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    for got in seen:
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(seen) == 2
    name = api.add_lora(base, f"{f}:{W}:lbw=INALL")  # the spec form of the API
    assert base.loras.list()[0]["blocks"] == blocks.parse("INALL", base.family)
    base.loras.remove(name)


def test_merge_blocks_bakes_them_into_a_plain_lora(xl_case, tmp_path):
    base, f, w0, _ = xl_case
    vector = "1,0,0.5,1,0,1,0.25,1,0,1,1,0.75"
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "merge", f"{f}:{W}:lbw={vector}", "--blocks", "--out", str(out)]) == 0
    baked = load_lora(out)
    want = applied(base, f, vector)
    got = applied(base, str(out), None, weight=1.0)
    for k in w0:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    zero = {b for b, v in blocks.parse(vector, base.family).items() if v == 0}
    kept = {(c, p) for c, p, _ in baked.items()}
    assert kept == {k for k in w0 if expected_block(*k) not in zero}  # layers weighted 0 are left out


def test_bad_vectors_are_one_clear_error(sd1_case, xl_case, tmp_path, capsys):
    from sdtune import families

    with pytest.raises(SdtuneError, match=r"^lbw=1,0,1: SD 1.x takes 17 or 26 comma-separated block weights, or a "
                                          r"preset: NONE, ALL, .*OUTALL, ALL0.5$"):
        blocks.parse("1,0,1", families.SD1)
    with pytest.raises(SdtuneError, match="SDXL takes 12 or 20 .*block weights"):
        blocks.parse(EXTENSION_PRESETS["ALL"], families.SDXL)  # a 17-weight SD vector on SDXL
    with pytest.raises(SdtuneError, match="lbw=INNALL: SD 2.x takes 17 or 26"):
        blocks.parse("INNALL", families.SD2)
    with pytest.raises(SdtuneError, match="lbw=1,x,1: "):
        blocks.parse("1,x,1", families.SD1)
    with pytest.raises(SdtuneError, match="a model of unknown family has none. Give the LoRA a plain weight"):
        blocks.parse("ALL", None)
    with pytest.raises(SdtuneError, match="lbw=BOGUS: the built-in tiny model takes 8 or 14 .* preset: NONE, ALL"):
        blocks.parse("BOGUS", families.TINY)
    base, f, w0, _ = xl_case
    with pytest.raises(SdtuneError, match="SDXL takes 12 or 20") as e:
        base.loras.add("bad", f, 1.0, blocks="1,1")
    assert "\n" not in str(e.value) and "bad" not in base.loras
    with pytest.raises(SdtuneError, match="unknown option 'lbwe'"):
        api.lora_tags("<lora:a:1:lbwe=x>")
    assert main(["lora", "merge", f"{f}:1:lbw=ALL", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "add --blocks" in capsys.readouterr().err
    assert main(["lora", "merge", f"{f}:1:lbw=1,2", "--blocks", "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"sdtune: error: lbw=1,2: SDXL takes 12 or 20 .*", err) and not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------- block weights baked into a checkpoint

VECTOR_XL = "1,0,0.5,1,0,1,0.25,1,0,1,1,0.75"


@pytest.fixture(scope="module")
def xl_single(xl, tmp_path_factory):
    from sdtune import models

    return models.save_single_file(xl, tmp_path_factory.mktemp("xl-single") / "base.safetensors")


def test_checkpoint_merge_bakes_block_weights_as_apply_does(xl_case, xl_single, tmp_path):
    """``sdtune merge --lora FILE:W:lbw=…`` (a single file streamed to a single file) and ``bake.merge`` with
    (lora, weight, blocks) (a diffusers folder streamed to a folder) give each layer the bits of the same LoRA
    applied with those block weights; the merge note records them. (sdxl-small-random: SDXL's blocks at small
    widths.)"""
    from safetensors import safe_open

    from sdtune import models
    from sdtune.lora import bake

    base, f, w0, plain = xl_case
    want = applied(base, f, VECTOR_XL)
    assert any(torch.equal(want[k], w0[k]) for k in w0) and any(not torch.equal(want[k], plain[k]) for k in w0)
    out = tmp_path / "baked.safetensors"
    assert main(["merge", "--model", str(xl_single), "--lora", f"{f}:{W}:lbw={VECTOR_XL}", "--out", str(out)]) == 0
    got = weights(load_base(str(out), device="cpu", dtype="fp32"))
    for k in w0:
        assert torch.equal(got[k], want[k]), k
    with safe_open(str(out), "pt") as fh:
        note = json.loads(fh.metadata()[bake.META_MERGED])
    assert note == [{"source": f, "unet_weight": W, "te_weight": W, "te2_weight": W, "blocks": VECTOR_XL}]

    folder = models.save_diffusers(base, tmp_path / "base-folder")
    out_folder = bake.merge(str(folder), [(f, W, "OUTALL")], tmp_path / "baked-folder")
    want = applied(base, f, "OUTALL")
    got = weights(load_base(str(out_folder), device="cpu", dtype="fp32"))
    for k in w0:
        assert torch.equal(got[k], want[k]), k
    assert all(torch.equal(module(base, c, p).weight, w0[(c, p)]) for c, p in w0)  # the base was not touched


def test_checkpoint_merge_with_bad_block_weights_writes_nothing(xl_case, xl_single, tmp_path, capsys):
    _, f, _, _ = xl_case
    out = tmp_path / "baked.safetensors"
    assert main(["merge", "--model", str(xl_single), "--lora", f"{f}:1:lbw=1,0", "--out", str(out)]) == 2
    assert "lbw=1,0: SDXL takes 12 or 20" in capsys.readouterr().err and not out.exists()
    assert main(["merge", "--model", "tiny", "--lora", f"{f}:1:lbw=1,0", "--out", str(out)]) == 2
    assert "lbw=1,0: the built-in tiny model takes 8 or 14" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------- block weights in X/Y plots

def pixels(path):
    from PIL import Image

    return torch.from_numpy(__import__("numpy").asarray(Image.open(path).convert("RGB")).astype("int16"))


def direct(base, f, weight, spec, tmp_path, name) -> torch.Tensor:
    """The image of the plot's settings with the LoRA applied straight away (weight, block weights)."""
    from sdtune.generate import generate

    base.loras.add("direct", f, weight, blocks=spec)
    try:
        image = generate(base, "a cat", steps=1, seed=4, width=64, height=64, progress=False)[0].image
    finally:
        base.loras.remove_all()
    image.save(tmp_path / f"{name}.png")
    return pixels(tmp_path / f"{name}.png")


def test_grid_blocks_axis_through_the_cli(xl_case, tmp_path):
    """``sdtune grid --lora FILE:W --x 'blocks=…|…'``: each column is the LoRA applied with that column's block
    weights (a preset or a vector), and the grid's record names the axis and the LoRA it sweeps."""
    base, f, _, _ = xl_case
    values = ["INALL", VECTOR_XL]
    out = tmp_path / "grid"
    assert main(["grid", "--model", "sdxl-small-random", "--device", "cpu", "--dtype", "fp32", "--prompt", "a cat",
                 "--lora", f"{f}:{W}", "--x", "blocks=" + "|".join(values), "--steps", "1", "--seed", "4",
                 "--width", "64", "--height", "64", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "xy.json").read_text())
    assert record["x"]["kind"] == "blocks" and record["x"]["values"] == values and record["x"]["target"] == "a"
    assert "X Type: LoRA block weights (a)" in record["parameters"]
    cells = [pixels(out / f"xy-00-{c:02d}.png") for c in range(len(values))]
    for c, spec in enumerate(values):
        want = direct(base, f, W, spec, tmp_path, f"want{c}")
        assert int((cells[c] - want).abs().max()) <= 1, spec  # the same merge: at most rounding in the PNG
    assert not torch.equal(cells[0], cells[1])


def test_plot_lbw_in_lora_specs_and_adapter_items(xl_case, tmp_path):
    """``loras=["FILE:W:lbw=…"]`` keeps those block weights where no axis sets them; an adapter-axis item
    ``FILE:W:lbw=…`` sets its own; the plot leaves the base as it was."""
    from sdtune.xyplot import Axis, xy_plot

    base, f, w0, _ = xl_case
    grid = xy_plot(base, "a cat", Axis("weight", [W]), loras=[f"{f}:1:lbw=OUTALL"], seed=4, steps=1,
                   width=64, height=64, out_dir=tmp_path / "a", progress=False)
    want = direct(base, f, W, "OUTALL", tmp_path, "spec")
    assert int((pixels(grid.parent / "xy-00-00.png") - want).abs().max()) <= 1
    grid = xy_plot(base, "a cat", Axis("loras", [f"{f}:0.6:lbw=INALL"]), seed=4, steps=1, width=64,
                   height=64, out_dir=tmp_path / "b", progress=False)
    want = direct(base, f, 0.6, "INALL", tmp_path, "item")
    assert int((pixels(grid.parent / "xy-00-00.png") - want).abs().max()) <= 1
    assert len(base.loras) == 0 and all(torch.equal(module(base, c, p).weight, w0[(c, p)]) for c, p in w0)


def test_plot_block_weights_errors(xl_case, tmp_path, capsys):
    from sdtune.xyplot import Axis, xy_plot

    base, f, _, _ = xl_case
    with pytest.raises(SdtuneError, match="lbw=1,1: SDXL takes 12 or 20"):
        xy_plot(base, "a cat", Axis("blocks", ["ALL", "1,1"]), loras=[f], steps=1, out_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.png")) and len(base.loras) == 0  # stopped before any image
    base.loras.add("before", f, 1.0)
    try:
        with pytest.raises(SdtuneError, match="before was loaded before the plot"):
            xy_plot(base, "a cat", Axis("blocks", ["ALL"], target="before"), steps=1, out_dir=tmp_path,
                    progress=False)
    finally:
        base.loras.remove_all()
    assert main(["grid", "--model", "sdxl-small-random", "--prompt", "a", "--lora", f"{f}:1", "--x",
                 "lbw=INALL|1,0", "--steps", "1", "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "lbw=1,0: SDXL takes 12 or 20" in capsys.readouterr().err and not list(tmp_path.rglob("*.png"))
