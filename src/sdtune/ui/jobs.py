"""Training jobs for the web UI: a queue of ``sdtune train`` processes, and what their folders say.

A job is a folder (``job.toml``, ``job.json``, ``train.log`` and whatever training writes) and, while it runs,
a child process ``python -m sdtune.cli train KIND --config job.toml`` in its own process group; a job of kind
``queue`` is a queue file, run as ``python -m sdtune.cli train queue job.toml --out .`` (its runs in
subfolders, compared in its ``queue.html``). The server
never trains in its own process: the page stays responsive, a crashed job cannot take the server down, and
stopping a job is ending its process group. Resuming is running the same config again: training continues
from the resume state in the folder. One job runs at a time (they would share the CPU or GPU); the others
wait in the queue in the order they were submitted.

Progress is read back from the folder, not from the process: the progress lines of the loop's log, a CSV of
the loss if training wrote one, sample grids, and the result the command printed when it finished.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..console import LOG_SECONDS_ENV
from ..safeio import SdtuneError, atomic_write_text, visible_paths
from ..train.report import WRITING_REPORT

JOB_FILE, CONFIG_FILE, LOG_FILE = "job.json", "job.toml", "train.log"
QUEUE = "queue"  # the kind of a job that runs a queue file
QUEUE_PAGE = "queue.html"  # what ``sdtune train queue`` writes after each of its runs
# the line ``sdtune train queue`` prints as each run starts: "sdtune train queue: 2/3 lora-lr-0.001 (lora, ...)"
QUEUE_RUN = re.compile(r"^sdtune train queue: (\d+)/(\d+) (\S+) \(")
STATES = ("queued", "running", "done", "failed", "stopped")
# the training progress line of a log (console.LogLines), "train lora: 3/10 step, 1 s, 2.90 step/s, loss=0.1234,
# lr=1.00e-04", or of a terminal's bar in jobs run by earlier versions, "train lora:  30%|###   | 3/10 [00:01<00:02,
# 2.9step/s, loss=0.1234, lr=1.00e-04]" (not the other bars, such as "encoding images: 5/5 img", which are not steps)
PROGRESS = re.compile(r"train [\w-]+:[^\r\n]*?(\d+)/(\d+) (?:step,([^\r\n]*)|\[([^\]]*)\])")
LOG_EVERY = "1"  # seconds between the progress lines of a job's log: the page polls about this often
LOSS = re.compile(r"loss=([-+0-9.eE]+|nan|inf)")


@dataclass
class Job:
    name: str
    kind: str  # ti | lora | queue
    folder: str
    state: str = "queued"
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    runs: int = 0  # how many times it was started (resumes count)

    def save(self) -> None:
        atomic_write_text(json.dumps(asdict(self), indent=1), Path(self.folder) / JOB_FILE)


class JobRunner:
    """Submit, stop and resume training jobs under ``root``; one worker thread starts them in turn."""

    def __init__(self, root: str | Path, python: str = sys.executable, extra_args: tuple = (), poll: float = 0.3):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.python, self.extra_args, self.poll = python, tuple(extra_args), poll
        self.jobs: dict[str, Job] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._load()
        self._thread = threading.Thread(target=self._work, name="sdtune-jobs", daemon=True)
        self._thread.start()

    # ---- the queue ----
    def submit(self, name: str, kind: str, config_text: str) -> Job:
        """Queue a new job ``name`` (a fresh folder under the root) that trains with this TOML config."""
        folder = self.root / name
        with self.lock:
            if name in self.jobs or folder.exists():
                raise SdtuneError(f"a job named {name!r} exists already; pick another name, or resume it")
            folder.mkdir(parents=True)
            atomic_write_text(config_text, folder / CONFIG_FILE)
            job = self.jobs[name] = Job(name, kind, str(folder))
            job.save()
        return job

    def stop(self, name: str) -> Job:
        """Stop a running job (its whole process group) or take a queued one out of the queue."""
        with self.lock:
            job = self.get(name)
            proc = self.procs.get(name)
            if job.state not in ("queued", "running"):
                raise SdtuneError(f"job {name} is {job.state}, not running or queued")
            job.state, job.ended = "stopped", time.time()
            job.save()
        if proc is not None:
            _end_group(proc)
        return job

    def resume(self, name: str) -> Job:
        """Queue a stopped or failed job again: it continues from its last save."""
        with self.lock:
            job = self.get(name)
            if job.state not in ("stopped", "failed"):
                raise SdtuneError(f"job {name} is {job.state}; only a stopped or failed job can be resumed")
            job.state, job.submitted, job.returncode, job.ended = "queued", time.time(), None, None
            job.save()
        return job

    def get(self, name: str) -> Job:
        if name not in self.jobs:
            raise SdtuneError(f"no job named {name!r}; the jobs are: {', '.join(self.jobs) or 'none yet'}")
        return self.jobs[name]

    def list(self) -> list[Job]:
        """Newest first."""
        with self.lock:  # the page asks while the worker or another request adds jobs
            return sorted(self.jobs.values(), key=lambda j: j.submitted, reverse=True)

    def shutdown(self) -> None:
        """Stop the worker and every running job (the server is going away)."""
        self._stop.set()
        for name in [n for n, j in self.jobs.items() if j.state == "running"]:
            self.stop(name)
        self._thread.join(timeout=5)

    # ---- the worker ----
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one job's trouble
                print(f"sdtune ui: job runner: {e}", file=sys.stderr)
            self._stop.wait(self.poll)

    def _step(self) -> None:
        with self.lock:
            for name, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.procs[name]
                job = self.jobs[name]
                if job.state == "running":  # not stopped by the user
                    job.state = "done" if code == 0 else "failed"
                    job.ended = time.time()
                job.returncode = code
                job.save()
            if self.procs:
                return
            queued = sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.submitted)
            if queued:
                self._start(queued[0])

    def _start(self, job: Job) -> None:
        folder = Path(job.folder)
        what = [QUEUE, CONFIG_FILE, "--out", "."] if job.kind == QUEUE else [job.kind, "--config", CONFIG_FILE]
        cmd = [self.python, "-m", "sdtune.cli", "train", *what, *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{LOG_SECONDS_ENV: LOG_EVERY})
        with open(folder / LOG_FILE, "ab") as log:
            log.write(f"\n--- run {job.runs + 1}: {' '.join(cmd[1:])}\n".encode())
            log.flush()
            # a session of its own: stopping the job ends it and anything it started, never the server
            self.procs[job.name] = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        job.state, job.started, job.runs = "running", time.time(), job.runs + 1
        job.save()

    def _load(self) -> None:
        """Jobs of an earlier server: a job that was running then is stopped now (its process is gone)."""
        for path in sorted(self.root.glob(f"*/{JOB_FILE}")):
            try:
                job = Job(**json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                continue
            job.folder = str(path.parent)
            if job.state in ("queued", "running"):
                job.state = "stopped"
            self.jobs[job.name] = job


def _end_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the job's process group; after the job has exited (or ``grace`` seconds), SIGKILL to whatever
    of its group is left (helpers it started)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---------------------------------------------------------------- what a job's folder says

def _log_text(folder: Path) -> str:
    try:
        return (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _csv_loss(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of a CSV that training wrote, if any has a step and a loss column."""
    try:
        paths = sorted(folder.glob("*.csv")) + sorted(folder.glob("*/*.csv"))
    except OSError:  # a file written atomically there (a .tmp) came and went while the folder was listed: next poll
        return []
    for path in paths:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        cols = rows[0].keys() if rows else []
        step = next((c for c in cols if c and c.strip().lower() == "step"), None)
        loss = next((c for c in cols if c and c.strip().lower() == "loss"), None)
        if step and loss:
            out = []
            for r in rows:
                try:
                    out.append((int(float(r[step])), float(r[loss])))
                except (TypeError, ValueError):
                    continue
            return out
    return []


