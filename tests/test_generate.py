import hashlib
import re
import shutil

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdtune import api, families, sources
from sdtune.cli import main
from sdtune.generate import (
    draw_grid,
    generate,
    grid,
    infotext,
    make_scheduler,
    parse_infotext,
    read_infotext,
    sampling_steps,
    save_batch,
)
from sdtune.models import load_base
from sdtune.safeio import SdtuneError
from sdtune.samplers import sampler_key, scheduler_available
from sdtune.tiny import files as tiny_files


def test_same_seed_same_pixels_and_seed_sequence(base):
    a = generate(base, "a red circle", steps=4, seed=7, num_images=2, progress=False)
    b = generate(base, "a red circle", steps=4, seed=7, num_images=2, progress=False)
    assert [r.seed for r in a] == [7, 8]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    c = generate(base, "a red circle", steps=4, seed=9, num_images=1, progress=False)
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(c[0].image))


def test_a_random_seed_is_random_after_a_model_load():
    """Loading a built-in model seeds torch's global generator; seed -1 must not follow it (it did: every
    first "random" seed after a load was 1143939325)."""
    seeds = set()
    for _ in range(3):
        base = load_base("tiny-random")
        seeds.add(generate(base, "a red circle", steps=1, seed=-1, progress=False)[0].seed)
    assert len(seeds) == 3


def test_png_carries_a1111_parameters(base, tmp_path):
    res = generate(base, "a blue star", negative_prompt="blurry", steps=3, guidance=6.0, seed=5, num_images=2,
                   scheduler="euler_a", progress=False)
    paths = save_batch(res, tmp_path)
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png", "grid-00000.png"]
    text = read_infotext(paths[1])
    lines = text.split("\n")
    assert lines[0] == "a blue star" and lines[1] == "Negative prompt: blurry"
    fields = parse_infotext(text)
    assert fields["Steps"] == "3" and fields["Sampler"] == "Euler a" and fields["CFG scale"] == "6.0"
    assert fields["Seed"] == "6" and fields["Size"] == "64x64" and fields["Model"] == "tiny-random"
    assert fields["Model hash"] == base.model_hash
    assert Image.open(paths[2]).size == (128, 64)
    # what A1111 needs to read it as drawn: the CPU's first noise; no emphasis or padding in this prompt
    assert fields["RNG"] == "CPU" and not {"Emphasis", "Pad conds", "Schedule type"} & set(fields)


def test_png_says_where_a1111_defaults_differ(base):
    """A1111's DPM++ 2M is Karras unless the PNG says otherwise, its emphasis rescales unless told "No norm", and it
    runs a negative prompt of fewer chunks apart unless "Pad conds" says sdtune padded it."""
    (res,) = generate(base, "a (blue) star " + "on white, " * 30, negative_prompt="blurry", steps=1, seed=1,
                      scheduler="dpmpp_2m", progress=False)
    fields = parse_infotext(res.infotext)
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Uniform"
    assert fields["Emphasis"] == "No norm" and fields["Pad conds"] == "True"
    assert sampler_key("DPM++ 2M", "Uniform") == "dpmpp_2m" and sampler_key("DPM++ 2M", "Automatic") == \
        "dpmpp_2m_karras" == sampler_key("DPM++ 2M Karras") == sampler_key("DPM++ 2M", "Karras")
    assert sampler_key("PLMS") == "pndm" == sampler_key("PNDM") and sampler_key("Euler a", "Karras") is None
    # PLMS is linear multistep from the first step, whatever the model's scheduler config says (tiny's is DDIM's)
    assert make_scheduler("pndm", base.scheduler).config.skip_prk_steps is True
    # A1111 looks for brackets in the texts once edited: an edit alone weighs nothing
    (edited,) = generate(base, "a [red:blue:0.5] star", steps=1, seed=1, progress=False)
    assert "Emphasis" not in parse_infotext(edited.infotext)


