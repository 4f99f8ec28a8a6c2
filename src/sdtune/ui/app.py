"""The page: five tabs (Generate, Compare, Train, LoRA files, Gallery) laid out with Gradio, each button wired to
a ``Studio`` method. Layout and wiring only; what a button does is in ``studio.py``.

Every handler shows its outcome in its tab's status line; an ``SdtuneError`` (a refused path, a bad setting)
becomes that line instead of a stack trace, and the other outputs keep their values.
"""

from __future__ import annotations

import functools
import re
import sys
import traceback
from pathlib import Path

import gradio as gr
import pandas as pd

from ..safeio import SdtuneError
from ..samplers import SCHEDULERS, scheduler_available
from . import trainform
from .guard import UPLOADS
from .studio import MERGED, RANGES, Studio

# shown as A1111 names them ("Euler a"); only those that can run here (LMS needs scipy)
SAMPLERS = [(a1111, name) for name, (_, _, a1111) in SCHEDULERS.items() if scheduler_available(name)]
LORA_SLOTS = 4  # LoRA pickers on the Generate tab (Fooocus shows 5, A1111 users type tags for more)
GEN_FIELDS = ("prompt", "negative_prompt", "sampler", "steps", "cfg", "seed", "width", "height", "clip_skip")
CSS = """
#job-log textarea, #lora-info textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def _quiet_refusals(app: gr.Blocks) -> None:
    """Every field's refusal of a value goes to the caller alone. Gradio checks a value sent straight to its HTTP
    API (a step count above the slider's range, a choice not in the menu, text for a number) before any handler
    runs, and prints each refusal's traceback on the server's terminal: a caller's mistake, not the server's. A
    number or a text the caller left out (null; the page always sends one) is the field's own value."""
    for block in app.blocks.values():
        if isinstance(block, gr.components.Component):
            block.preprocess = _quiet(block)


def _quiet(block: gr.components.Component):
    preprocess, fill = block.preprocess, isinstance(block, (gr.Slider, gr.Number, gr.Textbox))
    blank = "" if isinstance(block, gr.Textbox) else None  # a text box made without a value shows ""

    def run(payload):
        if payload is None and fill:
            payload = blank if block.value is None else block.value
        try:
            return preprocess(payload)
        except gr.Error as e:
            e.print_exception = False
            raise
        except (TypeError, ValueError) as e:  # Gradio would print these too
            raise gr.Error(f"{block.label or block.get_block_name()}: {e}", print_exception=False) from None
    return run


def _handler(n_outputs: int):
    """Wrap a handler whose last output is the tab's status line: errors go there, other outputs stay."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except SdtuneError as e:
                message = f"⚠️ {_page_words(str(e))}"
            except Exception as e:  # noqa: BLE001 - the page must say something, the server must go on
                traceback.print_exc(file=sys.stderr)
                message = f"⚠️ unexpected error: {type(e).__name__}: {e}"
            keep = [gr.skip()] * (n_outputs - 1)
            return (*keep, message) if keep else message
        return run
    return wrap


def _owner(what: str, request: gr.Request | None) -> tuple[str, str | None]:
    """Whose generation or grid a request starts or cancels: the page's tab (Gradio's session of that page load,
    so another tab's or another user's Cancel leaves it running)."""
    return what, getattr(request, "session_hash", None)


# the command line's flags that the API's messages name, as the page's fields are labelled (train form settings
# keep their names: the form shows them so)
_FIELDS = {"--seed": "Seed", "--clip-skip": "Clip skip", "--steps": "Steps", "--guidance": "CFG scale",
           "--num-images": "Images", "--x and --y": "X and Y axes", "--cell": "Cell width"}
_FLAG = re.compile("(?:" + "|".join(re.escape(f) for f in sorted(_FIELDS, key=len, reverse=True)) + r")(?![\w-])")


def _page_words(message: str) -> str:
    """An API message as the page says it: the fields' labels where it names the command line's flags."""
    return _FLAG.sub(lambda m: _FIELDS[m.group(0)], message)


def _status(elem_id: str) -> gr.Textbox:
    """A tab's status line: plain text, since messages quote paths and prompts (<lora:...>, '..', '_')."""
    return gr.Textbox("", label="Status", interactive=False, max_lines=6, elem_id=elem_id, elem_classes=["status"])


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]()#+\-.!<>|~])", r"\\\1", str(text))


def _picked(rows, evt: gr.SelectData):
    """(parameters, path) of the image clicked in a gallery showing ``rows`` of (path, parameters)."""
    path, text = rows[evt.index]
    return text, path


