"""--optimizer: AdamW 8-bit (paged too), Lion (8-bit too), SGD with Nesterov momentum (8-bit too), Prodigy,
Adafactor and the schedule-free AdamW, RAdam and SGD step the run, keep their state across a resume, name themselves
in the LoRA's metadata, and refuse what they cannot take in one line."""

import sys

import pytest
import torch
from small_runs import Stop, outline_dataset, settings, stop_at

from sdtune.cli import main
from sdtune.console import SdtuneWarning
from sdtune.lora.formats import load_lora
from sdtune.safeio import SdtuneError, load_state, read_metadata
from sdtune.train import logs, loop, optimizers
from sdtune.train.config import load_settings
from sdtune.train.lora import train_lora

pytest.importorskip("bitsandbytes")
pytest.importorskip("prodigyopt")
pytest.importorskip("schedulefree")
pytest.importorskip("dadaptation")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return outline_dataset(tmp_path_factory.mktemp("data"))


# what each optimizer keeps per tensor: its own state, so the run stepped with it (AdamW 8-bit's moments in bytes
# where a tensor has at least min_8bit_size values)
OWN_STATE = {
    "adamw8bit": (["min_8bit_size=64"], lambda s: s["state1"].dtype == s["state2"].dtype == torch.uint8),
    "pagedadamw8bit": (["min_8bit_size=64"], lambda s: s["state1"].dtype == s["state2"].dtype == torch.uint8),
    "lion": ([], lambda s: "state1" in s and "state2" not in s),
    "lion8bit": (["min_8bit_size=64"], lambda s: s["state1"].dtype == torch.uint8 and "state2" not in s),
    "sgdnesterov": ([], lambda s: "momentum_buffer" in s),
    "sgdnesterov8bit": (["min_8bit_size=64"], lambda s: s["state1"].dtype == torch.uint8),
    "prodigy": ([], lambda s: {"s", "exp_avg", "exp_avg_sq", "p0"} <= s.keys()),
    "dadaptadam": (["decouple=True"], lambda s: {"s", "exp_avg", "exp_avg_sq"} <= s.keys()),
    "dadaptlion": ([], lambda s: {"s", "exp_avg"} <= s.keys() and "exp_avg_sq" not in s),
    "adafactor": ([], lambda s: "exp_avg_sq_row" in s and "exp_avg_sq_col" in s),
    "adamwschedulefree": (["warmup_steps=1"], lambda s: {"z", "exp_avg_sq"} <= s.keys()),
    # (its first 5 steps only gather moments, unless told otherwise: this run has 4)
    "radamschedulefree": (["silent_sgd_phase=False"], lambda s: {"z", "exp_avg_sq"} <= s.keys()),
    "sgdschedulefree": (["momentum=0.8"], lambda s: "z" in s),
    "torch.optim.RAdam": (["decoupled_weight_decay=True"], lambda s: {"exp_avg", "exp_avg_sq"} <= s.keys()),
}


@pytest.mark.parametrize("name", list(OWN_STATE))
def test_each_optimizer_trains_and_resumes_to_the_uninterrupted_weights(base, dataset, tmp_path, name):
    args, holds_own_state = OWN_STATE[name]
    kw = dict(optimizer=name, optimizer_args=args, flip=True, lr_scheduler="cosine", lr_warmup_steps=1)
    if optimizers.finds_step(name):
        kw["lr"] = 1.0
    if optimizers.schedule_free(name):  # (no decaying schedule: refused below)
        kw["lr_scheduler"] = "constant_with_warmup"
    whole = train_lora(base, settings(dataset, tmp_path / "whole", **kw))
    with pytest.raises(Stop):
        train_lora(base, settings(dataset, tmp_path / "cut", **kw), callback=stop_at(3))
    state, _ = load_state(tmp_path / "cut" / loop.STATE_FILE)
    assert state["step"] == 2
    # (bitsandbytes keeps its tensors under one key of their own)
    kept = [s.get("__bnb_optimizer_quant_state__", s) for s in state["optimizer"]["state"].values() if s]
    assert kept and all(holds_own_state(s) for s in kept), sorted(kept[0])
    resumed = train_lora(base, settings(dataset, tmp_path / "cut", **kw))
    a, b = load_lora(whole), load_lora(resumed)
    assert [k for k, _, _ in a.items()] == [k for k, _, _ in b.items()]
    for (_, path, x), (_, _, y) in zip(a.items(), b.items()):
        assert torch.equal(x.tensors["down"], y.tensors["down"]) and torch.equal(x.tensors["up"], y.tensors["up"]), path
    assert any(ad.tensors["up"].abs().max() > 0 for _, _, ad in a.items())  # it learned (up starts at zero)
    said = read_metadata(whole)["ss_optimizer"]
    cls = {"adamw8bit": "bitsandbytes.optim.AdamW8bit(", "lion": "bitsandbytes.optim.Lion(",
           "prodigy": "prodigyopt.Prodigy(", "adafactor": "transformers.optimization.Adafactor(",
           "dadaptadam": "dadaptation.DAdaptAdam(", "dadaptlion": "dadaptation.DAdaptLion(",
           "pagedadamw8bit": "bitsandbytes.optim.PagedAdamW8bit(", "lion8bit": "bitsandbytes.optim.Lion8bit(",
           "sgdnesterov": "torch.optim.SGD(", "sgdnesterov8bit": "bitsandbytes.optim.SGD8bit(",
           "adamwschedulefree": "schedulefree.AdamWScheduleFree(", "radamschedulefree": "schedulefree.RAdamScheduleFree(",
           "sgdschedulefree": "schedulefree.SGDScheduleFree(", "torch.optim.RAdam": "torch.optim.RAdam("}[name]
    assert said.startswith(cls + "weight_decay=0.01") and all(arg in said for arg in args), said
    if optimizers.schedule_free(name):  # saved (files and state) at the averaged point
        saved = load_state(tmp_path / "whole" / loop.STATE_FILE)[0]
        assert not any(g["train_mode"] for g in saved["optimizer"]["param_groups"])


