"""ModelSpec metadata: Stability's ``modelspec.*`` safetensors keys, which sd-scripts writes into the LoRAs and
embeddings it trains and which model browsers (SwarmUI among them) read for a file's architecture, title and
trigger words.

sdtune writes the keys sd-scripts writes, with its values: the architecture id by family (``Family.modelspec``,
``/lora`` or ``/textual-inversion`` after it), the implementation whose key names the file uses, the training
resolution, the date, the prediction type, the clip skip and timestep range where a run set them, and what the user
said of the file (kohya's --metadata_title, _author, _description, _license, _tags).
"""

from __future__ import annotations

import datetime

SPEC_VERSION = "1.0.1"  # the ModelSpec version sd-scripts writes
# the implementation a file's key names follow, as sd-scripts names them: Stability's for SDXL LoRAs (its SGM UNet
# names) and for embeddings, diffusers' for SD 1.x/2.x LoRAs
STABILITY = "https://github.com/Stability-AI/generative-models"
DIFFUSERS = "diffusers"
ADAPTERS = {"lora": "lora", "ti": "textual-inversion"}
USER_FIELDS = ("title", "author", "description", "license", "tags")  # kohya's --metadata_* flags


def architecture(family, prediction_type: str, kind: str) -> str:
    """``modelspec.architecture`` of a ``kind`` ("lora" or "ti") file for ``family`` models predicting
    ``prediction_type`` (a scheduler's: "epsilon", "v_prediction")."""
    arch = family.modelspec_v if prediction_type == "v_prediction" and family.modelspec_v else family.modelspec
    return f"{arch}/{ADAPTERS[kind]}"


def metadata(family, scheduler_config, kind: str, *, title: str, resolution: int, created: float,
             clip_skip: str = "None", timesteps: tuple[int, int] | None = None, trigger: str = "",
             user: dict[str, str] | None = None) -> dict[str, str]:
    """The ``modelspec.*`` keys of a file sdtune trained. ``clip_skip``: kohya's count ("None": none);
    ``timesteps``: the range trained on, when not the whole schedule; ``trigger``: the word a prompt needs (TI's
    token, pivotal tuning's); ``user``: the run's metadata_* settings by field (empty ones left out; a title
    replaces ``title``)."""
    prediction = scheduler_config.get("prediction_type", family.prediction_type)
    said = {k: v for k, v in (user or {}).items() if v}
    meta = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture(family, prediction, kind),
        "modelspec.implementation": STABILITY if kind == "ti" or family.kohya_unet_names == "sgm" else DIFFUSERS,
        "modelspec.title": said.pop("title", title),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(created)).isoformat(),
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
    }
    if clip_skip != "None":
        meta["modelspec.encoder_layer"] = clip_skip
    if timesteps is not None:
        meta["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    return meta | {f"modelspec.{k}": v for k, v in said.items()}
