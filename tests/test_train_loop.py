"""The shared training loop: schedules, loss, settings, exact resume, NaN stop, samples, several processes."""

import html
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import small_runs
import torch
from diffusers.optimization import get_scheduler
from PIL import Image
from transformers import optimization as tf_optimization

from sdtune import safeio
from sdtune.generate import TextStack
from sdtune.lora.formats import load_lora
from sdtune.models import load_base
from sdtune.safeio import SdtuneError, folder_lock, load_state, read_metadata
from sdtune.tiny import world
from sdtune.train import data as data_mod
from sdtune.train import diffusion, logs, loop, prior, schedules, validation
from sdtune.train.config import LoraSettings, TISettings, load_settings
from sdtune.train.lora import train_lora
from sdtune.train.objective import Objective, TextInput
from sdtune.train.scan import scan_folder
from sdtune.train.ti import train_ti


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    scenes = world.concept_scenes(5, seed=1, style="outline")
    return world.write_dataset(tmp_path_factory.mktemp("data"), scenes, template=None, with_style=False)


def lora_tensors(path):
    return {(c, p): ad.tensors for c, p, ad in load_lora(path).items()}


def settings(dataset, out, **kw):
    defaults = dict(data=str(dataset), out=str(out), steps=6, batch_size=2, rank=4, alpha=4, lr=2e-3,
                    sample_steps=2, progress=False)
    return LoraSettings(**{**defaults, **kw})


# ---------------------------------------------------------------- pieces

def test_lr_factor_warmup_and_schedules():
    f = schedules.lr_factor
    assert [f(s, 110, 10, "constant") for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    assert f(60, 110, 10, "linear") == pytest.approx(0.5)
    assert f(60, 110, 10, "cosine") == pytest.approx(0.5)
    assert f(10, 110, 10, "cosine") == pytest.approx(1.0)
    assert f(109, 110, 10, "linear") == pytest.approx(0.01)
    with pytest.raises(SdtuneError, match="--lr-scheduler"):
        f(0, 10, 0, "exponential")
    # kohya's warm-up as a share of the steps (its lr_warmup_steps below 1): int(share x steps), as sd-scripts
    assert LoraSettings(lr_warmup_ratio=0.15).warmup_steps(110) == 16 and LoraSettings().warmup_steps(110) == 0
    for ratio, steps, says in ((1.0, 0, "--lr-warmup-ratio 1.0: a share of the run's steps, from 0 up to 1"),
                               (0.1, 5, "--lr-warmup-steps 5 and --lr-warmup-ratio 0.1: give one of them")):
        with pytest.raises(SdtuneError, match=re.escape(says)):
            LoraSettings(data="d", out="o", lr_warmup_ratio=ratio, lr_warmup_steps=steps).check()


@pytest.mark.parametrize("name, kw, ours", [("cosine_with_restarts", {"num_cycles": 3}, {"cycles": 3}),
                                             ("polynomial", {"power": 2.0}, {"power": 2.0})])
def test_kohyas_other_schedules_are_diffusers_ones(name, kw, ours):
    """kohya's cosine_with_restarts (--lr-scheduler-num-cycles) and polynomial (--lr-scheduler-power), step for step
    as diffusers' get_scheduler computes them (no warm-up: diffusers' starts at 0, sdtune's at 1/warmup; diffusers'
    polynomial ends at 1e-7, sdtune's at 0)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=0, num_training_steps=90, **kw)
    theirs = []
    for _ in range(90):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [schedules.lr_factor(s, 90, 0, name, **ours) for s in range(90)] == pytest.approx(theirs, abs=2e-7)
    if name == "cosine_with_restarts":  # three cosines: back to the full rate at steps 30 and 60
        assert [schedules.lr_factor(s, 90, 0, name, **ours) for s in (0, 29, 30, 60)] == pytest.approx(
            [1.0, 0.0027, 1.0, 1.0], abs=1e-3)


@pytest.mark.parametrize("name, make, ours", [
    ("cosine_with_min_lr", lambda o: tf_optimization.get_cosine_with_min_lr_schedule_with_warmup(
        o, 10, 90, min_lr_rate=0.1), dict(min_ratio=0.1)),
    ("warmup_stable_decay", lambda o: tf_optimization.get_wsd_schedule(
        o, 10, 30, num_training_steps=90, min_lr_ratio=0.2), dict(min_ratio=0.2, decay=30)),
    ("inverse_sqrt", lambda o: tf_optimization.get_inverse_sqrt_schedule(o, 10), {}),
    ("inverse_sqrt", lambda o: tf_optimization.get_inverse_sqrt_schedule(o, 0), {}),
])
def test_transformers_schedules_are_theirs_step_for_step_past_the_warmup(name, make, ours):
    """cosine_with_min_lr, warmup_stable_decay (--lr-scheduler-min-lr-ratio, --lr-decay-steps) and inverse_sqrt, as
    kohya offers them from transformers: the same factors after the warm-up (transformers' starts at 0, sdtune's at
    1/warmup)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make(optimizer)
    theirs = []
    for _ in range(90):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = scheduler.lr_lambdas[0].keywords["num_warmup_steps"]
    mine = [schedules.lr_factor(s, 90, warmup, name, **ours) for s in range(90)]
    assert mine[warmup:] == pytest.approx(theirs[warmup:], abs=1e-7)
    if name == "warmup_stable_decay":  # full rate until the last 30 steps, then down to 0.2
        assert mine[59] == 1.0 and mine[89] == pytest.approx(0.2, abs=3e-3)
    if warmup:
        assert mine[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    settings = dict(data="d", out="o", lr_scheduler="warmup_stable_decay")
    with pytest.raises(SdtuneError, match=r"warmup_stable_decay: decays over the run's last steps; give "
                                          r"--lr-decay-steps N \(or --lr-decay-ratio, e\.g\. 0\.2\)"):
        LoraSettings(**settings).check()
    assert LoraSettings(**settings, lr_decay_ratio=0.25).decay_steps(90) == 22


def test_min_snr_weights_match_the_formula():
    acp = torch.linspace(0.999, 0.001, 1000)
    t = torch.tensor([0, 100, 500, 999])
    snr = acp[t] / (1 - acp[t])
    assert torch.allclose(diffusion.min_snr_weights(t, acp, 5.0), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert torch.allclose(diffusion.min_snr_weights(t, acp, 5.0, "v_prediction"),
                          torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert torch.allclose(diffusion.min_snr_weights(t, acp, 1e9), torch.ones(4))
    # zero terminal SNR: the last timestep's SNR is 0, which weighs 1 for ε (the limit), 0 for v; never NaN
    ztsnr = torch.cat([acp[:-1], torch.zeros(1)])
    assert diffusion.min_snr_weights(t, ztsnr, 5.0)[-1] == 1.0
    assert diffusion.min_snr_weights(t, ztsnr, 5.0, "v_prediction")[-1] == 0.0


class ZeroUNet(torch.nn.Module):
    dtype = torch.float32

    def forward(self, x, t, context):
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_objective_is_the_weighted_noise_mse(base):
    obj = Objective(ZeroUNet(), None, base.scheduler, diffusion.Loss(min_snr_gamma=5.0))
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 900])
    loss = obj(z0, noise, t, context=torch.zeros(3, 77, 64))
    w = diffusion.min_snr_weights(t, base.scheduler.alphas_cumprod, 5.0)
    assert loss.item() == pytest.approx((w * noise.pow(2).mean(dim=(1, 2, 3))).mean().item(), rel=1e-6)


def test_draws_are_reproducible_and_noise_offset_shifts_channels():
    def draws(number=5, offset=0.0):
        d = diffusion.diffusion_draws(1, number, (2, 4, 8, 8), 1000, diffusion.Noise(offset=offset))
        assert d.input_noise is d.noise  # no input perturbation: the noisy latent is made with the target
        return d.noise, d.timesteps

    a, ta = draws()
    b, tb = draws()
    c, _ = draws(offset=0.1)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    shift = c - a  # one constant per (image, channel)
    # (a + s) - a gives s back up to the rounding of a + s: half a float32 step at |a| < 8 is 2.4e-7, far
    # below the shifts themselves (0.1 x N(0, 1))
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), rtol=0, atol=1e-6) and shift.abs().max() > 0
    assert not torch.equal(a, draws(6)[0])


