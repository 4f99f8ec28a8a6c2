"""The diffusion training loop, shared by Textual Inversion and LoRA.

One step, for a batch of cached latents z0 and captions c::

    noise ~ N(0, I),   t ~ U{0, T-1}
    z_t  = sqrt(ᾱ_t) · z0 + sqrt(1 - ᾱ_t) · noise
    loss = mean_i  w_i · mean(m_i ⊙ (target_i − ε_θ(z_t, t, c)_i)²)    target = noise (ε) or v; w = 1

``objective.Objective`` computes that loss; ``diffusion`` holds the draws and the options that change them
(noise offset, pyramid noise, input perturbation, a timestep range, Huber losses, Min-SNR-γ and debiased
weights); ``schedules`` the learning rate at each step.

m_i is the image's loss mask on the latent grid (``masks``, with ``--masked-loss``; else all ones). With prior
preservation (``prior``) each step also draws a batch of class images and adds ``prior_loss_weight`` times
their loss, computed the same way (DreamBooth).

The condition c is what the family's UNet reads (``TextStack``): each text encoder's chosen hidden layer,
concatenated, and for SDXL also the pooled text embedding and each image's time ids (original size, crop,
target size, from the data). The target follows the scheduler's prediction type (ε, or v for SD 2.x's
768-v models: v = sqrt(ᾱ_t) · noise − sqrt(1 − ᾱ_t) · z0, diffusers' ``get_velocity``).

Only the job's parameters (TI's new rows, the LoRA matrices) are in the optimizer; everything else is
frozen, in eval mode, and where it does not lead to a trainable parameter runs without autograd (the text
encoders of a UNet-only LoRA; their outputs are even cached when captions do not change, and a caption that a
batch holds several times then goes through the UNet's cross-attention text projections once: ``shared_text``).

Reproducibility. Every random draw of step s comes from generators seeded with (seed, s): which images,
their latent samples and flips, caption shuffles, noise, timesteps and dropout. So a run resumed from a save
repeats the uninterrupted one exactly, and several processes (``accelerate launch``, ``torchrun``) each take
their slice of the same global batch: N processes with batch b give the result of one with batch N·b (except
--lora-dropout: each process draws the masks of its own slice, equal in distribution only).

Saves (atomic) hold the job's files plus ``resume.pt`` (trainable tensors, optimizer, step, settings, the
checkpoints so far); a NaN loss stops the run before the bad step is applied, leaving the last save as it was.

What a run shows: it prints its settings and writes them to ``settings.toml`` (``--config`` reruns it); the
validation loss (``validation``) is measured at step 0, every ``validation_every`` steps, at each save and at
the end; sample grids at step 0, every ``sample_every`` steps (and ``sample_every_epochs`` epochs) and at the end;
the losses go to ``loss.csv``, TensorBoard and ``loss.png`` (``logs``). The trainers then write ``report.html``
from the returned ``Record``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..console import Interrupted, Terminated, launched, main_process, note, progress, stop_requests, stopped_by
from ..generate import TextStack, generate, grid, infotext, note_deep_clip_skip, save_png
from ..safeio import SdtuneError, atomic_save_torch, atomic_write_text, folder_lock, load_state
from . import fp8, logs, optimizers, samples, shared_text
from .config import OUTPUT_SETTINGS, SCHEDULES_OVER_RUN, TrainSettings, summary, to_toml
from .data import TrainingSet, seed_for, vae_scale
from .diffusion import Loss, Noise, diffusion_draws
from .objective import Objective, TextInput
from .scan import fingerprint
from .schedules import learning_rates
from .validation import ValidationSet, validation_loss

STATE_FILE = "resume.pt"
SAMPLE_KEY = "Training sample"  # the grid's parameter naming the run and step: the adapter was live, in no tag
STATE_FORMAT = "sdtune-train-state-1"
SETTINGS_FILE = "settings.toml"
# settings that may change between a save and its resume without changing what the remaining steps compute
RESUMABLE_CHANGES = OUTPUT_SETTINGS | {"steps", "epochs", "resume", "progress", "out", "data", "model", "preset",
                                       "save_precision"}


@dataclass
class Job:
    """What a kind of training plugs into the loop."""

    name: str  # "ti" | "lora"
    param_groups: list[dict]  # [{"params": [...], "lr": base lr}, ...]
    state: Callable[[], dict]  # the trainable tensors, for the resume state
    load_state: Callable[[dict], None]
    save: Callable[[int, bool], list[Path]]  # (step, final) -> files written (final: the main file names)
    text_trainable: bool  # gradients must flow through the text encoder
    expand: Callable[[str], str] = lambda prompt: prompt  # prompt rewrite (multi-vector TI tokens)
    set_training: Callable[[bool], None] = lambda on: None  # train/eval mode of the trainable modules (dropout)
    metadata: dict = field(default_factory=dict)  # filled by the loop: steps, epochs, batches per epoch...
    sample_prompts: list[str] = field(default_factory=list)  # the grids' prompts when the settings name none
    validation: ValidationSet | None = None  # fixed images for the validation loss
    prior_data: TrainingSet | None = None  # prior preservation: the class images, a batch of them every step
    prior_weight: float = 0.0  # their loss's weight
    after_step: Callable[[], dict[str, float]] = lambda: {}  # run after each optimizer step; its numbers are logged


@dataclass
class Record:
    """What a finished run did, for its report."""

    files: list[Path]  # the final files
    checkpoints: list[tuple[int, Path]]  # (step, main file) of every save, the final one last
    val_losses: dict[int, float]  # step -> validation loss
    validation: str  # which images the validation loss is on
    seconds: float  # training time, summed over resumed sessions
    peak_memory: dict[str, int]  # bytes: "rss", "cuda"
    main: bool  # the main process (the one that writes files)
    spans: list = field(default_factory=list)  # [first step, planned total] of each --steps the run had


# ---------------------------------------------------------------- pieces

def check_model(settings: TrainSettings, base) -> None:
    """What the model cannot train with (its device's precision, its schedule's timesteps and prediction type):
    said by the trainers first, before any image is encoded."""
    on_cpu = base.device.type == "cpu"
    if on_cpu and base.dtype == torch.float16:
        raise SdtuneError("training on the CPU needs the model in fp32 (or bf16); load it with --dtype fp32")
    if on_cpu and settings.mixed_precision == "fp16":
        raise SdtuneError("--mixed-precision fp16 needs a GPU; on the CPU use no or bf16")
    if settings.full_bf16 and precision(settings, base) != "bf16":
        raise SdtuneError(f"--full-bf16: the trained weights in bf16 compute under bf16 mixed precision, and this "
                          f"run's is {precision(settings, base)}; add --mixed-precision bf16")
    Noise.of(settings).check(len(base.scheduler.alphas_cumprod))
    Loss.of(settings).check(base.scheduler.config.get("prediction_type", "epsilon"))


def note_merged(base) -> None:
    """A run on a model with LoRAs merged in learns on top of them: its file then works only with them loaded."""
    loras = getattr(base, "loras", None)
    if loras is not None and len(loras):
        note(f"the model has LoRAs merged in ({', '.join(loras.names())}): this run learns on top of them, and what "
             f"it writes works as trained only with them loaded too; remove them first to train on the model "
             f"itself")


def precision(settings: TrainSettings, base) -> str:
    """The run's mixed precision, --mixed-precision auto resolved: the model's half dtype on a GPU, else none."""
    if settings.mixed_precision != "auto":
        return settings.mixed_precision
    return "no" if base.device.type == "cpu" else {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(base.dtype, "no")


def make_accelerator(settings: TrainSettings, base):
    check_model(settings, base)
    on_cpu = base.device.type == "cpu"
    mp = precision(settings, base)
    # --module-dropout: a process's step may leave a layer out, whose gradients DDP must then find (it costs a walk
    # of the graph each step, so only then)
    skips = getattr(settings, "module_dropout", 0.0) > 0
    # accelerate keeps one state per process, fixed by its first Accelerator: a later run in the same process (the
    # Python API, a test) with another precision would be refused, so each run starts it afresh; the process group
    # (its PartialState) stays
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mp, cpu=on_cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if skips else None)


def total_steps(settings: TrainSettings, data: TrainingSet, global_batch: int) -> int:
    if settings.epochs:
        return settings.epochs * math.ceil(data.batches_per_epoch(global_batch) / settings.grad_accum)
    return settings.steps


def schedule_note(settings: TrainSettings, spans: list) -> str:
    """What a run resumed with other --steps cannot repeat from its settings: the part of it that followed a
    learning-rate schedule planned over another step count ("" when nothing differs)."""
    if settings.lr_scheduler not in SCHEDULES_OVER_RUN or len(spans) < 2:
        return ""
    ends = [start for start, _ in spans[1:]] + [spans[-1][1]]
    parts = ", ".join(f"steps {start + 1}-{end} over {planned}" for (start, planned), end in zip(spans, ends))
    return (f"this run was resumed with other --steps, so its {settings.lr_scheduler} learning-rate schedule was "
            f"planned over other step counts ({parts}); these settings plan it over {spans[-1][1]} throughout, "
            f"so a rerun's weights differ")


def _announce(settings: TrainSettings, job: Job, out: Path, resolution: int, resolutions: list[int], spans: list,
              processes: int) -> None:
    """Print the settings the run uses and write them where ``--config`` can rerun them (with what the settings
    do not hold: the processes of an ``accelerate launch``, a schedule a resume changed)."""
    batch = (f"{processes} processes x batch {settings.batch_size} x grad_accum {settings.grad_accum} = global "
             f"batch {processes * settings.batch_size * settings.grad_accum}") if processes > 1 else ""
    notes = [n for n in (schedule_note(settings, spans), batch and f"trained on {batch}; rerun it on as many") if n]
    atomic_write_text("".join(f"# {n}\n" for n in notes) + to_toml(settings), out / SETTINGS_FILE)
    preset = f"preset {settings.preset!r}" if settings.preset else "no preset"
    validated = job.validation.description if job.validation else "no validation images"
    if resolutions != [resolution]:  # a dataset config's datasets at their own sizes
        size = f"; {' and '.join(map(str, resolutions))} px (its datasets' sizes)"
    else:  # (resolution=0 says less)
        size = f"; {resolution} px (the model's own size)" if not settings.resolution else ""
    size += f"; trained on {batch}" if batch else ""
    print(f"sdtune train {job.name}: {preset}; validation on {validated}{size}; settings (also in "
          f"{out / SETTINGS_FILE}):\n{summary(settings)}", file=sys.stderr)


def check_resume(base, settings: TrainSettings, kind: str, scan, validation_id: dict | None = None) -> None:
    """Refuse a resume ``run`` would refuse, before the images are encoded (minutes on a real dataset); ``run``
    checks again, the class images too, which may not be drawn yet here. ``validation_id``: the held-out images'
    fingerprint (``validation.data_id``)."""
    path = Path(settings.out) / STATE_FILE
    if settings.resume and path.is_file():
        data_id = fingerprint(scan, settings.data) | ({"validation": validation_id} if validation_id else {})
        # (mapped: only its settings are read here; ``run`` reads the tensors)
        _read_resume(path, kind, settings, getattr(base, "model_hash", ""), data_id, mmap=True)


def _read_resume(path: Path, kind: str, settings: TrainSettings, model_hash: str, data_id: dict,
                 mmap: bool = False) -> dict:
    try:
        state, _ = load_state(path, mmap=mmap)
    except SdtuneError as e:  # cut short (a full disk): the files of the last complete save are still there
        raise SdtuneError(f"{e}; delete it to start over here (or use --no-resume), or use another --out") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SdtuneError(f"{path}: not an sdtune resume state; delete it or use another --out")
    saved = json.loads(state["settings"])
    now = settings.to_dict()
    other = state.get("kind") or ("lora" if "rank" in saved else "ti")  # older states name no kind
    if other != kind:
        raise SdtuneError(f"{path.parent} holds a {other} training run, not a {kind} one; use another --out for "
                          f"this {kind} run")
    # the model first: another model's preset differs in settings the user never typed
    if state.get("model_hash") and model_hash and state["model_hash"] != model_hash:
        raise SdtuneError(f"{path}: this run was started on another base model (hash {state['model_hash']}, now "
                          f"{model_hash}); use the same --model, or another --out")
    saved = {**type(settings)().to_dict(), **saved}  # settings added since: defaults
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed[:3])
        raise SdtuneError(f"{path}: this run was started with other settings ({what}); use the same settings to "
                          f"resume, another --out for a new run, or --no-resume to start over here")
    saved_data = state.get("data")  # states written before sdtune recorded it: not checked
    # only what the state recorded (states before sdtune hashed the images' bytes or the class images hold less)
    if saved_data and any(saved_data[k] != data_id.get(k) for k in saved_data if k in data_id or k != "class_images"):
        held = saved_data.get("validation")
        if held != data_id.get("validation") and all(saved_data[k] == data_id.get(k) for k in ("sha256", "content")):
            where, then, now = (settings.validation_dir or settings.data, (held or {}).get("images", 0),
                                (data_id.get("validation") or {}).get("images", 0))
            what = "held-out validation images or their captions"
        else:
            where, then, now, what = settings.data, saved_data["images"], data_id["images"], "images or captions"
        raise SdtuneError(f"{path}: the {what} in {where} changed since this run was saved ({then} image(s) then, "
                          f"{now} now), and the rest of the run would train and validate on other data under the "
                          f"same curve; use another --out for a new run, or --no-resume to start over here")
    return state


# What a run writes in its folder (beside settings.toml): its files and checkpoints, samples, logs, report
_RUN_SUFFIXES = {".safetensors", ".pt", ".bin", ".png", ".csv", ".html"}
_RUN_FOLDERS = ("samples", "tensorboard", "diffusers")


def main_first(work: Callable[[], object]) -> None:
    """``work`` (files that every process then reads) on the main process alone under a launcher, the others
    waiting for it; an error it meets stops every process with its message."""
    if not launched():
        work()
        return
    error = None
    if main_process():
        try:
            work()
        except (SdtuneError, OSError) as e:  # a refusal, a file that cannot be written (a full disk)
            error = str(e)
    errors = [e for e in gather_object([error]) if e]
    if errors:
        raise SdtuneError(errors[0])


def _set_aside(out: Path) -> Path | None:
    """Move an earlier run's files out of ``out`` into ``out/earlier-N`` when a run starts over there (--no-resume,
    or a run stopped before its first save): its checkpoints, samples and TensorBoard events would otherwise sit
    beside this run's and be taken for them. Nothing is deleted. None when ``out`` holds no earlier run."""
    if not (out / SETTINGS_FILE).is_file():
        return None
    # of the TOML files only the run's own: another is the user's (the UI's job.toml, a config given to --config
    # from there), which a rerun of the same command reads again
    old = [p for p in out.iterdir() if (p.is_file() and (p.suffix in _RUN_SUFFIXES or p.name == SETTINGS_FILE))
           or (p.is_dir() and p.name.startswith(_RUN_FOLDERS))]
    aside = next(out / f"earlier-{n}" for n in range(1, 10_000) if not (out / f"earlier-{n}").exists())
    aside.mkdir()
    for path in old:
        path.rename(aside / path.name)
    return aside


