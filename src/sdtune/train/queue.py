"""``sdtune train queue jobs.toml``: several training runs in turn, compared on one page.

A queue file lists jobs; each is a table of the settings ``sdtune train KIND --config`` reads, plus ``kind``::

    # jobs.toml
    out = "runs/style"             # the queue's folder (default: the file's name without .toml, beside it)

    [defaults]                     # optional: settings every job starts from (a job's own keys win)
    data = "images/"
    steps = 300

    [[job]]
    name = "lora"                  # optional (default: KIND-N); the job's folder is OUT/NAME
    output_name = "mystyle"        # optional: the LoRA file's name (a run's --name; default lora)
    kind = "lora"                  # ti | lora
    rank = 8
    sweep = {lr = [1e-3, 5e-4]}    # one run per value: lora-lr-0.001 and lora-lr-0.0005

    [[job]]
    kind = "ti"
    token = "<hx>"
    init_token = "hexagon"

A ``sweep`` table may name several settings; the job then runs every combination (the first setting varies
slowest). Each run trains in its own folder (``OUT/NAME``, with its ``report.html``); settings start from the
base model's preset as with ``sdtune train``, the ``[defaults]``, then the job's keys. ``out`` is set by the
queue and cannot be a job key. Paths (``data``) are relative to the current folder, as in ``--config`` files.

The queue's state is ``OUT/queue.json``, rewritten atomically when a run starts, ends or fails. Running the
same file again skips the runs it marks done (they must have the same settings), and the interrupted run
resumes from its last save (``save_every``) through training's own resume state. A run that fails does not
stop the others; the command reports the failures at the end. After every run ``OUT/queue.html`` compares
them: the settings that differ, the final and the best validation loss, the recommended checkpoint, and the
last sample grid of each, side by side. Like the reports, it opens from the disk with no server.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

from ..models import load_base
from ..pages import Html, fill, lines
from ..safeio import SdtuneError, atomic_write_text, folder_lock, load_state, output_folder, read_toml
from . import logs
from .config import (
    KINDS,
    OUTPUT_SETTINGS,
    as_keys,
    check_one_spelling,
    likely_name,
    load_settings,
    read_settings,
)
from .loop import SETTINGS_FILE, STATE_FILE, Record
from .lora import train_lora
from .report import BEST_FILE, LOOK, REPORT_FILE, best_checkpoint
from .ti import train_ti

STATE_FORMAT = "sdtune-queue-1"
QUEUE_STATE = "queue.json"
QUEUE_PAGE = "queue.html"
PAGE = "templates/queue.html"
TOP_KEYS = ("out", "defaults", "job")
JOB_KEYS = ("name", "kind", "sweep")  # a job's keys besides its settings
TRAINERS = {"ti": train_ti, "lora": train_lora}
# settings every run has its own value of, whatever was asked: not a difference worth a row on the page
NOT_COMPARED = {"out", "progress", "resume"}
# settings that leave the weights alone: a finished run given new ones is kept as it is, not refused
NOT_WEIGHTS = NOT_COMPARED | OUTPUT_SETTINGS
# what makes validation losses comparable between runs: the same model, kind of training and held-out images
SAME_VALIDATION = ("model", "vae", "data", "validation_dir", "validation_split", "resolution", "masked_loss")


@dataclass
class Run:
    """One training run of the queue: a job, or one combination of a job's sweep."""

    name: str  # also its folder under the queue's
    kind: str  # ti | lora
    given: dict  # the settings the queue file gives it (defaults, the job's keys, its sweep values)
    swept: dict = field(default_factory=dict)  # the sweep's values for this run


# ---------------------------------------------------------------- reading the queue file

def _unknown(path: Path, where: str, key: str, allowed) -> SdtuneError:
    likely, other_tool = likely_name(key, allowed)
    hint = (f"; did you mean {likely!r}?" + (" (kohya's/diffusers' name)" if other_tool else "")) if likely else ""
    return SdtuneError(f"{path}: {where}: unknown key {key!r}{hint}")


def _setting_names(kind: str) -> set[str]:
    return {f.name for f in dataclasses.fields(KINDS[kind])}


def _checked(path: Path, where: str, kind: str, table: dict) -> dict:
    """``table``'s settings for ``kind`` (keys with '-' or '_'), each checked against its field's type."""
    names = _setting_names(kind)
    for key in table:
        if key.replace("-", "_") not in names:
            raise _unknown(path, where, key, names)
    try:
        return read_settings(None, table, kind)
    except SdtuneError as e:  # "--lr: lr = 'x' is not a number": name the file and the job instead of a flag
        message = re.sub(r"^--[\w-]+: ", "", str(e))
        raise SdtuneError(f"{path}: {where}: {message}") from None


