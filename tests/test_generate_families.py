"""Generation on every family: SDXL conditions on both encoders, the pooled embedding and size/crop time ids,
exactly as diffusers' own SDXL pipeline does; SD 2.x keeps its v-prediction through any sampler."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune import api, families
from sdtune.cli import main
from sdtune.generate import encode_prompt, generate, make_scheduler, parse_infotext, read_infotext, read_layer
from sdtune.lora.formats import save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.models import load_base
from sdtune.models import make_scheduler as family_scheduler
from sdtune.safeio import SdtuneError


@pytest.fixture(scope="module")
def xl():
    return load_base("sdxl-small-random", device="cpu")


def test_sdxl_prompt_features(xl):
    embeds = encode_prompt(xl, ["a cat", "a dog"])
    assert embeds.hidden.shape == (2, 77, 2048) and embeds.pooled.shape == (2, 1280)
    # the same call diffusers makes (one prompt at a time, its own tokenizers): same features
    hidden, _, pooled, _ = xl.pipeline().encode_prompt("a dog", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds.hidden[1:], hidden, rtol=1e-4, atol=1e-5)  # batch of 2 vs 1
    torch.testing.assert_close(embeds.pooled[1:], pooled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_sdxl_images_match_diffusers(xl, negative):
    ours = generate(xl, "a red circle", negative_prompt=negative, steps=2, seed=5, progress=False,
                    scheduler="euler")[0]
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    pipe = xl.pipeline(make_scheduler("euler", xl.scheduler))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red circle", negative_prompt=negative or None, num_inference_steps=2, guidance_scale=7.5,
                  latents=latents, height=64, width=64).images[0]
    # one text-encoder batch for both prompts here, two calls there: rounding may differ in the last bits
    diff = np.abs(np.asarray(ours.image, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert ours.image.size == (64, 64) and diff.max() <= 2 and diff.mean() < 0.1


def test_sdxl_from_the_command_line(tmp_path, capsys):
    assert main(["generate", "--model", "sdxl-small-random", "--prompt", "a castle", "--negative-prompt", "ugly",
                 "--steps", "2", "--seed", "7", "--no-progress", "--out", str(tmp_path)]) == 0
    png = capsys.readouterr().out.split()[-1]
    info = parse_infotext(read_infotext(png))
    assert (info["prompt"], info["negative_prompt"], info["Seed"], info["Size"]) == ("a castle", "ugly", "7", "64x64")
    assert info["Model"] == "sdxl-small-random" and len(info["Model hash"]) == 10


def test_sd2_keeps_v_prediction_in_every_sampler():
    config = families.SD2.component_configs()["scheduler"]
    own = family_scheduler(families.SD2, config)
    assert type(own).__name__ == "DDIMScheduler"
    for name in ("ddim", "euler", "dpmpp_2m", "unipc"):
        assert make_scheduler(name, own).config.prediction_type == "v_prediction"


# ---------------------------------------------------------------- clip skip

def test_clip_skip_reads_the_layer_a1111_reads():
    """A1111's clip skip N on SD 1.x: the Nth layer from the end, then the final norm. The oracle is the usual
    trick for it: the same encoder cut to its first layers, whose last (normed) output is that layer's.
    (diffusers' own clip_skip, N-1 there, fails under transformers 5: it looks for text_model.final_layer_norm.)"""
    base = load_base("tiny", device="cpu")
    default = encode_prompt(base, ["a red star"]).hidden
    assert torch.equal(encode_prompt(base, ["a red star"], clip_skip=1).hidden, default)
    ids = base.tokenizer(["a red star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    for skip in (2, 3):
        config = base.text_encoder.config.to_dict() | {"num_hidden_layers": 3 - (skip - 1)}
        cut = type(base.text_encoder)(type(base.text_encoder.config).from_dict(config)).eval()
        cut.load_state_dict(base.text_encoder.state_dict(), strict=False)  # the deeper layers are left out
        with torch.no_grad():
            theirs = cut(ids)[0]
        ours = encode_prompt(base, ["a red star"], clip_skip=skip).hidden
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # the same ops, another caller
        assert not torch.allclose(ours, default)
    with pytest.raises(SdtuneError, match=r"--clip-skip 4: text_encoder has only 3 layers"):
        encode_prompt(base, ["a red star"], clip_skip=4)


def test_sdxl_clip_skip_counts_from_the_penultimate_layer_it_reads_anyway():
    base = load_base("tiny-xl", device="cpu")
    default = encode_prompt(base, ["a red star"])
    # SDXL reads both encoders' penultimate layer: clip skip 2 is the default (as in A1111 and ComfyUI)
    assert torch.equal(encode_prompt(base, ["a red star"], clip_skip=2).hidden, default.hidden)
    ours = encode_prompt(base, ["a red star"], clip_skip=3)
    theirs, _, pooled, _ = base.pipeline().encode_prompt("a red star", do_classifier_free_guidance=False,
                                                         clip_skip=1)
    torch.testing.assert_close(ours.hidden, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.pooled, default.pooled)  # the pooled embedding is the last layer's, skip or not
    # A1111 reads SDXL at its own layer whatever the skip: a deeper one is said to be ComfyUI's reading only
    with pytest.warns(UserWarning, match="clip skip 3: read as ComfyUI reads it; A1111 ignores clip skip on the "
                                         "built-in tiny SDXL model, so it draws"):
        api.generate(base, "a red star", steps=1, seed=1, clip_skip=3, progress=False)


def test_sd2_clip_skip_counts_the_openclip_layer_diffusers_drops():
    """SD 2.x's diffusers encoder is OpenCLIP without its last layer (SD 2 reads the penultimate): A1111's and
    ComfyUI's clip skip 2 is its own last layer, 3 the one before, with the final norm."""
    te = families.SD2.text_encoders[0]
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=23))
    assert [read_layer(te, model, n) for n in (1, 2, 3, 4)] == [(-1, False), (-1, False), (-2, True), (-3, True)]
    xl_l, xl_g = families.SDXL.text_encoders
    assert read_layer(xl_l, model, 3) == read_layer(xl_g, model, 3) == (-3, False)  # SDXL never norms its layer


def test_clip_skip_in_the_png_and_refused_when_impossible(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red star", "--clip-skip", "2", "--steps", "1", "--seed", "3",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    png = capsys.readouterr().out.split()[-1]
    assert parse_infotext(read_infotext(png))["Clip skip"] == "2"  # A1111's field, which it reads back
    assert main(["generate", "--prompt", "a red star", "--steps", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    assert "Clip skip" not in parse_infotext(read_infotext(capsys.readouterr().out.split()[-1]))  # 1: not written
    assert main(["generate", "--prompt", "a red star", "--clip-skip", "0", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert "--clip-skip 0: must be a whole number from 1" in err and "Traceback" not in err
    assert not (tmp_path / "n").exists()


def test_sdxl_second_encoder_weight_rides_in_the_png(xl, tmp_path):
    """A LoRA added with its own weight for SDXL's second text encoder: the PNG's tag carries it (te2=), so the
    saved prompt draws the same image again; A1111 reads the tag's other weights as ever."""
    g = torch.Generator().manual_seed(0)
    lora = Lora()
    for comp, path in (("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
                       ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
                       ("text_encoder_2", "encoder.layers.0.self_attn.q_proj")):
        module = getattr(xl, comp)
        w = (module.text_model if hasattr(module, "text_model") else module).get_submodule(path).weight
        lora.modules[comp][path] = Adapter("lora", {"down": torch.randn(4, w.shape[1], generator=g),
                                                    "up": torch.randn(w.shape[0], 4, generator=g)}, 4.0)
    (tmp_path / "loras").mkdir()
    save_lora(lora, tmp_path / "loras" / "xa.safetensors")
    xl.loras.add("xa", tmp_path / "loras" / "xa.safetensors",
                 weight={"unet": 0.8, "text_encoder": 0.5, "text_encoder_2": 0.0})
    try:
        [first] = api.generate(xl, "a red star", steps=2, seed=1, progress=False)
    finally:
        xl.loras.remove("xa")
    fields = parse_infotext(first.infotext)
    assert fields["prompt"] == "a red star <lora:xa:0.5:0.8:te2=0>" and fields["Lora weights"] == "xa=0.5:0.8:te2=0"
    [again] = api.generate(xl, fields["prompt"], steps=2, seed=1, progress=False, lora_dirs=[tmp_path / "loras"])
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))
    assert not len(xl.loras)
    [without] = api.generate(xl, "a red star <lora:xa:0.5:0.8>", steps=2, seed=1, progress=False,
                             lora_dirs=[tmp_path / "loras"])
    assert not np.array_equal(np.asarray(without.image), np.asarray(first.image))  # te2 mattered
    # the command line takes the same weights after the file (it took te= and unet= only)
    out = tmp_path / "cli"
    assert main(["generate", "--model", "sdxl-small-random", "--prompt", "a red star", "--steps", "2", "--seed", "1",
                 "--lora", f"{tmp_path / 'loras' / 'xa.safetensors'}:0.5:0.8:te2=0", "--no-progress",
                 "--out", str(out)]) == 0
    [png] = out.glob("*.png")
    assert parse_infotext(read_infotext(png))["Lora weights"] == "xa=0.5:0.8:te2=0"
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(first.image))


def test_a_te2_weight_on_a_lora_without_second_encoder_layers_is_said(xl, tmp_path):
    """te2= weighs only layers in SDXL's second text encoder: on a LoRA with none it changes nothing, said (a tag
    or --lora), not silently dropped."""
    lora = Lora()
    w = xl.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k").weight
    lora.modules["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] = Adapter(
        "lora", {"down": torch.ones(2, w.shape[1]), "up": torch.ones(w.shape[0], 2)}, 2.0)
    (tmp_path / "loras").mkdir()
    save_lora(lora, tmp_path / "loras" / "unet_only.safetensors")
    said = r"te2= changes nothing, this LoRA has no layers in SDXL's second text encoder"
    with pytest.warns(UserWarning, match=rf"unet_only.safetensors:1:te2=0.5: {said}"):
        api.add_lora(xl, f"{tmp_path / 'loras' / 'unet_only.safetensors'}:1:te2=0.5")
    xl.loras.remove("unet_only")
    with pytest.warns(UserWarning, match=rf"<lora:unet_only:...:te2=...>: {said}"):
        api.generate(xl, "a red star <lora:unet_only:1:te2=0>", steps=1, seed=1, progress=False,
                     lora_dirs=[tmp_path / "loras"])


def test_sdxl_empty_negative_asks_for_no_padding():
    """SDXL conditions an empty negative on zeros, which pad to any length alike: a long prompt beside it asks
    A1111 for no "Pad conds" (told to pad, A1111 pads with the encoded "", another image); a short negative does."""
    base = load_base("tiny-xl", device="cpu")
    long = ", ".join(["a red star on a white background"] * 12)  # past 75 tokens: two chunks
    [alone] = api.generate(base, long, steps=1, seed=1, progress=False)
    [beside] = api.generate(base, long, negative_prompt="blurry", steps=1, seed=1, progress=False)
    assert "Pad conds" not in parse_infotext(alone.infotext)
    assert parse_infotext(beside.infotext)["Pad conds"] == "True"


def test_te2_weight_on_a_model_with_one_text_encoder_is_refused(tmp_path, capsys):
    lora = tmp_path / "x.safetensors"
    save_lora(Lora(), lora)
    assert main(["generate", "--prompt", "a red star", "--steps", "1", "--lora", f"{lora}:1:te2=0.3",
                 "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert f"{lora}:1:te2=0.3: te2= weighs SDXL's second text encoder, and this model has one" in err
    assert "Traceback" not in err


def test_sdxl_negative_emptied_by_prompt_editing_is_zeros_from_then_on():
    """SDXL conditions an empty negative on zeros; A1111 so too for one that prompt editing empties at a step
    ([blurry::2]): the UNet's negative half is zeros from the step after 2 on, the encoded "blurry" before."""
    base = load_base("tiny-xl", device="cpu")
    zeros, forward = [], base.unet.forward

    def spy(sample, timestep, encoder_hidden_states, *a, **k):
        zeros.append(not encoder_hidden_states[0].any())
        return forward(sample, timestep, encoder_hidden_states, *a, **k)

    base.unet.forward = spy
    try:
        api.generate(base, "a red star", negative_prompt="[blurry::2]", steps=5, seed=1, progress=False)
    finally:
        base.unet.forward = forward
    assert zeros == [False, False, False, True, True]
