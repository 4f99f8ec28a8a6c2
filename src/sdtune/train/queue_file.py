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
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..safeio import SdtuneError, read_toml
from .config import KINDS, as_keys, check_one_spelling, likely_name, load_settings, read_settings

TOP_KEYS = ("out", "defaults", "job")
JOB_KEYS = ("name", "kind", "sweep")  # a job's keys besides its settings


@dataclass
class Run:
    """One training run of the queue: a job, or one combination of a job's sweep."""

    name: str  # also its folder under the queue's
    kind: str  # ti | lora
    given: dict  # the settings the queue file gives it (defaults, the job's keys, its sweep values)
    swept: dict = field(default_factory=dict)  # the sweep's values for this run


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
    except SdtuneError as e:  # named as keys of the file (where a job's settings come from), not as flags
        keys = {f.name for f in dataclasses.fields(KINDS[run.kind])}
        raise SdtuneError(f"{path}: {where}: {as_keys(str(e), keys)}") from None


def queue_folder(path: str | Path, top: dict, out: str | Path | None = None) -> Path:
    """``out`` if given, else the file's ``out``, else the file's name without ``.toml`` beside it."""
    if out:
        return Path(out)
    if "out" in top:
        return Path(top["out"])
    return Path(path).with_suffix("")
