"""The built-in models (tiny, tiny-xl): the shipped weights draw what they are asked; the recipe resumes exactly."""

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from sdtune import ldm
from sdtune.generate import generate
from sdtune.models import load_base
from sdtune.tiny import config as tiny_config
from sdtune.tiny import files as tiny_files
from sdtune.tiny import judge, recipe, vae_recipe
from sdtune.tiny import model as tiny_model

shipped = pytest.mark.skipif(not tiny_files.trained_weights_exist(), reason="no trained tiny model shipped")
shipped_xl = pytest.mark.skipif(not (tiny_files.trained_weights_exist() and tiny_files.is_xl_export(
    tiny_files.XL_WEIGHTS)), reason="no trained tiny-xl shipped")


@shipped
def test_shipped_weights_are_small_and_load_as_tiny():
    size = sum((tiny_files.WEIGHTS / f"{c}.safetensors").stat().st_size for c in tiny_files.COMPONENTS)
    assert size <= 20_000_000
    base = load_base("tiny", device="cpu", dtype="fp32")
    assert base.source == "tiny" and base.model_hash
    assert base.vae.config.scaling_factor != 1.0  # the trained VAE's own factor, not the random default


@shipped_xl
def test_shipped_tiny_xl_is_sdxl_at_small_widths_on_tiny_s_vae():
    own = [tiny_files.XL_WEIGHTS / f"{c}.safetensors" for c in tiny_files.XL_COMPONENTS]
    assert sum(f.stat().st_size for f in own) <= 20_000_000  # its own; the VAE is tiny's (in tiny's 20 MB)
    base = load_base("tiny-xl", device="cpu", dtype="fp32")
    tiny = load_base("tiny", device="cpu", dtype="fp32")
    assert base.source == "tiny-xl" and base.family.name == "tiny-xl" and base.model_hash != tiny.model_hash
    mine, theirs = base.vae.state_dict(), tiny.vae.state_dict()  # shared, bit for bit
    assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)
    assert base.vae.config.scaling_factor == tiny.vae.config.scaling_factor
    # the first text encoder is tiny's, trained on, with a fourth layer that adds nothing: SDXL's penultimate
    # layer is its last
    assert base.text_encoder.config.num_hidden_layers == tiny.text_encoder.config.num_hidden_layers + 1
    ids = tiny.tokenizer(["a blue square on a white background"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        states = base.text_encoder(ids, output_hidden_states=True).hidden_states
    assert states[-1].equal(states[-2])
    # SDXL's structure: no attention at the first level, linear projections, pooled text + time ids
    unet = base.unet.config
    assert unet.down_block_types[0] == "DownBlock2D" and unet.addition_embed_type == "text_time"
    assert unet.use_linear_projection and unet.layers_per_block == 2
    names = dict(base.unet.named_modules())
    assert "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k" in names
    assert "add_embedding.linear_1" in names and "down_blocks.0.attentions" not in names
    assert type(base.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(base.pipeline()).__name__ == "StableDiffusionXLPipeline"
    assert base.tokenizer_2.pad_token == "!" and base.tokenizer.pad_token == "<|endoftext|>"


@shipped
@pytest.mark.parametrize("model", ["tiny", pytest.param("tiny-xl", marks=shipped_xl)])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tiny_single_file_without_sdtune_metadata(model, suffix, tmp_path):
    """A built-in model re-saved by another tool (ComfyUI, A1111: the weights, none of sdtune's metadata) loads
    as the built-in one: the family's configs are the shipped VAE's widths and latent scaling."""
    base = load_base(model, device="cpu", dtype="fp32")
    state = ldm.to_single_file(base.modules(), base.family)
    path = tmp_path / f"re-saved{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    loaded = load_base(str(path), device="cpu", dtype="fp32")
    assert loaded.family is base.family
    for name, module in base.modules().items():
        mine, theirs = module.state_dict(), loaded.modules()[name].state_dict()
        assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine), name
    assert loaded.vae.config.scaling_factor == base.vae.config.scaling_factor == tiny_config.SHIPPED_VAE_SCALING
    assert dict(loaded.scheduler.config) == dict(base.scheduler.config)


@shipped
@pytest.mark.parametrize("model", ["tiny", pytest.param("tiny-xl", marks=shipped_xl)])
@pytest.mark.parametrize("colour,shape", [("red", "circle"), ("blue", "square"), ("green", "triangle")])
def test_shipped_model_draws_the_prompted_shape_and_colour(model, colour, shape):
    base = load_base(model, device="cpu", dtype="fp32")
    images = [g.image for g in generate(base, f"a {colour} {shape} on a white background", steps=20,
                                        guidance=5.0, seed=0, num_images=2, progress=False)]
    verdicts = judge.judge(images)
    assert [v.colour for v in verdicts] == [colour, colour]
    assert [v.shape for v in verdicts] == [shape, shape]


def assert_same_exports(straight, resumed, components):
    """Same per-step random draws and restored optimizer/EMA state; CPU conv/matmul kernels may round
    differently in another process (allocation-dependent), so compare to fp16 rounding, not bits."""
    for name in components:
        a = load_file(straight / f"{name}.safetensors")
        b = load_file(resumed / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k].float(), a[k].float(), rtol=4e-3, atol=1e-4, msg=f"{name}.{k}")


SMALL = ["--vae-steps", "4", "--vae-batch", "2", "--vae-images", "16", "--images", "16", "--steps", "6",
         "--batch", "2", "--save-every", "2", "--workers", "1", "--device", "cpu", "--seed", "3",
         "--preset", "cpu"]  # every size given; the preset supplies the rest (Min-SNR weighting, lr)


def test_recipe_resumes_after_a_kill_to_the_same_weights(tmp_path, monkeypatch):
    recipe.main(["--out", str(tmp_path / "straight"), *SMALL])
    settings = recipe.settings(SMALL)
    assert settings.steps == 6 and settings.min_snr == recipe.PRESETS["cpu"]["min_snr"] > 0

    real, calls = recipe.F.mse_loss, {"n": 0}

    def dies_in_diffusion_step_5(*a, **k):  # 4 VAE steps, then diffusion steps (checkpoint every 2)
        calls["n"] += 1
        if calls["n"] == 4 + 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(recipe.F, "mse_loss", dies_in_diffusion_step_5)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(["--out", str(tmp_path / "resumed"), *SMALL])
    assert not (tmp_path / "resumed" / "model").exists()

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    calls["n"] = 0
    monkeypatch.setattr(recipe.F, "mse_loss", counted)
    recipe.main(["--out", str(tmp_path / "resumed"), *SMALL])
    assert calls["n"] == 2  # VAE kept, diffusion went on from its step-4 checkpoint: steps 5 and 6 only

    assert_same_exports(tmp_path / "straight" / "model", tmp_path / "resumed" / "model", tiny_files.COMPONENTS)
    # --export-only rebuilds the same export from the last checkpoint
    exported = load_file(tmp_path / "straight" / "model" / "unet.safetensors")
    recipe.main(["--out", str(tmp_path / "straight"), "--export-only"])
    again = load_file(tmp_path / "straight" / "model" / "unet.safetensors")
    assert all(again[k].equal(exported[k]) for k in exported)
    # an export loads as a model of its own (what eval-tiny --model runs/tiny/model judges)
    base = load_base(str(tmp_path / "straight" / "model"), device="cpu", dtype="fp32")
    assert base.family.name == "tiny" and base.source == "tiny"
    assert base.unet.conv_in.weight.equal(exported["conv_in.weight"].float())


def test_recipe_trains_on_a_given_vae_without_training_one(tmp_path, monkeypatch):
    """``--vae``: tiny retrained on another VAE (the general one, twice as wide): no VAE stage, its latents."""
    given = tmp_path / "given.safetensors"
    torch.manual_seed(1)
    vae = AutoencoderKL(**tiny_config.WIDE_VAE)
    vae.register_to_config(scaling_factor=0.5)
    vae_recipe.export(vae, given)
    real, calls = recipe.F.mse_loss, {"n": 0}

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(recipe.F, "mse_loss", counted)
    recipe.main(["--out", str(tmp_path / "run"), *SMALL, "--vae", str(given)])
    assert calls["n"] == 6  # the six diffusion steps; no VAE step
    assert not (tmp_path / "run" / "vae_ckpt.pt").exists()
    exported, want = load_file(tmp_path / "run" / "model" / "vae.safetensors"), load_file(given)
    assert exported.keys() == want.keys() and all(exported[k].equal(want[k]) for k in want)  # shipped as given
    with pytest.raises(SystemExit, match="nothere.safetensors: no such VAE file; give --vae"):
        recipe.main(["--out", str(tmp_path / "other"), *SMALL, "--vae", str(tmp_path / "nothere.safetensors")])


SMALL_XL = ["--arch", "sdxl", "--images", "16", "--steps", "6", "--batch", "2", "--save-every", "2", "--workers",
            "1", "--device", "cpu", "--seed", "3"]


@shipped
def test_xl_recipe_trains_from_tiny_on_its_vae_resumes_and_installs_only_its_own(tmp_path, monkeypatch):
    recipe.main(["--out", str(tmp_path / "straight"), *SMALL_XL])
    settings = recipe.settings(SMALL_XL)
    assert settings.preset == "xl-cpu" and settings.min_snr > 0 and settings.vae_steps == 0

    real, calls = recipe.F.mse_loss, {"n": 0}

    def dies_in_step_5(*a, **k):  # no VAE stage: every loss is a diffusion step's (checkpoint every 2)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(recipe.F, "mse_loss", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(["--out", str(tmp_path / "resumed"), *SMALL_XL])

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    calls["n"] = 0
    monkeypatch.setattr(recipe.F, "mse_loss", counted)
    installed = tmp_path / "installed"
    monkeypatch.setattr(tiny_files, "XL_WEIGHTS", installed)
    recipe.main(["--out", str(tmp_path / "resumed"), *SMALL_XL, "--install"])
    assert calls["n"] == 2  # went on from its step-4 checkpoint: steps 5 and 6 only

    assert_same_exports(tmp_path / "straight" / "model", tmp_path / "resumed" / "model",
                        (*tiny_files.COMPONENTS, "text_encoder_2"))  # an export holds all four components
    shipped_vae = load_file(tiny_files.WEIGHTS / "vae.safetensors")
    trained_vae = load_file(tmp_path / "straight" / "model" / "vae.safetensors")
    assert all(trained_vae[k].equal(shipped_vae[k]) for k in shipped_vae)  # tiny's VAE stayed frozen
    # the first text encoder starts as tiny's with a fourth layer that adds nothing, and learns slowly from there
    shipped_te = load_file(tiny_files.WEIGHTS / "text_encoder.safetensors")
    trained_te = load_file(tmp_path / "straight" / "model" / "text_encoder.safetensors")
    added = set(trained_te) - set(shipped_te)
    assert added and all(".layers.3." in k for k in added)
    assert all(not trained_te[k].any() for k in added if "out_proj" in k or "fc2" in k)
    assert all(torch.allclose(trained_te[k].float(), shipped_te[k].float(), atol=1e-2) for k in shipped_te)
    assert sorted(p.name for p in installed.iterdir()) == ["text_encoder.safetensors", "text_encoder_2.safetensors",
                                                           "unet.safetensors"]
    for folder in (tmp_path / "straight" / "model", installed):  # both load as tiny-xl
        base = load_base(str(folder), device="cpu", dtype="fp32")
        assert base.family.name == "tiny-xl" and base.source == "tiny-xl"
        unet = load_file(folder / "unet.safetensors")
        assert base.unet.conv_in.weight.equal(unet["conv_in.weight"].float())


@shipped
def test_xl_recipe_starts_its_first_text_encoder_from_the_tiny_it_is_given(tmp_path):
    other = tmp_path / "other-tiny"  # another tiny's text encoder (all the recipe reads): the shipped one, moved
    other.mkdir()
    given = {k: v + 0.5 if v.is_floating_point() else v for k, v in
             load_file(tiny_files.WEIGHTS / "text_encoder.safetensors").items()}
    save_file(given, other / "text_encoder.safetensors")
    recipe.main(["--out", str(tmp_path / "run"), *SMALL_XL, "--steps", "2", "--tiny", str(other)])
    trained = load_file(tmp_path / "run" / "model" / "text_encoder.safetensors")
    assert all(torch.allclose(trained[k].float(), given[k].float(), atol=1e-2) for k in given)  # 0.5 from the shipped
    with pytest.raises(SystemExit, match="nothere: no trained tiny text encoder .* give --tiny an export"):
        recipe.main(["--out", str(tmp_path / "other-run"), *SMALL_XL, "--tiny", str(tmp_path / "nothere")])


def test_min_snr_weights_damp_only_the_nearly_clean_timesteps():
    acp = tiny_model.build()["scheduler"].alphas_cumprod
    t = torch.arange(1000)
    w = recipe.min_snr_weights(t, acp, 5.0)  # the training loop's, shared by the recipe
    snr = acp / (1 - acp)
    noisy = snr <= 5.0
    assert noisy.any() and (~noisy).any()
    assert torch.equal(w[noisy], torch.ones(int(noisy.sum())))  # noisy end: plain MSE
    torch.testing.assert_close(w[~noisy], 5.0 / snr[~noisy])    # clean end: scaled down to gamma / SNR
    assert w[0] < 0.01 and bool((w[1:] >= w[:-1]).all())        # monotone in t
