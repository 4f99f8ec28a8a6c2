"""A run's logs in the forms people already read: ``loss.csv``, TensorBoard event files, ``loss.png``.

Rows are kept in memory and ``loss.csv`` is rewritten atomically at every save and at the end, so after a
kill it ends where the resume state does; a resumed run reads it back up to its start step (TensorBoard's
``purge_step`` drops the later events the same way). Only the main process writes.

The two losses are different measures, so ``loss.png`` draws them in two panels: the training loss is the
objective of each step's random batch (Min-SNR weighted when that is on), noisy, drawn raw and smoothed; the
validation loss is the plain noise-prediction error on fixed images, timesteps and noise, one steady point
per evaluation (see ``validation``).
"""

from __future__ import annotations

import csv
import inspect
import io
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..safeio import SdtuneError, atomic_path, atomic_write_text

CSV_FILE = "loss.csv"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
COLUMNS = ("step", "loss", "lr", "val_loss")


def smooth(values: list[float], window: int) -> list[float]:
    """Debiased exponential moving average over about ``window`` points (TensorBoard's smoothing)."""
    weight = 1 - 1 / max(1, window)
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(acc / norm if norm else v)
    return out


def reset_peak_memory() -> None:
    """Start ``peak_memory`` afresh (a queue's next run): Linux resets the resident peak on request, CUDA too."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: the peak resident size becomes the current one
    except OSError:  # not Linux, or not allowed: the process's peak so far stays in
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, int]:
    """Peak memory in bytes since the process started (or ``reset_peak_memory``): ``rss`` (resident) and
    ``cuda`` (allocated on the GPU) where known."""
    peak = {}
    try:  # Linux: VmHWM, which clear_refs resets (getrusage's maxrss keeps the process's peak)
        status = Path("/proc/self/status").read_text()
        peak["rss"] = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
    except (OSError, AttributeError):
        try:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak["rss"] = rss if sys.platform == "darwin" else rss * 1024  # macOS says bytes, Linux kilobytes
        except ImportError:  # Windows
            pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda"] = int(torch.cuda.max_memory_allocated())
    return peak


LOCAL_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no account
NO_ACCOUNT = ("run wandb login (or set WANDB_API_KEY), or WANDB_MODE=offline to keep the run in OUT/wandb (wandb sync "
              "uploads it later)")


def wandb_module():
    """Weights & Biases' package (optional: ``pip install wandb``), ready to log: one line saying how to get it, or
    how to log in, where it is not."""
    try:
        import wandb  # (imported only by the runs that log to it: it starts a service process of its own)
    except ImportError:
        raise SdtuneError("--log-with wandb needs Weights & Biases' package: pip install wandb (or log with "
                          "tensorboard)") from None
    _quiet_wandb()
    if os.environ.get("WANDB_MODE", "").lower() not in LOCAL_MODES and _logged_in(wandb) is False:
        raise SdtuneError(f"--log-with wandb: Weights & Biases has no API key here; {NO_ACCOUNT}")
    return wandb


def _quiet_wandb() -> None:
    """wandb's own lines off the terminal (the user's settings win): its banner, and its advice to install Weave,
    its LLM tracer, which comes before a run's settings' silence applies."""
    for name in ("WANDB_SILENT", "WANDB_DISABLE_WEAVE"):
        os.environ.setdefault(name, "true")


def _logged_in(wandb) -> bool | None:
    """Whether W&B has a key here, asked without a prompt or the network; None where this wandb cannot say (its
    own start then says)."""
    if "prompt" in inspect.signature(wandb.login).parameters:  # wandb 0.2x+: login(prompt=False) only looks
        return bool(wandb.login(prompt=False, verify=False))
    key = getattr(getattr(wandb, "api", None), "api_key", "unknown")  # older ones: its key, or None
    return None if key == "unknown" else key is not None


class TrainLog:
    """One run's loss log (a no-op on processes other than the main one): loss.csv always, and TensorBoard and/or
    Weights & Biases as ``log_with`` says ("tensorboard", "wandb", "all"). ``wandb``: the run's project, name and
    settings (``wandb.init``'s project, name, config)."""

    def __init__(self, out: Path, start: int, enabled: bool = True, log_with: str = "tensorboard",
                 wandb: dict | None = None, wandb_id: str | None = None):
        self.out, self.enabled = Path(out), enabled
        self.rows: dict[int, dict] = {}
        self.writer = self.wandb = self._wandb_module = None
        self.wandb_id = wandb_id  # the W&B run's id, kept in the resume state
        if not enabled:
            return
        self.rows = {step: row for step, row in read_csv(self.out / CSV_FILE).items() if step <= start}
        if log_with in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides this folder's older events past ``start`` (a fresh run: all of them)
            self.writer = SummaryWriter(log_dir=str(self.out / TENSORBOARD_DIR), purge_step=start + 1 if start else 0)
        if log_with in ("wandb", "all"):
            module = wandb_module()
            # quiet, and leaving the terminal's output (progress bars) alone. A resume logs into the run it
            # continues: the steps a kill cut short are logged again with the same values (resuming is exact),
            # which W&B keeps once
            self._wandb_module = module
            try:
                self.wandb = module.init(**(wandb or {}), dir=str(self.out), id=wandb_id, resume="allow",
                                         settings=module.Settings(silent=True, console="off"))
            except Exception as e:  # noqa: BLE001 - its login, network and server errors, as one line
                raise SdtuneError(f"--log-with wandb: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                                  f"{NO_ACCOUNT}") from None
            self.wandb_id = self.wandb.id

    def _scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({name: value}, step=step)

    def _row(self, step: int) -> dict:
        return self.rows.setdefault(step, {"step": step, "loss": None, "lr": None, "val_loss": None})

    def train(self, step: int, loss: float, lr: float, group_lrs: dict[str, float] | None = None) -> None:
        """A step's loss and (first) learning rate; ``group_lrs``: each optimizer group's by name, logged apart
        to TensorBoard where there are several (lr/unet, lr/text_encoder, lr/text_encoder_2, lr/embedding)."""
        if self.enabled:
            self._row(step).update(loss=loss, lr=lr)
            self._scalar("loss/train", loss, step)
            self._scalar("lr", lr, step)
            if group_lrs and len(group_lrs) > 1:
                for name, value in group_lrs.items():
                    self._scalar(f"lr/{name}", value, step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Other numbers of a step (a job's own, e.g. --scale-weight-norms' counts), to TensorBoard by name."""
        if self.enabled:
            for name, value in values.items():
                self._scalar(name, value, step)

    def validation(self, step: int, loss: float) -> None:
        if self.enabled:
            self._row(step)["val_loss"] = loss
            self._scalar("loss/validation", loss, step)

    def image(self, name: str, step: int, path: Path) -> None:
        """An image file of a step (a sample grid) to TensorBoard's images and W&B's media."""
        if not self.enabled:
            return
        if self.writer is not None:
            with Image.open(path) as img:
                self.writer.add_image(name, np.asarray(img.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log({name: self._wandb_module.Image(str(path), caption=path.name)}, step=step)

    def val_losses(self) -> dict[int, float]:
        return {s: r["val_loss"] for s, r in sorted(self.rows.items()) if r["val_loss"] is not None}

    def flush(self) -> None:
        """Write ``loss.csv`` (every digit of each number) and flush the TensorBoard events."""
        if not self.enabled:
            return
        text = io.StringIO()
        table = csv.DictWriter(text, COLUMNS, lineterminator="\n")
        table.writeheader()
        for _, row in sorted(self.rows.items()):
            table.writerow({k: "" if row[k] is None else repr(row[k]) for k in COLUMNS})
        atomic_write_text(text.getvalue(), self.out / CSV_FILE)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Write everything, ``loss.png`` included; later calls do nothing."""
        if self.enabled:
            self.flush()
            plot(self.rows, self.out / PLOT_FILE)
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()
            self.enabled = False


def read_csv(path: Path) -> dict[int, dict]:
    """``loss.csv`` back as {step: row} (numbers as floats, empty cells None); nothing if there is no file."""
    if not path.is_file():
        return {}
    rows = {}
    with open(path, encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            row = {"step": int(rec["step"])}
            row.update({k: float(rec[k]) if rec.get(k) else None for k in COLUMNS[1:]})
            rows[row["step"]] = row
    return rows


def plot(rows: dict[int, dict], path: Path) -> Path:
    """``loss.png``: the training loss (raw and smoothed) above, the validation loss below, same steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no global pyplot state
    from matplotlib.figure import Figure

    ordered = [rows[s] for s in sorted(rows)]
    train = [(r["step"], r["loss"]) for r in ordered if r["loss"] is not None and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in ordered if r["val_loss"] is not None]
    fig = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    if train:
        steps, losses = zip(*train)
        top.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="each step")
        top.plot(steps, smooth(list(losses), max(1, len(losses) // 20)), color="#08519c", linewidth=2,
                 label="smoothed")
        top.legend(loc="upper right")
    top.set_ylabel("training loss")
    top.set_title("training loss (the objective of each step's random batch)")
    if val:
        steps, losses = zip(*val)
        bottom.plot(steps, losses, "o-", color="#d94801", linewidth=2)
    bottom.set_ylabel("validation loss")
    bottom.set_xlabel("step")
    bottom.set_title("validation loss (plain error on fixed images, timesteps and noise; lower is better)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