def _value_text(value) -> str:
    """A swept value as a run's name has it: 0.001 (as short as tells it apart: 1.0000001e-04 stays so); "none"
    for an empty one."""
    text = f"{value:g}" if isinstance(value, float) and float(f"{value:g}") == value else str(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "none"


def read_queue(path: str | Path, out: str | Path | None = None) -> tuple[dict, list[Run]]:
    """The file's top-level values (``out``) and its runs, sweeps expanded; every key and value is checked
    here, before anything trains, and a bad one is named with the file and the job. ``out``: the queue's folder
    when given apart (``--out``)."""
    path = Path(path)
    table = read_toml(path, "queue")
    for key in table:
        if key not in TOP_KEYS:
            raise _unknown(path, "top level", key, TOP_KEYS)
    jobs = table.get("job", [])
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise SdtuneError(f"{path}: no jobs; add [[job]] tables, e.g. [[job]] kind = \"lora\" data = \"images/\"")
    defaults = table.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SdtuneError(f"{path}: defaults must be a table ([defaults]) of settings")
    all_names = set().union(*(_setting_names(k) for k in KINDS))
    check_one_spelling(f"{path}: [defaults]", defaults)
    for key in defaults:
        if key.replace("-", "_") not in all_names:
            raise _unknown(path, "[defaults]", key, all_names)
        if key == "out":
            raise SdtuneError(f"{path}: [defaults]: out is set by the queue (each job writes to OUT/NAME); write "
                              f"out = \"FOLDER\" above [defaults] for the queue's folder")
    if "out" in table and not isinstance(table["out"], str):
        raise SdtuneError(f"{path}: out = {table['out']!r}: must be a folder name in quotes")
    runs: list[Run] = []
    counts: dict[str, int] = {}
    problems: list[str] = []  # every job is checked, and each bad one named, before the user fixes any
    for number, job in enumerate(jobs, 1):
        kind = job.get("kind")
        counts[kind] = counts.get(kind, 0) + 1
        try:
            job_runs = _job_runs(path, number, job, defaults, counts[kind])
            for run in job_runs:
                _check_run(path, run, queue_folder(path, table, out) / run.name)
        except SdtuneError as e:
            problems.append(str(e))
            continue
        runs += job_runs
    seen: set[str] = set()
    for run in runs:
        if run.name in seen:
            problems.append(f"{path}: two runs are named {run.name!r}; give the jobs different name = keys")
        seen.add(run.name)
    if problems:
        raise SdtuneError("\n".join(problems))  # one line each
    return {k: v for k, v in table.items() if k == "out"}, runs


def _job_runs(path: Path, number: int, job: dict, defaults: dict, nth: int) -> list[Run]:
    """The runs of job ``number`` (the ``nth`` of its kind): one, or one per combination of its sweep."""
    kind = job.get("kind")
    where = f"job {number}" + (f" ({job['name']})" if isinstance(job.get("name"), str) else "")
    if kind not in KINDS:
        raise SdtuneError(f"{path}: {where}: kind = {kind!r}; write kind = \"ti\" or kind = \"lora\"")
    name = job.get("name", f"{kind}-{nth}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", name):
        raise SdtuneError(f"{path}: {where}: name = {name!r}: use letters, digits, '.', '_' or '-'")
    own = {k: v for k, v in job.items() if k not in JOB_KEYS}
    if "output_name" in own and kind == "lora":  # the LoRA file's name (``name`` is the job's): kohya's key for it
        own["name"] = own.pop("output_name")
    check_one_spelling(f"{path}: {where}", own)
    sweep = job.get("sweep", {})
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise SdtuneError(f"{path}: {where}: sweep must be a table of lists, e.g. sweep = {{lr = [1e-3, 5e-4]}}")
    if any(k.replace("-", "_") == "out" for k in [*own, *sweep]):
        raise SdtuneError(f"{path}: {where}: out is set by the queue (each job writes to OUT/{name}); remove it")
    names = _setting_names(kind)
    given = {k: v for k, v in defaults.items() if k.replace("-", "_") in names}  # the other kind's are skipped
    given = _checked(path, where, kind, {**given, **own})
    for key in sweep:
        if key.replace("-", "_") not in names:
            raise _unknown(path, f"{where}: sweep", key, names)
    keys = [k.replace("-", "_") for k in sweep]
    runs = []
    for combo in itertools.product(*sweep.values()):
        values = _checked(path, f"{where}: sweep", kind, dict(zip(keys, combo)))
        suffix = "".join(f"-{k}-{_value_text(v)}" for k, v in values.items())
        runs.append(Run(name + suffix, kind, {**given, **values}, values))
    return runs


def _check_run(path: Path, run: Run, out: Path) -> None:
    """What can be checked without the model: a typo in a preset name, in the data folder, or a setting that
    cannot work (a TI job without a token) stops here; ``out``: the run's folder."""
    where = f"job {run.name}"
    data = run.given.get("data", "")
    if not data:
        raise SdtuneError(f"{path}: {where}: no data; add data = \"FOLDER\" to the job or to [defaults]")
    if not Path(data).is_dir():
        raise SdtuneError(f"{path}: {where}: data = {data!r}: no such folder (paths are relative to the current "
                          f"folder); fix the path")
    try:
        # the model's preset is unknown until it loads; what the job gives is checked on the plain defaults
        load_settings(None, {**run.given, "out": str(out)}, kind=run.kind).check()
    except SdtuneError as e:  # named as the file's keys, not as flags the user did not type
        raise SdtuneError(f"{path}: {where}: {as_keys(str(e), run.given)}") from None


def queue_folder(path: str | Path, top: dict, out: str | Path | None = None) -> Path:
    """``out`` if given, else the file's ``out``, else the file's name without ``.toml`` beside it."""
    if out:
        return Path(out)
    if "out" in top:
        return Path(top["out"])
    return Path(path).with_suffix("")


# ---------------------------------------------------------------- the state file

def _read_state(folder: Path) -> dict:
    path = folder / QUEUE_STATE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SdtuneError(f"{path}: not an sdtune queue state; delete it or use another --out")
    return state["runs"]


def _write_state(folder: Path, runs: dict) -> None:
    atomic_write_text(json.dumps({"format": STATE_FORMAT, "runs": runs}, indent=1, default=str),
                      folder / QUEUE_STATE)


# ---------------------------------------------------------------- running it

def run_queue(path: str | Path, out: str | Path | None = None, *, device=None, dtype=None,
              step_callback: Callable[[str, int, float], None] | None = None,
              run_callback: Callable[[str, str], None] | None = None) -> Path:
    """Run the queue file's jobs in turn; returns ``OUT/queue.html``. ``step_callback(run, step, loss)`` is
    called after each training step, ``run_callback(run, state)`` after each run ends ("done" | "failed").
    Raises ``SdtuneError`` naming the failed runs, after the others have run."""
    path = Path(path)
    top, runs = read_queue(path, out)
    folder = output_folder(queue_folder(path, top, out))
    with folder_lock(folder, "sdtune train queue"):  # a second queue there would fail the runs the first holds
        return _run_all(path, folder, runs, device, dtype, step_callback, run_callback)


def _changed(old: dict, new: dict) -> list[str]:
    """The settings a finished run was given otherwise (as recorded: JSON) than the queue gives it now."""
    new = json.loads(json.dumps(new))
    return sorted(k for k in {**old, **new} if old.get(k) != new.get(k))


def _run_all(path: Path, folder: Path, runs: list[Run], device, dtype, step_callback, run_callback) -> Path:
    state = _read_state(folder)
    for run in runs:  # a done run with other settings now: its folder no longer says what the file asks
        old = state.get(run.name)
        changed = [k for k in _changed(old["given"], run.given) if k not in NOT_WEIGHTS] if old else []
        if old and old["state"] == "done" and changed:
            raise SdtuneError(f"{path}: job {run.name} finished with other settings ({', '.join(changed[:3])} "
                              f"changed); rename the job, or use another --out for a new queue")
    base, loaded = None, None
    for number, run in enumerate(runs, 1):
        head = f"sdtune train queue: {number}/{len(runs)} {run.name}"
        if state.get(run.name, {}).get("state") == "done":
            kept = [k for k in _changed(state[run.name]["given"], run.given) if k not in NOT_COMPARED]
            print(f"{head}: done before, skipped" + (f" (kept with its earlier {', '.join(kept)}: they do not change "
                                                     f"its weights; rename the job to train it again)" if kept else ""),
                  file=sys.stderr)
            continue
        state[run.name] = {"state": "running", "kind": run.kind, "given": run.given}
        _write_state(folder, state)
        write_page(folder, runs, state)
        print(f"{head} ({run.kind}" + "".join(f", {k} = {v!r}" for k, v in run.swept.items()) + ")",
              file=sys.stderr)
        logs.reset_peak_memory()  # each run's report gives its own peak, not the queue's so far
        try:
            # with the run's --vae (a "no VAE" checkpoint loads only with one), so a model is reloaded for another
            model = run.given.get("model", KINDS[run.kind].model), run.given.get("vae")
            if base is None or loaded != model:
                base = None  # free the last model before loading the next
                base, loaded = load_base(model[0], device=device, dtype=dtype, vae=model[1]), model
            settings = load_settings(None, {**run.given, "out": str(folder / run.name)}, kind=run.kind,
                                     family=base.family)
            before = set(base.embeddings.tokens)
            on_step = None if step_callback is None else (lambda s, v, n=run.name: step_callback(n, s, v))
            try:
                result = TRAINERS[run.kind](base, settings, on_step)
            finally:  # a TI run leaves its token on the base: the next run starts from the plain model
                for token in [t for t in base.embeddings.tokens if t not in before]:
                    base.embeddings.remove(token)
            state[run.name].update(state="done", result=str(result))
        except SdtuneError as e:
            print(f"{head}: failed: {e}", file=sys.stderr)
            state[run.name].update(state="failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - one run's crash must not stop the runs after it
            print(f"{head}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            state[run.name].update(state="failed", error=f"{type(e).__name__}: {e}")
        _write_state(folder, state)
        page = write_page(folder, runs, state)
        if run_callback is not None:
            run_callback(run.name, state[run.name]["state"])
    page = write_page(folder, runs, state)
    failed = [r.name for r in runs if state[r.name]["state"] == "failed"]
    if failed:
        raise SdtuneError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}): "
                          f"{state[failed[0]]['error']}; see {page}; run the queue again to retry them")
    print(f"sdtune train queue: {len(runs)} runs compared in {page}", file=sys.stderr)
    return page


