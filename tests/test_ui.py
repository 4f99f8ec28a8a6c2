"""The web UI without a browser: path guard, upload check, training forms, job runner, and the UI's actions
(generate with a picked LoRA, reuse a PNG's settings, compare, LoRA files, gallery) with their refusals."""

import dataclasses
import html
import json
import re
import shutil
import stat
import time
import tomllib
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdtune.generate import parse_infotext, read_infotext, save_png
from sdtune.lora.blocks import TINY
from sdtune.lora.formats import load_lora, save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.models import load_base
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import Embedding, load_embedding, save_embedding
from sdtune.train.config import KINDS, TOPICS, load_settings
from sdtune.train.scan import scan_folder
from sdtune.ui import app as app_mod
from sdtune.ui import jobs as jobs_mod
from sdtune.ui import parse_auth, trainform
from sdtune.ui.guard import Folders, Refused, check_upload
from sdtune.ui.studio import _split_names

MB = 2**20


# ---------------------------------------------------------------------------------------------- guard

def _folders(root: Path) -> Folders:
    for name in ("loras", "embs"):
        (root / name).mkdir()
    return Folders.make(root / "out", root / "loras", root / "embs")


@pytest.fixture
def folders(tmp_path):
    return _folders(tmp_path)


def test_names_inside_a_folder_are_allowed(folders):
    (folders.loras / "sub").mkdir()
    (folders.loras / "sub" / "a.safetensors").write_bytes(b"x")
    assert folders.child("loras", "sub/a.safetensors") == folders.loras / "sub" / "a.safetensors"
    assert folders.child("out", "new.png", must_exist=False) == folders.out / "new.png"


@pytest.mark.parametrize("name, says", [
    ("../secret.safetensors", "'..' leaves the LoRA folder"),
    ("sub/../../secret.safetensors", "'..' leaves the LoRA folder"),
    ("/etc/passwd", "absolute paths are not allowed"),
    ("~/x.safetensors", "absolute paths are not allowed"),
    ("", "no LoRA file named"),
    ("nothere.safetensors", "no such file in the LoRA folder"),
])
def test_traversal_and_absolute_paths_are_refused(folders, name, says):
    with pytest.raises(Refused, match=says):
        folders.child("loras", name)


def test_a_symlink_out_of_the_folder_is_refused(folders, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"secret")
    (folders.loras / "evil.safetensors").symlink_to(outside)
    (folders.loras / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(Refused, match="leads outside the LoRA folder"):
        folders.child("loras", "evil.safetensors")
    with pytest.raises(Refused, match="leads outside the LoRA folder"):
        folders.child("loras", "linkdir/outside.safetensors")


def test_given_folders_must_exist(tmp_path):
    with pytest.raises(SdtuneError, match="--lora-dir .*nope: no such folder"):
        Folders.make(tmp_path / "out", tmp_path / "nope")
    f = Folders.make(tmp_path / "out")
    assert (f.loras, f.embeddings, f.model) == (f.out / "loras", f.out / "embeddings", None)
    assert f.loras.is_dir() and f.embeddings.is_dir()
    (tmp_path / "a-file").write_text("")  # was the system's "File exists" (or "Not a directory")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):
        with pytest.raises(SdtuneError, match=rf"^{out}: ({tmp_path / 'a-file'} )?is a file, not a folder; choose "
                                              r"another place for --out$"):
            Folders.make(out)


def test_new_names_are_plain(folders):
    assert folders.new_name("my-lora_v2.1") == "my-lora_v2.1"
    for bad in ("../x", "a/b", "", ".hidden", "a b", "..", "x" * 101):
        with pytest.raises(Refused, match="use letters, digits"):
            folders.new_name(bad)


def test_uploads_are_checked_for_size_and_type(tmp_path):
    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(png)
    assert check_upload(png, "image", MB) == png
    with pytest.raises(Refused, match="over the upload limit"):
        check_upload(png, "image", 10)
    fake = tmp_path / "b.png"
    fake.write_bytes(b"#!/bin/sh\necho not an image\n")
    with pytest.raises(Refused, match="contents are not a PNG"):
        check_upload(fake, "image", MB)
    for suffix in (".bmp", ".gif", ".tiff", ".webp", ".jpg", ".avif"):  # every kind training reads, by its first bytes
        Image.new("RGB", (8, 8)).save(tmp_path / f"c{suffix}")
        assert check_upload(tmp_path / f"c{suffix}", "image", MB) == tmp_path / f"c{suffix}"
        (tmp_path / f"d{suffix}").write_bytes(b"<html>not an image")
        with pytest.raises(Refused, match="contents are not a PNG"):
            check_upload(tmp_path / f"d{suffix}", "image", MB)
    with pytest.raises(Refused, match=r"not a \.safetensors or \.pt weight file"):
        check_upload(png, "weights", MB)
    text = tmp_path / "w.safetensors"
    text.write_text("hello")
    with pytest.raises(Refused, match="contents are not a .safetensors"):
        check_upload(text, "weights", MB)
    pt = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(2)}, pt)
    assert check_upload(pt, "weights", MB) == pt


def test_auth_is_user_colon_password():
    assert parse_auth("me:pw:with:colons") == ("me", "pw:with:colons")
    assert parse_auth(None) is None
    for bad in ("nopass", ":pw", "me:"):
        with pytest.raises(SdtuneError, match="USER:PASS"):
            parse_auth(bad)


# ---------------------------------------------------------------------------------------------- forms

def test_the_forms_come_from_the_settings_dataclasses():
    fields = {f.name: f for f in trainform.form_fields()}
    for kind, cls in KINDS.items():
        for f in dataclasses.fields(cls):
            if f.name in trainform.MANAGED:
                assert f.name not in fields
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert fields[f.name].defaults[kind] == default
    assert set(fields["token"].defaults) == {"ti"} and set(fields["rank"].defaults) == {"lora"}
    assert fields["steps"].defaults == {"ti": 1000, "lora": 1000} and fields["lr"].defaults["ti"] == 5e-3
    assert fields["te_lr"].nullable and fields["te_lr"].typ is float
    assert fields["sample_prompts"].typ is list and fields["flip"].typ is bool
    assert "optimizer steps" in fields["steps"].help  # the comment beside the field
    assert fields["targets"].choices == ("attn", "attn+ff", "all")
    assert fields["algo"].choices == ("lora", "loha", "lokr", "dora", "oft", "ia3", "full") and set(fields["algo"].defaults) == {"lora"}
    assert fields["optimizer"].choices == ("adamw", "adamw8bit", "pagedadamw8bit", "lion", "lion8bit", "sgdnesterov",
                                           "sgdnesterov8bit", "prodigy", "dadaptation", "dadaptadam", "dadaptadagrad",
                                           "dadaptadan", "dadaptadanip", "dadaptlion", "dadaptsgd", "adamwschedulefree",
                                           "radamschedulefree", "sgdschedulefree", "adafactor")
    assert fields["optimizer_args"].typ is list  # one key=value per line
    assert fields["loss_type"].choices == ("l2", "huber", "smooth_l1") and fields["loss_type"].defaults["ti"] == "l2"
    assert fields["huber_schedule"].choices == ("constant", "exponential", "snr")


def test_the_advanced_settings_are_in_helps_sections():
    """Every setting under "Advanced" is in one section, as --help shows it (config.TOPICS), in its order."""
    fields = trainform.form_fields()
    shown = trainform.sections(fields)
    assert sorted(f.name for _, mine in shown for f in mine) == sorted(f.name for f in fields if not f.basic)
    assert [topic for topic, _ in shown] == list(TOPICS)
    network = dict(shown)["the network (LoRA and LyCORIS)"]
    assert [f.name for f in network][:2] == ["algo", "conv_rank"] and all(set(f.defaults) == {"lora"} for f in network)


