"""The samplers sdtune draws with, by its own key, diffusers' class and A1111's name: data, and the checks of a
drawing that need no model, the image size's too (so a command line, a training run's settings and its sample
prompts are checked, and --help written, without loading diffusers)."""

from __future__ import annotations

import importlib.util

from .safeio import SdtuneError

# CLI name -> (diffusers class name, extra config, A1111 sampler name)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    # A1111's PLMS: linear multistep steps only, as SD's own config sets it; a model whose scheduler config does
    # not say (the built-in ones, a DDIM config) would otherwise start with Runge-Kutta steps, another sampler
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
}


def scheduler_available(name: str) -> bool:
    """Whether the packages the sampler needs are installed (diffusers' LMS integrates with scipy)."""
    return name != "lms" or importlib.util.find_spec("scipy") is not None


def check_scheduler(name: str) -> str:
    """sdtune's key for a sampler given by its key or A1111's name ("Euler a", "DPM++ 2M Karras"); an unknown
    one, or one whose package is missing, is one line (before a model is loaded for it)."""
    key = name if name in SCHEDULERS else sampler_key(str(name))
    if key is None:
        raise SdtuneError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)} (or A1111's name: "
                          f"{', '.join(repr(a1111) for _, _, a1111 in SCHEDULERS.values())})")
    if not scheduler_available(key):
        raise SdtuneError("scheduler 'lms' needs scipy, which is not installed; pip install scipy, or choose "
                          "another scheduler")
    return key


_A1111_NAMES = {a1111.lower(): key for key, (_, _, a1111) in SCHEDULERS.items()}  # "dpm++ 2m karras" -> key
_A1111_NAMES["pndm"] = "pndm"  # sdtune's PNGs before it wrote A1111's name
# A1111 1.9+ writes the schedule apart ("Schedule type"); its default ("Automatic") for DPM++ 2M is Karras, and
# sdtune's DPM++ 2M without Karras is the uniform one, which its PNGs say
_AUTOMATIC_KARRAS = {"dpm++ 2m"}
SCHEDULE_TYPES = {"dpmpp_2m": "Uniform"}
_SCHEDULES_READ = ("", "automatic", "karras", "uniform")  # A1111's schedule types sdtune's samplers follow


def sampler_key(name: str, schedule: str = "") -> str | None:
    """sdtune's sampler for an A1111 sampler name ("Euler a"; A1111 1.9+ writes "DPM++ 2M" with ``schedule``
    "Karras" or "Automatic" apart); None when it has none."""
    name, schedule = name.strip(), schedule.strip().lower()
    if schedule not in _SCHEDULES_READ:  # Exponential, SGM Uniform, Align Your Steps...: a sampling sdtune lacks
        return None
    if schedule == "automatic" and name.lower() in _AUTOMATIC_KARRAS:
        schedule = "karras"
    if schedule == "karras" and not name.lower().endswith(" karras"):
        name += " Karras"
    return _A1111_NAMES.get(name.lower())


MAX_SIDE = 8192  # pixels; above this one image takes hours and more memory than any machine has (SDXL: 1024)


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if v < 0:
            raise SdtuneError(f"{name} {v} is not a positive multiple of 8; leave it out (or 0) for the model's size")
        if v == 0 or v % 8:
            raise SdtuneError(f"{name} {v} is not a positive multiple of 8; use e.g. {max(8, round(v / 8) * 8)}")
        if v > MAX_SIDE:
            raise SdtuneError(f"{name} {v}: at most {MAX_SIDE} pixels (the model's own size is usual; upscale after)")