# ---------------------------------------------------------------- what each run did

def summarize(folder: Path) -> dict:
    """A run folder's numbers: final and best validation loss, the recommended checkpoint, its newest sample
    grid and report (each None when missing). The best is chosen as the report chooses it."""
    rows = logs.read_csv(folder / logs.CSV_FILE)
    val = {s: r["val_loss"] for s, r in sorted(rows.items()) if r["val_loss"] is not None}
    checkpoints = []
    if (folder / STATE_FILE).is_file():
        # mapped, not read: the state also holds the trainable tensors and optimizer moments (hundreds of MB
        # for an SDXL LoRA), and the page is rewritten after every run
        saved, _ = load_state(folder / STATE_FILE, mmap=True)
        checkpoints = [(s, folder / f) for s, f in saved.get("history", {}).get("checkpoints", [])]
    record = Record(files=[], checkpoints=checkpoints, val_losses=val, validation="", seconds=0.0, peak_memory={},
                    main=True)
    best = best_checkpoint(record) if checkpoints else None
    samples = sorted((folder / "samples").glob("step-*.png"))
    return {
        "final_step": max(val) if val else None,
        "final_loss": val[max(val)] if val else None,
        "best": None if best is None else (best[0], val[best[0]], best[1]),
        "sample": samples[-1] if samples else None,
        "report": folder / REPORT_FILE if (folder / REPORT_FILE).is_file() else None,
        "best_file": folder / BEST_FILE if (folder / BEST_FILE).is_file() else None,
    }