def test_text_cache_equals_running_the_encoder(base):
    captions = ["a red circle", "a blue square", ""]
    cached = TextInput(TextStack.of(base), "cpu", cache_captions=captions)
    live = TextInput(TextStack.of(base), "cpu")
    with torch.no_grad():
        want = base.text_encoder(live(["a blue square", "a red circle"])["input_ids"][0])[0]
    # the cache ran the encoder on another batch (all three captions), and CPU kernels may round differently
    # with batch size; 1e-4 is far above that (~1e-6 on outputs of size ~3) and far below the gap between
    # two captions' outputs (~1), so a stale or swapped entry still fails
    assert torch.allclose(cached(["a blue square", "a red circle"])["context"], want, atol=1e-4)


def test_settings_from_toml_with_flags_winning(tmp_path):
    cfg = tmp_path / "lora.toml"
    cfg.write_text('data = "imgs"\nout = "o"\nrank = 8\nlr = 1\n"text-encoder" = true\n'
                   'sample_prompts = "a cat"\n[ti]\ntoken = "<x>"\n')
    s = load_settings(cfg, {"rank": 32, "alpha": None, "te_lr": 5e-5}, kind="lora")
    assert (s.data, s.rank, s.alpha, s.lr, s.text_encoder, s.te_lr) == ("imgs", 32, 8.0, 1.0, True, 5e-5)
    assert s.sample_prompts == ["a cat"] and isinstance(s.lr, float)
    ti = load_settings(None, {"token": "<y>", "init_token": "dog"}, kind="ti")
    assert isinstance(ti, TISettings) and ti.token == "<y>" and ti.lr == 5e-3
    (tmp_path / "bad.toml").write_text("rnak = 4\n")
    with pytest.raises(SdtuneError, match=r"bad.toml: unknown setting for lora training: 'rnak' \(did you mean 'rank'"):
        load_settings(tmp_path / "bad.toml")
    (tmp_path / "kohya.toml").write_text('learning_rate = 1e-4\nnetwork_dim = 8\nrnak = 4\n')  # every key, named
    with pytest.raises(SdtuneError, match=r"kohya.toml: unknown settings for lora training: 'learning_rate' \(kohya's"
                                          r"/diffusers' name; sdtune's is 'lr'\); 'network_dim' \(kohya's/diffusers' "
                                          r"name; sdtune's is 'rank'\); 'rnak' \(did you mean 'rank'\?\)$"):
        load_settings(tmp_path / "kohya.toml")
    (tmp_path / "type.toml").write_text('rank = "big"\n')
    with pytest.raises(SdtuneError, match="type.toml: rank = 'big' is not an integer"):
        load_settings(tmp_path / "type.toml")
    (tmp_path / "broken.toml").write_text("rank = \n")
    with pytest.raises(SdtuneError, match="broken.toml: not valid TOML"):
        load_settings(tmp_path / "broken.toml")
    with pytest.raises(SdtuneError, match="--targets 'everything': choose one of attn, attn\\+ff, all"):
        LoraSettings(data="d", out="o", targets="everything").check()
    with pytest.raises(SdtuneError, match="no training data"):
        LoraSettings(out="o").check()


# ---------------------------------------------------------------- runs

class Stop(Exception):
    pass