def _k_diffusion_sigmas(config: dict, steps: int) -> torch.Tensor:
    """A1111's noise levels for its k-diffusion samplers (the "Automatic"/"Uniform" schedule): t = linspace(999, 0,
    steps), sigma(t) interpolated in log sigma between the model's 1000 levels, as k-diffusion's get_sigmas does."""
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    log_sigmas = ((1 - alphas) / alphas).sqrt().log()
    t = torch.linspace(999, 0, steps, dtype=torch.float64)
    low = t.floor().long()
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[(low + 1).clamp(max=999)]).exp()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_samplers_take_a1111s_noise_levels(family):
    """Euler, Euler a and Heun sample at k-diffusion's levels whatever the model's config spaces (SDXL's says
    "leading", which started a 20-step Euler at sigma 11.0 where A1111's starts at 14.6); DPM++ 2M too, from the top
    level to sigma(0) (diffusers' own spacing stopped at t = 50, sigma 0.22); DDIM and PLMS keep the leading steps
    (t = 951, 901, ... at 20 steps) that A1111's own DDIM and PLMS take."""
    config = families.FAMILIES[family].component_configs()["scheduler"]
    base_scheduler = diffusers.DDIMScheduler.from_config(config)
    want = _k_diffusion_sigmas(config, 20)
    for name in ("euler", "euler_a", "heun", "dpmpp_2m", *(["lms"] if scheduler_available("lms") else [])):
        scheduler = make_scheduler(name, base_scheduler)
        scheduler.set_timesteps(**sampling_steps(name, scheduler, 20))
        sigmas = scheduler.sigmas.double()
        if name == "heun":  # each interior level twice: Heun's two evaluations
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
        assert sigmas[-1] == 0 and len(sigmas) == 21, name
        if name == "dpmpp_2m":  # DPMSolver takes whole timesteps: the top and the last level (t = 0) exact, the
            torch.testing.assert_close(sigmas[[0, -2]], want[[0, -1]], rtol=1e-4, atol=0)  # others within 1%
            torch.testing.assert_close(sigmas[:-1], want, rtol=1e-2, atol=0)
        else:
            torch.testing.assert_close(sigmas[:-1], want, rtol=1e-4, atol=0, msg=name)
    for name in ("ddim", "pndm"):
        scheduler = make_scheduler(name, base_scheduler)
        scheduler.set_timesteps(20)
        assert scheduler.timesteps[:2].tolist() == [951, 901], name


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "unipc"])
def test_schedulers_run_and_differ_from_noise(base, name):
    res = generate(base, "a red circle", steps=3, seed=1, scheduler=name, progress=False)
    assert res[0].image.size == (64, 64)


def test_a1111_sampler_names_are_taken(base, tmp_path, capsys):
    """A1111's names, as its UI and PNGs say them, draw what sdtune's keys draw and are written back the same."""
    [ours] = generate(base, "a red circle", steps=2, seed=1, scheduler="dpmpp_2m_karras", progress=False)
    [theirs] = generate(base, "a red circle", steps=2, seed=1, scheduler="DPM++ 2M Karras", progress=False)
    assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image)) and ours.infotext == theirs.infotext
    assert main(["generate", "--model", "tiny-random", "--prompt", "a red circle", "--steps", "1", "--scheduler",
                 "Euler a", "--no-progress", "--out", str(tmp_path)]) == 0
    assert parse_infotext(read_infotext(capsys.readouterr().out.split()[-1]))["Sampler"] == "Euler a"


def test_bad_inputs_are_clear_errors(base):
    with pytest.raises(SdtuneError, match="unknown scheduler 'nope'"):
        generate(base, "x", scheduler="nope", steps=1)
    with pytest.raises(SdtuneError, match="multiple of 8"):
        generate(base, "x", width=60, steps=1)
    with pytest.raises(SdtuneError, match="--num-images 0: must be at least 1"):
        generate(base, "x", num_images=0, steps=1)
    with pytest.raises(SdtuneError, match="--guidance nan: must be a finite number"):
        generate(base, "x", guidance=float("nan"), steps=1)
    with pytest.raises(SdtuneError, match=r"--seed 99999999999999999999: must be from -1 \(random\) to"):
        generate(base, "x", seed=99999999999999999999, steps=1)  # torch takes 63 bits; it raised an overflow
    with pytest.raises(SdtuneError, match=r"^--seed -5: must be from -1 \(random\) to"):
        generate(base, "x", seed=-5, steps=1)  # was taken as random: a typo lost the seed the user meant
    with pytest.raises(SdtuneError, match=r"^height 100000: at most 8192 pixels"):
        generate(base, "x", height=100000, steps=1)  # ran for minutes, then ran out of memory
    with pytest.raises(SdtuneError, match=r"^--steps 2000: at most 1000 for this model \(its noise levels\)"):
        generate(base, "x", steps=2000)  # diffusers' ValueError, a traceback, before
    # what a Python caller may pass that the command line never does: each was a TypeError from deep inside
    for kwargs, said in (({"steps": 2.5}, r"^steps=2.5: must be a whole number$"),
                         ({"seed": "5"}, r"^seed='5': must be a whole number$"),
                         ({"guidance": None}, r"^guidance=None: must be a number$"),
                         ({"prompt": ["x", "y"]}, r"^prompt: one text \(a str\), not a list; for several images")):
        with pytest.raises(SdtuneError, match=said):
            api.generate(base, **({"prompt": "x", "steps": 1} | kwargs))
    # diffusers' default for no negative prompt is None: the same image as ""
    none, empty = (api.generate(base, "x", negative_prompt=n, steps=1, seed=1, progress=False)[0] for n in (None, ""))
    assert np.array_equal(np.asarray(none.image), np.asarray(empty.image))


def test_lms_without_scipy_is_one_line(monkeypatch):
    import importlib.util

    gen = importlib.import_module("sdtune.generate")  # the module (sdtune.generate names the function too)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(SdtuneError, match="scheduler 'lms' needs scipy, which is not installed; pip install scipy"):
        gen.check_scheduler("lms")
    # which the web UI's sampler menus leave out
    assert not gen.scheduler_available("lms") and gen.scheduler_available("euler_a")