def _taken(form: dict, image: str = "the image") -> str:
    """The status line after an image's settings were taken, naming those the form cannot apply."""
    missed = form.get("not_applied") or []
    return f"settings taken from {image}" + (f"; not applied here: {', '.join(missed)}" if missed else "")


def _form_updates(form: dict) -> list:
    """Generate-form updates from ``Studio.settings_of``; the LoRA pickers and their block weights are emptied
    (the prompt's tags carry the LoRAs of the image)."""
    return [gr.update(value=form[k]) if k in form else gr.skip() for k in GEN_FIELDS] + \
        [gr.update(value="")] * (2 * LORA_SLOTS)


# ---------------------------------------------------------------------------------------------- tabs

def _generate_tab(studio: Studio):
    with gr.Row(equal_height=True):  # A1111's place for the prompts and the button
        with gr.Column(scale=6):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt",
                                placeholder="a red star on a white background, <lora:name:0.8>")
            negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
        with gr.Column(scale=1, min_width=120):
            go = gr.Button("Generate", variant="primary", elem_id="gen-go")
            cancel = gr.Button("Cancel", variant="stop", size="sm", elem_id="gen-cancel")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                sampler = gr.Dropdown(SAMPLERS, value="ddim", label="Sampler", elem_id="gen-sampler")
                steps = gr.Slider(*RANGES["steps"], 20, step=1, label="Steps", elem_id="gen-steps")
                cfg = gr.Slider(*RANGES["cfg"], 7.5, step=0.5, label="CFG scale", elem_id="gen-cfg")
                clip_skip = gr.Slider(*RANGES["clip_skip"], 1, step=1, label="Clip skip", elem_id="gen-clip-skip")
            with gr.Row():
                seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="gen-seed")
                count = gr.Slider(1, 16, 1, step=1, label="Images", elem_id="gen-count")
            with gr.Row():  # a row of their own: beside the seed their number boxes pushed the sliders out of view
                width = gr.Slider(*RANGES["width"], 0, step=8, label="Width (0: the model's)", elem_id="gen-width")
                height = gr.Slider(*RANGES["height"], 0, step=8, label="Height (0: the model's)", elem_id="gen-height")
            with gr.Accordion("LoRAs from the LoRA folder (or type <lora:name:weight> in the prompt); the "
                              "text-encoder (TE) weight takes each new weight (set it after the weight); block weights: a "
                              "preset or a comma vector as in <lora:name:w:lbw=...> (empty: none)", open=True):
                slots = []
                for i in range(LORA_SLOTS):
                    with gr.Row(equal_height=True):
                        name = gr.Dropdown([""] + studio.lora_names(), value="", label=f"LoRA {i + 1}",
                                           elem_id=f"gen-lora-{i}", scale=2)
                        weight = gr.Slider(-2, 2, 1.0, step=0.05, label="weight", elem_id=f"gen-lora-{i}-w", scale=2)
                        te = gr.Slider(-2, 2, 1.0, step=0.05, label="TE weight", elem_id=f"gen-lora-{i}-te", scale=2)
                        blocks = gr.Dropdown([""] + studio.block_presets(), value="", allow_custom_value=True,
                                             label="block weights", elem_id=f"gen-lora-{i}-blocks", scale=2)
                        # in the browser, so that the text-encoder weight has followed before Generate is pressed
                        weight.change(None, weight, te, js="(w) => w", show_progress="hidden")
                        # the presets of the model in use (it may have been switched or loaded since)
                        blocks.focus(lambda: gr.update(choices=[""] + studio.block_presets()), None, blocks,
                                     show_progress="hidden")
                    slots.append((name, weight, te, blocks))
            with gr.Row(equal_height=True):
                emb = gr.Dropdown([""] + studio.embedding_names(), value="", label="Embedding (by its file name)",
                                  elem_id="gen-embedding", scale=3)
                add_pos = gr.Button("Add to prompt", size="sm", scale=1)
                add_neg = gr.Button("Add to negative", size="sm", scale=1)
                refresh = gr.Button("Refresh lists", size="sm", scale=1)
        with gr.Column(scale=2):
            # the gallery's height follows its images: at a fixed height one image (a column of its own) was
            # drawn taller than the box and shown cut, behind a scroll bar
            images = gr.Gallery(label="Images", columns=2, height="auto", object_fit="contain",
                                elem_id="gen-gallery")
            params = gr.Textbox(label="Parameters", lines=3, interactive=False, elem_id="gen-params")
            reuse = gr.Button("Reuse these settings", elem_id="gen-reuse")
            drop = gr.File(label="Drop an sdtune or A1111 PNG here to reuse its settings", elem_id="gen-drop",
                           height=120, file_types=list(UPLOADS["image"][0]))  # (another is dropped unsaid)
            status = _status("gen-status")
    shown = gr.State([])  # [(path, parameters)] of the images on show
    picked = gr.State(None)  # path of the image whose parameters are on show
    pickers = [s[0] for s in slots]
    form = [prompt, negative, sampler, steps, cfg, seed, width, height, clip_skip] + pickers + [s[3] for s in slots]

    @_handler(5)
    def run(request: gr.Request, progress=gr.Progress(), *values):  # Gradio fills both by their annotation/default
        p, n, smp, st, c, sd, w, h, cs, k, *slot_values = values
        picks = [tuple(slot_values[i:i + 4]) for i in range(0, len(slot_values), 4)]
        rows, notes = studio.generate(p, n, sampler=smp, steps=st, cfg=c, seed=sd, width=w, height=h, count=k,
                                      clip_skip=cs, picks=picks, on_step=lambda done, total: progress((done, total),
                                                                                        desc="denoising",
                                                                                        unit="steps"),
                                      owner=_owner("generation", request))
        rows = [(str(path), text) for path, text in rows]
        # the model named: the server has one, and another page may have switched it since this one loaded
        say = f"{len(rows)} image(s) by {studio.model_choice()} in {studio.folders.out / 'generate'}" + \
            "".join(f"\n\n⚠️ {m}" for m in notes)
        return rows, rows[0][1], rows, rows[0][0], say

    go.click(run, [prompt, negative, sampler, steps, cfg, seed, width, height, clip_skip, count,
                   *[c for s in slots for c in s]], [images, params, shown, picked, status], concurrency_id="model")
    # outside the queue, so that it runs while the generation holds the model; the generation then stops
    # after its current step and says so in the status line
    # (an answer goes to the status line: a gr.Info outside the queue never reached the page, Gradio printed it)
    def stop(request: gr.Request):
        return gr.skip() if studio.cancel(_owner("generation", request)) else "no generation to cancel"

    cancel.click(stop, None, status, queue=False, show_progress="hidden")

    images.select(_picked, shown, [params, picked], show_progress="hidden")

    @_handler(len(form) + 1)
    def reuse_picked(path):
        if not path:
            raise SdtuneError("no image on show; generate one, or drop a PNG below")
        found = studio.settings_of(path, uploaded=False)
        return *_form_updates(found), _taken(found)

    reuse.click(reuse_picked, picked, form + [status])

    @_handler(len(form) + 2)
    def reuse_dropped(upload):
        if not upload:
            return *[gr.skip()] * (len(form) + 1), ""
        found = studio.settings_of(upload, uploaded=True)
        return *_form_updates(found), found["parameters"], _taken(found, "the dropped image")

    drop.upload(reuse_dropped, drop, form + [params, status])

    add_pos.click(lambda text, e: f"{text}, {e}".strip(", ") if e else text, [prompt, emb], prompt)
    add_neg.click(lambda text, e: f"{text}, {e}".strip(", ") if e else text, [negative, emb], negative)
    return form, pickers, emb, refresh  # the page refreshes the lists (``build``)


