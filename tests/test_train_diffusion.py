"""The objective's options (kohya's): pyramid noise, input perturbation, random strengths, a timestep range,
pseudo-Huber losses, debiased and v-prediction-like weights: their values, their draws (the default's unchanged),
a run with all of them resumes to the uninterrupted weights and records them, and bad values are one line."""

import subprocess
import sys

import pytest
import torch
from diffusers import DDPMScheduler
from small_runs import factors, outline_dataset, resumes_exactly, settings

from sdtune.safeio import SdtuneError, read_metadata
from sdtune.train import diffusion, loop
from sdtune.train.config import load_settings
from sdtune.train.data import seed_for
from sdtune.train.diffusion import Loss, Noise, diffusion_draws
from sdtune.train.lora import train_lora
from sdtune.train.objective import Objective

SHAPE = (4, 4, 16, 16)


def test_the_default_draws_are_the_plain_ones_and_each_option_moves_only_its_own():
    plain = diffusion_draws(3, 7, SHAPE, 1000)
    g = torch.Generator().manual_seed(seed_for(3, "noise", 7))
    assert torch.equal(plain.noise, torch.randn(SHAPE, generator=g))
    assert torch.equal(plain.timesteps, torch.randint(0, 1000, (4,), generator=g))
    part = plain.rows(slice(1, 3))  # a process's slice: still one tensor, so the objective is told of no perturbation
    assert plain.input_noise is plain.noise and part.input_noise is part.noise and torch.equal(part.noise, plain.noise[1:3])
    # input perturbation: the target noise and timesteps stay; the noisy latent's noise is off by gamma x N(0, I)
    ip = diffusion_draws(3, 7, SHAPE, 1000, Noise(ip_gamma=0.1))
    assert torch.equal(ip.noise, plain.noise) and torch.equal(ip.timesteps, plain.timesteps)
    assert (ip.input_noise - ip.noise).std().item() == pytest.approx(0.1, rel=0.1)
    # kohya's random strengths: each batch's offset / γ drawn uniformly below the value, from the same generator
    g = torch.Generator().manual_seed(seed_for(3, "noise", 7))
    eps, t = torch.randn(SHAPE, generator=g), torch.randint(0, 1000, (4,), generator=g)
    offset = 0.1 * torch.rand((), generator=g).item()
    eps = eps + offset * torch.randn((4, 4, 1, 1), generator=g)
    gamma = 0.2 * torch.rand((), generator=g).item()
    both = diffusion_draws(3, 7, SHAPE, 1000, Noise(offset=0.1, offset_random=True, ip_gamma=0.2, ip_gamma_random=True))
    assert 0 < offset < 0.1 and 0 < gamma < 0.2
    assert torch.equal(both.noise, eps) and torch.equal(both.timesteps, t)
    assert torch.equal(both.input_noise, eps + gamma * torch.randn(SHAPE, generator=g))
    strengths = {round(diffusion_draws(3, n, SHAPE, 1000, Noise(ip_gamma=0.2, ip_gamma_random=True)).input_noise.sub(
        diffusion_draws(3, n, SHAPE, 1000).noise).std().item(), 5) for n in range(8)}
    assert len(strengths) == 8 and max(strengths) < 0.2 * 1.1  # one strength per batch, each its own
    # a timestep range
    ranged = diffusion_draws(3, 7, (256, 4, 2, 2), 1000, Noise(min_timestep=200, max_timestep=210))
    assert ranged.timesteps.min() >= 200 and ranged.timesteps.max() < 210 and len(ranged.timesteps.unique()) > 5