def test_a_disk_full_at_a_save_is_said_of_the_file_that_failed(base, dataset, tmp_path, monkeypatch):
    """The disk fills up as resume.pt is written: the error names resume.pt. The run's cleanups (loss.csv and
    loss.png, written as it closes) fail on the same disk, and their error used to replace the first one."""
    full = []

    def resume_state(obj, path, *args, **kwargs):
        full.append(path)
        raise SdtuneError(f"{path}: could not be written (No space left on device); free some space or choose "
                          f"another place")

    def text(content, path):
        if full:
            raise OSError(28, "No space left on device", str(path))
        safeio.atomic_write_text(content, path)
    monkeypatch.setattr(loop, "atomic_save_torch", resume_state)
    monkeypatch.setattr(logs, "atomic_write_text", text)
    with pytest.raises(SdtuneError) as e:
        train_lora(base, settings(dataset, tmp_path / "out", steps=4, save_every=2, sample_every=0, report=False))
    assert str(e.value).startswith(f"{tmp_path / 'out' / loop.STATE_FILE}: could not be written")
    assert full == [tmp_path / "out" / loop.STATE_FILE]


def test_resume_after_interruption_equals_uninterrupted(base, dataset, tmp_path):
    # every source of randomness on: flips, shuffled captions with dropout, noise offset, LoRA dropout, accumulation
    kw = dict(flip=True, shuffle_captions=True, caption_dropout=0.2, noise_offset=0.05, lora_dropout=0.1,
              grad_accum=2, min_snr_gamma=5.0, lr_scheduler="cosine", lr_warmup_steps=2, save_every=3)
    whole = train_lora(base, settings(dataset, tmp_path / "whole", **kw))

    def stop_at_5(step, loss):
        if step == 5:
            raise Stop()

    with pytest.raises(Stop):
        train_lora(base, settings(dataset, tmp_path / "cut", **kw), callback=stop_at_5)
    assert not (tmp_path / "cut" / "lora.safetensors").exists()
    state, _ = load_state(tmp_path / "cut" / loop.STATE_FILE)
    assert state["step"] == 3
    steps = []
    resumed = train_lora(base, settings(dataset, tmp_path / "cut", **kw), callback=lambda s, _: steps.append(s))
    assert steps == [4, 5, 6]
    a, b = lora_tensors(whole), lora_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        for role in ("down", "up"):
            assert torch.equal(a[key][role], b[key][role]), key
    assert any(t["up"].abs().max() > 0 for t in a.values())


