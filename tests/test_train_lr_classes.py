"""--lr-scheduler as a scheduler class (kohya's --lr_scheduler_type, --lr_scheduler_args): each group's rate at each
step is what the class gives a real optimizer after that many steps, under the warm-up; a run resumes bit for bit;
what the class cannot do is one line."""

import csv
import re

import pytest
import torch
from small_runs import outline_dataset, resumes_exactly

from sdtune.cli import main
from sdtune.safeio import SdtuneError
from sdtune.train import lr_classes
from sdtune.train.config import LoraSettings
from sdtune.train.schedules import learning_rates


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return outline_dataset(tmp_path_factory.mktemp("data"))


def _torch_rates(cls, kwargs, base_rates, steps):
    """The rates a real optimizer's groups step with under ``cls``, stepped as a training loop steps it."""
    weights = [torch.nn.Parameter(torch.zeros(2)) for _ in base_rates]
    optimizer = torch.optim.AdamW([{"params": [w], "lr": r} for w, r in zip(weights, base_rates)])
    scheduler = cls(optimizer, **kwargs)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("name, args, kwargs", [
    ("CosineAnnealingWarmRestarts", ["T_0=3", "T_mult=2", "eta_min=1e-5"], dict(T_0=3, T_mult=2, eta_min=1e-5)),
    ("torch.optim.lr_scheduler.StepLR", ["step_size=4", "gamma=0.5"], dict(step_size=4, gamma=0.5)),
    ("OneCycleLR", ["max_lr=[0.01,0.002]", "total_steps=20"], dict(max_lr=[0.01, 0.002], total_steps=20)),
])
def test_a_class_gives_each_group_the_rates_it_gives_a_real_optimizer(name, args, kwargs):
    """Two groups (the UNet's and the text encoder's rates), 20 steps, also asked out of order (a resume)."""
    settings = LoraSettings(lr_scheduler=name, lr_scheduler_args=args)
    rates = learning_rates(settings, 20, [1e-3, 2e-4])
    want = _torch_rates(lr_classes.scheduler_class(name), kwargs, [1e-3, 2e-4], 20)
    assert [rates(step) for step in range(20)] == want
    assert rates(7) == want[7] and rates(19) == want[19]  # (replayed from the start: a resumed run's first step)


def test_the_warm_up_multiplies_a_class_rates():
    settings = LoraSettings(lr_scheduler="StepLR", lr_scheduler_args=["step_size=2", "gamma=0.5"], lr_warmup_steps=4)
    rates = learning_rates(settings, 8, [1e-3])
    plain = _torch_rates(torch.optim.lr_scheduler.StepLR, dict(step_size=2, gamma=0.5), [1e-3], 8)
    assert [rates(step)[0] for step in range(8)] == [p[0] * min(1.0, (s + 1) / 4) for s, p in enumerate(plain)]


def test_a_run_logs_the_class_rates_and_resumes_exactly(base, dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(out), "--steps", "6",
                 "--rank", "4", "--alpha", "4", "--lr", "1e-3", "--lr-scheduler", "CosineAnnealingLR",
                 "--lr-scheduler-args", "T_max=4", "eta_min=1e-4", "--validation-split", "0", "--no-report",
                 "--no-progress", "--sample-every", "0"]) == 0
    capsys.readouterr()
    with open(out / "loss.csv") as f:
        logged = [float(row["lr"]) for row in csv.DictReader(f) if row["lr"]]  # (step 0: the validation alone)
    want = _torch_rates(torch.optim.lr_scheduler.CosineAnnealingLR, dict(T_max=4, eta_min=1e-4), [1e-3], 6)
    assert logged == pytest.approx([w[0] for w in want], rel=1e-12)
    assert logged[4] == pytest.approx(1e-4) and logged[5] > logged[4]  # (past T_max the cosine climbs again)
    resumes_exactly(base, dataset, tmp_path / "resume", steps=5, lr_scheduler="CosineAnnealingWarmRestarts",
                    lr_scheduler_args=["T_0=2"])


@pytest.mark.parametrize("args, says", [
    (["--lr-scheduler", "NoSuchLR"], r"--lr-scheduler NoSuchLR: torch.optim.lr_scheduler has no NoSuchLR \(a "
                                     r"torch.optim.lr_scheduler.LRScheduler class\)"),
    (["--lr-scheduler", "torch.optim.AdamW"], r"torch.optim holds no learning-rate scheduler named AdamW"),
    (["--lr-scheduler", "no_such_package.Cosine"], r"no_such_package cannot be imported"),
    (["--lr-scheduler", "ReduceLROnPlateau"], r"it steps on a measured loss, not on the step count"),
    (["--lr-scheduler", "StepLR"], r"--lr-scheduler StepLR --lr-scheduler-args \(none\): .*step_size"),
    (["--lr-scheduler", "StepLR", "--lr-scheduler-args", "step=2"],
     r"--lr-scheduler-args 'step=2': StepLR takes no 'step' \(did you mean step_size\?\)"),
    (["--lr-scheduler", "StepLR", "--lr-scheduler-args", "step_size"], r"give each as key=value"),
    (["--lr-scheduler", "StepLR", "--lr-scheduler-args", "step_size=2", "last_epoch=3"],
     r"last_epoch is set by the run"),
    (["--lr-scheduler", "CosineAnnealingWarmRestarts", "--lr-scheduler-args", "T_0=0"], r"T_0"),
    (["--lr-scheduler", "cosine", "--lr-scheduler-args", "T_0=2"],
     r"--lr-scheduler-args T_0=2: the arguments of a scheduler class \(--lr-scheduler module.Class\)"),
    (["--lr-scheduler", "cosine_annealing"], r"--lr-scheduler 'cosine_annealing': choose one of constant, .*"
                                             r"a scheduler class \(module.Class\)"),
])
def test_what_a_class_cannot_do_is_one_line(dataset, tmp_path, capsys, args, says):
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "o"),
                 *args]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sdtune: error: ")
    assert re.search(says, err), err


def test_the_class_rates_are_those_of_the_steps_not_of_how_often_they_were_asked():
    schedule = lr_classes.ClassSchedule("StepLR", ["step_size=1", "gamma=0.5"], [1.0])
    assert schedule.rates(3) == [0.125] and schedule.rates(3) == [0.125] and schedule.rates(1) == [0.5]
    with pytest.raises(SdtuneError, match=r"StepLR takes no 'gama' \(did you mean gamma\?\)"):
        lr_classes.ClassSchedule("StepLR", ["step_size=1", "gama=0.5"], [1.0])
