"""The built-in tiny model: the shipped weights draw what they are asked; the recipe resumes exactly."""

import pytest
import torch
from safetensors.torch import load_file

from sdtune.generate import generate
from sdtune.models import load_base
from sdtune.tiny import judge, recipe
from sdtune.tiny import model as tiny_model

shipped = pytest.mark.skipif(not tiny_model.trained_weights_exist(), reason="no trained tiny model shipped")


@shipped
def test_shipped_weights_are_small_and_load_as_tiny():
    size = sum((tiny_model.WEIGHTS / f"{c}.safetensors").stat().st_size for c in tiny_model.COMPONENTS)
    assert size <= 20_000_000
    base = load_base("tiny", device="cpu", dtype="fp32")
    assert base.source == "tiny" and base.model_hash
    assert base.vae.config.scaling_factor != 1.0  # the trained VAE's own factor, not the random default


@shipped
@pytest.mark.parametrize("colour,shape", [("red", "circle"), ("blue", "square"), ("green", "triangle")])
def test_shipped_model_draws_the_prompted_shape_and_colour(colour, shape):
    base = load_base("tiny", device="cpu", dtype="fp32")
    images = [g.image for g in generate(base, f"a {colour} {shape} on a white background", steps=20,
                                        guidance=5.0, seed=0, num_images=2, progress=False)]
    verdicts = judge.judge(images)
    assert [v.colour for v in verdicts] == [colour, colour]
    assert [v.shape for v in verdicts] == [shape, shape]


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

    # Same per-step random draws and restored optimizer/EMA state; CPU conv/matmul kernels may round
    # differently in another process (allocation-dependent), so compare to fp16 rounding, not bits.
    for name in tiny_model.COMPONENTS:
        a = load_file(tmp_path / "straight" / "model" / f"{name}.safetensors")
        b = load_file(tmp_path / "resumed" / "model" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k].float(), a[k].float(), rtol=4e-3, atol=1e-4, msg=f"{name}.{k}")
    # --export-only rebuilds the same export from the last checkpoint
    exported = load_file(tmp_path / "straight" / "model" / "unet.safetensors")
    recipe.main(["--out", str(tmp_path / "straight"), "--export-only"])
    again = load_file(tmp_path / "straight" / "model" / "unet.safetensors")
    assert all(again[k].equal(exported[k]) for k in exported)
    # an export loads as a model of its own (what eval-tiny --model runs/tiny/model judges)
    base = load_base(str(tmp_path / "straight" / "model"), device="cpu", dtype="fp32")
    assert base.family.name == "tiny" and base.source == "tiny"
    assert base.unet.conv_in.weight.equal(exported["conv_in.weight"].float())


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
