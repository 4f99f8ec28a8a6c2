"""What a run shows: the validation loss (held out, deterministic, comparable), loss.csv, TensorBoard events,
loss.png, sample grids, report.html and best.safetensors; resumed runs keep one consistent log."""

import json
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdtune.generate import parse_infotext
from sdtune.models import load_base
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import load_embedding
from sdtune.tiny import world
from sdtune.train import logs, report, validation
from sdtune.train.config import LoraSettings, TISettings, load_settings
from sdtune.train.loop import Record
from sdtune.train.lora import train_lora
from sdtune.train.scan import Scan, first_prompts, scan_folder, split_validation
from sdtune.train.ti import train_ti


def settings(dataset, out, **kw):
    """A short run with two saves, samples at each, and a fifth of the images held out."""
    return LoraSettings(**{**dict(data=str(dataset), out=str(out), steps=4, batch_size=2, rank=4, alpha=4, lr=5e-3,
                                  save_every=2, sample_every=2, sample_images=1, sample_steps=2, validation_split=0.2,
                                  progress=False), **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """10 outline renders captioned without the style word."""
    scenes = world.concept_scenes(10, seed=7, style="outline")
    return world.write_dataset(tmp_path_factory.mktemp("data"), scenes, template=None, with_style=False)


@pytest.fixture(scope="module")
def lora_run(base, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_lora(base, settings(dataset, out))
    return out


def csv_rows(out: Path) -> list[str]:
    return (out / logs.CSV_FILE).read_text().splitlines()


# ---------------------------------------------------------------- validation

def test_validation_split_holds_out_the_same_images_whatever_the_order(dataset):
    scan = scan_folder(dataset)
    train, held = split_validation(scan, 0.2, dataset)
    assert len(held.examples) == 2 and len(train.examples) == 8
    assert not {e.path for e in held.examples} & {e.path for e in train.examples}
    assert train.folders == {".": {"n_repeats": 1, "img_count": 8}}
    random.Random(1).shuffle(scan.examples)
    assert {e.path for e in split_validation(scan, 0.2, dataset)[1].examples} == {e.path for e in held.examples}
    assert len(split_validation(scan, 0.01, dataset)[1].examples) == 1  # at least one
    with pytest.raises(SdtuneError, match=r"--validation-split 0.95 holds out all 10 image\(s\)"):
        split_validation(scan, 0.95, dataset)
    with pytest.raises(SdtuneError, match=r"^the tiny preset's --validation-split 0.1 holds out all 1 image\(s\) of "
                                          r".*give --validation-split 0"):
        validation.split(load_settings(None, {"data": str(dataset)}, "lora", family="tiny"), Scan(scan.examples[:1]),
                         require_captions=True)
    with pytest.raises(SdtuneError, match=r"--validation-split 1.0: must be in \[0, 1\)"):
        settings(dataset, "o", validation_split=1.0).check()


def test_held_out_images_are_not_trained_on(lora_run):
    with safe_open(str(lora_run / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_dataset_dirs"]) == {".": {"n_repeats": 1, "img_count": 8}}  # the held-out 2 not counted


def test_validation_loss_is_deterministic_and_comparable(base, dataset, lora_run, tmp_path, capsys):
    capsys.readouterr()
    train_lora(base, settings(dataset, tmp_path / "again"))
    printed = [ln for ln in capsys.readouterr().err.splitlines() if "validation loss" in ln]
    first = [r for r in csv_rows(lora_run)]
    assert csv_rows(tmp_path / "again") == first  # every digit of every loss, lr and validation loss
    val = {int(r.split(",")[0]): r.split(",")[3] for r in first[1:] if r.split(",")[3]}
    assert sorted(val) == [0, 2, 4]  # step 0, each save, the end
    assert printed == [f"step {s}: validation loss {float(v):.8f}" for s, v in val.items()]
    # another seed and Min-SNR weighting change training, not the yardstick: step 0 (the base) reads the same
    train_lora(base, settings(dataset, tmp_path / "other", seed=1, min_snr_gamma=5.0))
    other = {int(r.split(",")[0]): r.split(",")[3] for r in csv_rows(tmp_path / "other")[1:] if r.split(",")[3]}
    assert other[0] == val[0] and other[4] != val[4]


def test_without_held_out_images_training_images_stand_in(base, dataset, tmp_path, capsys):
    train_lora(base, settings(dataset, tmp_path, validation_split=0.0, steps=2, sample_every=0))
    assert "validation on 8 training image(s): nothing was held out" in capsys.readouterr().err
    assert (tmp_path / logs.CSV_FILE).read_text().splitlines()[1].startswith("0,,,")  # still a number at step 0


def test_a_validation_folder(base, dataset, tmp_path, capsys):
    held = world.write_dataset(tmp_path / "held", world.concept_scenes(3, seed=9, style="outline"), template=None,
                               with_style=False)
    train_lora(base, settings(dataset, tmp_path / "out", validation_split=0.0, validation_dir=str(held), steps=2,
                              sample_every=0))
    assert "validation on 3 held-out image(s)" in capsys.readouterr().err
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "10"  # all of --data trains
    # --data itself (or a folder of it, which --data reads too) holds no held-out images: refused, not called so
    with pytest.raises(SdtuneError, match=rf"^--validation-dir {dataset}: 10 of its 10 image\(s\) are training "
                                          rf"images too \(.*\.png, read from --data\); held-out images must be kept "
                                          rf"apart: give a folder outside --data, or --validation-split"):
        train_lora(base, settings(dataset, tmp_path / "same", validation_split=0.0, validation_dir=str(dataset),
                                  steps=2, sample_every=0))


# ---------------------------------------------------------------- logs

def test_loss_csv_tensorboard_and_plot(lora_run):
    rows = [r.split(",") for r in csv_rows(lora_run)]
    assert rows[0] == ["step", "loss", "lr", "val_loss"]
    assert [int(r[0]) for r in rows[1:]] == [0, 1, 2, 3, 4]
    assert rows[1][1:3] == ["", ""] and all(float(r[1]) > 0 and float(r[2]) == 5e-3 for r in rows[2:])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(lora_run / logs.TENSORBOARD_DIR))
    events.Reload()
    train = events.Scalars("loss/train")
    assert [e.step for e in train] == [1, 2, 3, 4]
    assert [e.value for e in train] == pytest.approx([float(r[1]) for r in rows[2:]], rel=1e-6)
    assert [e.step for e in events.Scalars("loss/validation")] == [0, 2, 4]
    # the sample grids in TensorBoard's images, as written to samples/
    grids = events.Images("samples")
    assert [e.step for e in grids] == [0, 2, 4]
    with Image.open(lora_run / "samples" / "step-000004.png") as im:
        assert (grids[-1].width, grids[-1].height) == im.size
    with Image.open(lora_run / logs.PLOT_FILE) as im:
        assert im.format == "PNG" and im.size == (800, 550)


def test_each_optimizer_groups_learning_rate_is_logged(base, dataset, tmp_path):
    """With the text encoder trained at its own rate, TensorBoard has each group's (as kohya logs lr/unet and
    lr/textencoder); the CSV keeps the UNet's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "te"
    train_lora(base, settings(dataset, out, steps=2, text_encoder=True, te_lr=1e-4, validation_split=0.0,
                              sample_every=0, report=False))
    events = EventAccumulator(str(out / logs.TENSORBOARD_DIR))
    events.Reload()
    assert [e.value for e in events.Scalars("lr/unet")] == pytest.approx([5e-3, 5e-3])
    assert [e.value for e in events.Scalars("lr/text_encoder")] == pytest.approx([1e-4, 1e-4])
    assert [float(r.split(",")[2]) for r in csv_rows(out)[2:]] == pytest.approx([5e-3, 5e-3])


def test_smoothing_is_a_debiased_moving_average():
    assert logs.smooth([2.0, 2.0, 2.0], 10) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    assert logs.smooth([0.0, 1.0], 1) == [0.0, 1.0]  # window 1: the values themselves
    smoothed = logs.smooth([0.0] * 50 + [1.0] * 50, 10)
    assert 0 < smoothed[55] < 1 and smoothed[-1] == pytest.approx(1.0, abs=0.01)


def test_a_resumed_run_keeps_one_log(base, dataset, lora_run, tmp_path):
    class Stop(Exception):
        pass

    def stop(step, loss):
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        train_lora(base, settings(dataset, tmp_path), callback=stop)
    assert [r.split(",")[0] for r in csv_rows(tmp_path)[1:]] == ["0", "1", "2", "3"]  # up to the stop
    train_lora(base, settings(dataset, tmp_path))
    assert csv_rows(tmp_path) == csv_rows(lora_run)  # resumed from the save at 2: as if it had never stopped
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / logs.TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2, 3, 4]  # step 3 of the cut run purged
    # the report knows the checkpoint saved before the stop
    page = (tmp_path / report.REPORT_FILE).read_text()
    assert '<a href="lora-step000002.safetensors">' in page and "4 steps, resumed sessions included" in page
    assert "Not exactly" not in page  # resumed with the same --steps: its settings rerun it


def test_samples_start_at_the_base_and_use_the_first_captions(lora_run, dataset):
    assert sorted(p.name for p in (lora_run / "samples").iterdir()) == [
        "step-000000.png", "step-000002.png", "step-000004.png"]
    prompts = first_prompts(ex.caption for ex in split_validation(scan_folder(dataset), 0.2, dataset)[0].examples)
    with Image.open(lora_run / "samples" / "step-000002.png") as sample:
        assert len(prompts) == 4 and sample.size == (64, 4 * 64)  # the first 4 captions x one image
        params = parse_infotext(sample.info["parameters"])
    # the first image's parameters, as A1111's grids carry them (all prompts joined was a prompt nobody typed),
    # and the run and step: the adapter in training is in no tag
    assert params["prompt"] == prompts[0] and params["Seed"] == "0"
    assert params["Training sample"] == f"{lora_run.name} step-000002"
    assert first_prompts(["", "a", "b", "a"]) == ["a", "b"] and first_prompts(["", ""]) == [""]


# ---------------------------------------------------------------- report

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src")]


def test_report_shows_the_run_and_names_the_best_checkpoint(lora_run):
    page = (lora_run / report.REPORT_FILE).read_text()
    parser = _Links()
    parser.feed(page)
    for link in parser.links:  # opens from the disk: every link is relative and there
        assert not re.match(r"^[a-z]+:|^/", link) and (lora_run / link).exists(), link
    for needed in ("loss.png", "loss.csv", "settings.toml", report.BEST_FILE, report.GRID_FILE,
                   "samples/step-000000.png", "samples/step-000002.png", "samples/step-000004.png",
                   "lora-step000002.safetensors", "lora.safetensors"):
        assert needed in parser.links, needed
    val = {int(r.split(",")[0]): float(r.split(",")[3]) for r in csv_rows(lora_run)[1:] if r.split(",")[3]}
    best_step = min((2, 4), key=lambda s: (val[s], s))
    best_file = "lora.safetensors" if best_step == 4 else "lora-step000002.safetensors"
    assert f"Recommended checkpoint: <span class=\"best\">step {best_step}</span>, <code>{best_file}</code>" in page
    assert (lora_run / report.BEST_FILE).read_bytes() == (lora_run / best_file).read_bytes()
    assert "rank = 4" in page and "sdtune train lora --config" in page  # the settings, and how to rerun them
    assert re.search(r"peak memory</th><td class=\"num\">\d+\.\d\d GB RAM", page)
    with Image.open(lora_run / report.GRID_FILE) as grid:  # 2 checkpoints x 4 strengths, 128-px cells
        assert grid.width > 4 * report.GRID_CELL and 2 * report.GRID_CELL < grid.height < 3 * report.GRID_CELL


def test_best_checkpoint_and_verdict(tmp_path):
    ckpts = [(2, tmp_path / "a-2.safetensors"), (4, tmp_path / "a.safetensors")]
    learned = Record([], ckpts, {0: 1.0, 2: 0.5, 4: 0.7}, "", 1.0, {}, True)
    assert report.best_checkpoint(learned) == ckpts[0]
    text = report._verdict(learned, ckpts[0], tmp_path)
    assert "step 2" in text and "50.0% below the base model's 1.000000" in text and "over-fitting" in text
    tie = Record([], ckpts, {0: 1.0, 2: 0.5, 4: 0.5}, "", 1.0, {}, True)
    assert report.best_checkpoint(tie) == ckpts[0]  # the earlier of equals
    flat = Record([], ckpts, {0: 1.0, 2: 1.2, 4: 1.1}, "", 1.0, {}, True)
    assert "never fell below the base model's" in report._verdict(flat, report.best_checkpoint(flat), tmp_path)


def test_the_grid_draws_at_most_six_checkpoints_the_last_and_the_best_among_them(tmp_path):
    ckpts = [(s, tmp_path / f"a-{s}.safetensors") for s in range(100, 1300, 100)]  # 12 saves
    losses = {s: 1.0 for s, _ in ckpts} | {500: 0.5}
    shown = [s for s, _ in report.grid_checkpoints(Record([], ckpts, losses, "", 1.0, {}, True))]
    assert shown == [100, 400, 500, 700, 900, 1200]  # evenly spaced (100 ... 1200), and the best
    assert [s for s, _ in report.grid_checkpoints(Record([], ckpts, {}, "", 1.0, {}, True))] == [
        100, 400, 700, 900, 1200]
    assert report.grid_checkpoints(Record([], ckpts[:6], losses, "", 1.0, {}, True)) == ckpts[:6]


def test_ti_report_grid_and_the_token_keeps_its_final_vectors(tmp_path):
    base = load_base("tiny-random")
    data = world.write_dataset(tmp_path / "d", world.concept_scenes(4, seed=2, shape="star"))
    for caption in data.glob("*.txt"):
        caption.unlink()
    s = TISettings(data=str(data), out=str(tmp_path / "o"), token="<st>", init_token="star", steps=4, batch_size=2,
                   lr=5e-2, save_every=2, sample_images=1, sample_steps=2, progress=False)
    path = train_ti(base, s)
    learned = load_embedding(path).vectors
    assert torch.equal(base.embeddings.get("<st>").vectors, learned)  # the grid put the final vectors back
    page = (tmp_path / "o" / report.REPORT_FILE).read_text()
    assert "Each checkpoint on the sample prompts" in page and "a photo of a &lt;st&gt;" in page
    with Image.open(tmp_path / "o" / report.GRID_FILE) as grid:  # base row + 2 checkpoints, 4 prompts
        assert grid.width > 4 * report.GRID_CELL and 3 * report.GRID_CELL < grid.height < 4 * report.GRID_CELL
    assert (tmp_path / "o" / report.BEST_FILE).is_file()
