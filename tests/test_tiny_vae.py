"""The built-in VAE is a general 64 px codec: held-out PSNR by category; the image set and its recipe."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune.tiny import files as tiny_files
from sdtune.tiny import images, vae_quality, vae_recipe
from sdtune.tiny import model as tiny_model

shipped = pytest.mark.skipif(not tiny_files.trained_weights_exist(), reason="no trained tiny model shipped")

# The world-only VAE shipped before (commit 461c5a5) on the world renders of held_out_set(8):
# `python tools/vae_psnr.py --old git:461c5a5 --per-category 8` prints it.
OLD_WORLD_PSNR = 28.54
# Issue #15 asks for a mean of 28 dB and no category under 24 dB (on 64 per category the shipped VAE measures
# 28.7, photo 24.6 the lowest; on these 8: 28.9, photo 24.4). The world-only VAE: 13.7-15.8 dB outside the world.
FLOOR_MEAN = 28.0
FLOOR_CATEGORY = 24.0


@pytest.fixture(scope="module")
def small_test_set():
    return vae_quality.held_out_set(8)


@shipped
def test_shipped_vae_reproduces_every_category(small_test_set):
    torch.set_num_threads(1)  # the batch is small; more threads only contend on a shared CPU
    vae = tiny_model.load()["vae"].eval()
    scores = vae_quality.category_psnr(vae, small_test_set)
    low = {c: round(s, 1) for c, s in scores.items() if s < FLOOR_CATEGORY}
    assert not low, f"categories under {FLOOR_CATEGORY} dB: {low}"
    assert scores["mean"] >= FLOOR_MEAN, scores
    assert scores["world"] >= OLD_WORLD_PSNR - 0.5, scores  # the world is drawn as well as before


@shipped
def test_shipped_vae_keeps_its_format_and_scaling_factor():
    state = load_file(tiny_files.WEIGHTS / "vae.safetensors")
    assert float(state.pop("scaling_factor")) == pytest.approx(0.4965, abs=1e-4)  # the UNet's latent units
    assert all(v.dtype == torch.float16 for v in state.values())


def test_images_are_deterministic_64px_and_differ_by_category():
    for c in images.CATEGORIES:
        a, b = images.image(c, 5), images.image(c, 5)
        assert a.mode == "RGB" and a.size == (64, 64), c
        assert a.tobytes() == b.tobytes(), c
        assert a.tobytes() != images.image(c, 6).tobytes(), c
    px = images.images("background", range(40))
    corners = px[:, 0, 0].astype(int)
    assert len({tuple(c) for c in corners}) == 40  # any background colour, not the world's three
    with pytest.raises(ValueError, match="unknown image category 'blob'"):
        images.image("blob", 0)


def test_frames_are_painted_at_the_border():
    px = images.images("frame", range(20)).astype(int)
    # the outermost ring is one colour (the frame), whatever is inside
    ring = np.concatenate([px[:, 0, 4:-4], px[:, -1, 4:-4], px[:, 4:-4, 0], px[:, 4:-4, -1]], axis=1)
    assert (np.abs(ring - ring[:, :1]).max(axis=(1, 2)) <= 8).mean() >= 0.9


def test_psnr_values():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] += 10
    p = vae_quality.psnr(a, b)
    assert p[0] == pytest.approx(60.0)  # identical: capped
    assert p[1] == pytest.approx(10 * np.log10(255 ** 2 / 100))


def test_training_seeds_never_reach_the_held_out_seeds():
    with pytest.raises(ValueError, match="held-out seeds"):
        vae_recipe.training_pool(500_000, seed=2)


def test_recipe_keeps_the_scaling_factor_and_resumes_after_a_kill(tmp_path, monkeypatch):
    start = tmp_path / "start.safetensors"
    vae = tiny_model.build(seed=1)["vae"]
    vae.register_to_config(scaling_factor=0.5)
    vae_recipe.export(vae, start)
    args = ["--start", str(start), "--steps", "4", "--batch", "4", "--per-category", "4", "--save-every", "2",
            "--eval-per-category", "1", "--lr", "1e-3"]
    vae_recipe.main(["--out", str(tmp_path / "a"), *args])
    out = load_file(tmp_path / "a" / "vae.safetensors")
    assert float(out["scaling_factor"]) == 0.5  # the UNet's units are kept
    before = load_file(start)
    assert any(not out[k].equal(before[k]) for k in before if k != "scaling_factor")  # it trained
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "trained 4 steps" in log and "category" in log and "photo" in log

    real, calls = vae_recipe.F.mse_loss, {"n": 0}

    def dies_in_step_3(*a, **k):  # three MSE terms a step; the checkpoint is written after step 2
        calls["n"] += 1
        if calls["n"] == 3 * 2 + 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(vae_recipe.F, "mse_loss", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        vae_recipe.main(["--out", str(tmp_path / "b"), *args])
    monkeypatch.setattr(vae_recipe.F, "mse_loss", real)
    vae_recipe.main(["--out", str(tmp_path / "b"), *args])
    assert "trained 4 steps" in (tmp_path / "b" / "log.txt").read_text()
    resumed = load_file(tmp_path / "b" / "vae.safetensors")
    for k in out:  # same draws and optimizer state; kernels may round differently in a fresh process
        torch.testing.assert_close(resumed[k].float(), out[k].float(), rtol=4e-3, atol=2e-4, msg=k)
    with pytest.raises(SystemExit, match="no VAE to start from"):
        vae_recipe.main(["--out", str(tmp_path / "c"), "--start", str(tmp_path / "missing.safetensors")])


def test_decoder_only_keeps_every_latent_bit_for_bit(tmp_path):
    start = tmp_path / "start.safetensors"
    vae = tiny_model.build(seed=1)["vae"]
    vae.register_to_config(scaling_factor=0.5)
    vae_recipe.export(vae, start)
    vae_recipe.main(["--out", str(tmp_path / "d"), "--start", str(start), "--steps", "3", "--batch", "4",
                     "--per-category", "4", "--eval-per-category", "1", "--lr", "1e-3", "--decoder-only"])
    before, after = load_file(start), load_file(tmp_path / "d" / "vae.safetensors")
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(after[k].equal(before[k]) for k in encoder)
    assert any(not after[k].equal(before[k]) for k in decoder)  # it trained


def test_anchor_pulls_world_latents_to_the_old_encoder(tmp_path):
    torch.manual_seed(0)
    start = tiny_model.build(seed=1)["vae"]
    start.register_to_config(scaling_factor=0.5)
    pool = vae_recipe.training_pool(8, seed=0)
    x = torch.from_numpy(images.images("world", range(900_000, 900_004))).permute(0, 3, 1, 2).float() / 127.5 - 1

    def drift(anchor):
        vae = tiny_model.build(seed=1)["vae"]
        vae.load_state_dict(start.state_dict())
        vae.register_to_config(scaling_factor=0.5)
        vae_recipe.finetune(vae, tmp_path / f"a{anchor}", pool, steps=6, batch=8, world_share=0.5, lr=3e-3,
                            anchor=anchor, seed=0, device="cpu", log=lambda m: None, save_every=100)
        with torch.no_grad():
            return float((vae.encode(x).latent_dist.mean - start.encode(x).latent_dist.mean).pow(2).mean())

    for d in ("a0.0", "a100.0"):
        (tmp_path / d).mkdir()
    assert drift(100.0) < 0.5 * drift(0.0)


def test_widen_keeps_what_the_vae_computes_and_the_recipe_trains_the_wider_decoder(tmp_path):
    torch.manual_seed(0)
    world = tiny_model.build(seed=1)["vae"].eval()
    world.register_to_config(scaling_factor=0.5)
    wide = vae_recipe.widen(world).eval()
    assert wide.config.block_out_channels == tuple(2 * c for c in world.config.block_out_channels)
    assert wide.config.scaling_factor == 0.5
    x = torch.from_numpy(images.images("frame", range(900_000, 900_004))).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        old, new = world.encode(x).latent_dist, wide.encode(x).latent_dist
        torch.testing.assert_close(new.mean, old.mean, atol=1e-5, rtol=1e-5)  # the same latents (float rounding)
        torch.testing.assert_close(new.logvar, old.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wide.decode(old.mean).sample, world.decode(old.mean).sample, atol=1e-5, rtol=1e-5)
    start = tmp_path / "start.safetensors"
    vae_recipe.export(world, start)
    vae_recipe.main(["--out", str(tmp_path / "w"), "--start", str(start), "--widen", "--decoder-only", "--steps", "3",
                     "--batch", "4", "--per-category", "4", "--eval-per-category", "1", "--lr", "1e-3"])
    before, after = load_file(start), load_file(tmp_path / "w" / "vae.safetensors")
    trained = vae_recipe.load_vae(tmp_path / "w" / "vae.safetensors")  # the widths are read from the file
    assert trained.config.block_out_channels == wide.config.block_out_channels
    assert float(after["scaling_factor"]) == 0.5
    for k in before:  # the encoder: the old channels as they were, the new ones zero (group norm scales aside)
        if k.startswith(("encoder.", "quant_conv.")) and ".to_q." not in k and not ("norm" in k and "weight" in k):
            old_part = after[k][tuple(slice(0, n) for n in before[k].shape)]
            assert old_part.equal(before[k]) and after[k].count_nonzero() == before[k].count_nonzero(), k
    decoder = [k for k in before if k.startswith("decoder.up_blocks.")]
    assert any(not after[k][tuple(slice(0, n) for n in before[k].shape)].equal(before[k]) for k in decoder)


def test_a_widened_encoder_that_is_trained_gets_live_new_channels_and_keeps_its_latents_at_first(tmp_path):
    torch.manual_seed(0)
    world = tiny_model.build(seed=1)["vae"].eval()
    x = torch.from_numpy(images.images("photo", range(900_000, 900_004))).permute(0, 3, 1, 2).float() / 127.5 - 1
    frozen = vae_recipe.widen(world).eval()  # --decoder-only: the encoder's new channels are zero
    conv_in = frozen.encoder.conv_in.weight
    assert conv_in[16:].count_nonzero() == 0
    woken = vae_recipe.wake(frozen, world, ("encoder.",), seed=3)
    assert woken > 10 and conv_in[16:].count_nonzero() == conv_in[16:].numel()
    assert vae_recipe.wake(frozen, world, ("encoder.",), seed=3) == 0  # only all-zero channels are woken
    with torch.no_grad():  # the old channels compute what they did: the same latents to float rounding
        torch.testing.assert_close(frozen.eval().encode(x).latent_dist.mean, world.encode(x).latent_dist.mean,
                                   atol=1e-5, rtol=1e-5)
    start = tmp_path / "start.safetensors"
    vae_recipe.export(world, start)
    vae_recipe.main(["--out", str(tmp_path / "w"), "--start", str(start), "--widen", "--steps", "3",
                     "--batch", "4", "--per-category", "4", "--eval-per-category", "1", "--lr", "1e-3"])
    after = load_file(tmp_path / "w" / "vae.safetensors")
    narrow = vae_recipe.load_vae(start)
    begun = vae_recipe.widen(narrow, seed=0)  # what the recipe started from: widened, its encoder woken
    vae_recipe.wake(begun, narrow, ("encoder.",), seed=0)
    begun = begun.state_dict()
    weight = "encoder.down_blocks.0.resnets.0.conv1.weight"
    new_rows, started = after[weight][16:].float(), begun[weight][16:].half().float()
    assert started.count_nonzero() == started.numel() and not new_rows.equal(started)  # woken, then trained


def test_category_weights_draw_the_named_categories_more_often():
    assert vae_recipe.category_weights("") is None
    weights = vae_recipe.category_weights("photo=3,lines=0")
    assert weights[vae_recipe.BROAD.index("photo")] == 3 and weights[vae_recipe.BROAD.index("lines")] == 0
    assert weights.sum() == 3 + len(vae_recipe.BROAD) - 2
    # each category's images hold their own value: the batch says which categories were drawn
    pool = {c: torch.full((2, 3, 4, 4), i, dtype=torch.uint8) for i, c in enumerate(images.CATEGORIES)}
    x = vae_recipe._batch(pool, 2, 400, torch.Generator().manual_seed(0), weights)
    drawn = [images.CATEGORIES[round(float(v))] for v in (x[2:, 0, 0, 0] + 1) * 127.5]
    assert "lines" not in drawn and drawn.count("photo") > 2.5 * drawn.count("texture")
    for bad in ("photos=2", "photo", "photo=x"):
        with pytest.raises(ValueError, match="needs CAT=W"):
            vae_recipe.category_weights(bad)


def test_distil_pulls_the_decoder_to_the_start_vae_on_given_latents(tmp_path):
    torch.manual_seed(0)
    start = tiny_model.build(seed=1)["vae"].eval()
    start.register_to_config(scaling_factor=0.5)
    pool = vae_recipe.training_pool(4, seed=0)
    latents = torch.randn(16, 4, 16, 16) * 2  # off any encoder's manifold, like a UNet's samples can be

    def gap(distil):  # training on images moves the decoder; on the given latents the distil term holds it
        vae = tiny_model.build(seed=1)["vae"]
        vae.register_to_config(scaling_factor=0.5)
        for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()]:
            p.requires_grad_(False)
        out = tmp_path / ("on" if distil is not None else "off")
        out.mkdir()
        vae_recipe.finetune(vae, out, pool, steps=6, batch=4, world_share=0.5, lr=3e-3, anchor=0.0, seed=0,
                            device="cpu", log=lambda m: None, save_every=100, teacher=start, distil=distil)
        with torch.no_grad():
            return float((vae.decode(latents).sample - start.decode(latents).sample).abs().mean())

    assert gap(latents) < 0.6 * gap(None)


@shipped
def test_unet_latents_are_what_the_built_in_unet_draws(monkeypatch):
    torch.set_num_threads(1)
    drawn, lines = [], []

    def generate(*args, **kwargs):  # the pictures the pipeline made from the latents caught on their way
        out = real(*args, **kwargs)
        drawn.extend(np.asarray(g.image) for g in out)
        return out

    real = vae_recipe.generate
    monkeypatch.setattr(vae_recipe, "generate", generate)
    latents = vae_recipe.unet_latents(["tiny"], 8, seed=0, log=lines.append)
    assert latents.shape == (8, 4, 16, 16) and lines == ["distil: 8 UNet latents after tiny"]
    vae = tiny_model.load()["vae"].eval()
    with torch.no_grad():  # the same decode as the pipeline's: the latents are the decoder's input
        x = vae.decode(latents).sample
    decoded = ((x / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    assert len(drawn) == 8
    assert np.abs(decoded - np.stack(drawn).astype(np.float64)).max() <= 1