def test_adaptive_noise_scale_grows_each_images_offset_by_its_latent_mean():
    """kohya's adaptive_noise_scale: the offset of image b, channel c is offset + s·|mean(latent[b, c])| (floored at
    0) times the same offset draw; the rest of the draw stays, the perturbed noise moves with it, and a process's
    slice adapts as the whole batch's rows do."""
    latents = torch.randn(SHAPE) + torch.linspace(-2, 2, 4).view(4, 1, 1, 1)
    kw = dict(offset=0.1, ip_gamma=0.2)
    plain = diffusion_draws(3, 7, SHAPE, 1000, Noise(**kw))
    drawn = diffusion_draws(3, 7, SHAPE, 1000, Noise(**kw, adaptive_scale=0.5))
    assert plain.offset_noise is None and torch.equal(drawn.noise, plain.noise)  # the draw itself is the same
    g = torch.Generator().manual_seed(seed_for(3, "noise", 7))
    eps, _ = torch.randn(SHAPE, generator=g), torch.randint(0, 1000, (4,), generator=g)
    z = torch.randn((4, 4, 1, 1), generator=g)
    for scale in (0.5, -0.1):
        adapted = drawn.adapted(latents, scale)
        strength = (0.1 + scale * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
        assert torch.allclose(adapted.noise, eps + strength * z, atol=1e-6)
        assert torch.allclose(adapted.input_noise - adapted.noise, plain.input_noise - plain.noise, atol=1e-6)
        assert torch.equal(adapted.timesteps, plain.timesteps)
        assert torch.equal(drawn.rows(slice(2, 4)).adapted(latents[2:], scale).noise, adapted.noise[2:])
    assert (strength == 0).any() and (strength > 0).any()  # a negative scale floors some at 0


def test_a_run_with_adaptive_noise_scale_resumes_exactly_and_records_it(base, dataset, tmp_path):
    whole = resumes_exactly(base, dataset, tmp_path, noise_offset=0.1, adaptive_noise_scale=0.05)
    assert read_metadata(whole)["ss_adaptive_noise_scale"] == "0.05"
    offset = factors(train_lora(base, settings(dataset, tmp_path / "offset", noise_offset=0.1)))
    assert any(not torch.equal(a, b) for k, (a, *_) in factors(whole).items() for b in offset[k][:1])
    assert read_metadata(tmp_path / "offset" / "lora.safetensors")["ss_adaptive_noise_scale"] == "None"


def _neighbour_correlation(x: torch.Tensor) -> float:
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_pyramid_noise_is_unit_variance_low_frequency_and_stops_at_one_pixel():
    plain = diffusion_draws(0, 1, SHAPE, 1000).noise
    pyramid = diffusion_draws(0, 1, SHAPE, 1000, Noise(multires_iterations=6, multires_discount=0.8))
    assert torch.equal(pyramid.input_noise, pyramid.noise)
    assert pyramid.noise.std().item() == pytest.approx(1.0, abs=1e-5)  # rescaled over the whole global batch
    # neighbouring latent pixels: independent in plain noise, correlated once coarse layers are added (level 0 is
    # full-resolution noise of weight 1, as kohya's, so at most about half of the variance is correlated)
    assert abs(_neighbour_correlation(plain)) < 0.1 and _neighbour_correlation(pyramid.noise) > 0.15
    # each image-channel's mean drifts from 0 far more (the coarse layers' low frequencies)
    assert pyramid.noise.mean(dim=(2, 3)).std() > 3 * plain.mean(dim=(2, 3)).std()
    # many iterations on a small latent: the layers stop at a 1-pixel side, the result is finite and reproducible
    a = diffusion_draws(0, 1, (2, 4, 4, 4), 1000, Noise(multires_iterations=50)).noise
    assert torch.isfinite(a).all() and torch.equal(a, diffusion_draws(0, 1, (2, 4, 4, 4), 1000,
                                                                      Noise(multires_iterations=50)).noise)


def test_pseudo_huber_values_thresholds_and_its_limits():
    pred, target, t = torch.full((1, 1, 1, 1), 3.0), torch.zeros(1, 1, 1, 1), torch.tensor([500])
    acp = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    # error 3 at threshold 4: sqrt(9 + 16) = 5, so huber 2*4*(5 - 4) = 8 and smooth_l1 2*(5 - 4) = 2
    assert Loss("huber", 4.0, "constant").elementwise(pred, target, t, acp).item() == pytest.approx(8.0)
    assert Loss("smooth_l1", 4.0, "constant").elementwise(pred, target, t, acp).item() == pytest.approx(2.0)
    assert Loss().elementwise(pred, target, t, acp).item() == 9.0
    # squared for errors far below the threshold, linear (2c|d|) far above it
    small = torch.full((1, 1, 1, 1), 1e-2)
    assert Loss("huber", 1.0, "constant").elementwise(small, target, t, acp).item() == pytest.approx(1e-4, rel=1e-4)
    big = torch.full((1, 1, 1, 1), 100.0)
    assert Loss("huber", 0.1, "constant").elementwise(big, target, t, acp).item() == pytest.approx(20.0, rel=1e-3)
    # the schedules: exponential from 1 at t=0 to c at the end; snr from ~1 at clean timesteps to ~c at noisy ones
    ends = torch.tensor([0, 999])
    exp = Loss("huber", 0.1, "exponential").thresholds(ends, acp)
    assert exp[0].item() == 1.0 and exp[1].item() == pytest.approx(0.1 ** (999 / 1000))
    snr = Loss("huber", 0.1, "snr").thresholds(ends, acp)
    assert snr[0].item() == pytest.approx(1.0, abs=0.02) and snr[1].item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(Loss("huber", 0.1, "constant").thresholds(ends, acp), torch.full((2,), 0.1))


def test_debiased_weights_are_one_over_root_snr_capped():
    acp = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    t = torch.tensor([0, 10, 500, 999])
    snr = acp[t] / (1 - acp[t])
    w = diffusion.debiased_weights(t, acp)
    assert torch.allclose(w, 1 / snr.clamp(max=1000).sqrt())
    assert torch.allclose(diffusion.debiased_weights(t, acp, "v_prediction"), 1 / (snr.clamp(max=1000) + 1))
    ztsnr = torch.cat([acp[:-1], torch.zeros(1)])  # zero terminal SNR: finite, not inf
    assert diffusion.debiased_weights(t, ztsnr)[-1].item() == pytest.approx(1000.0)
    both = Loss(min_snr_gamma=5.0, debiased=True).weights(t, acp, "epsilon")
    assert torch.allclose(both, diffusion.min_snr_weights(t, acp, 5.0) * w)
    assert Loss().weights(t, acp, "epsilon") is None


def test_v_prediction_like_weights_are_kohyas_and_finite_at_zero_terminal_snr():
    acp = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    t = torch.tensor([0, 10, 500, 999])
    snr = (acp[t] / (1 - acp[t])).clamp(max=1000)
    # --v-pred-like-loss v: the loss plus v times the loss weighted (SNR+1)/SNR
    assert torch.allclose(Loss(v_pred_like=0.1).weights(t, acp, "epsilon"), 1 + 0.1 * (snr + 1) / snr)
    # --scale-v-pred-loss-like-noise-pred: a v-prediction loss weighted SNR/(SNR+1), an ε-prediction loss
    assert torch.allclose(Loss(v_like_eps=True).weights(t, acp, "v_prediction"), snr / (snr + 1))
    ztsnr = torch.cat([acp[:-1], torch.zeros(1)])
    assert Loss(v_pred_like=1.0).weights(t, ztsnr, "epsilon")[-1].item() == pytest.approx(1e6 + 2)
    assert Loss(v_like_eps=True).weights(t, ztsnr, "v_prediction")[-1].item() == 0.0
    every = Loss(min_snr_gamma=5.0, debiased=True, v_pred_like=0.1).weights(t, acp, "epsilon")
    assert torch.allclose(every, diffusion.min_snr_weights(t, acp, 5.0) * diffusion.debiased_weights(t, acp)
                          * (1 + 0.1 * (snr + 1) / snr))
    Loss(v_like_eps=True).check("v_prediction")
    with pytest.raises(SdtuneError, match="this model predicts ε already"):
        Loss(v_like_eps=True).check("epsilon")


class EchoUNet(torch.nn.Module):
    """Predicts its noisy input: the loss is then a known function of the objective's inputs."""

    dtype = torch.float32

    def forward(self, x, t, context):
        return type("Out", (), {"sample": x})()


def test_the_objective_makes_the_noisy_latent_with_the_perturbed_noise_and_aims_at_the_noise():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    z0, noise, extra = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([100, 800])
    acp = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    objective = Objective(EchoUNet(), None, scheduler, Loss("smooth_l1", 0.5, "constant", debiased=True))
    loss = objective(z0, noise, t, context=torch.zeros(2, 3, 5), input_noise=noise + 0.1 * extra)
    d = acp.sqrt() * z0 + (1 - acp).sqrt() * (noise + 0.1 * extra) - noise
    per_sample = (2 * ((d ** 2 + 0.25).sqrt() - 0.5)).mean(dim=(1, 2, 3))
    expected = (per_sample * diffusion.debiased_weights(t, scheduler.alphas_cumprod)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the validation loss stays the plain squared error of the unperturbed input
    plain = objective.errors(z0, noise, t, context=torch.zeros(2, 3, 5))
    e = acp.sqrt() * z0 + (1 - acp).sqrt() * noise - noise
    assert torch.allclose(plain, e.pow(2).mean(dim=(1, 2, 3)))


def test_zero_terminal_snr_trains_on_diffusers_rescaled_schedule(base):
    """--zero-terminal-snr: the objective's schedule is diffusers' rescale_betas_zero_snr of the model's, its last
    timestep pure noise (the noisy latent is the noise itself), its first as it was."""
    plain = Objective(EchoUNet(), None, base.scheduler)
    ztsnr = Objective(EchoUNet(), None, base.scheduler, zero_terminal_snr=True)
    want = DDPMScheduler.from_config(base.scheduler.config, rescale_betas_zero_snr=True).alphas_cumprod
    assert torch.allclose(ztsnr.alphas_cumprod, want, rtol=1e-6, atol=0) and ztsnr.alphas_cumprod[-1].item() == 0.0
    assert ztsnr.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    assert plain.alphas_cumprod[-1].item() > 0
    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 999])
    # an echo of its input at t = 999 is the noise exactly: no error left for ε
    assert ztsnr.errors(z0, noise, t, context=torch.zeros(2, 3, 5)).abs().max().item() == 0.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return outline_dataset(tmp_path_factory.mktemp("data"))