@contextlib.contextmanager
def holding(settings: TrainSettings, name: str, base):
    """``settings.out`` locked for a run from its start through its report: the main process's lock (the others of
    an ``accelerate launch`` write nothing there). Under a launcher the processes agree first, so that a refusal
    stops all of them at once (one left going would wait in the first collective until the launcher's timeout):
    the lock's outcome is shared, and every process must see the same resume state (one folder all share)."""
    lock = folder_lock(Path(settings.out), f"sdtune train {name}")
    if not launched():
        with lock:
            yield
        return
    make_accelerator(settings, base)  # the process group (the run's own accelerator joins it)
    with contextlib.ExitStack() as stack:
        error = None
        if main_process():
            try:
                stack.enter_context(lock)
            except SdtuneError as e:
                error = str(e)
        state = Path(settings.out) / STATE_FILE
        seen = gather_object([(error, state.stat().st_size if settings.resume and state.is_file() else None)])
        if any(e for e, _ in seen):
            raise SdtuneError(next(e for e, _ in seen if e))
        if len({size for _, size in seen}) > 1:
            shown = ", ".join(f"process {i}: {'none' if size is None else f'{size} bytes'}"
                              for i, (_, size) in enumerate(seen))
            raise SdtuneError(f"{settings.out}: the processes of this run see different resume states there "
                              f"({shown}); --out must be one folder they all share (on several machines, a shared "
                              f"filesystem)")
        yield


