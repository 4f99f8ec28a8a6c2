"""Generation on every family: SDXL conditions on both encoders, the pooled embedding and size/crop time ids,
exactly as diffusers' own SDXL pipeline does; SD 2.x keeps its v-prediction through any sampler."""

import numpy as np
import pytest
import torch

from sdtune import families
from sdtune.cli import main
from sdtune.generate import encode_prompt, generate, make_scheduler, parse_infotext, read_infotext
from sdtune.models import load_base
from sdtune.models import make_scheduler as family_scheduler


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