def test_form_values_become_the_toml_the_cli_reads(tmp_path):
    values = {"steps": 12.0, "rank": 4, "te_lr": None, "sample_prompts": "a red star\n\n a blue star ",
              "flip": True, "token": "<ignored for lora>", "default_caption": ""}
    s = trainform.settings_for("lora", values, data=str(tmp_path / "d"), out=str(tmp_path / "o"), model="tiny")
    text = trainform.to_toml(s)
    path = tmp_path / "job.toml"
    path.write_text(text)
    again = load_settings(path, kind="lora")
    assert again == s
    assert again.sample_prompts == ["a red star", "a blue star"] and again.steps == 12 and again.te_lr is None
    assert tomllib.loads(text)["progress"] is True
    odd = trainform.settings_for("lora", {"default_caption": 'q"uo\\te\x7f\u00e9\n'}, data=str(tmp_path), out="o",
                                 model="m")
    again = load_settings(_write(tmp_path / "odd.toml", trainform.to_toml(odd)), kind="lora")
    assert again.default_caption == odd.default_caption


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_an_unchanged_form_trains_as_the_cli_does(tmp_path):
    """The form shows the model's preset; submitted unchanged, it gives the settings `sdtune train` would (an
    unset optional number stays unset: a number box would have sent 0, training the text encoder at lr 0)."""
    for kind, token in (("lora", {}), ("ti", {"token": "<t>", "init_token": "star"})):
        shown = trainform.preset_values(kind, "tiny")
        assert shown["preset"] == "tiny"
        if kind == "lora":
            assert shown["te_lr"] == "" and shown["conv_alpha"] == "" and shown["batch_size"] == 8
        s = trainform.settings_for(kind, {**shown, **token}, data=str(tmp_path), out="o", model="tiny")
        cli = load_settings(None, {"data": str(tmp_path), "out": "o", "model": "tiny", **token}, kind=kind,
                            family="tiny")
        assert dataclasses.replace(s, progress=cli.progress, resume=cli.resume) == cli
    fields = {f.name: f for f in trainform.form_fields()}
    assert trainform.text_field(fields["te_lr"]) and not trainform.text_field(fields["lr"])
    assert trainform.from_form(fields["te_lr"], " ") is None and trainform.from_form(fields["te_lr"], "2e-4") == 2e-4
    with pytest.raises(SdtuneError, match=r"te lr: 'fast' is not a number"):
        trainform.from_form(fields["te_lr"], "fast")
    with pytest.raises(SdtuneError, match=r"^lr: empty; enter a number$"):  # not the preset's value without a word
        trainform.from_form(fields["lr"], None)
    # a form that names no preset trains on none, and says so (not the model's, whose values it did not show)
    s = trainform.settings_for("lora", trainform.preset_values("lora", None), data=str(tmp_path), out="o",
                               model="tiny")
    assert s.preset == "" and s.lr == 1e-4


def test_bad_form_values_are_refused_before_a_job_starts(tmp_path):
    with pytest.raises(SdtuneError, match="^rank 0: must be at least 1"):  # the field's name, not the flag's
        trainform.settings_for("lora", {"rank": 0}, data=str(tmp_path), out="o", model="tiny")
    with pytest.raises(SdtuneError, match="^steps 0 and epochs 0: give one of them"):
        trainform.settings_for("lora", {"steps": 0}, data=str(tmp_path), out="o", model="tiny")
    with pytest.raises(SdtuneError, match="no token"):
        trainform.settings_for("ti", {}, data=str(tmp_path), out="o", model="tiny")
    with pytest.raises(SdtuneError, match="not a whole number"):
        trainform.settings_for("lora", {"steps": 2.5}, data=str(tmp_path), out="o", model="tiny")
    # a module.Class optimizer (a settings file may name one) would import its module: the command line's only
    with pytest.raises(SdtuneError, match=r"^optimizer os\.path: the web UI trains with adamw, .*; train with another "
                                          r"class on the command line \(sdtune train --optimizer module\.Class\)$"):
        trainform.settings_for("lora", {"optimizer": "os.path"}, data=str(tmp_path), out="o", model="tiny")
    with pytest.raises(SdtuneError, match=r"^lr_scheduler os\.path: the web UI trains with constant, .*; train with a "
                                          r"scheduler class on the command line \(sdtune train --lr-scheduler "
                                          r"module\.Class\)$"):
        trainform.settings_for("lora", {"lr_scheduler": "os.path"}, data=str(tmp_path), out="o", model="tiny")


# ---------------------------------------------------------------------------------------------- jobs

FAKE_TRAIN = r"""#!/bin/sh
# stands in for "python -m sdtune.cli train KIND --config job.toml": progress lines as the loop writes them,
# a resume state every step, the result path at the end
total=$(sed -n 's/^steps = //p' job.toml)
# the runner asks for a progress line a second (a log's default is one every 30 s)
[ "$SDTUNE_LOG_SECONDS" = 1 ] || { echo "sdtune: error: SDTUNE_LOG_SECONDS is not 1" >&2; exit 3; }
i=0; [ -f state ] && i=$(cat state)
while [ "$i" -lt "$total" ]; do
  i=$((i+1)); echo "$i" > state
  printf 'encoding images: 9/9 img, 0 s\ntrain lora: %d/%d step, 0 s, 9.90 step/s, loss=0.%d, lr=1e-4\n' "$i" "$total" "$i" >&2
  sleep 0.1
done
if grep -q '^fail' job.toml; then echo "sdtune: error: the loss became NaN" >&2; exit 2; fi
touch lora.safetensors; echo; echo "$PWD/lora.safetensors"
"""


@pytest.fixture
def runner(tmp_path):
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_TRAIN)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    r = jobs_mod.JobRunner(tmp_path / "train", python=str(fake), poll=0.05)
    yield r
    r.shutdown()