def _resuming(name: str, state: dict, start: int, total: int, settings: TrainSettings) -> str:
    """The line a resumed run prints: where it picks up, and what a changed step count does to the schedule."""
    if start == total:
        return (f"sdtune train {name}: already finished ({total} steps, {Path(settings.out) / STATE_FILE}); "
                f"writing its final files and report again (more --steps would continue it)")
    line = f"sdtune train {name}: resuming at step {start} of {total} from {Path(settings.out) / STATE_FILE}"
    before = state.get("total")
    if before and before != total and settings.lr_scheduler in SCHEDULES_OVER_RUN:
        line += (f" (the {settings.lr_scheduler} learning-rate schedule now spans {total} steps, not {before}, "
                 f"so the remaining steps' rates differ from the first run's plan)")
    return line


# ---------------------------------------------------------------- the loop

def _freeze(base, job: Job) -> Callable[[], None]:
    """Only the job's parameters require grad, the frozen modules are in eval mode; returns the undo."""
    params = {id(p) for group in job.param_groups for p in group["params"]}
    flags = {}
    for module in base.modules().values():
        module.eval()
        for p in module.parameters():
            if id(p) not in params:
                flags[p] = p.requires_grad
                p.requires_grad_(False)
    for group in job.param_groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return lambda: [p.requires_grad_(flag) for p, flag in flags.items()]


