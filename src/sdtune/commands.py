"""What each ``sdtune`` command does once its line is parsed (``cli`` parses): call the Python API, print.
Imported after the parse, as it loads torch, diffusers and transformers: ``sdtune --help`` and a mistyped flag
answer without them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import api, demo, sources, xyplot
from .console import main_process
from .generate import ImageWriter, check_clip_skip
from .lora import blocks as block_weights
from .lora import tools as lora_tools
from .lora.bake import merge
from .models import load_base
from .safeio import SdtuneError, output_folder
from .samplers import check_scheduler
from .tiny import evaluate
from .train import presets
from .train import queue as train_queue
from .train.config import KINDS, check_given, load_settings, planned_settings, read_settings
from .train.lora import train_lora
from .train.ti import train_ti


def cmd_generate(a) -> None:
    check_scheduler(a.scheduler)  # a sampler that cannot run, or a file in the way, stops it before the work
    check_clip_skip(a.clip_skip)
    output_folder(a.out)
    base = api.load(a.model, a.device, a.dtype, vae=a.vae, loras=a.lora, embeddings=a.embedding,
                    lora_dirs=a.lora_dir, embedding_dirs=a.embedding_dir, allow_partial=a.allow_partial)
    api.note_unused_words(base, a.prompt, a.negative_prompt)
    writer = ImageWriter(a.out)  # each batch is written when done: a Ctrl-C keeps them

    def write(batch) -> None:
        for path in writer.add(batch):
            print(path, flush=True)
    api.generate(base, a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance,
                 seed=a.seed, scheduler=a.scheduler, clip_skip=a.clip_skip, width=a.width,
                 height=a.height, num_images=a.num_images, progress=not a.no_progress, lora_dirs=a.lora_dir,
                 allow_partial=a.allow_partial, on_batch=write)
    grid_path = writer.finish()
    if grid_path:
        print(grid_path)


def cmd_train(a) -> None:
    if a.list_presets:
        print(presets.listing(a.kind))
        return
    names = {f.name for f in dataclasses.fields(KINDS[a.kind])}
    overrides = {k: v for k, v in vars(a).items() if k in names}
    given = read_settings(a.config, overrides, kind=a.kind)  # bad values stop before the model loads
    if given.get("preset"):
        presets.get(a.kind, given["preset"])
    if a.print_settings:
        print(planned_settings(a.kind, a.config, overrides, given.get("model", KINDS[a.kind].model)), end="")
        return
    # the run's --vae as the model's: a "no VAE" checkpoint loads only with one
    base = load_base(given.get("model", KINDS[a.kind].model), device=a.device, dtype=a.dtype, vae=given.get("vae"))
    settings = load_settings(a.config, overrides, kind=a.kind, family=base.family)  # the model's preset first
    check_given(settings, a.config, overrides)
    train = train_ti if a.kind == "ti" else train_lora
    written = train(base, settings)
    if main_process():  # once under accelerate launch
        print(written)


def cmd_train_queue(a) -> Path:
    return train_queue.run_queue(a.jobs, a.out, device=a.device, dtype=a.dtype)


def _print_reports(reports, as_json: bool) -> None:
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    else:
        print(lora_tools.report_table(reports))


def cmd_lora_merge(a) -> Path | None:
    specs = []
    for spec in a.specs:
        spec, lbw = block_weights.split_spec(spec)
        if lbw is not None and not a.blocks:
            raise SdtuneError(f"{spec}:lbw={lbw}: block weights in a merge are baked into the file; add --blocks")
        src, w = sources.parse_weighted(spec)
        specs.append((sources.resolve(src, "lora"), w, lbw))
    if a.blocks and all(lbw is None for *_, lbw in specs):
        raise SdtuneError("--blocks bakes the files' block weights, but no FILE has one; give e.g. FILE:1:lbw=INALL")
    _, reports = lora_tools.merge_loras(specs, a.out, rank=a.rank, to=a.to, drop_biases=a.drop_biases)
    if reports or a.json:
        _print_reports(reports, a.json)
    return None if a.json else Path(a.out)


def cmd_lora_resize(a) -> Path | None:
    _, reports = lora_tools.resize_lora(sources.resolve(a.file, "lora"), a.out, rank=a.rank, dynamic=a.dynamic,
                                        param=a.param, to=a.to, conv_rank=a.conv_rank, drop_biases=a.drop_biases)
    _print_reports(reports, a.json)
    return None if a.json else Path(a.out)


def cmd_lora_extract(a) -> Path | None:
    _, reports = lora_tools.extract_lora(a.base, a.tuned, a.out, rank=a.rank, conv_rank=a.conv_rank,
                                         text_encoder=a.text_encoder, min_diff=a.min_diff, to=a.to)
    _print_reports(reports, a.json)
    return None if a.json else Path(a.out)


def cmd_merge(a) -> None:
    pairs = []
    for spec in a.lora:
        spec, lbw = block_weights.split_spec(spec)
        src, w = sources.parse_weighted(spec)
        pairs.append((sources.resolve(src, "lora"), w, lbw))
    fmt = "single" if a.out.endswith(".safetensors") else "diffusers"
    print(merge(a.model, pairs, a.out, fmt=fmt, dtype=a.save_dtype, allow_partial=a.allow_partial))


def cmd_grid(a) -> Path:
    x, y = xyplot.axes_from_specs(a.x, a.y, weights=a.weights, sweep=a.sweep)  # bad axes stop before the load
    check_scheduler(a.scheduler)
    check_clip_skip(a.clip_skip)
    base = api.load(a.model, a.device, a.dtype, vae=a.vae)
    return xyplot.xy_plot(base, a.prompt, x, y, negative_prompt=a.negative_prompt, seed=a.seed, steps=a.steps,
                          guidance=a.guidance, scheduler=a.scheduler, clip_skip=a.clip_skip, width=a.width,
                          height=a.height, loras=a.lora,
                          embeddings=a.embedding, lora_dirs=a.lora_dir, embedding_dirs=a.embedding_dir,
                          allow_partial=a.allow_partial, out_dir=a.out, name=a.name, cell=a.cell,
                          progress=not a.no_progress, keep_earlier=True)


def cmd_demo(a) -> Path:
    return demo.run_demo(a.out, model=a.model, quick=a.quick, fresh=a.fresh, device=a.device, dtype=a.dtype,
                         progress=not a.no_progress)


def cmd_eval_tiny(a) -> None:
    base = load_base(a.model, device=a.device, dtype=a.dtype)
    held_in, held_out = evaluate.evaluate(base, a.images, a.steps, a.guidance, a.seed, progress=True)
    print(evaluate.table(held_in, held_out), flush=True)
    evaluate.check_held_in(held_in, a.min_held_in)


def cmd_ui(a) -> None:
    from . import ui  # Gradio is loaded for this command only

    ui.serve(a.model, out=a.out, lora_dir=a.lora_dir, embedding_dir=a.embedding_dir, model_dir=a.model_dir,
             port=a.port, listen=a.listen, auth=a.auth, device=a.device, dtype=a.dtype, max_upload_mb=a.max_upload_mb,
             vae=a.vae)
