"""``report.html`` at the end of a training run: did it work, and which checkpoint to use.

The page is ``templates/train_report.html`` (a ``string.Template``, filled like the demo's page, every value
escaped). It shows the loss curves (``loss.png``), each checkpoint's validation loss, a grid of what each
checkpoint draws (LoRA: checkpoint x strength 0, 0.5, 0.75, 1; TI: checkpoint x prompt, with a row for the
base model and the init word), the sample grids made during training, the settings, the time and the peak
memory. The recommended checkpoint is the one with the lowest validation loss; it is copied to
``best.safetensors``. Everything it shows lies in the output folder and is linked relatively, so the page
opens from the disk with no server.
"""

from __future__ import annotations

import html
import re
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from string import Template

from ..generate import draw_grid, generate, save_png
from ..pages import Html, fill, lines
from ..safeio import atomic_path, atomic_write_text
from ..ti.formats import load_embedding
from . import samples
from .config import to_toml
from .logs import TENSORBOARD_DIR
from .loop import SETTINGS_FILE, Record, schedule_note

PAGE = "templates/train_report.html"
WRITING_REPORT = "writing the report,"  # the line the web UI's job view recognises
LOOK = "templates/demo_report.html"  # its stylesheet: one look for sdtune's pages
REPORT_FILE = "report.html"
BEST_FILE = "best.safetensors"
GRID_FILE = "checkpoint-grid.png"
STRENGTHS = (0.0, 0.5, 0.75, 1.0)
GRID_CELL = 128  # pixels per grid cell (the tiny model's 64-px images are scaled up)
# checkpoints the grid draws at most: a run saved 30 times would take longer to draw than to train on a CPU, and
# 30 rows are no longer compared at a glance
GRID_ROWS = 6

CHECKPOINT_ROW = Template('<tr><td class="num">step $step</td><td><a href="$file">$file</a></td>'
                          '<td class="num">$loss</td><td class="best">$mark</td></tr>')
BASE_ROW = Template('<tr><td class="num">step 0</td><td>(the base model)</td><td class="num">$loss</td><td></td></tr>')
SAMPLE = Template('<h3>$title</h3><p><a href="$file"><img src="$file" alt="$title"></a></p>')


def best_checkpoint(record: Record) -> tuple[int, Path] | None:
    """(step, file) of the saved checkpoint with the lowest validation loss (the earlier one on a tie)."""
    scored = [(record.val_losses[s], s, path) for s, path in record.checkpoints if s in record.val_losses]
    if not scored:
        return None
    _, step, path = min(scored, key=lambda x: (x[0], x[1]))
    return step, path


def grid_checkpoints(record: Record, limit: int = GRID_ROWS) -> list[tuple[int, Path]]:
    """The checkpoints the grid draws: all of them up to ``limit``, else ``limit - 1`` evenly spaced ones (the
    first and the last among them) and the best."""
    saved = record.checkpoints
    if len(saved) <= limit:
        return saved
    keep = {round(i * (len(saved) - 1) / (limit - 2)) for i in range(limit - 1)}
    best = best_checkpoint(record)
    if best is not None:
        keep.add(next(i for i, (step, _) in enumerate(saved) if step == best[0]))
    return [saved[i] for i in sorted(keep)]


def _image(base, settings, prompt: str):
    """One image of ``prompt`` with the run's sampling settings and seed, or those its kohya options give."""
    p = samples.parse(prompt)
    return generate(base, p.text, p.negative, steps=p.steps or settings.sample_steps,
                    guidance=settings.sample_guidance if p.guidance is None else p.guidance,
                    seed=settings.seed if p.seed is None else p.seed, scheduler=p.sampler or settings.sample_sampler,
                    clip_skip=settings.clip_skip, width=p.width, height=p.height, num_images=1,
                    progress=False)[0].image


def lora_grid(base, settings, record: Record, prompt: str):
    """Checkpoint x strength: rows are the checkpoints, columns the LoRA at 0 (the base), 0.5, 0.75 and 1."""
    plain = _image(base, settings, prompt)  # strength 0 is the base model bit for bit: drawn once
    rows = []
    shown = grid_checkpoints(record)
    for step, path in shown:
        name = f"report-step-{step}"
        base.loras.add(name, path, 0.0)
        try:
            row = [plain]
            for strength in STRENGTHS[1:]:
                base.loras.set_weights({name: strength})
                row.append(_image(base, settings, prompt))
        finally:
            base.loras.remove(name)
        rows.append(row)
    return draw_grid(rows, [f"step {s}" for s, _ in shown], [f"strength {w:g}" for w in STRENGTHS],
                     cell=GRID_CELL)


def ti_grid(base, settings, record: Record, prompts: list[str]):
    """Checkpoint x prompt: a first row of the base model with the init text in place of the token, then one
    row per checkpoint. The token ends up holding the final vectors again."""
    embeddings, token = base.embeddings, settings.token
    pattern = re.compile(re.escape(token), re.IGNORECASE)
    rows = [[_image(base, settings, pattern.sub(lambda _: settings.init_token, p)) for p in prompts]]
    final, shown = embeddings.get(token), grid_checkpoints(record)
    try:
        for _, path in shown:
            embeddings.remove(token)
            embeddings.add(load_embedding(path, token=token))
            rows.append([_image(base, settings, p) for p in prompts])
    finally:
        if token in embeddings:
            embeddings.remove(token)
        embeddings.add(final)
    labels = [f"base: {settings.init_token}"] + [f"step {s}" for s, _ in shown]
    return draw_grid(rows, labels, [samples.parse(p).text for p in prompts], cell=GRID_CELL)