def test_ctrl_c_saves_the_step_it_stops_at_and_the_rerun_continues_exactly(base, dataset, tmp_path):
    """A first Ctrl-C finishes the step in progress, saves it as a scheduled save does and stops with one line
    naming what was kept; the same command then continues to the uninterrupted run's weights."""
    import signal

    from sdtune.console import Interrupted, Terminated

    kw = dict(flip=True, shuffle_captions=True, noise_offset=0.05, save_every=100)
    whole = train_lora(base, settings(dataset, tmp_path / "whole", **kw))

    def ctrl_c_at_4(step, loss):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "cut"
    with pytest.raises(Interrupted, match=rf"interrupted at step 4 of 6, saved \({out / 'lora-step000004.safetensors'}"
                                          rf", {out / loop.STATE_FILE}\); run the same command to continue"):
        train_lora(base, settings(dataset, out, **kw), callback=ctrl_c_at_4)
    assert signal.getsignal(signal.SIGINT) is before  # Python's own handler again after the loop
    assert load_state(out / loop.STATE_FILE)[0]["step"] == 4 and not (out / "lora.safetensors").exists()
    steps = []
    resumed = train_lora(base, settings(dataset, out, **kw), callback=lambda s, _: steps.append(s))
    assert steps == [5, 6]
    a, b = lora_tensors(whole), lora_tensors(resumed)
    assert all(torch.equal(a[k][r], b[k][r]) for k in a for r in ("down", "up"))
    started = [read_metadata(out / f)["ss_training_started_at"] for f in ("lora-step000004.safetensors",
                                                                           "lora.safetensors")]
    assert started[0] == started[1]  # the run's first start, as kohya records it, not the resume's
    # SIGTERM (a scheduler's or `docker stop`'s first word) saves as a first Ctrl-C does, and is named as itself
    # (the command line exits 143 on a Terminated, as schedulers expect; 130 is a Ctrl-C's)
    term_before, out = signal.getsignal(signal.SIGTERM), tmp_path / "term"
    with pytest.raises(Terminated, match=r"^terminated at step 2 of 6, saved"):
        train_lora(base, settings(dataset, out, **kw),
                   callback=lambda step, _: step == 2 and os.kill(os.getpid(), signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is term_before
    assert load_state(out / loop.STATE_FILE)[0]["step"] == 2

    # a second Ctrl-C stops at once, saying what is kept (it said only "interrupted")
    def twice_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Interrupted, match=r"^stopped without saving the step in progress; the same command continues "
                                          r"from the last save, if there is one$"):
        train_lora(base, settings(dataset, tmp_path / "twice", save_every=2), callback=twice_at_3)
    assert load_state(tmp_path / "twice" / loop.STATE_FILE)[0]["step"] == 2


def test_a_run_repeats_to_the_last_bit_after_work_that_sets_the_thread_count(dataset, tmp_path):
    """torch computes in other last bits once set_num_threads has been called (the LoRA patcher and the bake
    call it); sdtune sets it on import, so a run after a LoRA was applied equals the same run before."""
    script = textwrap.dedent(f"""
        import torch
        from sdtune.models import load_base
        from sdtune.train.config import LoraSettings
        from sdtune.train.lora import train_lora
        from sdtune.lora.formats import load_lora

        def run(out):
            s = LoraSettings(data={str(dataset)!r}, out=out, steps=2, batch_size=2, rank=4, alpha=4, lr=2e-3,
                             flip=True, noise_offset=0.05, sample_steps=2, progress=False, report=False)
            return {{(c, p): ad.tensors for c, p, ad in load_lora(train_lora(load_base("tiny-random"), s)).items()}}

        first = run({str(tmp_path / "a")!r})  # the first run of a fresh process
        torch.set_num_threads(torch.get_num_threads())  # as LoraSet's patching does around its worker threads
        again = run({str(tmp_path / "b")!r})
        print(all(torch.equal(first[k][r], again[k][r]) for k in first for r in ("down", "up")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]


def test_starting_over_sets_the_earlier_run_aside_and_a_finished_run_says_so(base, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train_lora(base, settings(dataset, out, steps=4, save_every=2, sample_every=2))
    capsys.readouterr()
    train_lora(base, settings(dataset, out, steps=4, save_every=2, sample_every=2))  # the same command again
    assert "already finished (4 steps" in capsys.readouterr().err
    earlier = sorted(p.name for p in out.iterdir())
    (out / "job.toml").write_text("steps = 2\n")  # the user's own config there (the UI keeps its job's so) stays
    train_lora(base, settings(dataset, out, steps=2, lr=5e-4, resume=False, sample_every=0))
    assert f"starting over in {out}; the earlier run's files are now in {out / 'earlier-1'}" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "earlier-1").iterdir()) == earlier  # all there, none deleted
    assert "lora-step000002.safetensors" in earlier and not (out / "lora-step000002.safetensors").exists()
    assert not (out / "samples").exists() and load_state(out / loop.STATE_FILE)[0]["step"] == 2
    assert (out / "job.toml").read_text() == "steps = 2\n" and (out / "earlier-1" / "settings.toml").is_file()


def test_resume_refuses_other_settings(base, dataset, tmp_path, monkeypatch):
    train_lora(base, settings(dataset, tmp_path, steps=2))
    with pytest.raises(SdtuneError, match=r"resume.pt: this run was started with other settings \(rank 4 -> 8"):
        train_lora(base, settings(dataset, tmp_path, steps=3, rank=8))
    with pytest.raises(SdtuneError, match="past --steps 1"):
        train_lora(base, settings(dataset, tmp_path, steps=1))
    # another model (whose preset differs in settings never typed) is said as such, before the settings
    monkeypatch.setattr(base, "model_hash", "0123456789", raising=False)
    with pytest.raises(SdtuneError, match=r"resume.pt: this run was started on another base model \(hash \w+, now "
                                          r"0123456789\)"):
        train_lora(base, settings(dataset, tmp_path, steps=3, rank=8))
    monkeypatch.undo()
    # more steps continue the run; resume=False starts over
    steps = []
    train_lora(base, settings(dataset, tmp_path, steps=3), callback=lambda s, _: steps.append(s))
    train_lora(base, settings(dataset, tmp_path, steps=2, resume=False), callback=lambda s, _: steps.append(s))
    assert steps == [3, 1, 2]


QUIET = dict(report=False, sample_every=0)


def test_more_steps_on_a_finished_run_keep_its_final_weights_under_their_step(base, dataset, tmp_path, capsys):
    first = lora_tensors(train_lora(base, settings(dataset, tmp_path, steps=2, lr_scheduler="cosine", **QUIET)))
    capsys.readouterr()
    train_lora(base, settings(dataset, tmp_path, steps=3, lr_scheduler="cosine", **QUIET))
    err = capsys.readouterr().err
    assert f"sdtune train lora: resuming at step 2 of 3 from {tmp_path / loop.STATE_FILE}" in err
    assert "the cosine learning-rate schedule now spans 3 steps, not 2" in err
    # lora.safetensors now holds step 3: the step-2 weights stay, under their step's name, as the history says
    kept = lora_tensors(tmp_path / "lora-step000002.safetensors")
    assert kept.keys() == first.keys()
    assert all(torch.equal(kept[k][r], first[k][r]) for k in first for r in first[k])
    state, _ = load_state(tmp_path / loop.STATE_FILE)
    assert [tuple(c) for c in state["history"]["checkpoints"]] == [(2, "lora-step000002.safetensors"),
                                                                   (3, "lora.safetensors")]
    assert not any(torch.equal(lora_tensors(tmp_path / "lora.safetensors")[k]["up"], first[k]["up"]) for k in first)
    # its settings cannot repeat steps 1-2, which ran on a cosine planned over 2 steps: settings.toml and the
    # report say so (a resume with the same --steps adds nothing)
    note = ("this run was resumed with other --steps, so its cosine learning-rate schedule was planned over other "
            "step counts (steps 1-2 over 2, steps 3-3 over 3); these settings plan it over 3 throughout, so a "
            "rerun's weights differ")
    assert state["history"]["spans"] == [[0, 2], [2, 3]]
    assert (tmp_path / loop.SETTINGS_FILE).read_text().startswith(f"# {note}\n# sdtune train lora --config")
    train_lora(base, settings(dataset, tmp_path, steps=3, lr_scheduler="cosine", sample_every=0, sample_steps=2))
    assert f"Not exactly: {html.escape(note)}." in (tmp_path / "report.html").read_text()
    assert load_state(tmp_path / loop.STATE_FILE)[0]["history"]["spans"] == [[0, 2], [2, 3]]


def test_resume_refuses_changed_images_or_captions_and_a_cut_state(base, dataset, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(dataset, data)
    edited = sorted(data.glob("*.png"))[0]
    with Image.open(edited) as im:  # stored uncompressed: an edit keeps the file's size
        pixels = im.convert("RGB")
    pixels.save(edited, compress_level=0)
    train_lora(base, settings(data, out, steps=2, **QUIET))
    ti = TISettings(data=str(data), out=str(out), token="<q>", init_token="star", steps=2, **QUIET)
    kept = (out / loop.SETTINGS_FILE).read_bytes()
    with pytest.raises(SdtuneError, match=r"^\S+out holds a lora training run, not a ti one; use another --out"):
        train_ti(base, ti)  # it listed the settings the two kinds differ in
    assert (out / loop.SETTINGS_FILE).read_bytes() == kept
    moved = tmp_path / "moved"  # the same images in another folder: the run goes on
    data.rename(moved)
    steps = []
    train_lora(base, settings(moved, out, steps=3, **QUIET), callback=lambda s, _: steps.append(s))
    assert steps == [3]
    edited, before = moved / edited.name, (moved / edited.name).read_bytes()
    pixels.putpixel((0, 0), tuple(255 - c for c in pixels.getpixel((0, 0))))
    pixels.save(edited, compress_level=0)
    assert len(edited.read_bytes()) == len(before) and edited.read_bytes() != before
    with pytest.raises(SdtuneError, match=r"resume.pt: the images or captions in .*moved changed since this run"):
        train_lora(base, settings(moved, out, steps=4, **QUIET))
    edited.write_bytes(before)
    next(moved.glob("*.txt")).write_text("a different caption")
    with pytest.raises(SdtuneError, match=r"resume.pt: the images or captions in .*moved changed since this run was "
                                          r"saved \(\d+ image\(s\) then, \d+ now\).*--no-resume to start over here"):
        train_lora(base, settings(moved, out, steps=4, **QUIET))
    (out / loop.STATE_FILE).write_bytes((out / loop.STATE_FILE).read_bytes()[:200])  # a save cut short
    with pytest.raises(SdtuneError, match=r"resume.pt: .*; delete it to start over here \(or use --no-resume\), or "
                                          r"use another --out"):
        train_lora(base, settings(moved, out, steps=4, **QUIET))


def test_resume_refuses_changed_held_out_images_and_draws_a_sample_a_kill_skipped(base, dataset, tmp_path, capsys):
    """The held-out images of --validation-split are the validation curve's data: a caption changed there was
    resumed over, the rest of the curve measured on other images. And a kill between a step's save and its
    samples left that step's grid undrawn for good."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(dataset, data)
    held = dict(validation_split=0.2, save_every=2, sample_every=2, report=False)
    train_lora(base, settings(data, out, steps=2, **held))
    (out / "samples" / "step-000002.png").unlink()  # as a kill before it was drawn leaves it
    capsys.readouterr()
    train_lora(base, settings(data, out, steps=3, **held))
    assert "resuming at step 2 of 3" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000000.png", "step-000002.png",
                                                                       "step-000003.png"]
    s = settings(data, out, steps=4, **held)
    _, held_scan, _ = validation.split(s, scan_folder(str(data)), require_captions=True)
    [image] = [ex.path for ex in held_scan.examples]
    image.with_suffix(".txt").write_text("another caption")
    with pytest.raises(SdtuneError, match=r"resume.pt: the held-out validation images or their captions in \S+data "
                                          r"changed since this run was saved \(1 image\(s\) then, 1 now\)"):
        train_lora(base, s)


def test_a_second_run_on_a_folder_in_use_is_refused(base, dataset, tmp_path):
    """Two runs on one --out: the second would set the first's files aside, and the first would crash."""
    out = tmp_path / "out"
    with folder_lock(out, "sdtune train ti"):  # as the first run holds it (flock: per open file, so in-process too)
        with pytest.raises(SdtuneError, match=rf"^{out}: sdtune train ti \(process {os.getpid()}\) is using this "
                                              rf"folder; wait for it to end, or use another --out$"):
            train_lora(base, settings(dataset, out, steps=1, **QUIET))
        assert [p.name for p in out.iterdir()] == [".sdtune.lock"]
    train_lora(base, settings(dataset, out, steps=1, **QUIET))  # released: the next run goes on
    assert (out / "lora.safetensors").is_file() and not (out / ".sdtune.lock").exists()  # removed at the end


def test_nan_loss_stops_and_keeps_the_last_good_save(base, dataset, tmp_path, monkeypatch):
    real = data_mod.TrainingSet.batch

    def poisoned(self, number, *a, **k):
        b = real(self, number, *a, **k)
        if number == 4:  # step 5 with one micro-batch per step
            b.latents = b.latents * float("nan")
        return b

    monkeypatch.setattr(data_mod.TrainingSet, "batch", poisoned)
    pristine = {k: v.clone() for k, v in base.unet.state_dict().items()}
    flags = [p.requires_grad for p in base.unet.parameters()]
    with pytest.raises(SdtuneError, match=r"loss became NaN at step 5.*last good save is step 4"):
        train_lora(base, settings(dataset, tmp_path, save_every=2))
    state, _ = load_state(tmp_path / loop.STATE_FILE)
    assert state["step"] == 4
    good = lora_tensors(tmp_path / "lora-step000004.safetensors")
    assert all(torch.isfinite(t).all() for ts in good.values() for t in ts.values())
    assert not (tmp_path / "lora.safetensors").exists()
    assert base.unet.state_dict().keys() == pristine.keys()  # LoRA layers taken out again
    assert all(torch.equal(v, pristine[k]) for k, v in base.unet.state_dict().items())
    assert [p.requires_grad for p in base.unet.parameters()] == flags


def test_gradient_checkpointing_changes_nothing(base, dataset, tmp_path):
    kw = dict(steps=2, text_encoder=True, targets="attn+ff")
    a = load_lora(train_lora(base, settings(dataset, tmp_path / "a", **kw)))
    b = load_lora(train_lora(base, settings(dataset, tmp_path / "b", gradient_checkpointing=True, **kw)))
    assert {(c, p) for c, p, _ in a.items()} == {(c, p) for c, p, _ in b.items()}
    # The same forward values, but the recomputed graph may sum gradients in another order: float rounding,
    # ~1e-7 of each ΔW (AdamW scales every entry by its own gradient size). 1e-5 leaves room for that; a lost
    # or doubled gradient moves ΔW by a large part of itself.
    for comp, path, ad in a.items():
        shape = (ad.tensors["up"].shape[0], -1)
        da, db = ad.delta(shape), b.modules[comp][path].delta(shape)
        assert (da - db).norm() <= 1e-5 * da.norm(), (comp, path)
    assert not base.unet.is_gradient_checkpointing


def test_speed_options_learn_the_same(base, dataset, tmp_path):
    kw = dict(steps=2, targets="all", conv_rank=4)
    a = load_lora(train_lora(base, settings(dataset, tmp_path / "a", **kw)))
    for option in ("channels_last", "flush_denormals"):
        flipped = {option: not getattr(LoraSettings(), option)}  # the other way from the default
        b = load_lora(train_lora(base, settings(dataset, tmp_path / option, **flipped, **kw)))
        # NHWC kernels round differently (~1e-6 relative per value), flushed subnormals move nothing above
        # 1e-38; Adam's first steps (near ±lr wherever a gradient is near eps) amplify such rounding, to 0.3% of a
        # layer's ΔW in one run of the whole suite; a wrong layout or a lost gradient would move ΔW by a large part
        # of itself.
        for comp, path, ad in a.items():
            shape = (ad.tensors["up"].shape[0], -1)
            da, db = ad.delta(shape), b.modules[comp][path].delta(shape)
            assert (da - db).norm() <= 2e-2 * da.norm(), (option, comp, path)
    assert all(p.is_contiguous() for p in base.unet.parameters())  # the layout is restored afterwards
    assert (torch.tensor([1e-40]) * 1).item() != 0  # and subnormals are kept again


def test_the_faster_loop_learns_what_the_plain_one_did(base, dataset, tmp_path, monkeypatch):
    """The loop's speed-ups keep the numbers: AdamW's fused form on the CPU (one kernel for all tensors where the
    plain form loops over them in Python: the same update, rounded to within a bit or so) and the UNet's dtype
    read once. The plain forms, restored here, give the same first loss to the last bit and the same LoRA to
    float rounding."""
    kw = dict(steps=3, text_encoder=True, targets="attn+ff")

    def losses_and_lora(out):
        seen = []
        path = train_lora(base, settings(dataset, out, **kw), callback=lambda step, loss: seen.append(loss))
        return seen, lora_tensors(path)

    fast = losses_and_lora(tmp_path / "fast")
    adamw = torch.optim.AdamW
    made = []

    def plain_adamw(*args, **kwargs):
        made.append(kwargs.get("fused"))
        return adamw(*args, **{**kwargs, "fused": None, "foreach": False})

    monkeypatch.setattr(torch.optim, "AdamW", plain_adamw)
    # the dtype asked of the UNet at every forward pass again (the value __init__ stores is ignored)
    monkeypatch.setattr(Objective, "unet_dtype", property(lambda self: self.unet.dtype, lambda self, v: None),
                        raising=False)
    plain = losses_and_lora(tmp_path / "plain")
    assert made == [True]  # the loop asked for the fused form on the CPU
    assert len(fast[0]) == 3 and fast[0][0] == plain[0][0]  # before any update: the same computation
    assert fast[0][1:] == pytest.approx(plain[0][1:], rel=1e-5)
    assert fast[1].keys() == plain[1].keys()
    moved = 0
    for k in fast[1]:
        for role in ("down", "up"):
            a, b = fast[1][k][role], plain[1][k][role]
            # Adam moves each entry by about lr per step, whatever the gradient's size: where a gradient is
            # near zero a one-ulp difference in its moments moves that entry visibly, so the whole matrix is
            # compared (a wrong update would move it by a large part of itself)
            assert (a - b).norm() <= 1e-3 * b.norm(), (k, role, ((a - b).norm() / b.norm()).item())
            moved += int(role == "up" and b.abs().max() > 0)
    assert moved == len(fast[1])


def test_sample_grids_every_m_steps(base, dataset, tmp_path):
    s = settings(dataset, tmp_path, steps=4, sample_every=2, sample_prompts=["a red circle", "a blue square"],
                 sample_images=2, sample_steps=2)
    train_lora(base, s)
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step-000000.png", "step-000002.png", "step-000004.png"]  # step 0: the base model
    with Image.open(tmp_path / "samples" / grids[0]) as im:
        assert im.size == (2 * 64, 2 * 64)  # one row per prompt, sample_images columns


def test_epochs_set_the_number_of_steps(base, dataset, tmp_path):
    train_lora(base, settings(dataset, tmp_path, steps=0, epochs=2, batch_size=2))
    state, _ = load_state(tmp_path / loop.STATE_FILE)
    assert state["step"] == 6  # 5 images in batches of 2: 3 batches per epoch


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from sdtune.models import load_base
    from sdtune.train.config import LoraSettings
    from sdtune.train.lora import train_lora
    data, out = sys.argv[1:3]
    train_lora(load_base("tiny-random"), LoraSettings(data=data, out=out, steps=3, batch_size=2, rank=4, alpha=4,
                                                       lr=1e-3, progress=False))
""")


REFUSED_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from sdtune.cli import main
    data, out, per_process = sys.argv[1:4]
    out = os.path.join(out, os.environ["RANK"]) if per_process == "1" else out  # folders the processes do not share
    if os.path.basename(out) == "full" and os.environ["RANK"] == "0":  # the main process's disk fills up
        from sdtune.train import loop

        def full(*a, **k):
            raise OSError(28, "No space left on device", "samples")
        loop.sample_grid = full
    sys.exit(main(["train", "lora", "--model", "tiny-random", "--data", data, "--out", out, "--steps", "2",
                   "--no-progress", "--sample-every", "0", "--no-report", *sys.argv[4:]]))
""")