def test_infotext_round_trip_quotes_commas():
    text = infotext("p", "", {"Steps": 2, "Lora weights": "a=0.5; b=1", "Model": "x, y"})
    assert parse_infotext(text)["Model"] == "x, y"
    assert parse_infotext(text)["Lora weights"] == "a=0.5; b=1"


def test_infotext_of_a1111_jpegs_and_webps_is_read_from_their_exif(tmp_path):
    """A1111 writes a JPEG's or WebP's parameters into the EXIF UserComment (piexif's UNICODE form, UTF-16
    big-endian); other tools write it little-endian, or as ASCII."""
    from PIL import Image

    text = "a castle, ünï\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    for name, comment in (("a.jpg", b"UNICODE\0" + text.encode("utf-16-be")),
                          ("b.webp", b"UNICODE\0" + text.encode("utf-16-le")),
                          ("c.jpg", b"ASCII\0\0\0" + text.encode("ascii", "replace"))):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = comment
        Image.new("RGB", (8, 8)).save(tmp_path / name, exif=exif)
        got = read_infotext(tmp_path / name)
        assert got == (text if name != "c.jpg" else text.replace("ünï", "?n?")), name
        assert parse_infotext(got)["Seed"] == "1"
    Image.new("RGB", (8, 8)).save(tmp_path / "none.jpg")
    assert read_infotext(tmp_path / "none.jpg") is None


def test_infotext_reads_as_a1111_writes_and_parses():
    """Values with quotes, backslashes or newlines are JSON-quoted (A1111's quote()), and read back; prompts and
    negative prompts may span lines; the last line holds the parameters."""
    values = {"Steps": 2, "Model": 'my "best", model', "VAE": "C:\\vae\\x,y.pt", "Note": "two\nlines"}
    text = infotext("a red\ncircle", "bad,\nugly", values)
    assert 'Model: "my \\"best\\", model"' in text and 'VAE: "C:\\\\vae\\\\x,y.pt"' in text
    assert parse_infotext(text) == {"prompt": "a red\ncircle", "negative_prompt": "bad,\nugly", "Steps": "2",
                                    "Model": 'my "best", model', "VAE": "C:\\vae\\x,y.pt", "Note": "two\nlines"}
    assert parse_infotext("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


def test_save_batch_numbers_after_the_highest_in_use(base, tmp_path):
    """A deleted image's number is not reused: the files after it would be overwritten (A1111 numbers so too)."""
    first = save_batch(generate(base, "x", steps=1, seed=1, num_images=2, progress=False), tmp_path)
    assert [p.name for p in first] == ["00000-1.png", "00001-2.png", "grid-00000.png"]
    kept = first[1].read_bytes()
    first[0].unlink()
    again = save_batch(generate(base, "y", steps=1, seed=1, progress=False), tmp_path)
    assert [p.name for p in again] == ["00002-1.png"] and first[1].read_bytes() == kept


def test_grid_labels_and_size():
    ims = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "white")]
    g = grid(ims, cols=2, row_labels=["r1", "r2"], col_labels=["c1", "c2"])
    assert g.size[0] > 128 and g.size[1] == 128 + 24


def test_grid_places_cells_gaps_and_empty_places():
    ims = [Image.new("RGB", (32, 16), c) for c in ("red", "green", "blue", "black", "yellow")]
    g = grid(ims, cols=3)  # row-major, no gaps, the last row's sixth place white
    assert g.size == (96, 32)
    assert [g.getpixel((16 + 32 * c, 8 + 16 * r)) for r in range(2) for c in range(3)] == [
        (255, 0, 0), (0, 128, 0), (0, 0, 255), (0, 0, 0), (255, 255, 0), (255, 255, 255)]
    # the drawer under it, as X/Y plots use it: 2-pixel gaps, cells scaled up (nearest) to 64 pixels wide
    g = draw_grid([ims[:2], ims[2:4]], cell=64, gap=2)
    assert g.size == (2 * 64 + 2, 2 * 32 + 2)
    assert g.getpixel((63, 31)) == (255, 0, 0) and g.getpixel((64, 31)) == (255, 255, 255)  # the gap
    assert g.getpixel((66, 34)) == (0, 0, 0)
    labelled = draw_grid([ims[:2]], ["a row label long enough to wrap onto two lines"], ["x", "y"], cell=64, gap=2)
    left, top = labelled.width - g.width, labelled.height - 32  # one row of 64x32 cells
    assert left > 0 and top > 0 and labelled.getpixel((left, top)) == (255, 0, 0)