def _wait(cond, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (from /proc: field 5 of stat is the group)."""
    alive = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat_file.parent.name))
    return alive


def test_jobs_run_one_at_a_time_in_order_and_report_progress(runner):
    a = runner.submit("a", "lora", "steps = 5\n")
    b = runner.submit("b", "lora", "steps = 3\n")
    _wait(lambda: a.state == "running")
    assert b.state == "queued"
    _wait(lambda: b.state == "done")
    assert a.state == "done" and a.ended <= b.started
    p = jobs_mod.progress(a.folder)
    assert (p["step"], p["total"]) == (5, 5) and p["loss"][-1] == (5, 0.5) and p["loss_source"] == "log"
    assert p["result"] == Path(a.folder) / "lora.safetensors" and p["error"] is None
    with pytest.raises(SdtuneError, match="exists already"):
        runner.submit("a", "lora", "steps = 1\n")


def test_stop_ends_the_process_group_and_resume_continues(runner):
    job = runner.submit("long", "lora", "steps = 200\n")
    _wait(lambda: (jobs_mod.progress(job.folder)["step"] or 0) >= 3)
    proc = runner.procs["long"]
    runner.stop("long")
    assert job.state == "stopped" and proc.poll() is not None
    _wait(lambda: _live_members(proc.pid) == [], 3)  # nothing of the group is left (zombies aside)
    at = int((Path(job.folder) / "state").read_text())
    time.sleep(0.3)
    assert int((Path(job.folder) / "state").read_text()) == at
    runner.resume("long")
    _wait(lambda: job.state == "running" and (jobs_mod.progress(job.folder)["step"] or 0) > at)
    log = (Path(job.folder) / jobs_mod.LOG_FILE).read_text()
    assert "--- run 2" in log and f"{at + 1}/200" in log.split("--- run 2")[1]
    runner.stop("long")
    with pytest.raises(SdtuneError, match="is stopped, not running"):
        runner.stop("long")


def test_the_job_view_knows_when_the_report_is_drawn(tmp_path):
    log = tmp_path / jobs_mod.LOG_FILE
    log.write_text("encoding images: 4/4 img, 0 s, 9.10 img/s\ntrain lora: 1/2 step, 1 s, 0.50 step/s, loss=0.2, "
                   "lr=1e-4\nencoding images: 4/4 img, 0 s\ntrain lora: 2/2 step, 1 s, 0.50 step/s, loss=0.1, lr=1e-4\n"
                   f"sdtune train lora: writing the report, {tmp_path / 'report.html'}\n")
    p = jobs_mod.progress(tmp_path)
    assert (p["step"], p["total"], p["reporting"]) == (2, 2, True)  # not 4/4: the encoding lines are not steps
    assert p["loss"] == [(1, 0.2), (2, 0.1)]
    # a job folder from an earlier version: the terminal bar's redraws
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / jobs_mod.LOG_FILE).write_text("encoding images: 4/4 [00:00<00:00]\rtrain lora: 1/3 [00:01<00:"
                                                      "00, loss=0.3]\rtrain lora: 2/3 [00:01<00:00, loss=0.2]")
    p = jobs_mod.progress(tmp_path / "old")
    assert (p["step"], p["total"], p["loss"]) == (2, 3, [(1, 0.3), (2, 0.2)])
    (tmp_path / "lora.safetensors").write_bytes(b"")
    log.write_text(log.read_text() + f"{tmp_path / 'lora.safetensors'}\n")
    assert jobs_mod.progress(tmp_path)["reporting"] is False


def test_resume_says_whether_the_job_starts_over(runner):
    from sdtune.ui.studio import Studio

    runner.submit("first", "lora", "steps = 200\n")
    second = runner.submit("second", "lora", "steps = 1\n")
    runner.stop("second")  # taken out of the queue before it saved anything
    page = SimpleNamespace(jobs=runner)
    assert "it saved nothing before it stopped, so it starts over" in Studio.resume(page, "second")
    runner.stop("second")
    (Path(second.folder) / "resume.pt").write_bytes(b"")  # what a save leaves
    assert Studio.resume(page, "second") == "job second: queued again; it resumes from its last save"
    runner.stop("first")


def test_a_failed_job_says_why_and_the_queue_goes_on(runner):
    bad = runner.submit("bad", "lora", "steps = 1\nfail = true\n")
    good = runner.submit("good", "lora", "steps = 1\n")
    _wait(lambda: good.state == "done")
    assert bad.state == "failed" and bad.returncode == 2
    assert jobs_mod.progress(bad.folder)["error"] == "sdtune: error: the loss became NaN"


def test_a_queued_job_can_be_taken_out_and_jobs_survive_a_restart(runner, tmp_path):
    runner.submit("first", "lora", "steps = 50\n")
    second = runner.submit("second", "lora", "steps = 1\n")
    runner.stop("second")
    assert second.state == "stopped"
    _wait(lambda: runner.jobs["first"].state == "running")
    runner.shutdown()
    again = jobs_mod.JobRunner(tmp_path / "train", python="false")
    try:
        assert {j.name: j.state for j in again.list()} == {"first": "stopped", "second": "stopped"}
    finally:
        again.shutdown()


def test_progress_reads_a_loss_csv_when_training_writes_one(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss,lr\n1,0.9,1e-4\n2,0.7,1e-4\n")
    (tmp_path / "loss.png").write_bytes(b"")
    p = jobs_mod.progress(tmp_path)
    assert p["loss"] == [(1, 0.9), (2, 0.7)] and p["loss_source"] == "csv" and p["loss_png"] == tmp_path / "loss.png"
    # the log's lines since the CSV's last save follow it: the page's loss keeps up with the steps
    (tmp_path / jobs_mod.LOG_FILE).write_text("train lora: 2/4 step, 1 s, loss=0.75\ntrain lora: 3/4 step, 1 s, "
                                              "loss=0.6\n")
    p = jobs_mod.progress(tmp_path)
    assert p["loss"] == [(1, 0.9), (2, 0.7), (3, 0.6)] and p["loss_source"] == "log"
    # an atomic write's temporary folder (hidden, and gone a moment later) is not walked into
    (tmp_path / "run1" / ".resume.pt.1-x.tmp").mkdir(parents=True)
    (tmp_path / "run1" / ".resume.pt.1-x.tmp" / "report.html").write_text("")
    (tmp_path / "run1" / "report.html").write_text("")
    assert jobs_mod.progress(tmp_path)["report"] == tmp_path / "run1" / "report.html"


# ---------------------------------------------------------------------------------------------- the UI's actions

def _lora_for(base, seed=1) -> Lora:
    g = torch.Generator().manual_seed(seed)
    lora = Lora(format="test")
    for path, m in base.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and path.endswith(("attn1.to_q", "attn2.to_k")):
            out_f, in_f = m.weight.shape
            lora.modules["unet"][path] = Adapter("lora", {"down": torch.randn(2, in_f, generator=g),
                                                          "up": torch.randn(out_f, 2, generator=g)}, 2.0)
    return lora


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from sdtune.ui.studio import Studio

    root = tmp_path_factory.mktemp("ui")
    folders = _folders(root)
    save_lora(_lora_for(load_base("tiny-random")), folders.loras / "style.safetensors")
    (root / "secret.safetensors").write_bytes((folders.loras / "style.safetensors").read_bytes())
    (folders.loras / "evil.safetensors").symlink_to(root / "secret.safetensors")
    s = Studio(folders, model="tiny-random", max_upload_mb=1)
    yield s
    s.jobs.shutdown()


def test_a_settings_file_fills_the_form_as_the_cli_reads_it(studio, tmp_path):
    """An uploaded settings file fills the Train form as `sdtune train --config FILE` reads it: a kohya sd-scripts
    config (its notes said on the page), a run's settings.toml; the other kind's file and a non-settings upload are
    one line each."""
    kohya = tmp_path / "config_lora.toml"
    kohya.write_text('pretrained_model_name_or_path = "x"\nnetwork_dim = 12\nnetwork_alpha = 6\nxformers = true\n'
                     'unet_lr = 3e-4\nlearning_rate = 1e-4\n')
    values, notes = studio.file_form_values("lora", str(kohya))
    assert (values["rank"], values["alpha"], values["lr"], values["te_lr"], values["text_encoder"]) == (
        12, 6.0, 3e-4, "0.0001", True)
    assert notes == ["config_lora.toml: read as a kohya sd-scripts config; xformers changes nothing sdtune trains and "
                     "is not used"]
    own = tmp_path / "settings.toml"
    own.write_text('[ti]\ntoken = "<w>"\ninit_token = "star"\nnum_vectors = 3\n')
    values, notes = studio.file_form_values("ti", str(own))
    assert (values["token"], values["num_vectors"], values["preset"], notes) == ("<w>", 3, "tiny", [])
    with pytest.raises(SdtuneError, match=r"holds \[ti\] settings, not \[lora\]; use sdtune train ti"):
        studio.file_form_values("lora", str(own))
    dataset = tmp_path / "dataset.toml"  # kohya's dataset config: folders of the uploader's machine
    dataset.write_text('[general]\nkeep_tokens = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/their/img"\n')
    with pytest.raises(Refused, match=r"^dataset.toml: a kohya dataset config, whose folders sdtune train --data "
                                      r"dataset.toml reads; this page trains on a dataset of the output folder"):
        studio.file_form_values("lora", str(dataset))
    (tmp_path / "broken.toml").write_text("rank = = 4\n")  # refused under the upload's name alone
    with pytest.raises(SdtuneError, match=r"^broken.toml: not valid TOML") as refused:
        studio.file_form_values("lora", str(tmp_path / "broken.toml"))
    assert str(tmp_path) not in str(refused.value)
    (tmp_path / "notes.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(Refused, match=r"notes.toml: its contents are not a .toml settings file"):
        studio.file_form_values("lora", str(tmp_path / "notes.toml"))


def test_use_the_result_copies_the_recommended_checkpoint_under_the_name_to_type(studio, tmp_path, monkeypatch):
    """A finished job's "Use the result": the checkpoint its report recommends (best.safetensors) where there is one;
    an embedding named after its token (the folder's embeddings are typed by file name), a LoRA after the job; a
    name in use gets a number, and the same file twice is not copied twice."""
    job = tmp_path / "job"
    job.mkdir()
    final, best = job / "ti.safetensors", job / "best.safetensors"
    for path, seed in ((final, 0), (best, 1)):
        save_embedding(Embedding("<mystar>", torch.randn(1, 64, generator=torch.Generator().manual_seed(seed)),
                                 "trained", "diffusers"), path)
    view = {"job": SimpleNamespace(kind="ti", state="done", folder=str(job)), "result": final}
    monkeypatch.setattr(studio, "job_view", lambda name: view)
    says = "its report's best checkpoint is in the embedding folder as mystar; put mystar in a prompt"
    assert studio.use_result("ti-001") == says
    assert (studio.folders.embeddings / "mystar.safetensors").read_bytes() == best.read_bytes()
    assert studio.use_result("ti-001") == says and not (studio.folders.embeddings / "mystar-2.safetensors").exists()
    best.unlink()  # another run's file under the same token
    assert studio.use_result("ti-002") == says.replace("its report's best checkpoint", "its final file").replace(
        "mystar", "mystar-2")
    assert (studio.folders.embeddings / "mystar-2.safetensors").read_bytes() == final.read_bytes()
    lora = job / "lora.safetensors"
    shutil.copyfile(studio.folders.loras / "style.safetensors", lora)
    view.update(job=SimpleNamespace(kind="lora", state="done", folder=str(job)), result=lora)
    assert studio.use_result("q2") == "its final file is in the LoRA folder as q2; put <lora:q2:1> in a prompt"
    for made in (studio.folders.loras / "q2.safetensors", *studio.folders.embeddings.glob("mystar*")):
        made.unlink()  # the module's other tests see the folders as they were


def test_generate_with_a_picked_lora_writes_its_weight_in_the_png(studio):
    assert studio.lora_names() == ["style"]  # the symlink out of the folder is not offered
    rows, notes = studio.generate("a red star", steps=2, seed=5, picks=[("style", 0.8, 0.8), ("", 1, 1)])
    (path, text), = rows
    assert path.parent == studio.folders.out / "generate" and read_infotext(path) == text
    params = parse_infotext(text)
    # joined by a space, as A1111's cards add tags: no comma left behind as a token
    assert params["prompt"] == "a red star <lora:style:0.8>" and params["Lora weights"] == "style=0.8"
    assert params["Seed"] == "5" and notes == []
    form = studio.settings_of(path, uploaded=False)
    assert form["prompt"] == "a red star <lora:style:0.8>" and form["seed"] == 5 and form["steps"] == 2
    # the same LoRA typed and picked: once, at the summed weight; an emptied seed box: a random seed
    (path, text), = studio.generate("a red star, <lora:style:0.5>", steps=1, seed=None, picks=[("style", 0.3, 0.3)])[0]
    assert parse_infotext(text)["Lora weights"] == "style=0.8" and int(parse_infotext(text)["Seed"]) >= 0
    assert studio.with_loras("x", [("style", 1, 0.5)]) == "x <lora:style:0.5:1>"  # A1111: te, then UNet


def test_picked_block_weights_become_the_lbw_option_of_the_tag(studio):
    assert studio.with_loras("x", [("style", 0.8, 0.8, "INALL")]) == "x <lora:style:0.8:lbw=INALL>"
    assert studio.with_loras("x", [("style", 1, 0.5, " 1, 0,0.5 ")]) == "x <lora:style:0.5:1:lbw=1,0,0.5>"
    assert studio.with_loras("x", [("style", 1, 1, ""), ("", 1, 1, "INS")]) == "x <lora:style:1>"
    for bad in ("INS><lora:../secret:1", "1:lbw=2"):  # nothing that ends the tag or adds an option
        with pytest.raises(SdtuneError, match="write a preset name .* or comma-separated numbers"):
            studio.with_loras("x", [("style", 1, 1, bad)])
    # a bad vector for the tiny model's layout: the API says so, as it does for the typed tag
    for picks, prompt in (([("style", 1, 1, "1,0,1")], "a star"), ([], "a star, <lora:style:1:lbw=1,0,1>")):
        with pytest.raises(SdtuneError, match="lbw=1,0,1: the built-in tiny model takes 8 or 14 comma-separated"):
            studio.generate(prompt, steps=1, picks=picks)
    studio.generate("a star", steps=1)  # the model is loaded now: its family's presets are offered
    assert studio.block_presets() == list(TINY.presets)


def test_picked_block_weights_generate_as_the_typed_tag_does(tmp_path):
    from sdtune.lora.blocks import XL
    from sdtune.ui.studio import Studio

    folders = Folders.make(tmp_path / "out", model="sdxl-small-random")
    s = Studio(folders, model="sdxl-small-random")
    try:
        assert s.block_presets() == list(XL.presets)  # before loading: the names every layout has
        with s.model_in_use() as (base, _):
            save_lora(_lora_for(base), folders.loras / "style.safetensors")
        assert s.block_presets() == list(XL.presets)  # SDXL's own
        run = dict(steps=2, seed=3, cfg=5)
        (picked, text), = s.generate("a red star", picks=[("style", 0.8, 0.8, "OUTD")], **run)[0]
        params = parse_infotext(read_infotext(picked))
        assert params["prompt"] == "a red star <lora:style:0.8:lbw=OUTD>" == s.settings_of(picked,
                                                                                          uploaded=False)["prompt"]
        # the strengths field carries the block weights too (OUTD on SDXL: BASE, OUT00-OUT02)
        assert params["Lora weights"] == "style=0.8:lbw=1,0,0,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0"
        (typed, typed_text), = s.generate("a red star <lora:style:0.8:lbw=OUTD>", **run)[0]
        assert typed_text == text  # the same parameters ...
        pixels = lambda path: torch.tensor(list(Image.open(path).getdata()))  # noqa: E731
        assert torch.equal(pixels(picked), pixels(typed))  # ... and the same image: the same API call
        (plain, _), = s.generate("a red star", picks=[("style", 0.8, 0.8, "")], **run)[0]
        (inall, _), = s.generate("a red star", picks=[("style", 0.8, 0.8, "1,1,1,1,1,0,0,0,0,0,0,0")], **run)[0]
        assert not torch.equal(pixels(plain), pixels(picked)) and not torch.equal(pixels(inall), pixels(picked))
        with pytest.raises(SdtuneError, match="lbw=1,0,1: SDXL takes 12 or 20 comma-separated block weights"):
            s.generate("a red star", picks=[("style", 0.8, 0.8, "1,0,1")], **run)
    finally:
        s.jobs.shutdown()


@pytest.mark.parametrize("prompt, says", [
    ("a star <lora:../secret:1>", "'..' leaves the LoRA folder"),
    ("a star <lora:/etc/passwd:1>", "absolute paths are not allowed"),
    ("a star <lora:evil:1>", "leads outside the LoRA folder"),
    ("a star <lora:nothere:1>", "no LoRA of that name in the LoRA folder"),
])
def test_generate_refuses_loras_outside_the_folder(studio, prompt, says):
    with pytest.raises(Refused, match=says):
        studio.generate(prompt, steps=1)
    with pytest.raises(Refused, match=says):
        studio.compare("a red star", x="seed=1,2", y=f"prompt={prompt}|a star", steps=1)


def test_reuse_reads_an_a1111_png(studio, tmp_path):
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "a1111.png",
                   "a castle\nNegative prompt: blurry\nSteps: 31, Sampler: Euler a, CFG scale: 6.5, Seed: 42, "
                   "Size: 512x768, Model hash: abc, Model: sd15")
    form = studio.settings_of(png, uploaded=True)
    assert form == {"prompt": "a castle", "negative_prompt": "blurry", "parameters": read_infotext(png),
                    "steps": 31, "cfg": 6.5, "seed": 42, "width": 512, "height": 768, "sampler": "euler_a",
                    "clip_skip": 1, "not_applied": ["RNG GPU (A1111 default)", "Model sd15 (the page's is tiny-random)"]}
    # A1111 1.9+: the schedule apart from the sampler, prompts over several lines
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "a1111-19.png",
                   "a castle,\nat night\nNegative prompt: blurry,\nugly\nSteps: 20, Sampler: DPM++ 2M, "
                   "Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Clip skip: 2, "
                   "Hires upscale: 2, Hires steps: 10")
    form = studio.settings_of(png, uploaded=True)
    assert (form["prompt"], form["negative_prompt"], form["sampler"]) == ("a castle,\nat night", "blurry,\nugly",
                                                                          "dpmpp_2m_karras")

    def not_applied(name: str, text: str) -> list[str]:
        png = save_png(Image.new("RGB", (8, 8)), tmp_path / name, text)
        return studio.settings_of(png, uploaded=True)["not_applied"]

    # values past the page's sliders (which would refuse them before any handler runs) are left out and named;
    # a file name's '=' and brackets are no weight and no emphasis; a text with no settings is a prompt
    big = studio.settings_of(save_png(Image.new("RGB", (8, 8)), tmp_path / "big.png",
                                       "a <lora:my (style):0.5>castle\nSteps: 200, CFG scale: 35, Seed: -7, "
                                       "Size: 2560x1440, Clip skip: 13, RNG: CPU, Lora weights: eq=sign=0.8"),
                             uploaded=True)
    assert {k for k in ("steps", "cfg", "clip_skip", "seed", "width", "height") if k in big} == set()
    assert big["not_applied"] == ["Steps 200 (the page takes 1 to 150)", "CFG scale 35 (the page takes 1 to 30)",
                                   "Clip skip 13 (the page takes 1 to 12)", "Seed -7 (seeds go from -1, random, up)",
                                   "Size 2560x1440 (the page takes 0 to 2048 a side)",
                                   "LoRA my (style), eq=sign (not in the LoRA folder)"]
    # an entry with block weights or te2= is the LoRA of the folder it is (its last '=' was taken for the name's end)
    for weights in ("0.8:lbw=1,0,1,0,1,0,1,0", "0.5:0.8:te2=0.3"):
        taken = studio.settings_of(save_png(Image.new("RGB", (8, 8)), tmp_path / "lbw.png",
                                            f'a castle\nSteps: 3, Seed: 1, RNG: CPU, Lora weights: "style={weights}"'),
                                   uploaded=True)
        assert (taken["prompt"], taken["not_applied"]) == (f"a castle <lora:style:{weights}>", [])
    Image.new("RGB", (8, 8)).save(tmp_path / "edited.avif")  # every image kind the drop takes is read and answered
    with pytest.raises(SdtuneError, match="^edited.avif: no generation parameters in this image"):
        studio.settings_of(tmp_path / "edited.avif", uploaded=True)
    plain = studio.settings_of(save_png(Image.new("RGB", (8, 8)), tmp_path / "text.png", "just some text"),
                               uploaded=True)
    assert plain == {"prompt": "just some text", "negative_prompt": "", "parameters": "just some text",
                     "not_applied": []}
    # named to the user, not dropped; A1111 writes no RNG for its default GPU noise
    assert form["not_applied"] == ["Hires upscale", "Hires steps", "RNG GPU (A1111 default)"]
    # what sdtune draws otherwise: GPU noise, A1111's default emphasis on a weighted prompt, a sampler it lacks
    assert not_applied("a1111-gpu.png",
                       "a (red) castle\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, "
                       "Size: 512x512, RNG: GPU") == [
        "RNG GPU", "Emphasis Original (sdtune weighs as No norm)",
        "Sampler Euler a (Karras schedule) (sdtune has no such sampler)"]
    # an embedding the image used (TI hashes) that the folder lacks: named (its word is a plain word here)
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "a1111-ti.png",
                   "a castle, EasyNegative\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
                   'TI hashes: "EasyNegative: c74b4e810b03, other: 0123456789ab", RNG: CPU')
    (studio.folders.embeddings / "other.safetensors").write_bytes(b"")
    try:
        assert studio.settings_of(png, uploaded=True)["not_applied"] == [
            "embedding EasyNegative (not in the embedding folder)"]
    finally:
        (studio.folders.embeddings / "other.safetensors").unlink()
    # a schedule type sdtune's samplers do not follow, and A1111's other sampling settings: named, not dropped
    assert not_applied("a1111-exp.png",
                       "a castle\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 7, Seed: 1, "
                       "Size: 512x512, NGMS: 0.5, RNG: CPU") == [
        "NGMS", "Sampler DPM++ 2M (Exponential schedule) (sdtune has no such sampler)"]
    # what A1111 assumes of an older version's PNG (before 1.6: old editing timelines, DDIM's v0 padding), a
    # prompt of more chunks than its negative without "Pad conds" (A1111 ran them apart); an edit alone is no emphasis
    assert not_applied("a1111-old.png",
                       "a [red:blue:1.0] castle\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 512x512, "
                       "RNG: CPU, Version: v1.5.1") == [
        "Old prompt editing timelines (A1111 v1.5.1)", "Pad conds v0 (A1111 v1.5.1)",
        "Downcast alphas_cumprod (A1111 v1.5.1)"]
    assert not_applied("a1111-long.png",
                       "a castle" + ", a tower" * 40 + "\nNegative prompt: blurry\nSteps: 20, Sampler: DDIM, "
                       "CFG scale: 7, Seed: 1, Size: 512x512, RNG: CPU, Version: v1.10.1") == [
        "Pad conds off (A1111 ran the prompt and negative prompt of different lengths apart; sdtune pads the shorter)"]
    assert form["clip_skip"] == 2
    # a grid cell loads its LoRAs as adapters, so its prompt has no tags: they go into the prompt from its
    # Lora weights (those in the LoRA folder; the others are named); an A1111 prompt's tag for a LoRA the folder
    # lacks is taken out of the prompt and named (Generate would refuse it)
    for text, prompt, missing in [
        ("a red star\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny-random, "
         "Lora weights: style=0.5:0.25; gone=1; <lora:tag>=1, RNG: CPU", "a red star <lora:style:0.5:0.25>", "gone"),
        ("a castle, <lora:style:0.7>, <lora:elsewhere:0.8>, at night\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
         "Seed: 1, Size: 512x512, RNG: CPU", "a castle, <lora:style:0.7>, at night", "elsewhere"),
        # sdtune's own image of a --lora: the tag it wrote into the prompt, and the same LoRA's Lora weights entry
        ("a red star <lora:style:0.5>\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, "
         "Lora weights: style=0.5; gone=1, RNG: CPU", "a red star <lora:style:0.5>", "gone"),
        # a tag for a LoRA the folder lacks, and its Lora weights entry: named once (it was named twice)
        ("a red star <lora:gone:0.5>\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, "
         "Lora weights: gone=0.5, RNG: CPU", "a red star", "gone")]:
        form = studio.settings_of(save_png(Image.new("RGB", (8, 8)), tmp_path / "cell.png", text), uploaded=True)
        assert form["prompt"] == prompt
        assert form["not_applied"] == [f"LoRA {missing} (not in the LoRA folder)"]
    sample = ("a red star\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, "
              "Training sample: lora-001 step-000200, RNG: CPU")  # a training run's sample grid
    form = studio.settings_of(save_png(Image.new("RGB", (8, 8)), tmp_path / "grid.png", sample), uploaded=True)
    assert form["prompt"] == "a red star" and form["not_applied"] == [
        "the adapter in training (lora-001 step-000200; pick its saved LoRA or embedding; this image is the first "
        "row of its grid)"]
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    with pytest.raises(SdtuneError, match="no generation parameters"):
        studio.settings_of(bare, uploaded=True)
    with pytest.raises(Refused, match="leads outside the output folder"):
        studio.settings_of(png, uploaded=False)  # the gallery only reads the output folder


def test_compare_makes_a_grid_with_its_parts(studio):
    # (an axis copied from a command line keeps its shell quotes: taken off)
    grid, parts, _ = studio.compare("a red star", x="'seed=1,2'", y='"weight=0,1"', loras=["style"], steps=1, cell=64)
    names = sorted(p.name for p in parts)
    assert grid.name == "xy.png" and names == sorted(["xy.png", "xy.json", "xy-00-00.png", "xy-00-01.png",
                                                      "xy-01-00.png", "xy-01-01.png"])
    assert "Y Type: LoRA weight (style)" in read_infotext(grid)
    with pytest.raises(Refused, match="absolute paths are not allowed"):
        studio.compare("a red star", x="loras=none|/etc/passwd", steps=1)
    # a LoRA item's refusal names the LoRA folder (it named the embedding folder), an embedding's its own
    for axis, folder in (("loras", "LoRA"), ("adapters", "LoRA"), ("embeddings", "embedding")):
        with pytest.raises(Refused, match=f"'..' leaves the {folder} folder"):
            studio.compare("a red star", x=f"{axis}=none|../secret", steps=1)
    # too many cells: refused before the work per cell (checking a million cells' prompts took minutes)
    with pytest.raises(SdtuneError, match="^1000000 cells: a grid takes at most 2500"):
        studio.compare("a red star", x="seed=1-1000", y="cfg=1-1000", steps=1)
    (studio.folders.loras / "sub").mkdir()  # two picks of one file name: the cells could name only one of them
    shutil.copyfile(studio.folders.loras / "style.safetensors", studio.folders.loras / "sub" / "style.safetensors")
    with pytest.raises(SdtuneError, match=r"^two picked LoRAs are named style \(sub/style and another folder's\)"):
        studio.compare("a red star", x="seed=1,2", loras=["style", "sub/style"], steps=1)
    shutil.rmtree(studio.folders.loras / "sub")
    with pytest.raises(SdtuneError, match="^no X axis; write KIND=VALUES in it"):  # the page's words, no flags
        studio.compare("a red star", y="seed=1,2", steps=1)
    with pytest.raises(SdtuneError, match="^weight axis: pick the LoRA it sweeps in 'weight axis sweeps'"):
        studio.compare("a red star", x="weight=0,1", steps=1)
    (studio.folders.loras / "broken.safetensors").write_bytes(b"not weights")
    before = set((studio.folders.out / "grids").iterdir())
    with pytest.raises(SdtuneError, match="broken.safetensors"):
        studio.compare("a red star", x="seed=1,2", loras=["broken"], steps=1)
    assert set((studio.folders.out / "grids").iterdir()) == before  # no empty folder left for the refused grid
    (studio.folders.loras / "broken.safetensors").unlink()
    # the grid's progress counts the denoising steps of all its batches; Cancel stops it as it stops Generate
    seen = []
    studio.compare("a red star", x="seed=1,2", y="cfg=3,7", steps=2, on_step=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # two batches (one per cfg) of two seeds, 2 steps each
    with pytest.raises(SdtuneError, match=r"grid cancelled at step 2 of 4; nothing was saved"):
        studio.compare("a red star", x="seed=1,2", y="cfg=3,7", steps=2, on_step=lambda d, t: studio.cancel())
    assert len(set((studio.folders.out / "grids").iterdir())) == len(before) + 1  # only the finished grid
    # cancelled in its second batch: the grid shows the first batch's cells, blank where the others would be, as a
    # Ctrl-C leaves it on the command line
    grid, parts, notes = studio.compare("a red star", x="seed=1,2", y="cfg=3,7", steps=2,
                                        on_step=lambda d, t: d == 3 and studio.cancel())
    assert notes[-1] == "grid cancelled at step 4 of 4; the grid shows the 2 cell(s) drawn before it, blank where " \
                        "a cell was not"
    record = json.loads(grid.with_suffix(".json").read_text())
    assert record["cells"] == [["xy-00-00.png", "xy-00-01.png"], [None, None]]
    assert sorted(p.name for p in parts) == ["xy-00-00.png", "xy-00-01.png", "xy.json", "xy.png"]


def test_lora_files_inspect_convert_and_refuse_pickled_code(studio, tmp_path, code_pickle):
    text, info = studio.inspect("style")
    assert info["modules"]["unet"] == info["fits"]["unet"] > 0 and info["ranks"] == [2] and info["file"] == "style"
    assert text.startswith("file ") and "ranks" in text
    upload = tmp_path / "uploaded.safetensors"
    shutil.copyfile(studio.folders.loras / "style.safetensors", upload)
    assert studio.inspect("style", str(upload))[1]["file"] == "uploaded.safetensors"  # the file read, by its name
    out, words = studio.convert("style", "diffusers", "style-diffusers")
    assert out == studio.folders.loras / "style-diffusers.safetensors" and "style-diffusers" in studio.lora_names()
    assert words == []
    # a LoRA that bundles a word: the word goes to the embedding folder (beside the LoRA it was offered as one)
    lora = load_lora(studio.folders.loras / "style.safetensors")
    save_lora(dataclasses.replace(lora, embeddings={"<s1>": torch.ones(2, 64)}),
              studio.folders.loras / "pivotal.safetensors", format="kohya")
    out, words = studio.convert("pivotal", "diffusers", "pivotal-diffusers")
    assert words == [studio.folders.embeddings / "s1.safetensors"] and "s1" in studio.embedding_names()
    assert "s1" not in studio.lora_names() and torch.equal(load_embedding(words[0]).parts[""], torch.ones(2, 64))
    with pytest.raises(SdtuneError, match="exists already"):
        studio.convert("style", "diffusers", "style-diffusers")
    with pytest.raises(Refused, match="use letters, digits"):
        studio.convert("style", "kohya", "../escaped")

    marker = tmp_path / "pwned"
    evil = code_pickle(tmp_path / "evil.pt", "lora_unet_x.lora_down.weight", marker)
    with pytest.raises(SdtuneError, match="refuses to unpickle"):
        studio.inspect(upload=str(evil))
    with pytest.raises(SdtuneError, match="refuses to unpickle"):
        studio.add_upload(str(evil), "loras")
    assert not marker.exists() and "evil" not in studio.lora_names()
    # an embedding goes to the embedding folder; offered as a LoRA it is refused (it would have listed as one)
    emb = tmp_path / "mystar.safetensors"
    save_file({"<mystar>": torch.randn(1, 64)}, str(emb))
    with pytest.raises(SdtuneError, match="mystar.safetensors: holds no LoRA layers .*embedding folder"):
        studio.add_upload(str(emb), "loras")
    assert studio.add_upload(str(emb), "embeddings") == "mystar" and "mystar" in studio.embedding_names()
    assert "mystar" not in studio.lora_names()
    lora_file = studio.folders.loras / "style.safetensors"
    with pytest.raises(SdtuneError, match=r"^style.safetensors: holds no embedding \(a LoRA\?\); add it to the LoRA "
                                          r"folder instead$"):
        studio.add_upload(str(lora_file), "embeddings")
    # an A1111-style file name (spaces, brackets) is taken under a plain one (it was refused as an "output name"),
    # letters of any script kept; the same file again is the one there, another of that name gets a number
    spaced = tmp_path / "my style (v2) ünï.safetensors"
    shutil.copyfile(lora_file, spaced)
    assert studio.add_upload(str(spaced), "loras") == "my_style_v2_ünï" and "my_style_v2_ünï" in studio.lora_names()
    assert studio.add_upload(str(spaced), "loras") == "my_style_v2_ünï"
    save_file(load_file(str(lora_file)), str(spaced), metadata={"ss_output_name": "v3"})  # an update
    assert studio.add_upload(str(spaced), "loras") == "my_style_v2_ünï-2"
    assert (studio.folders.loras / "my_style_v2_ünï-2.safetensors").read_bytes() == spaced.read_bytes()
    big = tmp_path / "big.safetensors"
    shutil.copyfile(studio.folders.loras / "style.safetensors", big)
    with open(big, "ab") as f:
        f.write(b"\0" * (2 * MB))
    with pytest.raises(Refused, match="over the upload limit of 1 MB"):
        studio.inspect(upload=str(big))


def test_a_lora_in_a_subfolder_is_found_by_its_file_name_as_in_a1111(studio, tmp_path):
    """A grid cell (and A1111) writes <lora:STEM>: read back and generated, it finds sub/STEM."""
    inner = studio.folders.loras / "sub" / "inner.safetensors"
    inner.parent.mkdir()
    shutil.copyfile(studio.folders.loras / "style.safetensors", inner)
    try:
        png = save_png(Image.new("RGB", (8, 8)), tmp_path / "cell.png", "a red star <lora:inner:1>\nSteps: 2, "
                       "Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, RNG: CPU, Lora weights: inner=1; style=0")
        form = studio.settings_of(png, uploaded=True)
        assert form["prompt"] == "a red star <lora:inner:1> <lora:style:0>" and form["not_applied"] == []
        assert "sub/inner" in studio.lora_names() and studio.adapter_file("loras", "inner") == inner
    finally:
        shutil.rmtree(inner.parent)


def test_merge_writes_inside_the_output_folder(studio):
    path = studio.merge("style:0.5", "merged-style", "single")
    assert path == studio.folders.out / "merged" / "merged-style.safetensors" and path.is_file()
    # a name the LoRA folder lists may hold a comma; the list's commas still separate
    shutil.copyfile(studio.folders.loras / "style.safetensors", studio.folders.loras / "comma,name.safetensors")
    try:
        assert _split_names("comma,name:0.5, style\nstyle:0.2,comma,name", set(studio.lora_names())) == [
            "comma,name:0.5", "style", "style:0.2", "comma,name"]
        assert _split_names("a, b:1,,c", set()) == ["a", "b:1", "c"]
        assert studio.merge("comma,name:0.5, style:0.5", "merged-comma", "single").is_file()
    finally:
        (studio.folders.loras / "comma,name.safetensors").unlink()
    with pytest.raises(Refused, match="'..' leaves the LoRA folder"):
        studio.merge("../secret:1", "m2", "single")


def test_gallery_lists_newest_first_and_searches_parameters(studio):
    studio.generate("a blue circle", steps=1, seed=9)
    rows = studio.gallery()
    assert rows[0][1].startswith("a blue circle")
    assert all("blue circle" in t for _, t in studio.gallery("BLUE CIRCLE"))
    assert studio.gallery("no such prompt anywhere") == []
    studio.generate("a blue circle", steps=1, seed=10)
    rows, say = studio.gallery_view("blue circle", shown=1)  # more than it shows: said
    assert len(rows) == 1 and say == "1 image(s) (the newest; more match: search to narrow them down)"
    assert studio.gallery_view("blue circle", shown=2)[1] == "2 image(s)"


def test_dataset_uploads_say_what_they_got(studio, tmp_path):
    """Images and captions into out/datasets/NAME: a file the browser sends twice counts once, a caption with no
    image is named as unused."""
    up = tmp_path / "up"
    up.mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (8, 8)).save(up / f"{stem}.png")
        (up / f"{stem}.txt").write_text("a red star")
    (up / "orphan.txt").write_text("a blue circle")
    files = [str(p) for p in sorted(up.iterdir())]
    name, said = studio.add_dataset_files("uploaded", files + files)
    assert name == "uploaded" and said == "2 image(s) and 3 caption(s) added to dataset uploaded; no image for " \
                                          "orphan.txt (not used)"
    assert sorted(p.name for p in (studio.folders.out / "datasets" / "uploaded").iterdir()) == sorted(
        p.name for p in up.iterdir())
    # a phone's or a browser's names, and every image kind training reads: kept under plain names that pair
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("RGB", (8, 8), "red").save(odd / "my pic (1).png")
    (odd / "my pic (1).txt").write_text("a red square")
    Image.new("RGB", (8, 8), "blue").save(odd / "scan.bmp")
    Image.new("RGB", (8, 8), "green").save(odd / "été.gif")
    name, said = studio.add_dataset_files("odd", [str(p) for p in sorted(odd.iterdir())])
    assert said == ("3 image(s) and 1 caption(s) added to dataset odd; saved my pic (1).png as my_pic_1.png, "
                    "my pic (1).txt as my_pic_1.txt, été.gif as ete.gif (plain names)")
    kept = studio.folders.out / "datasets" / "odd"
    assert sorted(p.name for p in kept.iterdir()) == ["ete.gif", "my_pic_1.png", "my_pic_1.txt", "scan.bmp"]
    assert Image.open(kept / "scan.bmp").getpixel((0, 0)) == (0, 0, 255)
    found = scan_folder(kept, require_captions=False)  # training reads them all, the caption paired
    assert sorted((e.path.name, e.caption) for e in found.examples) == [
        ("ete.gif", None), ("my_pic_1.png", "a red square"), ("scan.bmp", None)] and not found.skipped
    (odd / "my_pic_1.png").write_bytes((odd / "my pic (1).png").read_bytes())  # two uploads, one plain name
    with pytest.raises(Refused, match=r"^my pic \(1\)\.png and my_pic_1\.png would both be saved as my_pic_1\.png; "
                                      r"rename one$"):
        studio.add_dataset_files("odd2", [str(odd / "my pic (1).png"), str(odd / "my_pic_1.png")])


def test_training_jobs_need_a_dataset_inside_the_output_folder(studio):
    with pytest.raises(Refused, match="'..' leaves the output folder"):
        studio.submit("lora", "", "../../etc", {})
    with pytest.raises(Refused, match="absolute paths are not allowed"):
        studio.submit("lora", "", "/etc", {})
    with pytest.raises(SdtuneError, match="no training data"):
        studio.submit("lora", "", "", {})
    with pytest.raises(Refused, match="job name"):
        studio.submit("lora", "../x", "stars", {})
    for held_out in ("images", "held-out"):
        (studio.folders.out / "datasets" / held_out).mkdir(parents=True)
    for kind, setting in (("lora", "validation_dir"), ("lora", "reg_dir"), ("lora", "network_weights"),
                          ("ti", "init_embedding")):  # the form's other folders and files, as the queue file's
        with pytest.raises(Refused, match="absolute paths are not allowed"):
            studio.submit(kind, "", "images", {setting: "/etc"})
        with pytest.raises(Refused, match="'..' leaves the output folder"):
            studio.submit(kind, "", "images", {setting: "../../x"})
    # a size the model cannot train at is refused at Start, not by the queued job (the tiny models: steps of 16)
    queued = len(studio.jobs.list())
    for kind, extra in (("lora", {}), ("ti", {"token": "<zq>", "init_token": "star"})):
        with pytest.raises(SdtuneError, match="^resolution 70: must be a multiple of 16 for this model, e.g. 64$"):
            studio.submit(kind, "", "images", {"resolution": 70, **extra})
    assert len(studio.jobs.list()) == queued
    job = studio.submit("lora", "with-val", "images", {"validation_dir": "datasets/held-out", "steps": 1})
    studio.jobs.stop(job.name)
    table = tomllib.loads((Path(job.folder) / jobs_mod.CONFIG_FILE).read_text())
    assert table["validation_dir"] == str((studio.folders.out / "datasets" / "held-out").resolve())


def test_generation_reports_its_steps_and_stops_when_cancelled(studio):
    seen = []
    assert studio.cancel() is False  # nothing to cancel: the next generation is not cancelled in advance
    rows, _ = studio.generate("a blue circle", steps=3, seed=1, count=2, on_step=lambda d, t: seen.append((d, t)))
    assert len(rows) == 2 and seen == [(1, 3), (2, 3), (3, 3)]  # two images are one batch of 3 steps
    before = sorted((studio.folders.out / "generate").iterdir())

    def press_cancel(done, total):
        seen.append(done)
        assert studio.cancel()  # as the Cancel button does, from another request, while the model is in use

    seen.clear()
    with pytest.raises(SdtuneError, match="generation cancelled at step 2 of 4; nothing was saved"):
        studio.generate("a blue circle", steps=4, seed=1, on_step=press_cancel)
    assert seen == [1] and sorted((studio.folders.out / "generate").iterdir()) == before
    rows, _ = studio.generate("a blue circle", steps=1, seed=1)  # the next one runs: the model is free again
    assert len(rows) == 1
    # cancelled in the second of two batches of 4: the first batch's images are kept and shown, as A1111's
    # Interrupt keeps them (and as the command line's Ctrl-C does)
    before = set((studio.folders.out / "generate").iterdir())
    rows, notes = studio.generate("a blue circle", steps=3, seed=1, count=8,
                                  on_step=lambda d, t: d == 4 and studio.cancel())
    assert [read_infotext(p) for p, _ in rows] == [text for _, text in rows] and len(rows) == 4
    assert notes[-1] == "generation cancelled at step 5 of 6; the 4 image(s) finished before it are kept"
    new = set((studio.folders.out / "generate").iterdir()) - before
    assert len(new) == 5 and {p for p, _ in rows} < new and any(p.name.startswith("grid-") for p in new)


def test_the_status_line_names_the_pages_fields_not_the_command_lines_flags(studio):
    """The page has no --seed or --x: an API refusal is said with the labels of the fields it is about."""
    generate = app_mod._handler(1)(lambda: studio.generate("a red star", seed=-5, steps=1))
    assert generate().startswith("⚠️ Seed -5: must be from -1 (random) to ")
    compare = app_mod._handler(1)(lambda: studio.compare("a red star", x="seed=1,2", y="seed=3,4", steps=1))
    assert compare().startswith("⚠️ X and Y axes both set seed")


def test_cancel_stops_only_what_its_page_started(studio):
    """A page's Cancel stops its own tab's generation (or grid), not another tab's or another user's."""
    said = []

    def others_press_cancel(done, total):
        said.append((studio.cancel(("generation", "tab-b")), studio.cancel(("grid", "tab-a"))))

    rows, _ = studio.generate("a blue circle", steps=2, seed=1, on_step=others_press_cancel,
                              owner=("generation", "tab-a"))
    assert len(rows) == 1 and said == [(False, False), (False, False)]
    with pytest.raises(SdtuneError, match="generation cancelled at step 2 of 2"):
        studio.generate("a blue circle", steps=2, seed=1, owner=("generation", "tab-a"),
                        on_step=lambda d, t: studio.cancel(("generation", "tab-a")))


def test_the_train_form_shows_a_model_files_preset_before_it_loads(tmp_path):
    from sdtune.ui.studio import Studio

    models = tmp_path / "models"
    models.mkdir()
    # an SD 2.x checkpoint as far as its header tells: the form reads the header, not the weights
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, 1024)},
              str(models / "sd2.safetensors"))
    torch.save({"state_dict": {}}, models / "old.ckpt")
    s = Studio(Folders.make(tmp_path / "out", model="tiny-random", models=models), model="tiny-random")
    try:
        s.set_model("sd2.safetensors")
        shown = s.form_values("lora")
        assert shown == trainform.preset_values("lora", "sd2") and shown["preset"] == "sd2"
        assert s._base is None  # nothing was loaded
        s.set_model("old.ckpt")  # a pickle tells its family only once loaded: the plain defaults until then
        assert s.form_values("lora") == trainform.preset_values("lora", None)
    finally:
        s.jobs.shutdown()


def test_a_vae_given_to_the_ui_decodes_every_image_and_is_named(tmp_path):
    from sdtune.lora.hashes import file_sha256
    from sdtune.ui.studio import Studio

    own = load_base("tiny-random", device="cpu").vae.state_dict()
    vae = tmp_path / "brighter.safetensors"
    save_file({k: (v * 1.02).contiguous() for k, v in own.items()}, str(vae))
    s = Studio(Folders.make(tmp_path / "out", model="tiny-random"), model="tiny-random", vae=str(vae))
    try:
        (path, _), = s.generate("a red star", steps=1, seed=3)[0]
        params = parse_infotext(read_infotext(path))
        assert (params["VAE"], params["VAE hash"]) == ("brighter.safetensors", file_sha256(vae)[:10])
        assert s.settings_of(path, uploaded=False)["not_applied"] == []  # the page's VAE made it
        plain = Studio(Folders.make(tmp_path / "out"), model="tiny-random")
        try:  # a page decoding with the model's own VAE says it does not use the image's
            assert plain.settings_of(path, uploaded=False)["not_applied"] == [
                "VAE brighter.safetensors (the page's is the model's own)"]
        finally:
            plain.jobs.shutdown()
        with s.model_in_use() as (base, _):
            assert all(torch.equal(v, own[k] * 1.02) for k, v in base.vae.state_dict().items())
    finally:
        s.jobs.shutdown()


def test_the_base_model_switches_only_to_models_offered(tmp_path):
    from sdtune.ui.studio import Studio

    models = tmp_path / "models"
    (models / "sd" / "unet").mkdir(parents=True)
    (models / "sd" / "model_index.json").write_text("{}")
    (models / "sd" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")  # part of the folder
    (models / "style.safetensors").write_bytes(b"x")
    (models / ".hidden.safetensors").write_bytes(b"x")
    (models / "notes.txt").write_text("x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (models / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    folders = Folders.make(tmp_path / "out", model="tiny-random", models=models)
    s = Studio(folders, model="tiny-random")
    try:
        assert s.model_choices() == ["tiny", "tiny-xl", "tiny-random", "sd", "style.safetensors"]
        merged = folders.out / "merged"  # what the page's Merge writes: offered too, under its own prefix
        (merged / "m" / "unet").mkdir(parents=True)
        (merged / "m" / "model_index.json").write_text("{}")
        (merged / "one.safetensors").write_bytes(b"x")
        assert s.model_choices()[-2:] == ["merged: m", "merged: one.safetensors"]
        assert s.set_model("merged: one.safetensors") == str(merged / "one.safetensors")
        assert s.model_choice() == "merged: one.safetensors"
        with pytest.raises(Refused, match="'..' leaves the output folder"):
            s.set_model("merged: ../x.safetensors")
        s._base = object()  # a loaded model: switching drops it, the next request loads the new one
        assert s.set_model("style.safetensors") == str(models / "style.safetensors") == s.model
        assert s._base is None
        assert s.model_choice() == "style.safetensors"  # what the menu shows after a reload
        assert s.set_model("sd") == str(models / "sd") and s.model_choice() == "sd"
        for bad, says in [("../outside.safetensors", "'..' leaves the model folder"),
                          ("/etc/passwd", "absolute paths are not allowed"),
                          ("link.safetensors", "leads outside the model folder"),
                          ("notes.txt", "not a model in the model folder"),
                          ("nothere.safetensors", "no such file in the model folder"),
                          ("sdxl-random", "no such file in the model folder")]:  # built in, but not offered
            with pytest.raises(Refused, match=re.escape(says)):
                s.set_model(bad)
        assert s.model == str(models / "sd")  # a refusal changes nothing
        assert s.set_model("tiny") == "tiny" and s.model_choice() == "tiny"
    finally:
        s.jobs.shutdown()
    plain = Studio(Folders.make(tmp_path / "out2"), model="tiny-random")
    try:
        assert plain.model_choices() == ["tiny", "tiny-xl", "tiny-random"]  # tiny-random: the page's --model
        with pytest.raises(Refused, match="start the UI with --model-dir DIR"):
            plain.set_model("style.safetensors")
    finally:
        plain.jobs.shutdown()
    shipped = Studio(Folders.make(tmp_path / "out3"), model="tiny")
    try:
        assert shipped.model_choices() == ["tiny", "tiny-xl"]  # tiny-random only for a page started with it
    finally:
        shipped.jobs.shutdown()


def _finished_job(root: Path, name: str, lr: float, val: float) -> Path:
    folder = root / name
    (folder / "samples").mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"name": name, "kind": "lora", "folder": str(folder),
                                                 "state": "done", "submitted": int(name[-1])}))
    (folder / "job.toml").write_text(f'data = "d"\nout = "{folder}"\nlr = {lr}\nrank = 4\n')
    (folder / "loss.csv").write_text(f"step,loss,lr,val_loss\n0,,,0.5\n2,0.4,{lr},{val}\n")
    save_png(Image.new("RGB", (8, 8)), folder / "samples" / "step-000002.png")
    (folder / "report.html").write_text("<html><head></head><body><img src=\"samples/step-000002.png\"></body></html>")
    return folder


def test_reports_are_embedded_with_links_only_into_the_output_folder(tmp_path):
    from sdtune.ui.studio import Studio

    folders = Folders.make(tmp_path / "out")
    a = _finished_job(folders.out / "train", "lora-001", 1e-3, 0.25)
    _finished_job(folders.out / "train", "lora-002", 5e-4, 0.125)
    (tmp_path / "secret.png").write_bytes(b"x")
    (a / "link.png").symlink_to(tmp_path / "secret.png")
    (a / "report.html").write_text('<html><head></head><body><img src="loss%20curve.png"><img src="link.png">'
                                   '<a href="../../../secret.png">x</a><a href="/etc/passwd">y</a>'
                                   '<a href="https://example.com/">z</a><img src="samples/step-000002.png">'
                                   '</body></html>')
    (a / "loss curve.png").write_bytes(b"x")
    s = Studio(folders, model="tiny-random")
    try:
        assert s.report("lora-001") == a / "report.html"
        frame = s.embed_page(s.report("lora-001"))
        assert frame.startswith("<iframe ") and 'sandbox="allow-same-origin allow-popups"' in frame
        inner = html.unescape(re.search(r'srcdoc="([^"]*)"', frame).group(1))
        links = re.findall(r'(?:src|href)="([^"]*)"', inner)
        route = "gradio_api/file="
        assert links == [route + urllib.parse.quote(str((a / "loss curve.png").resolve())), "#", "#", "#", "#",
                         route + urllib.parse.quote(str((a / "samples" / "step-000002.png").resolve()))]
        assert '<base target="_blank">' in inner
        (tmp_path / "elsewhere.html").write_text("<html></html>")
        with pytest.raises(Refused, match="leads outside the output folder"):
            s.embed_page(tmp_path / "elsewhere.html")

        page = s.compare_jobs()  # the jobs side by side, on the page `sdtune train queue` writes
        assert page == folders.out / "train" / "queue.html"
        text = page.read_text()
        assert re.search(r"<th>lr</th>\s*<td>0.001</td>\s*<td>0.0005</td>", text)
        assert "0.250000 (step 2)" in text and "0.125000 (step 2)" in text and "<th>rank</th>" not in text
        assert 'href="lora-002/report.html"' in text and 'src="lora-001/samples/step-000002.png"' in text
    finally:
        s.jobs.shutdown()


def test_the_ui_command_refuses_bad_options_in_one_line(tmp_path, capsys):
    from sdtune import cli

    assert cli.main(["ui", "--auth", "nopassword", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "sdtune: error: --auth: write USER:PASS, e.g. --auth me:a-long-password\n"
    assert cli.main(["ui", "--port", "70000", "--out", str(tmp_path / "o")]) == 2
    assert "--port 70000: use a port between 1 and 65535" in capsys.readouterr().err
    assert cli.main(["ui", "--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--model-dir " + str(tmp_path / "nope") + ": no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was made


QUEUE_FILE = """
out = "/tmp/elsewhere"            # replaced: the UI puts a queue in out/train/NAME

[defaults]
data = "datasets/stars"           # a name in the output folder
steps = 2
report = false

[[job]]
kind = "lora"
rank = 2
sweep = {lr = [1e-3, 5e-4]}
"""


def test_a_queue_file_runs_as_a_job_with_its_page(studio, tmp_path):
    from sdtune.tiny import world

    world.write_dataset(studio.folders.out / "datasets" / "stars", world.concept_scenes(2, seed=3, shape="star"))
    upload = _write(tmp_path / "two.toml", QUEUE_FILE)
    job = studio.submit_queue(str(upload), uploaded=True, name="sweep")
    assert (job.kind, Path(job.folder)) == ("queue", studio.folders.out / "train" / "sweep")
    table = tomllib.loads((Path(job.folder) / jobs_mod.CONFIG_FILE).read_text())
    assert "out" not in table and table["defaults"]["model"] == "tiny-random"
    assert table["defaults"]["data"] == str((studio.folders.out / "datasets" / "stars").resolve())
    assert table["job"] == [{"kind": "lora", "rank": 2, "sweep": {"lr": [1e-3, 5e-4]}}]
    # about 20 s on idle cores; the limit only bounds a hang, and shared cores made it pass 180 s once
    _wait(lambda: job.state not in ("queued", "running"), 600)
    view = studio.job_view("sweep")
    assert job.state == "done", view["log_tail"]
    assert view["run"] == (2, 2, "lora-1-lr-0.0005") and (view["step"], view["total"]) == (2, 2)
    assert view["report"] == Path(job.folder) / "queue.html" == studio.report("sweep")
    page = view["report"].read_text()
    assert re.search(r"<th>lr</th>\s*<td>0.001</td>\s*<td>0.0005</td>", page)
    for run in ("lora-1-lr-0.001", "lora-1-lr-0.0005"):
        assert (Path(job.folder) / run / "lora.safetensors").is_file()
    assert "iframe" in studio.embed_page(view["report"])
    with pytest.raises(SdtuneError, match="is a queue: its runs' results are in their folders"):
        studio.use_result("sweep")
    # a queue file already in the output folder, by its name there
    shutil.copyfile(upload, studio.folders.out / "again.toml")
    assert studio.submit_queue("again.toml", uploaded=False).name == "queue-001"
    studio.jobs.stop("queue-001")


@pytest.mark.parametrize("text, says", [
    ("[[job]]\nkind = 'lora'\nrnak = 2\n", "bad.toml: job 1: unknown key 'rnak'; did you mean 'rank'?"),
    ("[[job]]\nkind = 'lora'\ndata = '../../etc'\n",
     "bad.toml: job 1: data: ../../etc: refused: '..' leaves the output folder"),
    ("[defaults]\nreg_dir = '/tmp'\n[[job]]\nkind = 'lora'\n",
     "bad.toml: [defaults]: reg_dir: /tmp: refused: absolute paths are not allowed"),
    ("[[job]]\nkind = 'lora'\ndata = 'datasets/stars'\nsweep = {model = ['tiny', '/x/sd.safetensors']}\n",
     "bad.toml: job 1: model: /x/sd.safetensors: no model folder; start the UI with --model-dir DIR"),
    ("[[job]]\nkind = 'lora'\ndata = 'nothere'\n", "bad.toml: job lora-1: data = '"),
    ("[[job\nkind = 'lora'\n", "bad.toml: not valid TOML"),
])
def test_a_bad_queue_file_is_refused_in_one_line(studio, tmp_path, text, says):
    before = set(studio.jobs.jobs)
    with pytest.raises(SdtuneError, match=re.escape(says)) as e:
        studio.submit_queue(str(_write(tmp_path / "bad.toml", text)), uploaded=True)
    assert "\n" not in str(e.value) and set(studio.jobs.jobs) == before


def test_a_queue_file_is_checked_like_any_upload(studio, tmp_path):
    with pytest.raises(Refused, match=r"jobs.txt: not a \.toml queue file"):
        studio.submit_queue(str(_write(tmp_path / "jobs.txt", "[[job]]\n")), uploaded=True)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00" * 10)
    with pytest.raises(Refused, match="binary.toml: its contents are not a .toml queue file"):
        studio.submit_queue(str(binary), uploaded=True)
    with pytest.raises(Refused, match="over the upload limit of 1 MB"):
        studio.submit_queue(str(_write(tmp_path / "big.toml", "#" * (2 * MB))), uploaded=True)
    for name, says in (("../two.toml", "'..' leaves the output folder"), ("/etc/passwd", "absolute paths"),
                       ("nothere.toml", "no such file in the output folder")):
        with pytest.raises(Refused, match=re.escape(says)):
            studio.submit_queue(name, uploaded=False)