INTERRUPTED_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from sdtune.console import Interrupted
    from sdtune.models import load_base
    from sdtune.train.config import LoraSettings
    from sdtune.train.lora import train_lora

    def ctrl_c(step, loss):
        if step == 2:
            raise KeyboardInterrupt  # as a launcher's Ctrl-C reaches each process (before step 2 is saved)
    try:
        train_lora(load_base("tiny-random"), LoraSettings(data=sys.argv[1], out=sys.argv[2], steps=4, save_every=1,
                                                           batch_size=1, rank=2, progress=False, report=False),
                   callback=ctrl_c)
    except Interrupted as e:
        print(f"said: {e}", flush=True)
""")


def test_an_interrupt_under_a_launcher_says_where_the_run_continues(dataset, tmp_path):
    """Several processes do not save the step in progress (they would have to agree on it): the message names
    the last save, which the same command continues from."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(dataset), str(tmp_path / "out")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=240, check=False)
    said = [line for line in run.stdout.splitlines() if line.startswith("said: ")]
    assert said and set(said) == {f"said: interrupted; with several processes the step in progress is not saved: the "
                                  f"same command continues from step 1 ({tmp_path / 'out' / loop.STATE_FILE})"}, \
        run.stdout[-2000:] + run.stderr[-2000:]