OPTIONS = dict(multires_noise_iterations=6, multires_noise_discount=0.5, ip_noise_gamma=0.1, min_timestep=100,
               max_timestep=900, loss_type="huber", huber_c=0.2, huber_schedule="exponential",
               debiased_estimation=True, noise_offset=0.05, noise_offset_random_strength=True,
               ip_noise_gamma_random_strength=True, v_pred_like_loss=0.1, zero_terminal_snr=True)


def test_a_run_with_every_option_resumes_to_the_uninterrupted_weights_and_records_them(base, dataset, tmp_path):
    whole = resumes_exactly(base, dataset, tmp_path, **OPTIONS)
    a = factors(whole)
    plain = factors(train_lora(base, settings(dataset, tmp_path / "plain")))
    assert any(not torch.equal(a[k][1], plain[k][1]) for k in a)  # the options changed what was learned
    meta = read_metadata(whole)
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"], meta["ss_ip_noise_gamma"],
            meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"], meta["ss_debiased_estimation"]) == \
        ("6", "0.5", "0.1", "huber", "exponential", "0.2", "True")
    assert meta["ss_zero_terminal_snr"] == "True" and "ss_zero_terminal_snr" not in read_metadata(
        tmp_path / "plain" / "lora.safetensors")
    assert (meta["ss_noise_offset_random_strength"], meta["ss_ip_noise_gamma_random_strength"],
            meta["ss_v_pred_like_loss"], meta["ss_scale_v_pred_loss_like_noise_pred"]) == ("True", "True", "0.1", "False")
    saved = (tmp_path / "whole" / loop.SETTINGS_FILE).read_text()
    assert 'loss_type = "huber"' in saved and "multires_noise_iterations = 6" in saved