def _compare_tab(studio: Studio):
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="cmp-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="cmp-negative")
            x = gr.Textbox(label="X axis (columns)", elem_id="cmp-x",
                           placeholder="one of: seed=1-4 · weight=0,0.5,1 · cfg=3,7 · steps=10,20 · sampler=ddim,euler · "
                                       "clip_skip=1,2 · prompt=a|b · sr=red|blue · loras=none|a|a:0.5+b:1 · "
                                       "embeddings=none|name · blocks=INALL|OUTD (values apart by |)")
            y = gr.Textbox(label="Y axis (rows, optional)", elem_id="cmp-y")
            with gr.Row():
                loras = gr.Dropdown(studio.lora_names(), multiselect=True, label="LoRAs for the plot",
                                    elem_id="cmp-loras", scale=3)
                sweep = gr.Dropdown([""] + studio.lora_names(), value="", label="weight axis sweeps",
                                    elem_id="cmp-sweep", scale=2)
            with gr.Row():
                sampler = gr.Dropdown(SAMPLERS, value="ddim", label="Sampler", elem_id="cmp-sampler")
                steps = gr.Slider(*RANGES["steps"], 20, step=1, label="Steps", elem_id="cmp-steps")
                cfg = gr.Slider(*RANGES["cfg"], 7.5, step=0.5, label="CFG scale", elem_id="cmp-cfg")
                seed = gr.Number(1, label="Seed", precision=0, elem_id="cmp-seed")
                clip_skip = gr.Slider(*RANGES["clip_skip"], 1, step=1, label="Clip skip", elem_id="cmp-clip-skip")
            with gr.Row():
                width = gr.Slider(*RANGES["width"], 0, step=8, label="Width (0: the model's)", elem_id="cmp-width")
                height = gr.Slider(*RANGES["height"], 0, step=8, label="Height (0: the model's)", elem_id="cmp-height")
                cell = gr.Slider(32, 512, 128, step=8, label="Cell width in the grid", elem_id="cmp-cell")
            with gr.Row():
                go = gr.Button("Make the grid", variant="primary", elem_id="cmp-go", scale=3)
                cancel = gr.Button("Cancel", variant="stop", size="sm", elem_id="cmp-cancel", scale=1)
            status = _status("cmp-status")
        with gr.Column(scale=3):
            grid = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="cmp-grid")
            files = gr.File(label="The grid and its parts", file_count="multiple", interactive=False,
                            elem_id="cmp-files")

    @_handler(3)
    def run(p, n, xs, ys, picked, sw, smp, st, c, sd, cs, w, h, cl, request: gr.Request, progress=gr.Progress()):
        path, parts, notes = studio.compare(p, n, x=xs or "", y=ys or "", loras=picked or [], sweep=sw, steps=st,
                                            cfg=c, seed=sd, clip_skip=cs, sampler=smp, width=w, height=h, cell=cl,
                                            on_step=lambda done, total: progress((done, total), desc="grid",
                                                                                 unit="steps"),
                                            owner=_owner("grid", request))
        return str(path), [str(q) for q in parts], \
            f"grid and {len(parts) - 1} parts by {studio.model_choice()} in {path.parent}" + \
            "".join(f"\n\n⚠️ {m}" for m in notes)

    go.click(run, [prompt, negative, x, y, loras, sweep, sampler, steps, cfg, seed, clip_skip, width, height, cell],
             [grid, files, status], concurrency_id="model")
    def stop(request: gr.Request):  # (said in the status line, as Generate's Cancel)
        return gr.skip() if studio.cancel(_owner("grid", request)) else "no grid to cancel"

    cancel.click(stop, None, status, queue=False, show_progress="hidden")
    return loras, sweep