def test_lora_tag_parsing():
    clean, tags = api.parse_lora_tags("a castle, <lora:moxin:0.8> <lora:b> <lyco:c:1:0.5>")  # lyco: A1111's alias
    assert clean == "a castle,   "  # only the tags go, as in A1111 (the comma is a token of the prompt)
    assert tags == [("moxin", 0.8, None), ("b", 1.0, None), ("c", 0.5, 1.0)]  # A1111: te first, then the UNet
    with pytest.raises(SdtuneError, match="must be a finite number"):
        api.parse_lora_tags("<lora:x:abc>")
    # A1111's named weights
    assert api.parse_lora_tags("a, <lora:x:unet=0.5:te=0.2>, b") == ("a, , b", [("x", 0.5, 0.2)])
    # A1111's UNet default is the text encoders' weight, te= included (extra_networks_lora.py)
    assert api.parse_lora_tags("<lora:x:1:te=0.5>")[1] == [("x", 0.5, None)]
    assert api.parse_lora_tags("<lora:x:unet=0.5>")[1] == [("x", 0.5, 1.0)]
    assert api.parse_lora_tags("a red <lora:x:1>circle")[0] == "a red circle"
    with pytest.raises(SdtuneError, match=r"^<lora:x:dyn=4>: .*; A1111's third, dyn, is not read by sdtune"):
        api.parse_lora_tags("<lora:x:dyn=4>")  # named as positional
    with pytest.raises(SdtuneError, match=r"^<lora:x:1:1:16>: a tag takes at most two weights .*; A1111's third, "
                                          r"dyn, is not read by sdtune: leave it out$"):
        api.parse_lora_tags("<lora:x:1:1:16>")
    with pytest.warns(UserWarning, match=r"^<hypernet:anime:1> in the prompt: sdtune has no hypernet networks; the "
                                         r"tag is left out, as A1111 leaves out a network it lacks$"):
        assert api.parse_lora_tags("a <hypernet:anime:1>girl")[0] == "a girl"
    # A1111's network names are case-sensitive: <LORA:x> is a network it lacks, so no LoRA applies
    with pytest.warns(UserWarning, match=r"^<LORA:x:0.5> in the prompt: A1111 reads only <lora:…> in lower case and "
                                         r"leaves this tag out, so sdtune does too; write <lora:x:0.5>$"):
        assert api.parse_lora_tags("a <LORA:x:0.5>girl, <lyco:y>") == ("a girl, ", [("y", 1.0, None)])


def test_a_lora_named_twice_applies_once_at_the_sum_of_its_weights(base, tmp_path):
    """A tag typed in the prompt and the same LoRA picked on the page (or one tag written twice): one adapter at
    the summed weights, as two ComfyUI loaders of one file give, not an error; different block weights refused."""
    import torch

    from sdtune.lora.formats import save_lora
    from sdtune.lora.neutral import Adapter, Lora

    lora = Lora()
    lora.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = Adapter(
        "lora", {"down": torch.randn(2, 32) * 0.3, "up": torch.randn(32, 2) * 0.3}, 2.0)
    (tmp_path / "loras").mkdir()
    save_lora(lora, tmp_path / "loras" / "style.safetensors")
    tag = api.LoraTag
    assert api.combined_tags([tag("a", 0.8, None, None), tag("b", 1, None, None), tag("a", 0.5, None, None)]) == [
        tag("a", 1.3, None, None), tag("b", 1, None, None)]
    assert api.combined_tags([tag("a", 0.8, 0.2, None), tag("a", 0.5, None, None)]) == [tag("a", 1.3, 0.7, None)]
    with pytest.raises(SdtuneError, match=r"^<lora:a:…> appears twice with different block weights \(lbw=INALL "
                                          r"and lbw=None\); write it once$"):
        api.combined_tags([tag("a", 1, None, "INALL"), tag("a", 1, None, None)])

    def image(prompt):
        (res,) = api.generate(base, prompt, lora_dirs=(tmp_path / "loras",), steps=2, seed=1, progress=False)
        return np.asarray(res.image), parse_infotext(res.infotext)

    twice, fields = image("a red star, <lora:style:0.8>, <lora:style:0.5>")
    once, _ = image("a red star, <lora:style:1.3>, ")  # the same text once the tags are out: "a red star, , "
    assert np.array_equal(twice, once) and not np.array_equal(twice, image("a red star")[0])
    assert fields["Lora weights"] == "style=1.3" and "<lora:style:0.8>, <lora:style:0.5>" in fields["prompt"]
    assert not len(base.loras)
    # a LoRA added from a file under another name is tagged by its file's stem, as A1111 names it: the saved
    # prompt finds it again in the LoRA folder
    base.loras.add("mine", tmp_path / "loras" / "style.safetensors", 0.8)
    try:
        mine, fields = image("a red star")
    finally:
        base.loras.remove("mine")
    assert fields["prompt"] == "a red star <lora:style:0.8>" and fields["Lora weights"] == "style=0.8"
    assert fields["Lora hashes"].startswith("style: ")
    assert np.array_equal(image(fields["prompt"])[0], mine)
    # given apart and in the prompt with other block weights, its image's prompt could not be drawn again: refused
    base.loras.add("mine", tmp_path / "loras" / "style.safetensors", 0.5)
    try:
        with pytest.raises(SdtuneError, match=r"^<lora:style:…> in the prompt and the LoRA style given apart from it "
                                              r"have different block weights; give it once$"):
            image("a red star <lora:style:0.8:lbw=INALL>")
        assert len(base.loras) == 1  # the tag's adapter was not left behind
    finally:
        base.loras.remove("mine")


