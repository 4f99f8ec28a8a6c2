"""What sdtune prints besides its results: its own warnings as one line each, and nothing from libraries.

Imported first by the package, before diffusers and transformers, so that the filters below are in place
when those libraries print their import-time messages; it also holds ``imports_without_gc``, which the package
and the command line import under.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
import warnings

from tqdm.auto import tqdm


def quiet_interrupt_while_starting() -> None:
    """For the ``sdtune`` command only: a Ctrl-C during the seconds torch and diffusers take to import says
    ``sdtune: interrupted``, as one later does (``cli.main`` catches those), instead of a traceback through
    the libraries' imports. ``cli.main`` puts Python's own handler back."""
    # the console script, or ``python -m sdtune[.cli]``, whose package is imported while sys.argv[0] is "-m"
    if (os.path.basename(sys.argv[0]) if sys.argv else "") in ("sdtune", "-m") and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def _interrupted(signum, frame) -> None:
    sys.stderr.write("sdtune: interrupted\n")
    os._exit(130)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that was handled: its message says what was kept (``cli.main`` prints it after ``sdtune:``)."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (``kill``, ``docker stop``, a job scheduler's time limit); its message, where it has one, says
    what was kept."""


@contextlib.contextmanager
def terminate_unwinds():
    """Inside: a SIGTERM unwinds as a Ctrl-C does, so that half-written outputs' temporary files are removed on the
    way out (by default Python ends at once and leaves them). Training's ``stop_requests`` takes it over for its
    steps, to save first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stop_requests(enabled: bool = True):
    """Inside: a first Ctrl-C (or SIGTERM) only asks (the yielded list gets its signal number) and says so, for a
    loop to finish its step, save and stop (raising ``stopped_by``'s exception); a second one interrupts at once,
    as outside. Off in other threads (the web UI's jobs), where Python delivers no signal."""
    requested: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def ask(signum, frame):
        if requested:
            raise stopped_by(signum)("stopped without saving the step in progress; the same command continues from "
                                     "the last save, if there is one")
        requested.append(signum)
        name = signal.Signals(signum).name
        why, again = ("", "Ctrl-C again") if signum == signal.SIGINT else (f"{name}: ", f"a second {name} or Ctrl-C")
        sys.stderr.write(f"\nsdtune: {why}stopping after this step to save it ({again} to stop without saving)\n")

    # SIGTERM too: what a job scheduler, `docker stop` or `kill` sends first, with a grace period to save in
    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stopped_by(signum: int) -> type[KeyboardInterrupt]:
    """The exception a stop asked by ``signum`` ends with: a SIGTERM's exits 143 (128 + 15), as schedulers expect,
    a Ctrl-C's 130."""
    return Terminated if signum == signal.SIGTERM else Interrupted


def restore_interrupt() -> None:
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupt_ends_with(code: int) -> None:
    """For the ``sdtune`` process once its command is done: a Ctrl-C while it exits ends it with the command's own
    exit code, what it printed flushed (Python's handler gave a traceback). Python's last steps of shutting down
    put the system's default back, under which the signal ends the process as a shell's 130."""
    def end(signum, frame) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    signal.signal(signal.SIGINT, end)


@contextlib.contextmanager
def imports_without_gc():
    """Import the heavy libraries without Python's cyclic garbage collector walking them.

    Importing torch, diffusers and transformers creates about 700 thousand tracked objects, and the collector
    walked the growing heap in full several times on the way (a quarter of the import's time, measured on the
    shared 2-core test machine); with it only paused, the first collection after the imports walked them all
    once more (0.3-0.4 s of every command's start). Import-time objects are nearly all alive until the process
    ends, so they are frozen (``gc.freeze``: left out of every later collection) before the collector's state
    is restored. What a program creates afterwards is collected as usual; the price is the import's own
    garbage, about 12 thousand objects that stay. The package's imports and the command line's own (the
    commands' modules) both run under it.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


class SdtuneWarning(UserWarning):
    """Something the user should know that does not stop the command (a skipped file, a fallback name)."""


def main_process() -> bool:
    """Whether this is the process that speaks and writes: the only one, or the first of an ``accelerate launch``
    or ``torchrun`` (RANK, which the launchers set, tells the others, who would say everything again)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def launched() -> bool:
    """Whether this process is one of several that a launcher started (WORLD_SIZE, which they set)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def note(message: str) -> None:
    """Tell the user about a fallback or a skipped input; the command goes on."""
    if main_process():
        warnings.warn(message, SdtuneWarning, stacklevel=2)


class _DropMessage(logging.Filter):
    """Drops one library message, known by a part of its text; the logger's other messages still come through."""

    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in record.getMessage()


# Library messages on import that would come before every answer, each about something sdtune does not use. A
# filter on a logger the library has not created yet is kept: getLogger returns the same object later.
# - transformers 5: CLIPImageProcessor and SiglipImageProcessor fall back to PIL without torchvision (sdtune uses
#   neither: the safety checker is off);
# - bitsandbytes, which diffusers imports when it is installed (for --optimizer adamw8bit or lion), on CPUs with
#   AVX-512 BF16: it could not fetch a 4-bit kernel from the hub (sdtune uses no 4-bit layers), and the kernels
#   package, offline, that it skipped that kernel's publisher check
logging.getLogger("transformers.utils.import_utils").addFilter(_DropMessage("requires torchvision (not installed)"))
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("gemm_4bit_forward"))
logging.getLogger("kernels._internals.hf_hub").addFilter(_DropMessage("kernels-community/quantization-bitsandbytes"))


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"sdtune: warning: {message}\n"


def cli_warnings() -> None:
    """For the command line: every warning as one ``sdtune: warning:`` line (no source line under it), and
    the libraries' deprecation notices, which a user of the command cannot act on, not at all."""
    warnings.formatwarning = _one_line
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# How often a progress line goes to a log file (see ``progress``); a program that watches the log (the web UI's
# jobs) asks for more through the environment
LOG_SECONDS = 30.0
LOG_SECONDS_ENV = "SDTUNE_LOG_SECONDS"


def on_terminal() -> bool:
    """Whether stderr is a terminal, where a progress bar redraws itself in place."""
    return sys.stderr.isatty()


def progress(total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0, leave: bool = True):
    """A progress bar on stderr (tqdm's ``update``/``set_postfix``/``close``): drawn in place on a terminal; in a
    log file (a batch job, CI, ``2> log``) a plain line every ``LOG_SECONDS`` and one at the end instead, where a
    bar's carriage-return redraws would make one line of megabytes."""
    enabled = enabled and main_process()
    if enabled and not on_terminal():
        return LogLines(total, desc, unit, initial, float(os.environ.get(LOG_SECONDS_ENV, LOG_SECONDS)))
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=leave,
                dynamic_ncols=True, file=sys.stderr)


class LogLines:
    """The progress bar for a log file: ``desc: n/total unit, elapsed, rate, postfix`` lines (see ``progress``)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: float = LOG_SECONDS):
        self.total, self.desc, self.unit, self.n, self.first, self.every = total, desc, unit, initial, initial, every
        self.postfix, self.closed, self.shown = "", False, initial
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self.line()

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def line(self) -> None:
        self.last, self.shown = time.monotonic(), self.n
        elapsed = self.last - self.start
        rate = f", {(self.n - self.first) / elapsed:.2f} {self.unit}/s" if elapsed > 0 and self.n > self.first else ""
        digits = 4 if self.every < 1 else 0  # lines more often than each second (benchmarks time each step)
        done = f"{self.n}/{self.total} {self.unit}, {elapsed:.{digits}f} s"
        sys.stderr.write(f"{self.desc}: {done}{rate}{self.postfix}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.closed and self.n != self.shown:  # where it ended, unless just said (nothing done: nothing)
            self.line()
        self.closed = True

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