def _train_tab(studio: Studio):
    fields = [f for f in trainform.form_fields() if f.name != "data"]
    # (the page offers the datasets folder's folders, not dataset configs, whose folders may be anywhere)
    data_help = next(f.help for f in trainform.form_fields() if f.name == "data").split(". Or ")[0]
    first = "lora"
    comps = {}
    sections = []  # (the Advanced section, the kinds with settings in it)
    initial = studio.form_values(first)  # the model's preset, as sdtune train starts from

    def component(f: trainform.FormField):
        kind_ = first if first in f.defaults else next(iter(f.defaults))
        value = initial[f.name] if f.name in initial else trainform.to_form(f, f.defaults[kind_])
        # the output file's name setting apart from the job's name (train-name), which the form shows first
        elem = "train-file-name" if f.name == "name" else f"train-{f.name}"
        common = dict(label=f.label, info=f.help or None, visible=first in f.defaults, elem_id=elem, min_width=150)
        if f.typ is bool:
            return gr.Checkbox(value=bool(value), **common)
        if f.choices:
            return gr.Dropdown(list(f.choices), value=value, **common)
        if f.typ in (int, float) and not trainform.text_field(f):
            # no precision for whole numbers either: the browser would round 2.5 steps to 2 without a word;
            # the form refuses it instead (trainform.from_form)
            return gr.Number(value=value, **common)
        if f.typ in (int, float):  # may be unset: text, empty for "unset"
            return gr.Textbox(value=value, placeholder="unset", **common)
        if f.typ is list:
            return gr.Textbox(value=value, lines=2, **{**common, "info": (f.help + "; " if f.help else "") +
                                                       "one per line"})
        return gr.Textbox(value=value, **common)

    with gr.Row():
        with gr.Column(scale=3):  # the form
            with gr.Row():
                kind = gr.Radio(list(trainform.KINDS), value=first, label="Training", elem_id="train-kind")
                name = gr.Textbox(label="Job name (empty: numbered, e.g. lora-001 or ti-001)", elem_id="train-name")
            dataset = gr.Dropdown(studio.datasets(), value=None, allow_custom_value=True, elem_id="train-dataset",
                                  label="Dataset (a folder in the output folder's datasets/)", info=data_help)
            with gr.Accordion("Add images to a dataset", open=False):
                with gr.Row():
                    upload = gr.File(file_count="multiple", label="Images and same-name .txt captions",
                                     file_types=[*UPLOADS["image"][0], *UPLOADS["caption"][0]],
                                     elem_id="train-upload")
                    with gr.Column():
                        upload_name = gr.Textbox(label="Dataset name", elem_id="train-upload-name")
                        upload_go = gr.Button("Add to dataset", size="sm")
            with gr.Group():
                with gr.Row(equal_height=True):
                    for f in fields:
                        if f.basic:
                            comps[f.name] = component(f)
            with gr.Accordion("Fill the form from a settings file", open=False, elem_id="train-settings"):
                settings_file = gr.File(label="A run's settings.toml, a kohya sd-scripts config, or a LoRA or "
                                        "embedding sdtune trained: read as sdtune train --config reads it",
                                        file_types=[".toml", ".safetensors"], height=120,
                                        elem_id="train-settings-file")
            with gr.Accordion("Advanced settings", open=False, elem_id="train-advanced"):
                # in --help's sections; a section shows for the kinds it has settings of (TI: no network)
                for topic, mine in trainform.sections(fields):
                    with gr.Accordion(topic, elem_id="train-section-" + re.sub(r"\W+", "-", topic).strip("-"),
                                      visible=any(first in f.defaults for f in mine)) as section:
                        with gr.Row(equal_height=True):
                            for f in mine:
                                comps[f.name] = component(f)
                    sections.append((section, {kind_ for f in mine for kind_ in f.defaults}))
            start = gr.Button("Start (queue)", variant="primary", elem_id="train-start")
            with gr.Accordion("Run a queue file: jobs and sweeps, as sdtune train queue reads them", open=False,
                              elem_id="train-queue"):
                with gr.Row():
                    queue_file = gr.File(label="Queue file (.toml)", file_types=[".toml"], height=90,
                                         elem_id="train-queue-file")
                    with gr.Column():
                        queue_path = gr.Textbox(label="... or a .toml file in the output folder",
                                                info="its data = folders are names in the output folder; its "
                                                     "runs go to train/JOB NAME/, compared in queue.html",
                                                elem_id="train-queue-path")
                        queue_go = gr.Button("Queue the file", size="sm", elem_id="train-queue-go")
        with gr.Column(scale=2):  # the jobs
            table = gr.Dataframe(headers=["job", "kind", "state", "step", "loss"], interactive=False,
                                 elem_id="train-jobs", label="Jobs (newest first)", max_height=200)
            job = gr.Dropdown([j.name for j in studio.jobs.list()], value=None, label="Job on show",
                              elem_id="train-job")
            with gr.Row():
                stop = gr.Button("Stop", variant="stop", size="sm", elem_id="train-stop")
                resume = gr.Button("Resume", size="sm", elem_id="train-resume")
                use = gr.Button("Use the result", size="sm", elem_id="train-use")
            status = _status("train-status")
            view = gr.Markdown(elem_id="train-progress")
            plot = gr.LinePlot(x="step", y="loss", label="Loss", height=200, elem_id="train-loss")
            loss_png = gr.Image(label="loss.png", type="filepath", interactive=False, visible=False)
            samples = gr.Image(label="Newest sample grid", type="filepath", interactive=False, height=150,
                               elem_id="train-samples")
            result = gr.File(label="Result", interactive=False, height=90, elem_id="train-result")
            log = gr.Textbox(label="Log (last lines)", lines=5, interactive=False, elem_id="job-log")
            compare = gr.Button("Compare the jobs", size="sm", elem_id="train-compare")
    report = gr.HTML(elem_id="train-report")  # the job's report.html when it has one
    comparison = gr.HTML(elem_id="train-comparison")  # the jobs side by side, when asked for
    report_shown = gr.State("")  # what the report panel shows (path and time), so the timer does not reload it

    names = list(comps)

    filled = [comps[n] for n in names] + [section for section, _ in sections] + [status]

    def shown(k, values: dict, keep=()) -> list:
        """The form's updates for kind ``k`` at ``values``: its fields shown at them, the other kind's hidden (and
        the sections with none of its settings); ``keep``: fields left as the user set them."""
        return [gr.skip() if n in keep else
                gr.update(visible=True, value=values[n]) if n in values else gr.update(visible=False)
                for n in names] + [gr.update(visible=k in kinds) for _, kinds in sections]

    @_handler(len(filled))
    def fill(k, preset="", keep=()):
        """Every field of kind ``k`` at the preset's values (the model's own when none is named). The status line
        is left as it is."""
        return *shown(k, studio.form_values(k, preset), keep), gr.skip()

    kind.change(fill, kind, filled)

    @_handler(len(filled))
    def fill_from_file(k, upload):
        """The form as ``sdtune train --config FILE`` would start: the file over the model's preset."""
        if not upload:  # the file cleared: the form stays as it is
            return (gr.skip(),) * len(filled)
        values, notes = studio.file_form_values(k, upload)
        return *shown(k, values), f"the form holds {Path(upload).name}'s settings (the dataset is picked above)" + \
            "".join(f"\n\n⚠️ {_page_words(m)}" for m in notes)

    settings_file.upload(fill_from_file, [kind, settings_file], filled)
    # naming a preset fills the form with its values, as --preset does on the command line (flags still win
    # there; here, change a value after picking the preset)
    comps["preset"].input(lambda k, p: fill(k, p, ("preset",)), [kind, comps["preset"]], filled)

    @_handler(3)
    def submit(k, nm, data, *values):
        new = studio.submit(k, nm, data, dict(zip(names, values)))
        return gr.update(choices=[j.name for j in studio.jobs.list()], value=new.name), \
            gr.update(value=""), f"job {new.name} queued"

    start.click(submit, [kind, name, dataset] + [comps[n] for n in names], [job, name, status])

    @_handler(4)
    def submit_file(upload, typed, nm):
        if not upload and not (typed or "").strip():
            raise SdtuneError("no queue file; upload a .toml file, or name one in the output folder")
        new = studio.submit_queue(upload or typed, uploaded=bool(upload), name=nm)
        return gr.update(choices=[j.name for j in studio.jobs.list()], value=new.name), gr.update(value=""), \
            gr.update(value=None), f"job {new.name} queued: the queue file's runs, in turn"

    queue_go.click(submit_file, [queue_file, queue_path, name], [job, name, queue_file, status])

    @_handler(3)
    def add_files(files, nm):
        got, said = studio.add_dataset_files(nm, files)
        return gr.update(choices=studio.datasets(), value=got), gr.update(value=None), said

    upload_go.click(add_files, [upload, upload_name], [dataset, upload, status])
    dataset.focus(lambda: gr.update(choices=studio.datasets()), None, dataset, show_progress="hidden")

    def act(what):
        @_handler(1)
        def run(name_):
            if not name_:
                raise SdtuneError("pick a job first")
            if what == "use":
                return f"{studio.use_result(name_)} (on the Generate tab, Refresh lists)"
            if what == "resume":
                return studio.resume(name_)
            studio.jobs.stop(name_)
            return f"job {name_}: stopped"
        return run

    # the jobs may have changed since the page was built (a reload, another tab)
    job.focus(lambda: gr.update(choices=[j.name for j in studio.jobs.list()]), None, job, show_progress="hidden")
    stop.click(act("stop"), job, status)
    resume.click(act("resume"), job, status)
    use.click(act("use"), job, status)

    def refresh(name_):
        rows = []
        for j in studio.jobs.list():
            p = studio.job_view(j.name)
            step = f"{p['step']}/{p['total']}" if p["total"] else ""
            rows.append([j.name, j.kind, j.state, step, f"{p['loss'][-1][1]:.4f}" if p["loss"] else ""])
        table_ = pd.DataFrame(rows, columns=["job", "kind", "state", "step", "loss"])
        if not name_:
            return table_, "", "", None, None, gr.update(visible=False), None
        p = studio.job_view(name_)
        j = p["job"]
        lines = [f"**{j.name}** ({j.kind}): **{j.state}**"]
        if p["run"]:
            lines.append(f"run {p['run'][0]} of {p['run'][1]}: {_md_escape(p['run'][2])}")
        if p["total"]:
            lines.append(f"step {p['step']} of {p['total']} ({100 * p['step'] // p['total']}%)")
        if p["reporting"] and j.state == "running":
            lines.append("writing the report (a grid of every checkpoint)")
        if p["loss"]:
            lines.append(f"loss {p['loss'][-1][1]:.4f} (from the {p['loss_source']})")
        if p["error"]:
            lines.append(_md_escape(p["error"]))
        if p["report"]:
            lines.append(f"report: {_md_escape(p['report'])}")
        # numeric columns even when empty: the plot keeps the axis types of the first frame it gets
        curve = pd.DataFrame(p["loss"], columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})
        return (table_, " · ".join(lines), p["log_tail"], str(p["result"]) if p["result"] else None, curve,
                gr.update(value=str(p["loss_png"]) if p["loss_png"] else None, visible=p["loss_png"] is not None),
                gr.update(value=str(p["samples"][-1]), label=f"Newest sample grid ({p['samples'][-1].stem})")
                if p["samples"] else gr.update(value=None, label="Newest sample grid"))

    outputs = [table, view, log, result, plot, loss_png, samples]
    gr.Timer(1.0).tick(refresh, job, outputs, show_progress="hidden")
    job.change(refresh, job, outputs, show_progress="hidden")

    def show_report(name_, shown_):
        """The job's report, embedded, once it exists; nothing is sent while it is the one on show."""
        page = studio.report(name_) if name_ else None
        key = f"{page}:{page.stat().st_mtime_ns}" if page else ""
        if key == shown_:
            return gr.skip(), gr.skip()
        return (studio.embed_page(page) if page else ""), key

    gr.Timer(2.0).tick(show_report, [job, report_shown], [report, report_shown], show_progress="hidden")
    job.change(show_report, [job, report_shown], [report, report_shown], show_progress="hidden")

    @_handler(2)
    def compare_all():
        page = studio.compare_jobs()
        return studio.embed_page(page, height=420), f"jobs compared in {page}"

    compare.click(compare_all, None, [comparison, status])
    return lambda k: fill(k), kind, filled, job  # for the model menu: another model, its preset; for a reload