def _trained_in(job: Job, dtype: torch.dtype) -> Callable[[], None]:
    """--full-bf16: the job's trainable tensors in ``dtype`` (their gradients and the optimizer's state follow);
    returns the undo, which gives them their dtype back with the values trained."""
    params = [p for group in job.param_groups for p in group["params"]]
    dtypes = [p.dtype for p in params]
    for p in params:  # (in place: the optimizer's groups hold these parameters)
        p.data = p.data.to(dtype)

    def undo():
        for p, was in zip(params, dtypes):
            p.data = p.data.to(was)
    return undo


def _checkpointing(base, text_trainable: bool) -> Callable[[], None]:
    """Gradient checkpointing on the UNet (and the text encoders when they are on the gradient path)."""
    unet = base.unet
    unet.enable_gradient_checkpointing()
    if not text_trainable:
        return unet.disable_gradient_checkpointing
    encoders = [model for _, model, _ in base.text_encoders()]
    # transformers checkpoints only in train mode (CLIP has no dropout, so train mode changes nothing else)
    for te in encoders:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        te.train()

    def undo():
        unet.disable_gradient_checkpointing()
        for te in encoders:
            te.gradient_checkpointing_disable()
            te.eval()
    return undo


def run(base, settings: TrainSettings, job: Job, data: TrainingSet,
        callback: Callable[[int, float], None] | None = None) -> Record:
    """Train ``job`` on ``data``; returns what the run did. Resumes from ``out/resume.pt`` when allowed."""
    started = time.perf_counter()
    accelerator = make_accelerator(settings, base)
    if base.device != accelerator.device:  # e.g. one GPU per process under accelerate launch
        base.to(accelerator.device)
    device, world = accelerator.device, accelerator.num_processes
    state_path = Path(settings.out) / STATE_FILE
    global_batch = settings.batch_size * world
    total = total_steps(settings, data, global_batch)
    job.metadata.update(total_steps=total, batches_per_epoch=data.batches_per_epoch(global_batch),
                        global_batch=global_batch * settings.grad_accum, processes=world,
                        mixed_precision=str(accelerator.mixed_precision))
    optimizers.fit_group_lrs(settings.optimizer, job.param_groups)  # (before the model changes: nothing to undo)
    for group in job.param_groups:
        group["base_lr"] = group["lr"]
    undo = [_freeze(base, job)]  # the folder is held by the trainer (``holding``), through its report too
    try:
        if settings.full_bf16:
            undo.append(_trained_in(job, torch.bfloat16))
        if settings.gradient_checkpointing:
            undo.append(_checkpointing(base, job.text_trainable))
        in_fp8 = fp8.models(base, settings.fp8_base, settings.fp8_base_unet)
        if in_fp8:
            if device.type == "cpu":
                note(f"{fp8.flag(settings)}: saves a GPU's memory; on the CPU the full-precision layers stay beside "
                     f"their 8-bit twins (the run trains as on a GPU)")
            trainable = {id(p) for group in job.param_groups for p in group["params"]}
            for where, model in in_fp8.items():  # (before the text cache: cached and run captions read the same)
                undo.append(fp8.store_in_fp8(model, trainable, where, fp8.flag(settings)))
        if settings.channels_last:  # only 4-D weights change layout: the convolutions (LoRA's included)
            base.unet.to(memory_format=torch.channels_last)
            undo.append(lambda: base.unet.to(memory_format=torch.contiguous_format))
        if settings.flush_denormals and device.type == "cpu":  # a subnormal moment changes less than Adam's eps
            torch.set_flush_denormal(True)
            undo.append(lambda: torch.set_flush_denormal(False))
        job.set_training(True)
        undo.append(lambda: job.set_training(False))
        sets = [data] + ([job.prior_data] if job.prior_data is not None else [])
        for d in sets:
            d.warm_tokens(settings.token_warmup(total), settings.token_warmup_min, settings.grad_accum)
        cache = None if job.text_trainable or any(d.captions_vary for d in sets) else \
            sorted({c for d in sets for c in d.possible_captions()})
        stack = TextStack.of(base, settings.clip_skip, settings.max_token_length // 75, settings.weighted_captions)
        note_deep_clip_skip(base.family, settings.clip_skip, "it reads what this run trains at the default layer")
        # frozen, cached text: each distinct caption of a batch goes through the cross-attention projections once
        unshare = shared_text.install(base.unet) if cache is not None and settings.share_text else None
        if unshare is not None:
            undo.append(unshare)
        text = TextInput(stack, device, job.expand, cache, shared=unshare is not None)
        objective = Objective(base.unet, stack, base.scheduler, Loss.of(settings), job.text_trainable,
                              base.family.pooled_and_time_ids, vae_scale(base), settings.zero_terminal_snr).to(device)
        if in_fp8:  # DDP leaves them alone: every process loaded the same, and its broadcast takes no fp8
            objective._ddp_params_and_buffers_to_ignore = fp8.names_in_fp8(objective)
        optimizer = optimizers.build(settings.optimizer, settings.optimizer_args, job.param_groups, settings.lr,
                                     settings.weight_decay, device)
        start, history, extend, state, spans = 0, {}, False, {}, [[0, total]]
        data_id = fingerprint(data.scan, settings.data)
        if job.validation is not None and job.validation.data_id:
            data_id["validation"] = job.validation.data_id
        if job.prior_data is not None:  # class images added or edited would change the rest of the run as much
            data_id["class_images"] = fingerprint(job.prior_data.scan)
        if settings.resume and state_path.is_file():
            state = _read_resume(state_path, job.name, settings, getattr(base, "model_hash", ""), data_id)
            start = int(state["step"])
            if start > total:
                raise SdtuneError(f"{state_path}: the saved run is at step {start}, past --steps {total}; raise "
                                  f"--steps, or use another --out")
            saved_world = state.get("processes", world)  # states before sdtune kept it: not checked
            if saved_world != world:  # another global batch: other batches, another step count per epoch
                raise SdtuneError(f"{state_path}: this run was trained on {saved_world} process(es) (a global batch "
                                  f"of {saved_world * settings.batch_size}), now on {world}; resume it on "
                                  f"{saved_world}, or use another --out")
            job.load_state(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            history = state.get("history", {})
            # a state written before sdtune kept spans: the one total it recorded
            spans = history.get("spans") or ([[0, state["total"]]] if state.get("total") else [])
            if spans and spans[-1][0] == start:  # resumed again where the last one began: no step ran on it
                spans = spans[:-1]
            if not spans or spans[-1][1] != total:
                spans = [*spans, [start, total]]
            # a finished run given more steps: its final files are written again at the new end, so the weights
            # they hold now are saved under their step's name first (states before sdtune recorded "final": the
            # saved step count tells)
            saved_steps = json.loads(state["settings"]).get("steps")
            extend = start < total and state.get("final", start == saved_steps and not settings.epochs)
        if accelerator.is_main_process:
            aside = _set_aside(Path(settings.out)) if start == 0 else None
            if aside is not None:
                print(f"sdtune train {job.name}: starting over in {settings.out}; the earlier run's files are now in "
                      f"{aside}", file=sys.stderr)
            _announce(settings, job, Path(settings.out), data.resolution, data.resolutions, spans, world)
            if start:
                print(_resuming(job.name, state, start, total, settings), file=sys.stderr)
        job.metadata["started_at"] = history.get("started_at", time.time())  # wall clock, as kohya records it
        model, optimizer = accelerator.prepare(objective, optimizer)
        undo.append(accelerator.free_memory)
        log = logs.TrainLog(Path(settings.out), start, enabled=accelerator.is_main_process, log_with=settings.log_with,
                            wandb=settings.wandb_run() if settings.log_with in ("wandb", "all") else None,
                            wandb_id=history.get("wandb_id"))
        undo.append(log.close)
        session = Session(accelerator=accelerator, base=base, settings=settings, job=job, data=data, text=text,
                          model=model, optimizer=optimizer, total=total, log=log, last_save=start or None,
                          checkpoints=[(s, Path(settings.out) / f) for s, f in history.get("checkpoints", [])],
                          snapshot_files={int(s): [Path(settings.out) / f for f in files]
                                          for s, files in history.get("snapshot_files", {}).items()},
                          seconds_before=history.get("seconds", 0.0), started=started, data_id=data_id, spans=spans)
        if extend:
            session.save(start, final=False)
        files = _steps(session, start, callback)
        log.close()  # loss.png and the last rows, before the report reads them
        return Record(files=files, checkpoints=session.checkpoints, val_losses=log.val_losses(),
                      validation=job.validation.description if job.validation else "",
                      seconds=session.seconds, peak_memory=logs.peak_memory(), main=accelerator.is_main_process,
                      spans=spans)
    finally:
        failing = sys.exc_info()[1] is not None
        for step_back in reversed(undo):
            if not failing:
                step_back()
                continue
            # the run's own error goes up: a cleanup failing after it (loss.csv on a disk that was full for
            # resume.pt) would replace it with the wrong file's name
            with contextlib.suppress(Exception):
                step_back()


@dataclass
class Session:
    """What the steps of one run share: the prepared model and optimizer, the data, the settings."""

    accelerator: object  # accelerate.Accelerator
    base: object  # the Base being trained
    settings: TrainSettings
    job: Job
    data: TrainingSet
    text: TextInput
    model: nn.Module  # the Objective, as accelerate prepared it (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    total: int  # steps of the whole run
    log: logs.TrainLog
    last_save: int | None = None  # step of the newest save, for the NaN message
    final_files: list[Path] = field(default_factory=list)
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)  # (step, main file), resumed runs' included
    # step -> every file of that snapshot (not the final files'), which --keep-last deletes together
    snapshot_files: dict[int, list[Path]] = field(default_factory=dict)
    seconds_before: float = 0.0  # training time of the sessions before a resume
    data_id: dict = field(default_factory=dict)  # the training data's fingerprint (scan.fingerprint), for resumes
    spans: list = field(default_factory=list)  # Record.spans
    started: float = 0.0  # perf_counter() at this session's start

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    @functools.cached_property
    def noise(self) -> Noise:
        """How each step draws its noise and timesteps (from the settings, once)."""
        return Noise.of(self.settings)

    @property
    def global_batch(self) -> int:
        return self.settings.batch_size * self.accelerator.num_processes

    def micro_step(self, number: int, sync: bool) -> torch.Tensor:
        """Forward and backward of global batch ``number`` (this process's slice); returns its share of the
        step loss. ``sync``: the last micro-batch of a step, whose backward all-reduces the gradients."""
        acc, s = self.accelerator, self.settings
        inputs = self.inputs(self.data, s.seed, number)
        if self.job.prior_data is not None:  # the class images: their own batches, noise and timesteps
            inputs.update(prior=self.inputs(self.job.prior_data, seed_for(s.seed, "prior"), number),
                          prior_weight=self.job.prior_weight)
        torch.manual_seed(seed_for(s.seed, "dropout", number, acc.process_index))
        with contextlib.nullcontext() if sync else acc.no_sync(self.model):
            loss = self.model(**inputs) / s.grad_accum
            acc.backward(loss)
        return loss.detach()

    def inputs(self, data: TrainingSet, seed: int, number: int) -> dict:
        """The objective's inputs for global batch ``number`` of ``data`` (this process's slice), with the noise
        and timesteps drawn for it from ``seed``."""
        acc, s = self.accelerator, self.settings
        batch = data.batch(number, self.global_batch, acc.process_index, acc.num_processes)
        mine = slice(acc.process_index * s.batch_size, (acc.process_index + 1) * s.batch_size)
        draws = diffusion_draws(seed, number, (self.global_batch, *batch.latents.shape[1:]),
                                len(self.base.scheduler.alphas_cumprod), self.noise).rows(mine)
        if self.noise.adaptive_scale:
            draws = draws.adapted(batch.latents, self.noise.adaptive_scale)
        inputs = {"latents": batch.latents.to(acc.device), "noise": draws.noise.to(acc.device),
                  "timesteps": draws.timesteps.to(acc.device), **self.text(batch.captions),
                  "time_ids": batch.time_ids.to(acc.device)}
        if draws.input_noise is not draws.noise:
            inputs["input_noise"] = draws.input_noise.to(acc.device)
        if batch.mask is not None:
            inputs["mask"] = batch.mask.to(acc.device)
        return inputs

    def save(self, step: int, final: bool) -> None:
        acc = self.accelerator
        optimizers.set_averaged(self.optimizer, True)  # (schedule-free: the averaged weights, and the state so)
        acc.wait_for_everyone()
        main_first(lambda: self._write_save(step, final))  # a failed write stops every process, with its message
        self.last_save = step

    def _write_save(self, step: int, final: bool) -> None:
        """The main process's part of ``save``: the job's files, then the resume state that points at them."""
        acc = self.accelerator
        written = self.job.save(step, final)  # the user's files first, then the state that points at them
        self.final_files = written if final else self.final_files
        self.checkpoints = [c for c in self.checkpoints if c[0] != step] + [(step, written[0])]
        # a step saved again as the final files (a run resumed with fewer --steps): they are its checkpoint now
        self.snapshot_files.pop(step, None)
        if not final:
            self.snapshot_files[step] = written
        expired = self._expired()
        self.checkpoints = [c for c in self.checkpoints if c[0] not in expired]
        history = {"checkpoints": [(s, p.relative_to(self.out).as_posix()) for s, p in self.checkpoints],
                   "snapshot_files": {str(s): [p.relative_to(self.out).as_posix() for p in files]
                                      for s, files in self.snapshot_files.items() if s not in expired},
                   "seconds": self.seconds, "spans": self.spans, "started_at": self.job.metadata["started_at"]}
        if self.log.wandb_id:  # a resume goes on logging into the same W&B run
            history["wandb_id"] = self.log.wandb_id
        self.log.flush()
        atomic_save_torch({"format": STATE_FORMAT, "kind": self.job.name, "step": step,
                           "trainable": self.job.state(),
                           "optimizer": self.optimizer.state_dict(),
                           "settings": json.dumps(self.settings.to_dict()), "history": history,
                           "model_hash": getattr(self.base, "model_hash", ""), "data": self.data_id,
                           "final": final, "total": self.total, "processes": acc.num_processes},
                          self.out / STATE_FILE)
        # deleted only once the state no longer names them: a kill in between leaves files, never a dangling state
        for old in expired:
            for path in self.snapshot_files.pop(old):
                path.unlink(missing_ok=True)

    def _expired(self) -> set[int]:
        """The snapshots ``--keep-last`` lets go: all but the newest N and the save with the best validation loss
        (the report's best checkpoint). Saves from before sdtune recorded their files are kept."""
        keep = self.settings.keep_last
        if not keep:
            return set()
        snapshots = sorted(s for s, _ in self.checkpoints if s in self.snapshot_files)
        losses = self.log.val_losses()
        scored = [(losses[s], s) for s, _ in self.checkpoints if s in losses]
        best = {min(scored)[1]} if scored else set()
        return set(snapshots[:-keep]) - best

    def _evaluating(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the main process with the trainable modules in eval mode (no dropout); its error stops
        every process."""
        def evaluate() -> None:
            self.job.set_training(False)
            try:
                work()
            finally:
                self.job.set_training(True)
        main_first(evaluate)

    def sample(self, step: int) -> None:
        prompts = samples.expand(self.settings.sample_prompts) or self.job.sample_prompts
        path = self.sample_path(step)
        optimizers.set_averaged(self.optimizer, True)
        self._evaluating(lambda: self.log.image("samples", step, sample_grid(self.base, self.settings, prompts,
                                                                            self.job.expand, path)))

    def sample_path(self, step: int) -> Path:
        return self.out / "samples" / f"step-{step:06d}.png"

    def validate(self, step: int) -> None:
        """The validation loss at ``step``: logged, and printed with enough digits to compare runs."""
        if self.job.validation is None:
            return
        optimizers.set_averaged(self.optimizer, True)

        def measure():
            with self.accelerator.autocast():
                value = validation_loss(self.accelerator.unwrap_model(self.model), self.text, self.job.validation,
                                        self.accelerator.device)
            self.log.validation(step, value)
            tqdm.write(f"step {step}: validation loss {value:.8f}", file=sys.stderr)

        self._evaluating(measure)

    def stop_if_diverged(self, step: int, loss: float, grad_norm) -> None:
        """Raise before the optimizer step when the loss or the gradient norm is not finite (under fp16 the
        grad scaler skips steps with infinite gradients by itself)."""
        bad_norm = (grad_norm is not None and self.accelerator.mixed_precision != "fp16"
                    and not math.isfinite(float(grad_norm)))
        if math.isfinite(loss) and not bad_norm:
            return
        kept = f"the last good save is step {self.last_save} in {self.out}" if self.last_save else "nothing was saved yet"
        what = "NaN" if math.isnan(loss) else ("infinite" if math.isinf(loss) else "a NaN gradient")
        raise SdtuneError(f"{self.job.name} training: the loss became {what} at step {step + 1}, so training "
                          f"stopped before applying it; {kept}. Lower --lr, or use fp32/bf16 instead of fp16")


def _steps(r: Session, start: int, callback: Callable[[int, float], None] | None) -> list[Path]:
    """The loop itself: micro-batches, backward, clip, NaN check, step, validation, saves and samples."""
    s, acc, optimizer = r.settings, r.accelerator, r.optimizer
    params = [p for group in r.job.param_groups for p in group["params"]]
    bar = progress(r.total, f"train {r.job.name}", "step", initial=start, enabled=acc.is_main_process and s.progress)
    smooth = None
    # --save-every-epochs and --sample-every-epochs in steps: an epoch is its batches, a step grad_accum of them
    # (its last one may hold fewer)
    epoch_steps = math.ceil(r.job.metadata["batches_per_epoch"] / s.grad_accum)
    saves = [every for every in (s.save_every, s.save_every_epochs * epoch_steps) if every]
    samples = [every for every in (s.sample_every, s.sample_every_epochs * epoch_steps) if every]
    schedule = learning_rates(s, r.total, [group["base_lr"] for group in optimizer.param_groups])

    def due(step: int, periods: list[int]) -> bool:
        return any(step % every == 0 for every in periods)

    # a Ctrl-C saves the step in progress, as a scheduled save does, and stops (one process only: several
    # would have to agree on the step)
    stopping = contextlib.ExitStack()
    asked = stopping.enter_context(stop_requests(enabled=acc.num_processes == 1))
    try:
        if start == 0:  # the base model's numbers: where the run starts from
            r.validate(0)
            if samples:
                r.sample(0)
        elif due(start, samples) and not r.sample_path(start).exists():
            r.sample(start)  # a kill between the save of this step and its samples: the model is that step's
        for step in range(start, r.total):
            rates = schedule(step)
            optimizers.set_averaged(optimizer, False)  # (schedule-free: back where the gradients are taken)
            for group, rate in zip(optimizer.param_groups, rates):  # a group may stop early (--ti-steps, --te-steps)
                stop = group.get("stop_after", 0)
                group["lr"] = 0.0 if stop and step >= stop else rate
            loss = torch.zeros((), device=acc.device)
            for micro in range(s.grad_accum):
                loss += r.micro_step(step * s.grad_accum + micro, sync=micro == s.grad_accum - 1)
            for group in optimizer.param_groups:  # a stopped group's gradients neither count in the clipping nor
                if group.get("stop_after", 0) and step >= group["stop_after"]:  # reach its optimizer (its moments
                    for p in group["params"]:  # and weight decay stay where they stopped)
                        p.grad = None
            norm = acc.clip_grad_norm_(params, s.max_grad_norm) if s.max_grad_norm else None
            value = float(acc.reduce(loss, "mean"))
            r.stop_if_diverged(step, value, norm)
            try:
                optimizer.step()
            except (RuntimeError, ValueError, TypeError) as e:
                if s.optimizer in optimizers.OPTIMIZERS:  # sdtune's own: a bug, with its traceback
                    raise
                raise SdtuneError(f"--optimizer {s.optimizer} failed at step {step + 1} ({type(e).__name__}: {e}); "
                                  f"give it other --optimizer-args, or choose another --optimizer") from None
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            bar.update(1)
            lr = optimizers.step_size(optimizer.param_groups[0])  # Prodigy's: the factor times its step size
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}", refresh=False)
            r.log.train(done, value, lr,
                        {g["name"]: optimizers.step_size(g) for g in optimizer.param_groups if "name" in g})
            r.log.scalars(done, r.job.after_step())
            if callback is not None:
                callback(done, value)
            saving = done < r.total and due(done, saves)
            if saving or done == r.total or (s.validation_every and done % s.validation_every == 0):
                r.validate(done)
            if saving:
                r.save(done, final=False)
            if samples and (due(done, samples) or done == r.total):
                r.sample(done)
            if asked and done < r.total:
                if r.last_save != done:
                    r.validate(done)
                    r.save(done, final=False)
                stop = stopped_by(asked[0])
                raise stop(f"{'terminated' if stop is Terminated else 'interrupted'} at step {done} of {r.total}, "
                           f"saved ({r.checkpoints[-1][1]}, {r.out / STATE_FILE}); run the same command to continue")
        r.save(r.total, final=True)
    except KeyboardInterrupt as e:
        if acc.num_processes == 1 or isinstance(e, Interrupted):
            raise
        # several processes (no save of the step in progress): say what the same command continues from
        kept = f"step {r.last_save} ({r.out / STATE_FILE})" if r.last_save else "the start (nothing was saved yet)"
        raise Interrupted(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}; with several processes "
                          f"the step in progress is not saved: the same command continues from {kept}") from None
    finally:
        bar.close()
        stopping.close()
    return r.final_files


@torch.no_grad()
def sample_grid(base, settings: TrainSettings, prompts: list[str], expand, path: Path) -> Path:
    """A grid of ``sample_images`` images per prompt (one row each), same seeds every time, each prompt with its
    own kohya options (``samples``; rows of other sizes are centred on the largest, not stretched). Its PNG carries
    the first image's parameters, as A1111's grids do (one prompt: "all prompts joined" is no prompt anyone typed),
    and names the run and step the images came from."""
    images, first = [], None
    for prompt in map(samples.parse, prompts):
        made = generate(base, expand(prompt.text), expand(prompt.negative), steps=prompt.steps or settings.sample_steps,
                        guidance=settings.sample_guidance if prompt.guidance is None else prompt.guidance,
                        seed=settings.seed if prompt.seed is None else prompt.seed,
                        scheduler=prompt.sampler or settings.sample_sampler, clip_skip=settings.clip_skip,
                        width=prompt.width, height=prompt.height, num_images=settings.sample_images, progress=False,
                        extra_info={SAMPLE_KEY: f"{path.parent.parent.name} {path.stem}"})
        images += [g.image for g in made]
        # as written: the TI sub-tokens are expand's
        first = first or infotext(prompt.text, prompt.negative, made[0].params)
    return save_png(grid(_centred(images), cols=settings.sample_images), path, first)


def _centred(images: list) -> list:
    """Images of several sizes each centred on a white canvas of the largest width and height (the grid draws every
    image at one size)."""
    w, h = max(im.width for im in images), max(im.height for im in images)
    if all(im.size == (w, h) for im in images):
        return images
    out = []
    for im in images:
        canvas = Image.new("RGB", (w, h), "white")
        canvas.paste(im, ((w - im.width) // 2, (h - im.height) // 2))
        out.append(canvas)
    return out
