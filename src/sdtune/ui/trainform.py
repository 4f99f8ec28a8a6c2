"""The training forms, read from the settings dataclasses that the CLI flags and TOML files come from.

Nothing about a setting is written here: its type comes from ``train.config.setting_type``, its default
from the dataclass field, its help from the field's text (``config.setting_helps``), and which kind (TI, LoRA)
it applies to from ``train.config.KINDS``. A setting added to a dataclass appears in the form by itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass

from ..safeio import SdtuneError
from ..train import config, optimizers, presets
from ..train.config import KINDS, load_settings, setting_helps, setting_type

# set by the UI itself: where the job writes, which model, progress for the live view
MANAGED = ("out", "model", "progress", "resume")
# the ones a first run needs; the rest go under "Advanced"
BASIC = ("data", "token", "init_token", "name", "steps", "lr", "batch_size", "rank", "alpha", "targets",
         "text_encoder", "num_vectors", "sample_every", "sample_prompts", "save_every", "seed")
# settings whose allowed values config.py names as a constant
CHOICES = {"lr_scheduler": config.SCHEDULES, "optimizer": tuple(optimizers.OPTIMIZERS), "algo": config.LORA_ALGOS,
           "save_precision": config.SAVE_PRECISIONS, "mixed_precision": config.PRECISIONS, "targets": config.TARGETS,
           "loss_type": config.LOSS_TYPES, "huber_schedule": config.HUBER_SCHEDULES, "log_with": config.LOGGERS,
           "preset": ("", *dict.fromkeys(name for table in presets.PRESETS.values() for name in table))}


@dataclass
class FormField:
    name: str
    typ: type  # bool, int, float, str or list (of strings)
    nullable: bool
    defaults: dict  # kind -> default, for the kinds that have this setting
    help: str
    choices: tuple | None = None

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    @property
    def basic(self) -> bool:
        return self.name in BASIC


def sections(fields: list[FormField]) -> list[tuple[str, list[FormField]]]:
    """The fields under "Advanced" in ``--help``'s sections (``config.TOPICS``, in its order), those with any."""
    advanced = {f.name: f for f in fields if not f.basic}
    grouped = [(topic, [advanced[n] for n in names if n in advanced]) for topic, names in config.TOPICS.items()]
    return [(topic, mine) for topic, mine in grouped if mine]


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def form_fields() -> list[FormField]:
    """Every setting of every kind, once, in dataclass order (shared settings first)."""
    out: dict[str, FormField] = {}
    for kind, cls in KINDS.items():
        notes = setting_helps(cls)
        for f in dataclasses.fields(cls):
            if f.name in MANAGED:
                continue
            if f.name not in out:
                typ, nullable = setting_type(cls, f.name)
                out[f.name] = FormField(f.name, typ, nullable, {}, notes.get(f.name, ""), CHOICES.get(f.name))
            out[f.name].defaults[kind] = _default(f)
    return list(out.values())


def text_field(field: FormField) -> bool:
    """Whether the form shows the setting as text: strings, lists, and numbers that may be unset (te_lr), since
    a number box cannot be empty (the browser sends an emptied one back as 0, which would train at lr 0)."""
    return field.typ in (str, list) or (field.nullable and field.typ in (int, float))


def to_form(field: FormField, value):
    """A setting's value as the form shows it (lists one item per line, None empty)."""
    if field.typ is list:
        return "\n".join(value or [])
    if text_field(field):
        return "" if value is None else str(value)
    return value