def _lora_menus(studio: Studio, pickers) -> list:
    """Choices for the LoRA files tab's menu and ``pickers`` as the LoRA folder holds them now; pickers that may
    be left empty offer "" first, the multi-select (a list) does not need it."""
    names = studio.lora_names()
    return [gr.update(choices=names)] + [gr.update(choices=names if p.multiselect else [""] + names) for p in pickers]


def _lora_tab(studio: Studio, pickers):
    with gr.Row():
        with gr.Column(scale=2):
            name = gr.Dropdown(studio.lora_names(), value=None, label="LoRA in the LoRA folder", elem_id="lora-name")
            upload = gr.File(label="... or upload one (.safetensors, .pt)", file_types=[".safetensors", ".pt", ".bin"],
                             elem_id="lora-upload")
            with gr.Row():
                look = gr.Button("Inspect", variant="primary", elem_id="lora-inspect")
                keep = gr.Button("Add the upload to the LoRA folder", elem_id="lora-keep")
                keep_emb = gr.Button("... to the embedding folder", elem_id="lora-keep-emb")
            with gr.Group():
                to = gr.Radio(["kohya", "diffusers"], value="kohya", label="Convert to", elem_id="lora-to")
                conv_name = gr.Textbox(label="New file name (in the LoRA folder)", elem_id="lora-conv-name")
                conv = gr.Button("Convert", elem_id="lora-convert")
            with gr.Group():
                specs = gr.Textbox(label="Merge into the model: LoRAs with weights",
                                   placeholder="style:0.8, detail:0.5", elem_id="lora-merge-specs")
                merge_name = gr.Textbox(label="Merged model name (in the output folder's merged/)",
                                        elem_id="lora-merge-name")
                fmt = gr.Radio(["single", "diffusers"], value="single", label="Write as",
                               info="single: one .safetensors in the family's original layout; diffusers: a folder")
                merge_go = gr.Button("Merge", elem_id="lora-merge")
            status = _status("lora-status")
        with gr.Column(scale=3):
            info = gr.Textbox(label="What the file holds", lines=18, interactive=False, elem_id="lora-info")
            with gr.Accordion("As JSON", open=False):
                details = gr.JSON(show_label=False, elem_id="lora-json")

    @_handler(3)
    def inspect(n, up):
        text, data = studio.inspect(n, up)
        return text, data, f"inspected {data['file']}"

    look.click(inspect, [name, upload], [info, details, status])
    # one file at a time: picking one in the menu drops an upload (which Inspect would take first) and the
    # panel's account of another file, uploading one drops the menu's pick
    name.input(lambda: (None, "", None), None, [upload, info, details], show_progress="hidden")
    upload.upload(lambda: (None, "", None), None, [name, info, details], show_progress="hidden")

    def relist():
        return _lora_menus(studio, pickers)

    @_handler(1)
    def add(up):
        if not up:
            raise SdtuneError("no upload; drop a .safetensors or .pt file above first")
        return f"added as {studio.add_upload(up, 'loras')}"

    keep.click(add, upload, status).then(relist, None, [name, *pickers])

    @_handler(1)
    def add_embedding(up):
        if not up:
            raise SdtuneError("no upload; drop an embedding file above first")
        return f"added as {studio.add_upload(up, 'embeddings')} (use its name in a prompt; Refresh lists on " \
            "Generate shows it in the embedding menu)"

    keep_emb.click(add_embedding, upload, status)

    @_handler(1)
    def convert(n, target, new):
        path, words = studio.convert(n, target, new)
        return f"written: {path}" + "".join(f"; the word it bundles is in the embedding folder as {w.name} (type "
                                            f"{w.stem} in a prompt)" for w in words)

    conv.click(convert, [name, to, conv_name], status).then(relist, None, [name, *pickers])

    @_handler(1)
    def merge(s, new, f):
        path = studio.merge(s, new, f)
        return f"written: {path}; the Base model menu offers it as {MERGED}{path.name}"

    merge_go.click(merge, [specs, merge_name, fmt], status, concurrency_id="model")
    return name


