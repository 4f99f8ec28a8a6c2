"""``sdtune train queue``: runs a queue file's runs in turn (``queue_file`` reads it), keeps their state so that
the same command resumes, and compares them on one page (``queue.html``)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from string import Template

from ..models import load_base
from ..pages import Html, fill, lines
from ..safeio import SdtuneError, atomic_write_text, folder_lock, load_state, output_folder
from . import logs
from .config import KINDS, OUTPUT_SETTINGS, load_settings
from .loop import SETTINGS_FILE, STATE_FILE, Record
from .lora import train_lora
from .queue_file import Run, queue_folder, read_queue
from .report import BEST_FILE, LOOK, REPORT_FILE, best_checkpoint
from .ti import train_ti

STATE_FORMAT = "sdtune-queue-1"
QUEUE_STATE = "queue.json"
QUEUE_PAGE = "queue.html"
PAGE = "templates/queue.html"
TRAINERS = {"ti": train_ti, "lora": train_lora}
# settings every run has its own value of, whatever was asked: not a difference worth a row on the page
NOT_COMPARED = {"out", "progress", "resume"}
# settings that leave the weights alone: a finished run given new ones resumes finished (its final files and report
# follow them), not refused
NOT_WEIGHTS = NOT_COMPARED | OUTPUT_SETTINGS
# what makes validation losses comparable between runs: the same model, kind of training and held-out images
SAME_VALIDATION = ("model", "vae", "data", "validation_dir", "validation_split", "resolution", "masked_loss")


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
            new = [k for k in _changed(state[run.name]["given"], run.given) if k not in NOT_COMPARED]
            if not new:
                print(f"{head}: done before, skipped", file=sys.stderr)
                continue
            # (as a single run does when resumed finished: its samples, report or file formats follow the new ones)
            print(f"{head}: done before, with other {', '.join(new)} now, which do not change its weights: its final "
                  f"files and report are written again", file=sys.stderr)
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
        except KeyboardInterrupt as e:  # a Ctrl-C or SIGTERM: the queue stops, and its page says where
            state[run.name].update(state="stopped", error=str(e) or "interrupted")
            _write_state(folder, state)
            write_page(folder, runs, state)
            raise
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