def from_form(field: FormField, value):
    """A form value back to the setting's type; None means "the default"."""
    if field.typ is list:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if field.typ is bool:
        return bool(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        if field.typ in (int, float) and not text_field(field):  # a number box the browser emptied (it drops
            raise SdtuneError(f"{field.label}: empty; enter a number")  # what it cannot read, e.g. "abc")
        return None
    if field.typ in (int, float):
        try:
            number = float(value)
        except ValueError:
            raise SdtuneError(f"{field.label}: {value!r} is not a number") from None
        if field.typ is int:
            if not number.is_integer():
                raise SdtuneError(f"{field.label}: {value} is not a whole number")
            return int(number)
        return number
    return str(value)


def preset_values(kind: str, family=None, preset: str = "") -> dict:
    """The form's values for ``kind``, by field name: what a run starts from, as ``sdtune train`` does (the
    named preset, else the one of ``family`` (a Family or its name), else the defaults)."""
    return _values(load_settings(None, {"preset": preset} if preset else {}, kind=kind, family=family))


def file_values(kind: str, path, family=None) -> dict:
    """The form's values for ``kind`` from a settings file: a run's settings.toml, a kohya sd-scripts config or a
    file sdtune trained, read as ``sdtune train --config FILE`` reads it (over the preset of ``family``)."""
    return _values(load_settings(path, {}, kind=kind, family=family))


def _values(settings) -> dict:
    fields = {f.name: f for f in form_fields()}
    return {name: to_form(fields[name], v) for name, v in settings.to_dict().items() if name in fields}


def settings_for(kind: str, values: dict, *, data: str, out: str, model: str):
    """Checked settings of ``kind`` from the form's values (settings of the other kind are ignored). The form
    shows a preset's values (``preset_values``), so they are all given; its preset names them in the record."""
    names = {f.name for f in dataclasses.fields(KINDS[kind])}
    fields = {f.name: f for f in form_fields()}
    overrides = {k: from_form(fields[k], v) for k, v in values.items() if k in names and k in fields}
    overrides["preset"] = overrides.get("preset") or ""  # none named: none (not the model's, unseen here)
    # a class named module.Class would import its module: the command line's, not a page's (which may be remote)
    if str(overrides.get("optimizer") or "adamw").lower() not in optimizers.OPTIMIZERS:
        raise SdtuneError(f"optimizer {overrides['optimizer']}: the web UI trains with {', '.join(optimizers.OPTIMIZERS)}; "
                          f"train with another class on the command line (sdtune train --optimizer module.Class)")
    if str(overrides.get("lr_scheduler") or "constant") not in config.SCHEDULES:
        raise SdtuneError(f"lr_scheduler {overrides['lr_scheduler']}: the web UI trains with {', '.join(config.SCHEDULES)}; "
                          f"train with a scheduler class on the command line (sdtune train --lr-scheduler module.Class)")
    overrides.update(data=data, out=out, model=model, progress=True, resume=True)
    try:
        settings = load_settings(None, overrides, kind=kind)
        settings.check()
    except SdtuneError as e:  # the form's fields are named as its labels are, not as flags: "--lr" -> "lr"
        raise SdtuneError(re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", " "),
                                 str(e))) from None
    return settings


def to_toml(settings) -> str:
    """The settings as the TOML file ``sdtune train KIND --config`` reads (None values: left at the default)."""
    table = {k: v for k, v in settings.to_dict().items() if v is not None}
    text = "".join(f"{k} = {config.toml_value(v)}\n" for k, v in table.items())
    if tomllib.loads(text) != table:  # the file must say exactly what the form said
        raise SdtuneError("these settings cannot be written as TOML; check the text fields for odd characters")
    return text


def table_toml(table: dict) -> str:
    """A queue file's table (top-level values, ``[defaults]``, ``[[job]]`` tables whose values may be inline
    tables) as TOML, checked to read back as the same table."""
    def is_jobs(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def pairs(d: dict) -> str:
        return "".join(f"{config.toml_value(str(k))} = {config.toml_value(v)}\n" for k, v in d.items())

    text = pairs({k: v for k, v in table.items() if not isinstance(v, dict) and not is_jobs(v)})
    for k, v in table.items():
        if isinstance(v, dict):
            text += f"\n[{json.dumps(str(k))}]\n" + pairs(v)
        elif is_jobs(v):
            text += "".join(f"\n[[{json.dumps(str(k))}]]\n" + pairs(x) for x in v)
    try:
        same = tomllib.loads(text) == table
    except tomllib.TOMLDecodeError:
        same = False
    if not same:
        raise SdtuneError("this queue file cannot be written back as TOML unchanged (dates or nested tables?); use "
                          "plain settings, lists and sweep = {...} tables")
    return text