def _gallery_tab(studio: Studio, form, tabs):
    with gr.Row():
        query = gr.Textbox(label="Search (prompt, parameters or file name)", elem_id="gal-query", scale=4)
        search = gr.Button("Search / refresh", elem_id="gal-search", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            images = gr.Gallery(label="Output folder, newest first", columns=5, height=480, object_fit="contain",
                                elem_id="gal-images")
        with gr.Column(scale=2):
            params = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="gal-params")
            send = gr.Button("Send to Generate", variant="primary", elem_id="gal-send")
            status = _status("gal-status")
    shown = gr.State([])
    picked = gr.State(None)

    def find(q):
        found_, say = studio.gallery_view(q or "")
        rows = [(str(p), t) for p, t in found_]
        return (gr.update(value=[(p, t.splitlines()[0] if t else "") for p, t in rows], selected_index=None),
                rows, "", None, say)

    found = [images, shown, params, picked, status]
    search.click(find, query, found)
    query.submit(find, query, found)

    images.select(_picked, shown, [params, picked], show_progress="hidden")

    @_handler(len(form) + 2)
    def to_generate(path):
        if not path:
            raise SdtuneError("pick an image first")
        return *_form_updates(studio.settings_of(path, uploaded=False)), gr.Tabs(selected="generate"), \
            "sent to Generate"

    send.click(to_generate, picked, form + [tabs, status])
    return find, query, found