def used_settings(folder: Path, run: Run) -> dict:
    """The settings ``run`` trains with, as far as they are known: its own ``settings.toml`` once it has started
    (what the model's preset set included), before that what the queue gives it over the preset it names. A
    setting the model's preset will decide is left out until then (the class defaults would show values the
    run never uses)."""
    saved = folder / run.name / SETTINGS_FILE
    try:
        if saved.is_file():
            return load_settings(saved, kind=run.kind).to_dict()
        if run.given.get("preset"):
            return load_settings(None, run.given, kind=run.kind).to_dict()
    except SdtuneError:
        pass  # an unreadable file: what the queue gives, as for a run not started
    return {k.replace("-", "_"): v for k, v in run.given.items()}


def differing(values: list[dict]) -> list[str]:
    """The settings whose values differ between the runs that have them (``values``: each run's settings), in
    the order first met. A setting of one kind only (rank, token) is compared between the runs of that kind."""
    keys = [k for k in dict.fromkeys(k for v in values for k in v) if k not in NOT_COMPARED]
    return [k for k in keys if len({json.dumps(v[k], default=str) for v in values if k in v}) > 1]


ROW = Template("<tr><th>$label</th>$cells</tr>")
CELL = Template("<td$mark>$text</td>")
LINK = Template('<a href="$href">$text</a>')
INTRO = Template('$done of $total run(s) done, in <code>$out</code>. One column per run; each run\'s folder holds its '
                 'own report, files and logs. The queue\'s state is <a href="$state_file">$state_file</a>: run the '
                 'queue again to resume it (done runs are skipped, an interrupted run continues from its last save).')
