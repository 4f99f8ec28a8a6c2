"""Sample prompts as kohya reads them: each prompt's own options (--n --w --h --d --l --s --ss), a .txt, .toml or
.json file of prompts, --sample-sampler; the grid draws each prompt with its options (rows of other sizes centred, not
stretched), and what sdtune cannot read is one line before the run starts."""

import numpy as np
import pytest
from PIL import Image
from small_runs import outline_dataset, settings

from sdtune.cli import main
from sdtune.generate import generate, parse_infotext, read_infotext
from sdtune.safeio import SdtuneError
from sdtune.train import samples
from sdtune.train.lora import train_lora


def test_kohyas_options_split_off_the_prompt():
    p = samples.parse("a castle, night --n blurry, lowres --w 768 --h 512 --d 42 --l 6.5 --s 30 --ss k_euler_a")
    assert p == samples.SamplePrompt("a castle, night", "blurry, lowres", 768, 512, 42, 6.5, 30, "euler_a")
    assert samples.parse("a castle") == samples.SamplePrompt("a castle")
    assert samples.parse("a castle --ss DPM++ 2M Karras").sampler == "dpmpp_2m_karras"  # A1111's names too
    with pytest.raises(SdtuneError, match=r"^sample prompt 'a castle --cn canny': --cn is not an option sdtune reads"):
        samples.parse("a castle --cn canny")
    with pytest.raises(SdtuneError, match=r"--w 'wide' is not a number"):
        samples.parse("a castle --w wide")
    with pytest.raises(SdtuneError, match=r"unknown scheduler 'dpm_2_a'"):
        samples.parse("a castle --ss dpm_2_a")


@pytest.mark.parametrize("option, says", [
    ("--w 70", "the width must be a positive multiple of 8, e.g. 72"), ("--h 0", "the height must be a positive"),
    ("--h 9000", "the height must be at most 8192 pixels"), ("--s -3", "the sampling steps must be at least 1"), ("--d -7", r"the seed must be -1 \(random\) or more"),
    ("--l nan", "the guidance must be a finite number")])
def test_a_value_no_image_can_be_drawn_with_is_said_before_the_run_quoting_the_prompt(tmp_path, capsys, option,
                                                                                     says):
    """Said by kohya's option and the prompt, before the model loads (it was said after the run's last step, by
    generation, as --steps or --seed: flags the user had not given)."""
    prompt = f"a castle {option}"
    with pytest.raises(SdtuneError, match=rf"^sample prompt '{prompt}': {option}: {says}"):
        samples.parse(prompt)
    outline_dataset(tmp_path / "data")
    assert main(["train", "lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--model",
                 "tiny-random", "--sample-prompts", prompt, "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"sdtune: error: sample prompt '{prompt}': {option}: ")
    assert not (tmp_path / "out" / "loss.csv").exists()  # no step was taken


def test_a_prompt_file_is_its_lines(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# kohya's prompt file\n\na castle --w 64\n  a river  \n")
    assert samples.expand([str(file), "a tree"]) == ["a castle --w 64", "a river", "a tree"]
    with pytest.raises(SdtuneError, match=r"missing.txt: no such prompt file; check --sample-prompts$"):
        samples.expand([str(tmp_path / "missing.txt")])


def test_kohyas_toml_and_json_prompt_files_read_as_their_lines(tmp_path):
    """kohya's .toml prompt file: [prompt] defaults under each [[prompt.subset]]; its .json file: a list of entries
    (or lines). Each entry reads as the prompt line with kohya's options that says the same."""
    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nwidth = 64\nheight = 32\nscale = 6.5\nsample_steps = 3\n\n'
                    '[[prompt.subset]]\nprompt = "a castle"\nnegative_prompt = "blurry"\nseed = 4\n\n'
                    '[[prompt.subset]]\nprompt = "a river"\nwidth = 48\nsample_sampler = "k_euler_a"\n')
    assert list(map(samples.parse, samples.expand([str(toml)]))) == [
        samples.SamplePrompt("a castle", "blurry", 64, 32, 4, 6.5, 3),
        samples.SamplePrompt("a river", "", 48, 32, None, 6.5, 3, "euler_a")]
    js = tmp_path / "prompts.json"
    js.write_text('[{"prompt": "a tree", "seed": 7, "negative_prompt": "", "width": null},'
                  ' "a lake --s 2", "# a comment"]')
    assert samples.expand([str(js), "a hill"]) == ["a tree --d 7", "a lake --s 2", "a hill"]
    for text, said in (('[prompt]\nwidth = 64\n', r"no \[\[prompt.subset\]\] entries"),
                       ('[[prompt.subset]\n', r"not valid TOML"),
                       ('[prompt]\n[[prompt.subset]]\nprompt = "a"\ncontrolnet_image = "c.png"\n',
                        r"controlnet_image is not a key sdtune reads; an entry has prompt and any of negative_prompt"),
                       ('[prompt]\n[[prompt.subset]]\nseed = 1\n', r"an entry without a prompt")):
        toml.write_text(text)
        with pytest.raises(SdtuneError, match=rf"^{toml}: {said}"):
            samples.expand([str(toml)])
    for text, said in (('{"prompt": "a"}', r"a .json prompt file is a list of entries"), ("[1", r"not valid JSON")):
        js.write_text(text)
        with pytest.raises(SdtuneError, match=rf"^{js}: {said}"):
            samples.check([str(js)])


def test_the_grid_draws_each_prompt_with_its_options(base, tmp_path):
    dataset = outline_dataset(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 32 --d 5 --s 2\na blue square --n red --s 2 --ss euler\n")
    train_lora(base, settings(dataset, tmp_path / "o", steps=1, sample_every=1, sample_images=1,
                              sample_prompts=[str(prompts)], sample_sampler="ddim"))
    grid = tmp_path / "o" / "samples" / "step-000000.png"
    image = np.asarray(Image.open(grid).convert("RGB"))
    assert image.shape == (128, 64, 3)  # two rows of 64 x 64: the 64 x 32 image centred on white
    assert (image[:16] == 255).all() and (image[48:64] == 255).all()
    want = generate(base, "a red circle", width=64, height=32, seed=5, steps=2, progress=False)[0].image
    assert np.array_equal(image[16:48], np.asarray(want))
    params = parse_infotext(read_infotext(grid))
    assert params["Seed"] == "5" and params["Size"] == "64x32" and params["Steps"] == "2"
    with pytest.raises(SdtuneError, match=r"--q is not an option sdtune reads"):
        settings(dataset, tmp_path / "x", sample_prompts=["a castle --q 1"]).check()
    with pytest.raises(SdtuneError, match=r"unknown scheduler 'nope'"):
        settings(dataset, tmp_path / "x", sample_sampler="nope").check()