def test_a_broken_lora_tag_is_said(base):
    """An unclosed tag or one without a name stays as words (as in A1111), with a warning that no LoRA applies."""
    import warnings

    for prompt, shown in (("a red star <lora:style:0.8", "'<lora:style:0.8'"), ("a <lora::0.5> star", "'<lora::0.5>'")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            api.generate(base, prompt, steps=1, seed=1, progress=False)
        assert [str(w.message) for w in caught] == [f"{shown} in the prompt is not a LoRA tag, so no LoRA is applied "
                                                    f"for it; write <lora:NAME:WEIGHT>"]
    # A1111's composable AND, which sdtune reads as a word: said, not silently different
    with pytest.warns(UserWarning, match=re.escape("'AND' in the prompt: sdtune does not read A1111's composable "
                                                   "AND")):
        api.generate(base, "a cat AND a dog", steps=1, seed=1, progress=False)
    with warnings.catch_warnings():  # emphasis, prompt editing and alternation are read: no warning
        warnings.simplefilter("error")
        api.generate(base, "a [red] (cat:1.2), and a [dog:cat:0.5] [on|in] grass", steps=2, seed=1, progress=False)


def test_a_tag_naming_no_lora_says_where_it_looked(base, tmp_path):
    (tmp_path / "loras").mkdir()
    with pytest.raises(SdtuneError, match=r"^<lora:nosuch:…> in the prompt: no LoRA named 'nosuch' in .*loras; "
                                          r"check the name, or pass the folder .* with --lora-dir$"):
        api.generate(base, "a, <lora:nosuch:0.8>", lora_dirs=(tmp_path / "loras",), steps=1, progress=False)
    with pytest.raises(SdtuneError, match=r"no LoRA named 'nosuch' \(no LoRA folder given\)"):
        api.generate(base, "a, <lora:nosuch:0.8>", steps=1, progress=False)


def test_source_specs(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x")
    assert sources.parse_weighted(f"{f}:0.5") == (str(f), 0.5)
    assert sources.parse_weighted(str(f)) == (str(f), 1.0)
    # the weights of A1111's tags, by place (the text encoders', then the UNet's) or by name
    assert sources.parse_weighted(f"{f}:0.2:0.5") == sources.parse_weighted(f"{f}:te=0.2:unet=0.5") == \
        (str(f), (0.5, 0.2))
    assert sources.parse_weighted(f"{f}:te=0.2") == (str(f), 0.2)  # the UNet's default is the text encoders'
    assert sources.parse_weighted(f"{f}:unet=0.3") == (str(f), (0.3, 1.0))
    assert sources.parse_weighted(f"{f}:2:unet=0.3:te=0.2") == (str(f), (0.3, 0.2))
    # SDXL's second text encoder's own weight, as a prompt tag's te2= (unet, te1, te2)
    assert sources.parse_weighted(f"{f}:0.5:0.8:te2=0") == (str(f), (0.8, 0.5, 0.0))
    assert sources.parse_weighted(f"{f}:0.7:te2=0.2") == (str(f), (0.7, 0.7, 0.2))
    with pytest.raises(SdtuneError, match="must be a finite number"):
        sources.parse_weighted(f"{f}:te2=inf")
    with pytest.raises(SdtuneError, match=r"unknown option 'foo'; after its file a LoRA takes :WEIGHT"):
        sources.parse_weighted(f"{f}:0.5:foo=1")
    assert sources.split_suffix(f"{f}:<tok>") == (str(f), "<tok>")
    # a token with '/' after an existing file (it was read as a path, then a hub id: "no such file")
    assert sources.split_suffix(f"{f}:style/v2") == (str(f), "style/v2")
    assert sources.split_suffix("C:/loras/a.safetensors") == ("C:/loras/a.safetensors", None)  # a drive letter
    assert sources.resolve("a", "lora", (tmp_path,)) == f
    # a name is found in a subfolder too, as A1111 finds <lora:inner> in Lora/sub/inner.safetensors; two are refused
    for rel in ("sub/inner.safetensors", "x/dup.safetensors", "y/z/dup.pt", ".hidden/inner2.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert sources.resolve("inner", "lora", (tmp_path,)) == tmp_path / "sub" / "inner.safetensors"
    assert sources.resolve("inner.safetensors", "embedding", (tmp_path,)) == tmp_path / "sub" / "inner.safetensors"
    with pytest.raises(SdtuneError, match=r"^dup: 2 files of that name in \S+ \(x/dup.safetensors, y/z/dup.pt\); name "
                                          r"one by its path there, e.g. x/dup$"):
        sources.resolve("dup", "lora", (tmp_path,))
    with pytest.raises(SdtuneError, match="^inner2: no such file"):  # not in a hidden folder
        sources.resolve("inner2", "lora", (tmp_path,))
    assert sources.hub_parts("andrewzhu/MoXinV1/MoXinV1.safetensors", "lora") == ("andrewzhu/MoXinV1",
                                                                                  ("MoXinV1.safetensors",))
    assert sources.hub_parts("sd-concepts-library/midjourney-style", "embedding")[1][0] == "learned_embeds.safetensors"
    with pytest.raises(SdtuneError, match="weight after ':' must be a finite number"):
        sources.parse_weighted("x.safetensors:heavy")
    with pytest.raises(SdtuneError, match=r"x.safetensors:1:2:3: a LoRA takes at most two weights"):
        sources.parse_weighted("x.safetensors:1:2:3")  # it said "x.safetensors:1: no such file"
    for bad in ("nan", "inf", "0.5:-inf", "unet=nan"):  # would bake NaN into every layer it touches
        with pytest.raises(SdtuneError, match="must be a finite number"):
            sources.parse_weighted(f"x.safetensors:{bad}")
    with pytest.raises(SdtuneError, match="no such file"):
        sources.resolve(str(tmp_path / "missing.safetensors"))


def test_hub_source_offline_is_one_clear_line(monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SdtuneError) as e:
        sources.resolve("andrewzhu/MoXinV1/MoXinV1.safetensors", "lora")
    assert "hub is unreachable" in str(e.value) and "\n" not in str(e.value)
    # not offline by setting, only unreachable (this machine): one request, no retries printed
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(SdtuneError, match="hub is unreachable|no hub repo"):  # (a machine that reaches it)
        sources.resolve("someone/some-lora", "lora")
    assert "Retry" not in capfd.readouterr().err


def test_readme_workflow_two_loras_reweight_remove(tmp_path):
    """The README's Python API example, with LoRAs made on the spot: weights change images, removal
    restores the base exactly."""
    import torch

    from sdtune import generate as gen
    from sdtune import load_base as lb
    from sdtune.lora.formats import save_lora
    from sdtune.lora.neutral import Adapter, Lora

    base = lb("tiny-random")
    files = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        lora = Lora(format="kohya")
        for path in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                     "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"):
            w = base.unet.get_submodule(path).weight
            lora.modules["unet"][path] = Adapter("lora", {"down": torch.randn(4, w.shape[1], generator=g),
                                                          "up": torch.randn(w.shape[0], 4, generator=g)}, 2.0)
        files.append(tmp_path / f"l{i}.safetensors")
        save_lora(lora, files[-1])
    before = np.asarray(gen(base, "a red circle", steps=3, seed=1, progress=False)[0].image)
    weights0 = base.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").weight.clone()
    base.loras.add("a", files[0], weight=0.5)
    base.loras.add("b", files[1], weight=1.0)
    mixed = np.asarray(gen(base, "a red circle", steps=3, seed=1, progress=False)[0].image)
    base.loras.set_weights({"a": 1.0, "b": (0.5, 0.0)})
    reweighted = np.asarray(gen(base, "a red circle", steps=3, seed=1, progress=False)[0].image)
    assert not np.array_equal(before, mixed) and not np.array_equal(mixed, reweighted)
    base.loras.remove("b")
    base.loras.remove("a")
    assert torch.equal(base.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").weight,
                       weights0)
    assert np.array_equal(before, np.asarray(gen(base, "a red circle", steps=3, seed=1, progress=False)[0].image))


def test_infotext_names_the_embeddings_used_and_every_lora_strength(base, tmp_path):
    """A1111's ``TI hashes`` (the embedding file's sha256, 12 hex digits) for the embeddings the prompt or the
    negative prompt uses, and a --lora's text-encoder weight and block weights, as a prompt tag would carry them."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from sdtune.lora.formats import save_lora
    from sdtune.lora.neutral import Adapter, Lora

    for name in ("zqshiny", "zqdull", "zqunused"):
        save_file({"emb_params": torch.randn(1, 64)}, tmp_path / f"{name}.safetensors")
    lora = Lora()
    lora.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = Adapter(
        "lora", {"down": torch.randn(2, 32) * 0.1, "up": torch.randn(32, 2) * 0.1}, 2.0)
    save_lora(lora, tmp_path / "style.safetensors")
    names = ("zqshiny", "zqdull", "zqunused")
    for spec in [str(tmp_path / f"{n}.safetensors") for n in names]:
        api.add_embedding(base, spec)
    api.add_lora(base, f"{tmp_path / 'style.safetensors'}:0.8:lbw=INALL", name="style")
    base.loras.set_weights({"style": (0.8, 0.5)})
    try:
        (res,) = api.generate(base, "a ZQShiny star", negative_prompt="zqdull", steps=1, seed=1, progress=False)
    finally:
        base.loras.remove("style")
        for n in names:
            base.embeddings.remove(n)
    fields = parse_infotext(res.infotext)
    # the LoRA loaded apart is a tag of the saved prompt, so A1111's "Send to txt2img" keeps it
    assert fields["prompt"] == "a ZQShiny star <lora:style:0.5:0.8:lbw=1,0,1,0,1,0,0,0,0,0,0,0,0,0>"
    sha = {n: hashlib.sha256((tmp_path / f"{n}.safetensors").read_bytes()).hexdigest()[:12] for n in names}
    assert fields["TI hashes"] == f"zqshiny: {sha['zqshiny']}, zqdull: {sha['zqdull']}"
    # a tag's order (text encoders, UNet); INALL's blocks: BASE, IN01, IN03
    assert fields["Lora weights"] == "style=0.5:0.8:lbw=1,0,1,0,1,0,0,0,0,0,0,0,0,0"


def test_a_vae_given_apart_decodes_and_is_named_as_a1111_names_it(tmp_path):
    """--vae: A1111's VAE files (LDM names, with or without first_stage_model., .safetensors or a .ckpt), diffusers'
    names or a diffusers VAE folder put those weights in place of the model's own; the PNG says `VAE hash`/`VAE`."""
    import torch
    from safetensors.torch import save_file

    from sdtune import ldm
    from sdtune.cli import main
    from sdtune.lora.hashes import file_sha256
    from sdtune.models import use_vae

    tiny = load_base("tiny", device="cpu")
    vae = {k: v.clone() for k, v in tiny.vae.state_dict().items()}
    ldm_names = {k.removeprefix(ldm.VAE_PREFIX): v for k, v in ldm.to_single_file(tiny.modules(), tiny.family).items()
                 if k.startswith(ldm.VAE_PREFIX)}
    save_file({k: v.contiguous() for k, v in ldm_names.items()}, str(tmp_path / "a1111.safetensors"))
    torch.save({"state_dict": {ldm.VAE_PREFIX + k: v for k, v in ldm_names.items()}}, tmp_path / "a1111.ckpt")
    (tmp_path / "folder").mkdir()
    save_file(vae, str(tmp_path / "folder" / "diffusion_pytorch_model.safetensors"))
    # the built-in models' own VAE file also states its scaling_factor (the family's scaling is kept)
    shutil.copy(tiny_files.WEIGHTS / "vae.safetensors", tmp_path / "builtin.safetensors")
    for source in ("a1111.safetensors", "a1111.ckpt", "folder", "builtin.safetensors"):
        other = load_base("tiny", device="cpu")
        with torch.no_grad():
            for p in other.vae.parameters():
                p.mul_(0.5)
        use_vae(other, tmp_path / source)
        assert other.vae_name == source  # as images name it: the file, or the folder given
        got = other.vae.state_dict()
        assert got.keys() == vae.keys() and all(torch.equal(got[k], vae[k]) for k in vae), source
        assert other.vae.config.scaling_factor == tiny.vae.config.scaling_factor

    # the same weights decode the same image; other weights another; the PNG names the file and its hash
    brighter = {k: v * 1.01 for k, v in vae.items()}
    save_file(brighter, str(tmp_path / "brighter.safetensors"))
    run = ["generate", "--prompt", "a red circle on a white background", "--steps", "3", "--seed", "2", "--no-progress"]
    for name, extra in (("own", []), ("same", ["--vae", str(tmp_path / "a1111.safetensors")]),
                        ("other", ["--vae", str(tmp_path / "brighter.safetensors")])):
        assert main([*run, *extra, "--out", str(tmp_path / name)]) == 0
    pixels = {n: np.asarray(Image.open(tmp_path / n / "00000-2.png")) for n in ("own", "same", "other")}
    assert np.array_equal(pixels["own"], pixels["same"]) and not np.array_equal(pixels["own"], pixels["other"])
    fields = parse_infotext(read_infotext(tmp_path / "other" / "00000-2.png"))
    assert fields["VAE"] == "brighter.safetensors"
    assert fields["VAE hash"] == file_sha256(tmp_path / "brighter.safetensors")[:10]
    assert "VAE" not in parse_infotext(read_infotext(tmp_path / "own" / "00000-2.png"))

    xl = load_base("tiny-xl", device="cpu")
    with pytest.raises(SdtuneError, match="brighter.safetensors: .*; pass a VAE made for") as caught:
        use_vae(load_base("tiny-random", device="cpu"), tmp_path / "brighter.safetensors")
    assert "\n" not in str(caught.value)
    with pytest.raises(SdtuneError, match="no diffusion_pytorch_model.safetensors in this folder or its vae/"):
        use_vae(xl, tmp_path / "own")
    # a whole checkpoint gives its own VAE; a LoRA is named as one
    from sdtune.models import save_single_file
    save_single_file(tiny, tmp_path / "whole.safetensors")
    other = load_base("tiny", device="cpu")
    with torch.no_grad():
        for p in other.vae.parameters():
            p.mul_(0.5)
    use_vae(other, tmp_path / "whole.safetensors")
    assert all(torch.equal(other.vae.state_dict()[k], vae[k]) for k in vae)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(tmp_path / "style.safetensors"))
    with pytest.raises(SdtuneError, match="style.safetensors: this is a LoRA, not a VAE; give it with --lora"):
        use_vae(other, tmp_path / "style.safetensors")


def test_a_checkpoint_without_a_vae_loads_with_one_given_apart(tmp_path, capsys):
    """A "no VAE" checkpoint (civitai's pruned uploads) loads with --vae, as A1111 and ComfyUI decode it with the VAE
    chosen: generate and train then equal the full checkpoint with that VAE; without one, one line names --vae."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdtune import ldm
    from sdtune.lora.formats import load_lora
    from sdtune.models import save_single_file
    from sdtune.tiny import world

    tiny = load_base("tiny", device="cpu")
    whole = save_single_file(tiny, tmp_path / "whole.safetensors")
    with safe_open(str(whole), "pt") as f:
        metadata = f.metadata()
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.startswith(ldm.VAE_PREFIX)},
                  str(tmp_path / "novae.safetensors"), metadata=metadata)
    vae = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.vae.state_dict().items()}, str(vae))
    loaded = load_base(str(tmp_path / "novae.safetensors"), device="cpu", vae=vae)
    assert loaded.vae_file == vae and loaded.vae.config.scaling_factor == tiny.vae.config.scaling_factor
    assert all(torch.equal(v, tiny.vae.state_dict()[k]) for k, v in loaded.vae.state_dict().items())

    run = ["generate", "--prompt", "a red circle on a white background", "--steps", "3", "--seed", "2", "--no-progress"]
    for name in ("whole", "novae"):
        assert main([*run, "--model", str(tmp_path / f"{name}.safetensors"), "--vae", str(vae),
                     "--out", str(tmp_path / f"gen-{name}")]) == 0
    pixels = [np.asarray(Image.open(tmp_path / f"gen-{name}" / "00000-2.png")) for name in ("whole", "novae")]
    assert np.array_equal(*pixels)
    assert parse_infotext(read_infotext(tmp_path / "gen-novae" / "00000-2.png"))["VAE"] == "vae.safetensors"

    data = world.write_dataset(tmp_path / "data", world.concept_scenes(2, seed=3, shape="star"))
    train = ["train", "lora", "--data", str(data), "--steps", "1", "--batch-size", "2", "--no-progress", "--no-report",
             "--vae", str(vae)]
    for name in ("whole", "novae"):
        assert main([*train, "--model", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / name)]) == 0
    a, b = (load_lora(tmp_path / name / "lora.safetensors") for name in ("whole", "novae"))
    assert all(torch.equal(ad.tensors["up"], b.modules[c][p].tensors["up"]) for c, p, ad in a.items())
    # kohya's record of the base file: the old 8-hex hash (64 KiB at 1 MiB) and the whole file's sha256
    data = whole.read_bytes()
    assert a.metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert a.metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()

    capsys.readouterr()
    assert main([*run, "--model", str(tmp_path / "novae.safetensors"), "--out", str(tmp_path / "none")]) == 2
    said = capsys.readouterr().err.strip()
    assert said.endswith("novae.safetensors: has no vae weights (first_stage_model.*); pass a full checkpoint of the "
                         "built-in tiny model that includes them (or give a VAE with --vae)")
    assert "\n" not in said and not any((tmp_path / "none").iterdir())


def test_an_image_that_comes_out_nan_is_said_and_drawn_black(base):
    """A LoRA at an absurd weight makes NaN: one sdtune warning naming the seed and the likely causes (numpy's
    "invalid value encountered in cast" before), and a black image rather than cast noise."""
    import warnings

    import torch

    from sdtune.console import SdtuneWarning
    from sdtune.lora.neutral import Adapter, Lora

    lora = Lora()
    sign = torch.tensor([1.0, -1.0]).repeat(16)[:, None]  # queries and keys overflow to +inf and -inf: NaN scores
    for p in ("to_q", "to_k"):
        lora.modules["unet"][f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}"] = Adapter(
            "lora", {"down": torch.ones(1, 32), "up": sign}, 1.0)
    base.loras.add("huge", lora, weight=1e30)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (res,) = generate(base, "x", steps=1, seed=3, progress=False)
    finally:
        base.loras.remove("huge")
    said = [str(w.message) for w in caught]
    assert [w.category for w in caught] == [SdtuneWarning], said
    assert said[0].startswith("seed 3: the model's output is not a number (NaN), drawn black")
    assert not np.asarray(res.image).any()


def test_progress_counts_steps_also_for_a_second_order_sampler(base):
    """Heun evaluates the model twice a step (2·steps − 1 calls): the progress counts the user's steps, to the
    total and never past it."""
    for scheduler in ("ddim", "heun"):
        seen = []
        generate(base, "a red circle", steps=3, seed=1, num_images=2, batch_size=1, scheduler=scheduler,
                 progress=False, on_step=lambda done, total: seen.append((done, total)))
        assert seen == sorted(seen) and seen[-1] == (6, 6) and all(d <= t for d, t in seen)
        # ddim: one call a step; heun: its first call of an image finishes no step yet
        assert {d for d, _ in seen} == ({1, 2, 3, 4, 5, 6} if scheduler == "ddim" else {0, 1, 2, 3, 4, 5, 6})