def test_class_images_under_a_launcher_are_drawn_once(dataset, tmp_path):
    """Prior preservation's class images are drawn by the main process alone; the others wait and read them."""
    script = tmp_path / "prior.py"
    script.write_text(REFUSED_SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(dataset), str(tmp_path / "out"), "0", "--class-prompt", "a shape",
                          "--num-class-images", "2", "--sample-steps", "2"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("prior preservation: drawing 2 class images") == 1 and "none drawn" not in run.stderr
    assert len(list((tmp_path / "out" / prior.CLASS_DIR).glob("*.png"))) == 2


def test_a_refusal_under_a_launcher_stops_every_process(dataset, tmp_path):
    """The main process's lock, and the resume state each process sees, are shared before anything else: a folder
    in use, or folders that are not one shared folder, stop both processes in one line each (the second one waited
    in the first collective until the launcher's timeout, or resumed apart from the first)."""
    script = tmp_path / "refused.py"
    script.write_text(REFUSED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launched(out, per_process, *more):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), str(dataset), str(out), per_process, *more], env=env, capture_output=True,
                              text=True, timeout=240, check=False)
    with folder_lock(tmp_path / "busy", "sdtune train lora"):
        run = launched(tmp_path / "busy", "0")
    assert run.returncode != 0
    assert run.stderr.count(f"sdtune: error: {tmp_path / 'busy'}: sdtune train lora (process {os.getpid()}) is using "
                            f"this folder") == 2, run.stderr[-3000:]
    # a write only the main process makes fails mid-run (its disk is full as it draws samples): every process
    # stops with that line; the other died in its next collective with a gloo "Connection closed by peer" traceback
    run = launched(tmp_path / "full", "0", "--sample-every", "1", "--no-gradient-checkpointing")
    assert run.returncode != 0
    assert "sdtune: error: [Errno 28] No space left on device: 'samples'" in run.stderr, run.stderr[-3000:]
    assert "Connection closed" not in run.stderr and "[rank1]: Traceback" not in run.stderr, run.stderr[-3000:]
    (tmp_path / "apart" / "0").mkdir(parents=True)
    (tmp_path / "apart" / "0" / loop.STATE_FILE).write_bytes(b"a save")
    run = launched(tmp_path / "apart", "1")
    assert run.returncode != 0
    assert run.stderr.count("the processes of this run see different resume states there (process 0: 6 bytes, "
                            "process 1: none); --out must be one folder they all share") == 2, run.stderr[-3000:]