def _verdict(record: Record, best: tuple[int, Path] | None, out: Path) -> Html:
    """What the validation loss says, in a sentence or three."""
    losses = record.val_losses
    if best is None:
        return Html("No checkpoint has a validation loss; look at the samples below.")
    step, path = best
    value, start = losses[step], losses.get(0)
    name = f"<code>{html.escape(path.relative_to(out).as_posix())}</code>"
    text = (f"Recommended checkpoint: <span class=\"best\">step {step}</span>, {name}, copied to "
            f"<a href=\"{BEST_FILE}\">{BEST_FILE}</a>: the lowest validation loss, {value:.6f}")
    if start is None:
        return Html(text + ".")
    change = (value - start) / start
    if value < start:
        text += f", {-change:.1%} below the base model's {start:.6f} (step 0)."
    else:
        text += (f". <span class=\"warn\">It never fell below the base model's {start:.6f} (step 0): the run has "
                 f"not learned what the images show.</span> Try more --steps or a higher --lr, and check the "
                 f"samples and captions.")
    last_step, _ = record.checkpoints[-1]
    if last_step != step and losses.get(last_step, value) > value:
        text += (f" Later checkpoints score worse (step {last_step}: {losses[last_step]:.6f}): over-fitting "
                 f"may have begun, so prefer step {step} to the final file.")
    return Html(text)


def _memory(peak: dict[str, int]) -> tuple[str, str]:
    shown = [f"{peak['rss'] / 2**30:.2f} GB RAM"] if "rss" in peak else []
    shown += [f"{peak['cuda'] / 2**30:.2f} GB GPU"] if "cuda" in peak else []
    return ", ".join(shown) or "unknown", "peak resident memory (and GPU memory allocated) of the run's process"


def write_report(base, settings, record: Record, grid, grid_title: str, grid_note: str, prompts: list[str],
                 images: int) -> Path:
    """``out/report.html`` (and ``best.safetensors``, the checkpoint grid). ``grid``: a callable making the
    checkpoint grid image (``lora_grid`` or ``ti_grid`` with its arguments bound); ``images``: training images."""
    started = time.perf_counter()
    out = Path(settings.out)
    # the checkpoint grid draws an image per checkpoint and strength: say what the pause after the last step is
    print(f"sdtune train {settings.kind}: {WRITING_REPORT} {out / 'report.html'}", file=sys.stderr, flush=True)
    best = best_checkpoint(record)
    drawn = len(grid_checkpoints(record))
    if drawn < len(record.checkpoints):
        grid_note += (f" {drawn} of the {len(record.checkpoints)} checkpoints are drawn: evenly spaced, the last "
                      f"and the best among them (the table above lists all).")
    if best is not None:
        with atomic_path(out / BEST_FILE) as tmp:
            shutil.copyfile(best[1], tmp)
    save_png(grid(), out / GRID_FILE)
    checkpoint_rows = [fill(CHECKPOINT_ROW, step=s, file=p.relative_to(out).as_posix(),
                            loss=f"{record.val_losses[s]:.6f}" if s in record.val_losses else "",
                            mark="best" if best and s == best[0] else "") for s, p in record.checkpoints]
    if 0 in record.val_losses:
        checkpoint_rows.insert(0, fill(BASE_ROW, loss=f"{record.val_losses[0]:.6f}"))
    samples = []
    for path in sorted((out / "samples").glob("step-*.png")):
        step = int(path.stem.split("-")[1])
        title = f"step {step}" + (" (the base model)" if step == 0 else "")
        samples.append(fill(SAMPLE, title=title, file=path.relative_to(out).as_posix()))
    peak, memory_note = _memory(record.peak_memory)
    package = resources.files("sdtune")
    page = Template(package.joinpath(PAGE).read_text(encoding="utf-8"))
    style = re.search(r"<style>.*?</style>", package.joinpath(LOOK).read_text(encoding="utf-8"), re.S).group(0)
    text = fill(page, style=Html(style), kind=settings.kind, out=str(out),
                model=getattr(base, "name", settings.model), preset=settings.preset or "none",
                images=images, validation=record.validation, verdict=_verdict(record, best, out),
                tensorboard=str(out / TENSORBOARD_DIR), checkpoint_rows=lines(checkpoint_rows),
                grid_title=grid_title, grid_note=grid_note, grid=GRID_FILE,
                prompts=" | ".join(prompts), samples=lines(samples) or Html("<p>No samples (--sample-every 0).</p>"),
                settings_file=str(out / SETTINGS_FILE), settings=to_toml(settings),
                rerun_note=(f"Not exactly: {note}." if (note := schedule_note(settings, record.spans)) else ""),
                train_seconds=f"{record.seconds:.0f}", steps=record.checkpoints[-1][0] if record.checkpoints else 0,
                report_seconds=f"{time.perf_counter() - started:.0f}", peak_memory=peak, memory_note=memory_note)
    atomic_write_text(text, out / REPORT_FILE)
    chosen = f"best checkpoint: step {best[0]}, copied to {out / BEST_FILE}" if best else "no validation loss"
    print(f"sdtune train {settings.kind}: report in {out / REPORT_FILE} ({chosen})", file=sys.stderr)
    return out / REPORT_FILE