@pytest.mark.parametrize("values, says", [
    (dict(loss_type="l1"), "--loss-type 'l1': choose one of l2, huber, smooth_l1"),
    (dict(huber_schedule="linear"), "--huber-schedule 'linear'"),
    (dict(huber_c=0.0), "--huber-c 0.0: must be in (0, 1]"),
    (dict(multires_noise_discount=1.5), "--multires-noise-discount 1.5: must be in (0, 1]"),
    (dict(min_timestep=900, max_timestep=100), "the range is empty"),
    (dict(multires_noise_iterations=-1), "--multires-noise-iterations -1: must be 0 or more"),
    (dict(noise_offset_random_strength=True), "--noise-offset-random-strength: draws each batch's strength from 0 "
                                              "to --noise-offset, which is 0; give --noise-offset"),
    (dict(ip_noise_gamma_random_strength=True), "which is 0; give --ip-noise-gamma"),
    (dict(v_pred_like_loss=-0.1), "--v-pred-like-loss -0.1: must be 0 or more"),
    (dict(adaptive_noise_scale=0.01), "--adaptive-noise-scale 0.01: adds to the noise offset, which is 0; give "
                                      "--noise-offset"),
    (dict(adaptive_noise_scale=0.01, noise_offset=0.1, multires_noise_iterations=6),
     "--adaptive-noise-scale with --multires-noise-iterations"),
])
def test_bad_values_are_refused(dataset, tmp_path, values, says):
    with pytest.raises(SdtuneError) as e:
        settings(dataset, tmp_path / "out", **values).check()
    assert says in str(e.value)


@pytest.mark.parametrize("flags, says", [(["--max-timestep", "2000"], "schedule has timesteps 0 to 999"),
                                         (["--scale-v-pred-loss-like-noise-pred"], "this model predicts ε already")])
def test_what_the_model_cannot_train_with_is_one_line_through_the_command(dataset, tmp_path, flags, says):
    run = subprocess.run([sys.executable, "-m", "sdtune", "train", "lora", "--model", "tiny-random", "--data",
                          str(dataset), "--out", str(tmp_path / "out"), "--steps", "1", "--no-progress", *flags],
                         capture_output=True, text=True)
    assert run.returncode != 0 and says in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not list((tmp_path / "out").glob("*.safetensors"))


def test_kohyas_and_diffusers_names_in_a_config_file_are_named_as_sdtunes(tmp_path):
    cfg = tmp_path / "kohya.toml"
    for theirs, ours in (("debiased_estimation_loss = true", "debiased_estimation"),
                         ("input_perturbation = 0.1", "ip_noise_gamma"), ("block_dims = '4,4'", "block_ranks"),
                         ("enable_wildcard = true", "wildcards"), ("bucket_reso_steps = 64", "bucket_step"),
                         ("caption_dropout_every_n_epochs = 2", "caption_dropout_every_epochs"),
                         ("optimizer_type = 'AdamW'", "optimizer"), ("sample_every_n_epochs = 1", "sample_every_epochs")):
        cfg.write_text(theirs + "\n")
        with pytest.raises(SdtuneError, match=f"kohya's/diffusers' name; sdtune's is '{ours}'"):
            load_settings(cfg, {}, "lora", family="tiny")