def test_two_processes_equal_one_with_double_batch(base, dataset, tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(dataset), str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    one = train_lora(base, settings(dataset, tmp_path / "one", steps=3, batch_size=4, lr=1e-3))
    a, b = load_lora(one), load_lora(tmp_path / "two" / "lora.safetensors")
    worst = 0.0
    for comp, path, ad in a.items():
        shape = (ad.tensors["up"].shape[0], -1)
        da, db = ad.delta(shape), b.modules[comp][path].delta(shape)
        worst = max(worst, ((da - db).norm() / da.norm()).item())
    assert worst < 1e-3, worst
    # said once (the second process says nothing), with the processes the settings do not hold
    said = [line for line in run.stderr.splitlines() if line.startswith("sdtune")]
    assert len(said) == len(set(said)) and any("2 processes x batch 2 x grad_accum 1 = global batch 4" in line
                                               for line in said), said
    assert "# trained on 2 processes x batch 2" in (tmp_path / "two" / loop.SETTINGS_FILE).read_text()
    # resumed on one process, its batches and steps per epoch would differ: refused in one line
    with pytest.raises(SdtuneError, match=r"resume.pt: this run was trained on 2 process\(es\) \(a global batch "
                                          r"of 4\), now on 1; resume it on 2, or use another --out"):
        train_lora(load_base("tiny-random"), LoraSettings(data=str(dataset), out=str(tmp_path / "two"), steps=4,
                                                          batch_size=2, rank=4, alpha=4, lr=1e-3, progress=False))


def test_save_every_epochs_saves_at_each_epochs_last_step(base, tmp_path):
    """kohya's --save_every_n_epochs: 4 images in batches of 2 are 2 steps an epoch, so saves at steps 2 and 4 of
    6; in batches of 1 with 2 accumulated per step, also 2 steps an epoch: every 2 epochs is step 4."""
    data = small_runs.outline_dataset(tmp_path / "data")
    train_lora(base, small_runs.settings(data, tmp_path / "epochs", steps=0, epochs=3, save_every=0,
                                         save_every_epochs=1))
    assert sorted(p.name for p in (tmp_path / "epochs").glob("lora*.safetensors")) == [
        "lora-step000002.safetensors", "lora-step000004.safetensors", "lora.safetensors"]
    train_lora(base, small_runs.settings(data, tmp_path / "accumulated", steps=0, epochs=3, save_every=0,
                                         save_every_epochs=2, grad_accum=2, batch_size=1))
    assert sorted(p.name for p in (tmp_path / "accumulated").glob("lora*.safetensors")) == [
        "lora-step000004.safetensors", "lora.safetensors"]
    with pytest.raises(SdtuneError, match="--save-every-epochs -1: must be 0 or more"):
        small_runs.settings(data, tmp_path / "x", save_every_epochs=-1).check()


def test_keep_last_deletes_older_snapshots_but_the_best_and_resumes(base, tmp_path, monkeypatch):
    """--keep-last 2 (diffusers' checkpoints_total_limit): of the snapshots at steps 2, 4, 6 and 8 of 9, the newest
    two stay with every file they have (pivotal tuning's word beside the LoRA), plus the one with the best validation
    loss; the resume state lists what is left. A run cut after step 5 and resumed trains the same weights as a whole
    one (a change that leaves them alone: resumed with --keep-last 1)."""
    data = small_runs.outline_dataset(tmp_path / "data")
    for caption in data.glob("*.txt"):
        caption.write_text("<kl> " + caption.read_text())
    kw = dict(steps=9, save_every=2, batch_size=1, ti_token="<kl>", ti_init="square", validation_split=0.25)

    def snapshots(out):
        return {int(p.stem[-6:]) for p in (tmp_path / out).glob("*-step*.safetensors")}

    whole = train_lora(base, small_runs.settings(data, tmp_path / "whole", keep_last=2, **kw))
    val = logs.read_csv(tmp_path / "whole" / logs.CSV_FILE)
    best = min((val[s]["val_loss"], s) for s in (2, 4, 6, 8, 9))[1]
    kept = {6, 8} | ({best} - {9})
    assert snapshots("whole") == kept
    assert sorted(p.name for p in (tmp_path / "whole").glob("*-step*")) == sorted(
        f"{stem}-step{s:06d}.safetensors" for s in kept for stem in ("lora", "kl"))
    history = load_state(tmp_path / "whole" / loop.STATE_FILE)[0]["history"]
    assert [s for s, _ in history["checkpoints"]] == sorted(kept | {9}) and history["snapshot_files"].keys() == {
        str(s) for s in kept}
    with pytest.raises(small_runs.Stop):
        train_lora(base, small_runs.settings(data, tmp_path / "cut", keep_last=2, **kw), callback=small_runs.stop_at(5))
    assert snapshots("cut") == {2, 4}
    resumed = train_lora(base, small_runs.settings(data, tmp_path / "cut", keep_last=1, **kw))
    assert snapshots("cut") == {8} | ({best} - {9})
    a, b = small_runs.factors(whole), small_runs.factors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    # the best validation loss at step 2: that snapshot stays beside the newest two, and the report names it
    real = logs.TrainLog.val_losses
    monkeypatch.setattr(logs.TrainLog, "val_losses", lambda self: {s: 0.0 if s == 2 else v
                                                                   for s, v in real(self).items()})
    train_lora(base, small_runs.settings(data, tmp_path / "early", keep_last=2, report=True, sample_images=1,
                                         sample_steps=1, **{**kw, "ti_token": "", "ti_init": ""}))
    assert snapshots("early") == {2, 6, 8}
    assert 'Recommended checkpoint: <span class="best">step 2</span>, <code>lora-step000002.safetensors</code>' in (
        tmp_path / "early" / "report.html").read_text()
    with pytest.raises(SdtuneError, match="--keep-last -1: must be 0 or more"):
        small_runs.settings(data, tmp_path / "x", keep_last=-1).check()


def test_sample_every_epochs_samples_at_each_epochs_last_step(base, tmp_path):
    """kohya's --sample_every_n_epochs: 2 steps an epoch, so grids at step 0 (the base), 2, 4 and 6 (the end); with
    --sample-every 3 beside it, at step 3 too. A run cut after step 3 (saved at 2) and resumed with the flag added
    (a change that leaves the weights alone) samples from there on."""
    data = small_runs.outline_dataset(tmp_path / "data")
    quick = dict(steps=0, epochs=3, save_every=0, sample_images=1, sample_steps=1)

    def grids(out):
        return sorted(p.name for p in (tmp_path / out / "samples").glob("*.png"))

    train_lora(base, small_runs.settings(data, tmp_path / "epochs", sample_every_epochs=1, **quick))
    assert grids("epochs") == ["step-000000.png", "step-000002.png", "step-000004.png", "step-000006.png"]
    train_lora(base, small_runs.settings(data, tmp_path / "both", sample_every_epochs=2, sample_every=3, **quick))
    assert grids("both") == ["step-000000.png", "step-000003.png", "step-000004.png", "step-000006.png"]
    with pytest.raises(small_runs.Stop):
        train_lora(base, small_runs.settings(data, tmp_path / "cut", **{**quick, "save_every": 2}),
                   callback=small_runs.stop_at(3))
    assert not (tmp_path / "cut" / "samples").exists()
    train_lora(base, small_runs.settings(data, tmp_path / "cut", sample_every_epochs=1, **{**quick, "save_every": 2}))
    assert grids("cut") == ["step-000002.png", "step-000004.png", "step-000006.png"]
    with pytest.raises(SdtuneError, match="--sample-every-epochs -1: must be 0 or more"):
        small_runs.settings(data, tmp_path / "x", sample_every_epochs=-1).check()