# ---------------------------------------------------------------------------------------------- the page

def build(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="sdtune") as app:
        with gr.Row(equal_height=True):
            gr.Markdown(f"**sdtune** · output folder `{studio.folders.out}`")
            model = gr.Dropdown(studio.model_choices(), value=studio.model_choice(), label="Base model", elem_id="model",
                                info="built-in, --model, or a model in --model-dir; it loads on first use",
                                scale=2)
            # the model as the menu names it (a merged one "merged: NAME", not its path in the output folder)
            model_status = gr.Textbox(f"base model: {studio.model_choice()}", show_label=False, interactive=False,
                                      elem_id="model-status", scale=2)

        @_handler(1)
        def switch_model(choice):
            studio.set_model(choice)
            return f"base model: {studio.model_choice()} (training jobs started from now on use it too)"

        model.focus(lambda: gr.update(choices=studio.model_choices()), None, model, show_progress="hidden")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                form, gen_pickers, gen_emb, gen_refresh = _generate_tab(studio)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                cmp_loras, cmp_sweep = _compare_tab(studio)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                refill_train, train_kind, train_form, train_job = _train_tab(studio)
            with gr.Tab("LoRA files", id="loras", elem_id="tab-loras"):
                lora_name = _lora_tab(studio, [*gen_pickers, cmp_loras, cmp_sweep])
            with gr.Tab("Gallery", id="gallery", elem_id="tab-gallery") as gallery_tab:
                find, query, found = _gallery_tab(studio, form, tabs)
        gallery_tab.select(find, query, found)
        # another model: its training preset fills the Train form
        model.change(switch_model, model, model_status, concurrency_id="model").then(refill_train, train_kind,
                                                                                      train_form)

        pickers = [*gen_pickers, cmp_loras, cmp_sweep]

        def lists():
            """Every LoRA and embedding list as the folders hold them now (files added by hand, by Use the result
            or on another tab), on each Refresh lists and each load of the page."""
            return *_lora_menus(studio, pickers), gr.update(choices=[""] + studio.embedding_names())

        listed = [lora_name, *pickers, gen_emb]
        gen_refresh.click(lists, None, listed)
        def job_on_show():
            """The jobs as they are now, the running one (else the newest) on show."""
            jobs = studio.jobs.list()
            shown = next((j.name for j in jobs if j.state == "running"), jobs[0].name if jobs else None)
            return gr.update(choices=[j.name for j in jobs], value=shown)

        # a reloaded page shows the server's state: the model in use (shared by every page), the lists, the jobs
        app.load(lambda: (gr.update(choices=studio.model_choices(), value=studio.model_choice()),
                          f"base model: {studio.model_choice()}", *lists(), job_on_show()), None,
                 [model, model_status, *listed, train_job])
    _quiet_refusals(app)
    return app
