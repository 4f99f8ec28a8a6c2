"""`sdtune train queue`: sweeps expand into runs, each run has its report, queue.html compares them, a killed
queue resumes (done runs skipped, the interrupted one from its last save), bad queue files say where."""

import json
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune import safeio
from sdtune.cli import main
from sdtune.safeio import SdtuneError
from sdtune.tiny import world
from sdtune.train import logs
from sdtune.train import queue as train_queue
from sdtune.train.config import load_settings, to_toml

SHORT = """
[defaults]
data = "{data}"
model = "tiny"
steps = 2
batch_size = 1
rank = 2
alpha = 2
targets = "attn"
save_every = 0
sample_every = 2
sample_prompts = ["an outline star"]
sample_images = 1
sample_steps = 1
sample_guidance = 1.0
validation_split = 0.2
validation_every = 0
progress = false
"""
NO_EXTRAS = "save_every = 1\nsample_every = 0\nreport = false\n"  # only the steps, for the resume test


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    scenes = world.concept_scenes(5, seed=3, style="outline")
    return world.write_dataset(tmp_path_factory.mktemp("data"), scenes, template=None, with_style=False)


def queue_file(folder: Path, dataset: Path, jobs: str) -> Path:
    path = folder / "jobs.toml"
    path.write_text(SHORT.format(data=dataset.as_posix()) + jobs)
    return path


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src")]


def test_a_sweep_writes_a_report_per_run_and_a_page_comparing_them(dataset, tmp_path, capsys):
    jobs = queue_file(tmp_path, dataset, '[[job]]\nname = "style"\nkind = "lora"\nsweep = {lr = [1e-3, 5e-3]}\n')
    assert main(["train", "queue", str(jobs)]) == 0
    out = tmp_path / "jobs"  # the file's name without .toml
    assert capsys.readouterr().out.strip() == str(out / "queue.html")
    names = ["style-lr-0.001", "style-lr-0.005"]
    for name in names:
        assert (out / name / "report.html").is_file() and (out / name / "lora.safetensors").is_file()
        assert tomllib.loads((out / name / "settings.toml").read_text())["lora"]["lr"] == float(name[-5:])
    state = json.loads((out / "queue.json").read_text())["runs"]
    assert [state[n]["state"] for n in names] == ["done", "done"]
    assert [state[n]["given"]["lr"] for n in names] == [1e-3, 5e-3]

    page = (out / "queue.html").read_text()
    parser = Links()
    parser.feed(page)
    for name in names:
        assert f"{name}/report.html" in parser.links
        assert f"{name}/samples/step-000002.png" in parser.links
    assert all((out / link).is_file() for link in parser.links if not link.startswith("http"))
    # the settings that differ are shown (lr), those that do not are not (rank)
    assert re.search(r"<th>lr</th>\s*<td>0.001</td>\s*<td>0.005</td>", page)
    assert "<th>rank</th>" not in page
    for name in names:  # the final validation loss is the run's own last one
        rows = logs.read_csv(out / name / logs.CSV_FILE)
        assert f"{rows[2]['val_loss']:.6f} (step 2)" in page
        info = train_queue.summarize(out / name)
        step, loss, path = info["best"]
        assert loss == min(r["val_loss"] for s, r in rows.items() if s and r["val_loss"] is not None)
        assert path.is_file() and f'{name}/{path.name}' in parser.links


def test_a_killed_queue_skips_done_runs_and_resumes_the_interrupted_one(dataset, tmp_path):
    jobs = queue_file(tmp_path, dataset, '[[job]]\nkind = "lora"\nsample_every = 0\nreport = false\n\n[[job]]\n'
                                         f'kind = "ti"\ntoken = "<q>"\ninit_token = "star"\nsteps = 3\n{NO_EXTRAS}')
    out = tmp_path / "q"
    seen = []

    def kill_in_run_2(run, step, loss):
        seen.append((run, step))
        if run == "ti-1" and step == 2:
            raise KeyboardInterrupt  # as Ctrl+C would, after step 2 and before its save

    with pytest.raises(KeyboardInterrupt):
        train_queue.run_queue(jobs, out, step_callback=kill_in_run_2)
    assert seen == [("lora-1", 1), ("lora-1", 2), ("ti-1", 1), ("ti-1", 2)]
    state = json.loads((out / "queue.json").read_text())["runs"]
    # (a kill -9 would leave "running"; a Ctrl-C or SIGTERM is said, on the page too)
    assert (state["lora-1"]["state"], state["ti-1"]["state"]) == ("done", "stopped")
    assert "<td>stopped: interrupted</td>" in (out / "queue.html").read_text()
    finished = (out / "lora-1" / "lora.safetensors").stat().st_mtime_ns

    seen.clear()
    ended = []
    page = train_queue.run_queue(jobs, out, step_callback=lambda r, s, v: seen.append((r, s)),
                                 run_callback=lambda r, s: ended.append((r, s)))
    assert seen == [("ti-1", 2), ("ti-1", 3)]  # from the save of step 1; run 1 not again
    assert ended == [("ti-1", "done")]
    assert (out / "lora-1" / "lora.safetensors").stat().st_mtime_ns == finished
    assert (out / "ti-1" / "learned_embeds.safetensors").is_file()
    assert "<td>done</td>\n<td>done</td>" in page.read_text()

    # a done run whose settings were changed since is not silently taken as done
    jobs.write_text(jobs.read_text().replace("steps = 2\n", "steps = 5\n", 1))
    with pytest.raises(Exception, match=r"job lora-1 finished with other settings \(steps changed\)"):
        train_queue.run_queue(jobs, out)