def test_schedule_free_validates_samples_and_saves_the_average_and_steps_from_the_gradient_point():
    """x (the average: what is used and saved) and y (where gradients are taken) are blends of each other and the
    optimizer's z: y = (1 - b1) z + b1 x. ``set_averaged`` moves between them, once, whichever the optimizer is."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = optimizers.build("adamwschedulefree", [], [{"params": [weight]}], 0.1, 0.0, torch.device("cpu"))
    optimizers.set_averaged(optimizer, False)
    for grad in (1.0, -2.0, 0.5):
        weight.grad = torch.full((3,), grad)
        optimizer.step()
    y, z = weight.detach().clone(), optimizer.state[weight]["z"]
    optimizers.set_averaged(optimizer, True)
    x = weight.detach().clone()
    assert not torch.allclose(x, y) and torch.allclose(0.1 * z + 0.9 * x, y, atol=1e-6)
    optimizers.set_averaged(optimizer, True)  # already there: no change
    assert torch.equal(weight.detach(), x)
    optimizers.set_averaged(optimizer, False)
    assert torch.allclose(weight.detach(), y, atol=1e-6)
    plain = optimizers.build("adamw", [], [{"params": [weight]}], 0.1, 0.0, torch.device("cpu"))
    before = weight.detach().clone()
    optimizers.set_averaged(plain, True)  # one point only
    assert torch.equal(weight.detach(), before)


def test_prodigy_takes_lr_1_unless_given_and_logs_the_step_size_it_found(base, dataset, tmp_path):
    """Prodigy's learning rates are factors on the step size it finds (d): 1.0 unless the flag or file gives one
    (a preset's 1e-4 would leave it still); the log's lr is the step it takes, d x lr."""
    assert load_settings(None, {"optimizer": "prodigy"}, "lora").lr == 1.0
    said = load_settings(None, {"optimizer": "Prodigy"}, "lora")  # kohya's spelling
    assert said.optimizer == "prodigy" and said.lr == 1.0
    assert load_settings(None, {"optimizer": "prodigy"}, "lora").ti_lr == 1.0
    assert load_settings(None, {"optimizer": "prodigy"}, "ti").lr == 1.0
    assert load_settings(None, {"optimizer": "prodigy", "lr": 0.5}, "lora").lr == 0.5
    toml = tmp_path / "run.toml"
    toml.write_text('optimizer = "prodigy"\nlr = 0.25\n')
    assert load_settings(toml, {}, "lora").lr == 0.25
    assert load_settings(None, {"optimizer": "adamw"}, "lora").lr == 1e-4
    out = tmp_path / "run"
    s = load_settings(None, dict(data=str(dataset), out=str(out), optimizer="prodigy", steps=3, batch_size=2,
                                 rank=4, alpha=4, sample_every=0, report=False, progress=False), "lora")
    train_lora(base, s)
    d = load_state(out / loop.STATE_FILE)[0]["optimizer"]["param_groups"][0]["d"]
    assert d > 1e-6  # grew from Prodigy's d0
    assert logs.read_csv(out / logs.CSV_FILE)[3]["lr"] == pytest.approx(d)


def test_dadaptation_steps_groups_at_one_rate_and_dadaptadam_scales_each(base, dataset, tmp_path, capsys):
    """D-Adaptation's optimizers step every group at one learning rate (0 aside): D-Adaptation Adam keeps the text
    encoder's --te-lr as its group's layer_scale (the rate logged: lr x d x layer_scale); the others refuse rates
    that differ, in one line, before a step."""
    out = tmp_path / "adam"
    train_lora(base, settings(dataset, out, optimizer="dadaptadam", lr=1.0, text_encoder=True, te_lr=0.25,
                              steps=3))
    groups = load_state(out / loop.STATE_FILE)[0]["optimizer"]["param_groups"]
    assert sorted((g["lr"], g["layer_scale"]) for g in groups) == [(1.0, 0.25), (1.0, 1.0)]
    d = groups[0]["d"]
    assert d > 1e-6  # grew from its d0
    assert logs.read_csv(out / logs.CSV_FILE)[3]["lr"] == pytest.approx(d * groups[0]["layer_scale"])
    capsys.readouterr()  # (the run above's settings)
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "lion"),
                 "--optimizer", "dadaptlion", "--text-encoder", "--te-lr", "0.5", "--steps", "2", "--no-progress",
                 "--sample-every", "0", "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--optimizer dadaptlion: DAdaptLion steps every group at one learning rate, and " \
        "this run's differ (0.5, 1:" in err, err


def test_optimizer_refusals_are_one_line(dataset, tmp_path, capsys, monkeypatch):
    def refused(*flags):
        code = main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out",
                     str(tmp_path / "out"), "--steps", "1", "--no-progress", *flags])
        err = capsys.readouterr().err.strip()
        assert code != 0 and "\n" not in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()  # refused before anything was written
        return err

    assert ("--optimizer 'adam': choose one of adamw, adamw8bit, pagedadamw8bit, lion, lion8bit, sgdnesterov, "
            "sgdnesterov8bit, prodigy, dadaptation, dadaptadam, dadaptadagrad, dadaptadan, dadaptadanip, dadaptlion, "
            "dadaptsgd, adamwschedulefree, radamschedulefree, sgdschedulefree, adafactor, "
            "module.Class") in refused(
        "--optimizer", "adam")
    assert ("--optimizer adamwschedulefree --lr-scheduler cosine: a schedule-free optimizer averages its steps "
            "instead of decaying the rate; use --lr-scheduler constant (or constant_with_warmup)") in refused(
        "--optimizer", "AdamWScheduleFree", "--lr-scheduler", "cosine")
    err = refused("--optimizer", "prodigy", "--optimizer-args", "d_coeff=2")
    assert "--optimizer-args 'd_coeff=2': Prodigy takes no 'd_coeff' (did you mean d_coef?); it takes betas, " \
           "beta3" in err
    assert "lr is set by --lr; use that" in refused("--optimizer-args", "lr=1")
    assert "give each as key=value" in refused("--optimizer-args", "betas")
    assert "--optimizer adamw8bit --optimizer-args betas=(0.9,): IndexError: " in refused(
        "--optimizer", "adamw8bit", "--optimizer-args", "betas=(0.9,)")
    # a class given as module.Class (kohya's optimizer_type takes one too): one line where it is none, or fails
    assert "--optimizer torch.optim.Nope: torch.optim has no Nope (a torch.optim.Optimizer class)" in refused(
        "--optimizer", "torch.optim.Nope")
    assert "--optimizer torch.nn.Linear: torch.nn holds no optimizer named Linear" in refused(
        "--optimizer", "torch.nn.Linear")
    assert "--optimizer nosuch.Thing needs nosuch, which is not installed" in refused("--optimizer", "nosuch.Thing")
    # LBFGS steps with a closure of its own, which a training loop has not: it fails at the first step (it takes no
    # weight decay either, which is said)
    with pytest.warns(SdtuneWarning, match="--weight-decay 0.01: LBFGS takes no weight decay; not used"):
        code = main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "lbfgs"),
                     "--steps", "1", "--sample-every", "0", "--no-progress", "--optimizer", "torch.optim.LBFGS"])
    assert code != 0 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "sdtune: error: --optimizer torch.optim.LBFGS failed at step 1 (TypeError: 'NoneType' object is not "
        "callable); give it other --optimizer-args, or choose another --optimizer")
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if it were not installed
    assert "--optimizer prodigy needs prodigyopt, which is not installed" in refused("--optimizer", "prodigy")
    assert "pip install prodigyopt, or choose another --optimizer" in refused("--optimizer", "prodigy")


def test_a_run_resumes_only_with_its_own_optimizer(base, dataset, tmp_path):
    with pytest.raises(Stop):
        train_lora(base, settings(dataset, tmp_path / "out"), callback=stop_at(3))
    with pytest.raises(SdtuneError, match=r"other settings \(optimizer 'adamw' -> 'lion'\)"):
        train_lora(base, settings(dataset, tmp_path / "out", optimizer="lion"))


def test_a_bitsandbytes_without_cpu_optimizers_is_one_line_on_the_cpu(monkeypatch):
    real = optimizers.importlib.metadata.version
    monkeypatch.setattr(optimizers.importlib.metadata, "version",
                        lambda name: "0.48.2" if name == "bitsandbytes" else real(name))
    weight = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(SdtuneError, match=r"^--optimizer adamw8bit: bitsandbytes 0\.48\.2 steps on CUDA only \(0\.50 "
                                          r"added the CPU\); pip install -U bitsandbytes, or train on a GPU$"):
        optimizers.build("adamw8bit", [], [{"params": [weight]}], 1e-3, 0.0, torch.device("cpu"))
    assert optimizers._version("bitsandbytes") == (0, 48, 2)
    monkeypatch.setattr(optimizers.importlib.metadata, "version", lambda name: "1.2rc1")
    assert optimizers._version("x") == (1, 2)