SAMPLE = Template('<a href="$href"><img src="$href" alt="$text"></a><br>$text')


def _validation_group(run: Run, used: dict) -> str:
    return json.dumps([run.kind, *(used.get(k) for k in SAME_VALIDATION)], default=str)


def _cell(text, mark: bool = False) -> Html:
    """A table cell: ``text`` escaped unless it is ``Html``; ``mark`` shows it as the best."""
    return fill(CELL, text=text, mark=Html(' class="best"' if mark else ""))


def write_page(folder: Path, runs: list[Run], state: dict, intro: str | None = None) -> Path:
    """``OUT/queue.html``: one column per run, one row per compared thing. Links are relative to the folder.
    ``intro``: the text above the table (default: what the queue's folder holds and how to resume it)."""
    info = [summarize(folder / r.name) for r in runs]
    states = [state.get(r.name, {}) for r in runs]
    used = [used_settings(folder, r) for r in runs]
    # the lowest loss is marked among runs whose losses compare (same model, kind and held-out images), two or more
    groups: dict[str, list[float]] = {}
    for r, u, i in zip(runs, used, info):
        if i["best"]:
            groups.setdefault(_validation_group(r, u), []).append(i["best"][1])
    best_loss = {group: min(losses) for group, losses in groups.items() if len(losses) > 1}

    def row(label: str, cells) -> Html:
        return fill(ROW, label=label, cells=lines(c if isinstance(c, Html) else _cell(c) for c in cells))

    def link(path: Path | None, text: str | None = None) -> Html:
        href = path.relative_to(folder).as_posix() if path else ""
        return fill(LINK, href=href, text=text or href) if path else Html("")

    rows = [row("run", [r.name for r in runs]),
            row("state", [s.get("state", "queued") + (f": {s['error']}" if s.get("error") else "") for s in states]),
            row("kind", [r.kind for r in runs])]
    rows += [row(key, [json.dumps(u[key], default=str) if key in u else "" for u in used]) for key in differing(used)]
    rows.append(row("final validation loss", [f"{i['final_loss']:.6f} (step {i['final_step']})"
                                              if i["final_loss"] is not None else "" for i in info]))
    best_cells = []
    for r, u, i in zip(runs, used, info):
        if i["best"] is None:
            best_cells.append("")
            continue
        step, loss, path = i["best"]
        mark = loss == best_loss.get(_validation_group(r, u))
        best_cells.append(_cell(Html(f"step {step}, {link(path, path.name)}: {loss:.6f}"), mark=mark))
    rows.append(row("best checkpoint (lowest validation loss)", best_cells))
    rows.append(row("report", [_cell(link(i["report"])) for i in info]))
    samples = [_cell(fill(SAMPLE, href=i["sample"].relative_to(folder).as_posix(), text=i["sample"].stem))
               if i["sample"] else "no samples (sample_every = 0)"
               if u.get("sample_every") == 0 and not u.get("sample_every_epochs") else "none yet"
               for i, u in zip(info, used)]
    rows.append(row("last samples", samples))
    package = resources.files("sdtune")
    style = re.search(r"<style>.*?</style>", package.joinpath(LOOK).read_text(encoding="utf-8"), re.S).group(0)
    page = Template(package.joinpath(PAGE).read_text(encoding="utf-8"))
    done = sum(state.get(r.name, {}).get("state") == "done" for r in runs)
    if intro is None:
        intro = fill(INTRO, done=done, total=len(runs), out=str(folder), state_file=QUEUE_STATE)
    text = fill(page, style=Html(style), out=str(folder), intro=intro, rows=lines(rows))
    atomic_write_text(text, folder / QUEUE_PAGE)
    return folder / QUEUE_PAGE