@pytest.mark.parametrize("text, says", [
    ('outt = "x"\n[[job]]\nkind = "lora"\n', r"top level: unknown key 'outt'; did you mean 'out'\?"),
    ('[[job]]\nkind = "lora"\nlearning_rate = 1e-3\n', r"job 1: unknown key 'learning_rate'"),
    ('[[job]]\nname = "a"\nkind = "lora"\nrnk = 4\n', r"job 1 \(a\): unknown key 'rnk'; did you mean 'rank'\?"),
    ('[[job]]\nkind = "lora"\nlearning_rate = 1e-4\n', r"job 1: unknown key 'learning_rate'; did you mean 'lr'\? "
                                                        r"\(kohya's/diffusers' name\)"),
    ('[[job]]\nkind = "lora"\nrank = "big"\n', r"job 1: rank = 'big' is not an integer; fix the value"),
    ('[[job]]\nkind = "ti"\ntoken = "<t>"\nsweep = {rank = [4]}\n', r"job 1: sweep: unknown key 'rank'"),
    ('[[job]]\nkind = "lora"\nsweep = {lr = 1e-3}\n', r"job 1: sweep must be a table of lists"),
    ('[[job]]\nkind = "lora"\nsweep = {lr = ["fast"]}\n', r"job 1: sweep: lr = 'fast' is not a number"),
    ('[[job]]\nkind = "dreambooth"\n', r"job 1: kind = 'dreambooth'; write kind = \"ti\" or kind = \"lora\""),
    ('[[job]]\nkind = "lora"\nout = "elsewhere"\n', r"job 1: out is set by the queue"),
    ('[[job]]\nkind = "lora"\n[[job]]\nkind = "lora"\nname = "lora-1"\n', r"two runs are named 'lora-1'"),
    ('[[job]]\nkind = "lora"\npreset = "sd9"\n', r"job lora-1: .*sd9"),
    ('[[job]]\nkind = "lora"\nrank = -4\n', r"job lora-1: rank -4: must be at least 1"),  # the key, not --rank
    ('[defaults]\nrnak = 2\n[[job]]\nkind = "lora"\n', r"\[defaults\]: unknown key 'rnak'; did you mean 'rank'\?"),
    ('', r"no jobs; add \[\[job\]\] tables"),
    ('[defaults]\nout = "x"\n[[job]]\nkind = "lora"\n', r"\[defaults\]: out is set by the queue"),
])
def test_a_bad_queue_file_names_the_file_and_the_key(dataset, tmp_path, capsys, text, says):
    path = tmp_path / "bad.toml"
    data = f'data = "{dataset.as_posix()}"\n'
    path.write_text(text.replace("[defaults]\n", "[defaults]\n" + data) if "[defaults]" in text else
                    text + "\n[defaults]\n" + data)
    assert main(["train", "queue", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(f"^sdtune: error: {re.escape(str(path))}: {says}", err), err
    assert not (tmp_path / "bad").exists()  # nothing was started


def test_every_bad_job_is_named_at_once(dataset, tmp_path, capsys):
    """All jobs are checked before the first is fixed: one line per bad job, the good ones not named."""
    path = tmp_path / "jobs.toml"
    path.write_text(f'[[job]]\nkind = "lora"\nrnak = 4\ndata = "{dataset.as_posix()}"\n'
                    f'[[job]]\nkind = "tii"\n'
                    f'[[job]]\nkind = "lora"\ndata = "no/such/folder"\n'
                    f'[[job]]\nkind = "ti"\ndata = "{dataset.as_posix()}"\n'  # no token
                    f'[[job]]\nkind = "lora"\nname = "fine"\ndata = "{dataset.as_posix()}"\n')
    assert main(["train", "queue", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(f"sdtune: error: {path}: job 1: unknown key 'rnak'; did you mean 'rank'?")
    assert lines[1:] == [f"{path}: job 2: kind = 'tii'; write kind = \"ti\" or kind = \"lora\"",
                         f"{path}: job lora-2: data = 'no/such/folder': no such folder (paths are relative to the "
                         f"current folder); fix the path",
                         f"{path}: job ti-1: no token; give token '<name>' (the new word your prompts will use)"]
    assert not (tmp_path / "jobs").exists()


def test_a_missing_data_folder_stops_before_any_training(tmp_path, capsys):
    path = tmp_path / "jobs.toml"
    path.write_text('[[job]]\nkind = "lora"\ndata = "no/such/folder"\n')
    assert main(["train", "queue", str(path)]) == 2
    assert "job lora-1: data = 'no/such/folder': no such folder" in capsys.readouterr().err


def test_the_page_compares_the_settings_each_run_trains_with(tmp_path):
    started = train_queue.Run("a", "lora", {"lr": 1e-3})
    (tmp_path / "a").mkdir()  # a run that has started: its settings.toml holds the model's preset (tiny's)
    (tmp_path / "a" / "settings.toml").write_text(to_toml(load_settings(
        None, {"lr": 1e-3, "data": "d", "out": "o"}, kind="lora", family="tiny")))
    queued = train_queue.Run("b", "lora", {"lr": 5e-3, "data": "d"})  # not started, no preset named: only what the queue gives
    named = train_queue.Run("c", "lora", {"lr": 5e-3, "data": "d", "preset": "tiny-quick"})
    ti = train_queue.Run("d", "ti", {"token": "<q>", "lr": 5e-3, "data": "d"})
    runs = [started, queued, named, ti]
    used = [train_queue.used_settings(tmp_path, r) for r in runs]
    assert (used[0]["rank"], used[0]["targets"]) == (8, "all")  # not the class defaults' 16 and "attn"
    assert "rank" not in used[1] and used[2]["steps"] == 30
    # rank is compared between the runs that have one (8 and 8: the same), steps too (tiny's 300, quick's 30);
    # TI's token belongs to one run only
    assert train_queue.differing(used) == ["preset", "steps", "lr", "batch_size", "save_every", "sample_every",
                                           "validation_every"]
    page = train_queue.write_page(tmp_path, runs, {}).read_text()
    assert re.search(r"<th>lr</th>\s*<td>0.001</td>\s*<td>0.005</td>\s*<td>0.005</td>\s*<td>0.005</td>", page)
    assert re.search(r"<th>steps</th>\s*<td>300</td>\s*<td></td>\s*<td>30</td>\s*<td></td>", page)
    assert "<th>rank</th>" not in page and "<th>token</th>" not in page and "null" not in page


def test_a_finished_queue_takes_settings_that_do_not_change_weights(dataset, tmp_path, capsys, monkeypatch):
    """A finished run given a new progress bar, sample cadence or report setting keeps its weights, and its final
    files and report follow the new ones (as a single run resumed finished), not refused; a second queue process on the same folder is refused at once; a data folder given as "." is not taken for
    the run's output folder."""
    extras = NO_EXTRAS.replace("save_every = 1", "save_every = 0")
    jobs = queue_file(tmp_path, dataset, '[[job]]\nkind = "lora"\n' + extras)
    out = tmp_path / "q"
    train_queue.run_queue(jobs, out)
    done = load_file(out / "lora-1" / "lora.safetensors")
    assert not (out / "lora-1" / "report.html").exists()
    capsys.readouterr()
    jobs.write_text(jobs.read_text().replace("progress = false", "progress = true").replace("report = false", "report "
                                                                                            "= true"))
    train_queue.run_queue(jobs, out)
    assert ("lora-1: done before, with other report now, which do not change its weights: its final files and report "
            "are written again") in capsys.readouterr().err
    again = load_file(out / "lora-1" / "lora.safetensors")
    assert again.keys() == done.keys() and all(torch.equal(again[k], done[k]) for k in done)
    assert (out / "lora-1" / "report.html").is_file()
    train_queue.run_queue(jobs, out)  # and then it is done as it is asked
    assert "lora-1: done before, skipped\n" in capsys.readouterr().err

    with safeio.folder_lock(out, "sdtune train queue"):
        with pytest.raises(SdtuneError, match=r"q: sdtune train queue \(process \d+\) is using this folder"):
            train_queue.run_queue(jobs, out)
    assert json.loads((out / "queue.json").read_text())["runs"]["lora-1"]["state"] == "done"

    monkeypatch.chdir(dataset)
    dot = tmp_path / "dot.toml"
    dot.write_text(f'out = "{(tmp_path / "elsewhere").as_posix()}"\n[[job]]\nkind = "lora"\ndata = "."\n')
    assert [r.given["data"] for r in train_queue.read_queue(dot)[1]] == ["."]
    inside = tmp_path / "inside.toml"
    inside.write_text('[[job]]\nkind = "lora"\ndata = "."\n')
    with pytest.raises(SdtuneError, match=r"inside.toml: job lora-1: .*the run's sample images would be read"):
        train_queue.read_queue(inside, out=dataset / "runs")


def test_queue_names_and_spellings(dataset, tmp_path):
    """Swept values that print alike at 6 digits, or an empty one, still name runs apart; a setting written both
    with '-' and '_' in one table is refused rather than one silently winning."""
    path = tmp_path / "jobs.toml"
    path.write_text(f'[defaults]\ndata = "{dataset.as_posix()}"\n[[job]]\nkind = "lora"\n'
                    'sweep = {lr = [1e-4, 1.0000001e-4], exclude = [["attn2"], []]}\n')
    names = [r.name for r in train_queue.read_queue(path)[1]]
    assert names == ["lora-1-lr-0.0001-exclude-attn2", "lora-1-lr-0.0001-exclude-none",
                     "lora-1-lr-0.00010000001-exclude-attn2", "lora-1-lr-0.00010000001-exclude-none"]
    path.write_text(f'[defaults]\ndata = "{dataset.as_posix()}"\nmin_snr_gamma = 5\n[[job]]\nkind = "lora"\n'
                    'min_snr_gamma = 1\nmin-snr-gamma = 5\n')
    with pytest.raises(SdtuneError, match=r"jobs.toml: job 1: min_snr_gamma and min-snr-gamma are the same setting"):
        train_queue.read_queue(path)
    # one spelling in [defaults], the other in a job: the job's overrides it
    path.write_text(f'[defaults]\ndata = "{dataset.as_posix()}"\nmin-snr-gamma = 5\n[[job]]\nkind = "lora"\n'
                    'min_snr_gamma = 1\n')
    assert train_queue.read_queue(path)[1][0].given["min_snr_gamma"] == 1
    # a job's name is its folder's: the LoRA file's is kohya's output_name (a run's --name)
    path.write_text(f'[defaults]\ndata = "{dataset.as_posix()}"\n[[job]]\nkind = "lora"\nname = "a"\n'
                    'output_name = "mystyle"\n')
    (run,) = train_queue.read_queue(path)[1]
    assert (run.name, run.given["name"]) == ("a", "mystyle")


def test_the_page_marks_the_best_among_comparable_runs_and_says_what_is_running(tmp_path, monkeypatch):
    """A lowest loss is marked only among runs of the same kind, model and held-out images (a tiny run's loss
    says nothing against a tiny-xl run's); a run not yet sampled says so, not "sample_every = 0"."""
    runs = [train_queue.Run("a", "lora", {"model": "tiny", "sample_every": 5}),
            train_queue.Run("b", "lora", {"model": "tiny", "sample_every": 0}),
            train_queue.Run("c", "lora", {"model": "tiny-xl", "sample_every": 5}),
            train_queue.Run("d", "ti", {"model": "tiny", "token": "<q>"})]
    losses = {"a": 0.2, "b": 0.3, "c": 0.1, "d": 0.05}
    for r in runs:
        (tmp_path / r.name).mkdir()
        (tmp_path / r.name / "ckpt.safetensors").write_bytes(b"")

    def summary(folder):
        loss = losses[folder.name]
        return {"final_step": 10, "final_loss": loss, "best": (10, loss, folder / "ckpt.safetensors"),
                "sample": None, "report": None, "best_file": None}

    monkeypatch.setattr(train_queue, "summarize", summary)
    page = train_queue.write_page(tmp_path, runs, {"a": {"state": "running"}}).read_text()
    assert page.count('class="best"') == 1 and re.search(r'<td class="best">step 10, <a[^>]*>ckpt.safetensors</a>: '
                                                         r'0.200000</td>', page)
    assert "<td>running</td>" in page and "<td>queued</td>" in page
    assert page.count("none yet") == 3 and page.count("no samples (sample_every = 0)") == 1


def test_peak_memory_restarts_for_each_run():
    """In a fresh process, as a queue's is at its first run (this one's has the whole suite's history)."""
    import subprocess
    import sys

    probe = ("import numpy as np\nfrom sdtune.train import logs\n"
             "big = np.ones(300 * 2**20 // 8)\n"  # 300 MB touched
             "high = logs.peak_memory()['rss']\ndel big\nlogs.reset_peak_memory()\n"
             "print(high - logs.peak_memory()['rss'])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) > 200 * 2**20


def test_help_shows_the_queue_file_format_as_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["train", "queue", "--help"])
    text = capsys.readouterr().out
    assert "sdtune train queue jobs.toml: several training runs" in text and 'kind = "lora"' in text
    assert "``" not in text and "::\n" not in text  # the module docstring's reStructuredText marks