def progress(folder: str | Path) -> dict:
    """What a job's folder says: step, total, loss curve, samples, loss plot, report, result, log tail. For a
    queue job, the numbers are those of its current (or last) run, named in ``run`` as (number, of, name), and
    the report is the queue's page comparing its runs."""
    folder = Path(folder)
    log = _log_text(folder)
    segments = [s for line in log.split("\n") for s in line.split("\r") if s.strip()]
    step = total = run = None
    curve: dict[int, float] = {}
    for seg in segments:
        started = QUEUE_RUN.match(seg)
        if started:  # a queue's next run: its own steps from 0
            run, step, total, curve = (int(started.group(1)), int(started.group(2)), started.group(3)), None, None, {}
            continue
        m = PROGRESS.search(seg)
        if m:
            step, total = int(m.group(1)), int(m.group(2))
            value = LOSS.search(m.group(3) or m.group(4))
            if value:
                curve[step] = float(value.group(1))
    page = folder / QUEUE_PAGE
    if run is not None and (folder / run[2]).is_dir():
        folder = folder / run[2]  # the run's files: its loss CSV, samples and plot
    # every step's loss from the CSV (written at each save), then the log's (smoothed) since the CSV's last row
    from_csv = _csv_loss(folder)
    loss = from_csv + [(s, v) for s, v in sorted(curve.items()) if not from_csv or s > from_csv[-1][0]]
    newest = "csv" if from_csv and loss[-1] == from_csv[-1] else "log"
    # the command prints the path of what it made as its last line
    result = None
    for seg in reversed(segments):
        cand = (folder / seg.strip()) if not Path(seg.strip()).is_absolute() else Path(seg.strip())
        if cand.suffix in (".safetensors", ".pt") and cand.is_file():
            result = cand
            break
        if seg.startswith("--- run "):
            break
    errors = [s[s.index("sdtune: error:"):] for s in segments if "sdtune: error:" in s]
    # training is over and the report is being drawn (its last line; the result path follows it when done)
    reporting = bool(segments) and WRITING_REPORT in segments[-1]
    files = visible_paths(folder)  # one walk of the run folder per refresh, for its plot and report
    return {
        "reporting": reporting,
        "step": step, "total": total, "loss": loss, "run": run,
        "loss_source": newest,  # where the last value came from
        "samples": sorted((folder / "samples").glob("*.png")),
        "loss_png": next((p for p in files if p.name == "loss.png"), None),
        "report": page if page.is_file() else next((p for p in files if p.name == "report.html"), None),
        "result": result,
        "error": errors[-1] if errors else None,
        "log_tail": "\n".join(segments[-15:]),
    }
