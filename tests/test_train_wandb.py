"""--log-with wandb (kohya's --log_with, diffusers' --report_to): a run's losses and learning rates go to Weights &
Biases as to loss.csv, quietly; run offline here (WANDB_MODE=offline) and read back from the run's own file. Without
the package it is one line before anything loads; a kohya config's wandb keys read, its API key never kept."""

import json
import struct
import sys
import time

import pytest
from small_runs import Stop, outline_dataset, settings, stop_at

from sdtune.cli import main
from sdtune.safeio import SdtuneError
from sdtune.train import logs
from sdtune.train.config import load_settings
from sdtune.train.lora import train_lora
from sdtune.ui.trainform import to_toml

wandb = pytest.importorskip("wandb")
wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # the run file's records


def history(out):
    """(project, name, config, rows) of the offline W&B run in ``out``, read from its run file."""
    [path] = out.glob("wandb/offline-run-*/run-*.wandb")
    return read_run(path)


BLOCK, HEADER = 32768, 7  # the run file: LevelDB's log layout after a 7-byte header (":W&B", magic, version)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path) -> list[bytes]:
    """The records of an offline W&B run file, read as LevelDB's log format (blocks of 32 KiB; each record a
    header of crc32, length and kind, a long one in pieces), so that no wandb internals are needed."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pos, pieces = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pieces = chunk
        elif kind == MIDDLE:
            pieces += chunk
        elif kind == LAST:
            out.append(pieces + chunk)
    return out


def read_run(path):
    """(project, name, config, rows) of the offline W&B run file ``path``."""
    run, rows = None, []
    for data in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_") or k == "_step"})
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    return run.project, run.display_name, config, rows


def test_a_run_logs_to_wandb_what_loss_csv_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = outline_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(data), "--out", str(out), "--steps", "3",
                 "--batch-size", "2", "--rank", "4", "--no-report", "--no-progress", "--log-with", "wandb",
                 "--log-tracker-name", "shapes", "--wandb-run-name", "outline-1"]) == 0
    said = capsys.readouterr()
    assert not [line for line in (said.out + said.err).splitlines() if line.lower().startswith("wandb")]  # quiet
    assert not (out / logs.TENSORBOARD_DIR).exists()  # wandb alone
    project, name, config, rows = history(out)
    assert (project, name) == ("shapes", "outline-1")
    assert config["steps"] == 3 and config["rank"] == 4 and config["out"] == str(out)
    csv = logs.read_csv(out / logs.CSV_FILE)
    want = [{"_step": s} | ({"loss/train": r["loss"], "lr": r["lr"]} if r["loss"] is not None else {})
            | ({"loss/validation": r["val_loss"]} if r["val_loss"] is not None else {}) for s, r in sorted(csv.items())]
    # the sample grids as W&B images, at the steps samples/ has them (here the base's at 0 and the end's)
    assert [(row["_step"], row["samples/_type"], row["samples/caption"]) for row in rows if "samples/_type" in row] \
        == [(0, "image-file", "step-000000.png"), (3, "image-file", "step-000003.png")]
    rows = [{k: v for k, v in row.items() if not k.startswith("samples/")} for row in rows]
    assert [p.name for p in sorted((out / "samples").glob("*.png"))] == ["step-000000.png", "step-000003.png"]
    assert len(list(out.glob("wandb/offline-run-*/files/media/images/samples_*.png"))) == 2
    assert rows == want and len(rows) == 4  # step 0's validation, then steps 1-3 (to the last digit)


def test_all_logs_to_both_and_the_default_to_tensorboard_only(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = logs.TrainLog(tmp_path / "both", 0, log_with="all", wandb={"project": "p", "name": "n"})
    log.train(1, 0.5, 1e-3)
    log.close()
    assert (tmp_path / "both" / logs.TENSORBOARD_DIR).is_dir()
    assert history(tmp_path / "both")[3] == [{"_step": 1, "loss/train": 0.5, "lr": 1e-3}]
    log = logs.TrainLog(tmp_path / "tb", 0)
    log.close()
    assert (tmp_path / "tb" / logs.TENSORBOARD_DIR).is_dir() and not (tmp_path / "tb" / "wandb").exists()


def test_without_the_package_it_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it fails
    data = outline_dataset(tmp_path / "data")
    assert main(["train", "ti", "--model", "no/such-model", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--token", "<t>", "--init-token", "shape", "--log-with", "wandb"]) != 0
    err = capsys.readouterr().err.strip()
    assert err == ("sdtune: error: --log-with wandb needs Weights & Biases' package: pip install wandb (or log with "
                   "tensorboard)")


def test_a_kohya_config_logs_as_it_says_and_its_api_key_is_never_kept(tmp_path, recwarn, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tmp_path / "config_lora.toml"
    cfg.write_text('pretrained_model_name_or_path = "m"\nlog_with = "wandb"\nlog_tracker_name = "proj"\n'
                   'wandb_run_name = "first"\nwandb_api_key = "0123456789abcdef"\n')
    s = load_settings(cfg, {}, "lora", family="sd1")
    assert (s.log_with, s.log_tracker_name, s.wandb_run_name) == ("wandb", "proj", "first")
    assert "0123456789abcdef" not in to_toml(s)  # the settings go into settings.toml and every file trained
    assert any("wandb_api_key" in str(w.message) for w in recwarn)
    diffusers = tmp_path / "diffusers.toml"
    diffusers.write_text('report_to = "wandb"\n')  # diffusers' name: refused, naming sdtune's
    with pytest.raises(SdtuneError, match=r"'report_to' \(kohya's/diffusers' name; sdtune's is 'log_with'\)"):
        load_settings(diffusers, {}, "lora", family="sd1")


def test_a_resumed_run_logs_into_the_run_it_continues(base, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = outline_dataset(tmp_path / "data")
    with pytest.raises(Stop):  # killed at step 3, past the save of step 2
        train_lora(base, settings(data, tmp_path / "run", log_with="wandb"), callback=stop_at(3))
    time.sleep(1.1)  # (an offline run's folder is named by the second it starts)
    train_lora(base, settings(data, tmp_path / "run", log_with="wandb"))
    files = sorted((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name  # one W&B run (its id), logged in two sittings
    cut, resumed = (read_run(f)[3] for f in files)
    assert [r["_step"] for r in cut] == [0, 1, 2, 3] and [r["_step"] for r in resumed] == [3, 4]
    assert resumed[0] == cut[3]  # the step the kill cut short, logged again: the same numbers (resuming is exact)


def test_no_account_or_a_failing_start_is_one_line(tmp_path, monkeypatch, capsys):
    data = outline_dataset(tmp_path / "data")
    cmd = ["train", "ti", "--model", "tiny-random", "--data", str(data), "--out", str(tmp_path / "o"), "--token", "<t>",
           "--init-token", "shape", "--steps", "1", "--log-with", "wandb", "--no-progress"]
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.netrc login)
    assert main(cmd) != 0
    err = capsys.readouterr().err.strip()
    assert err == ("sdtune: error: --log-with wandb: Weights & Biases has no API key here; run wandb login (or set "
                   "WANDB_API_KEY), or WANDB_MODE=offline to keep the run in OUT/wandb (wandb sync uploads it later)")
    assert not (tmp_path / "o").exists()  # said before anything ran
    monkeypatch.setenv("WANDB_MODE", "offline")

    def refuse(**kwargs):
        raise wandb.errors.CommError("could not reach the server\ndetails")
    monkeypatch.setattr(wandb, "init", refuse)
    assert main(cmd) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sdtune: error: --log-with wandb: CommError: could not reach the server; run wandb login")
