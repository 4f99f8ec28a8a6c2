"""What a LoRA, Textual Inversion or checkpoint file holds, without a model: backs ``sdtune inspect FILE [--json]``."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from .. import families
from ..checkpoints import describe_checkpoint, describe_folder, not_a_model, unknown_width
from ..ldm import ADAPTER_KEY
from ..safeio import SdtuneError, is_safetensors, read_keys
from ..ti.formats import (
    Embedding,
    OriginalTextualInversion,
    a1111_word,
    fitting_families,
    load_embedding,
    made_for,
)
from . import blocks as block_weights
from . import hashes, keys
from .formats import CLIP_G_SUFFIX, adapter_folder_file, load_lora
from .neutral import COMPONENTS


def describe(path: str | Path) -> dict:
    """A JSON-ready summary: format, base family guess, modules per component and how many of them fit that
    family's layers, ranks, alphas, scales, conv layers, LyCORIS type, ``ss_*`` metadata, bundled embeddings,
    and keys sdtune could not read. A Textual Inversion file (any layout ``load_embedding`` reads) is described
    as one: its token, vectors, widths and the family they fit; a checkpoint as ``checkpoints.describe_checkpoint``
    reads its header, with the hash A1111 shows for it."""
    if Path(path).is_dir() and (Path(path) / "model_index.json").is_file():
        return describe_folder(path)
    if Path(path).is_dir() and adapter_folder_file(Path(path)) is not None:  # as load_lora and convert read it
        path = adapter_folder_file(Path(path))
    if Path(path).is_dir():
        inside = sorted(Path(path).glob("*.safetensors"))[:3]
        hint = f" (it holds {', '.join(p.name for p in inside)})" if inside else ""
        raise SdtuneError(f"{path}: is a folder; give a LoRA, embedding or checkpoint file{hint}, or several "
                          f"(sdtune inspect {Path(path) / '*.safetensors'})")
    try:
        checkpoint = describe_checkpoint(path)
    except SdtuneError:  # unreadable: the embedding reader's refusal where it names the format, else this one
        _embedding(path)
        raise
    if checkpoint is not None:
        sha = hashes.file_sha256(Path(path))  # remembered across runs for big files: checkpoints are gigabytes
        return checkpoint | {"hashes": {"sha256": sha, "autov2": sha[:hashes.AUTOV2_LEN],
                                        "autov1": hashes.old_model_hash(path)}}
    try:
        lora = load_lora(path)
    except SdtuneError:  # not a LoRA: an embedding, a model's part, or the LoRA reader's message stands
        embedding = _embedding(path)
        if embedding is None:
            names = read_keys(path) if is_safetensors(Path(path)) else []
            if names and not any(ADAPTER_KEY.search(k) for k in names):
                raise SdtuneError(f"{path}: {not_a_model(names)}") from None
            raise
        return _describe_embedding(path, embedding)
    if not any(lora.modules.values()) and lora.embeddings and not lora.unknown:  # a diffusers {token: rows} file
        embedding = _embedding(path)
        if embedding is not None:
            return _describe_embedding(path, embedding)
    family = keys.guess_family(lora)
    reference = keys.reference(family or families.SD1)
    kinds = Counter(ad.kind for _, _, ad in lora.items())
    conv3, conv1 = 0, 0
    for comp, p, ad in lora.items():
        shape = reference.get(comp, {}).get(p)
        kernel = tuple(shape[2:]) if shape and len(shape) == 4 else ad.io().kernel
        if kernel and math.prod(kernel) > 1:
            conv3 += 1
        elif kernel:
            conv1 += 1
    lycoris = sorted({ad.algo.lycoris_label(ad.tensors) for _, _, ad in lora.items()} - {None})
    fit = keys.match(lora, reference)
    return {
        "file": str(path),
        "kind": "lora",
        "format": lora.format,
        "family": family.name if family else None,
        "family_name": family.title if family else None,
        # no family's: the cross-attention width its layers read, which may name what it is for (SDXL's refiner)
        "cross_attention_width": None if family else keys.cross_attention_width(lora),
        # where the family comes from: the file's metadata (and its layers agree), or its layers' widths alone
        "family_from": "metadata" if family and keys.claimed_family(lora) == family else "layers",
        # the model it was trained on, as its trainer wrote it, and the family's fine-tune that name is, if known
        "trained_on": lora.metadata.get("ss_sd_model_name") or None,
        "fine_tune": family.fine_tune_named(lora.metadata.get("ss_sd_model_name", "")) if family else None,
        "modules": {c: len(m) for c, m in lora.modules.items() if m},
        # modules that fit a layer of the family's real architecture (none to fit when the family is unknown)
        "fits": {c: sum(1 for cc, _ in fit.matched if cc == c) for c in COMPONENTS if lora.modules.get(c)}
        if family else {},
        "fits_family": family.title if family else None,
        "kinds": dict(kinds),
        "ranks": sorted({ad.rank for _, _, ad in lora.items() if ad.rank is not None}),
        "alphas": sorted({float(ad.alpha) for _, _, ad in lora.items() if ad.alpha is not None}),
        # adapters with a rank and no alpha (alpha = rank); IA3, full and norm adapters have neither
        "alpha_missing": sum(1 for _, _, ad in lora.items() if ad.alpha is None and ad.algo.uses_alpha
                             and ad.rank is not None),
        # an OFT's alpha is its constraint, not a factor on a ΔW (its scale slot carries it): no scale to show
        "scales": sorted({round(ad.scale, 6) for _, _, ad in lora.items() if not ad.algo.alpha_is_constraint}),
        # what an OFT has instead of a rank: the size b of its b x b blocks, {b: layers}
        "oft_block_sizes": dict(sorted(Counter(ad.algo.block_size(ad.tensors) for _, _, ad in lora.items()
                                               if ad.kind == "oft").items())),
        "conv_layers": conv3,
        "conv1x1_layers": conv1,
        "lycoris": ", ".join(lycoris) or None,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for _, _, ad in lora.items()
                          for t in ad.tensors.values()}),
        "parameters": sum(t.numel() for _, _, ad in lora.items() for t in ad.tensors.values()),
        "embeddings": _bundled_shapes(lora),
        "blocks": _blocks(lora, family),
        "metadata": {k: v for k, v in sorted(lora.metadata.items()) if k.startswith(("ss_", "sshs_", "modelspec."))},
        "unknown_keys": list(lora.unknown),
        # civitai's AutoV2 (whole file) and AutoV3 (tensor data = sshs_model_hash), what model pages list
        "hashes": hashes.describe(path),
    }


def _blocks(lora, family) -> dict[str, int] | None:
    """Layers per block of the lora-block-weight extension's layout (what an ``lbw=`` vector scales), in the
    layout's order; "none" counts layers in no block (time embedding, conv_in/out). None for an unknown family."""
    if family is None:
        return None
    try:
        unet = block_weights.unet_blocks(family.component_configs()["unet"])
    except (SdtuneError, KeyError):
        return None
    counts = Counter(block_weights.block_of(c, p, unet) or "none" for c, p, _ in lora.items())
    return {b: counts[b] for b in (*block_weights.layout(family).blocks, "none") if counts[b]}


def _bundled_shapes(lora) -> dict:
    """{word: rows' shape} of the embeddings a LoRA bundles; an SDXL word as one entry {"clip_l": .., "clip_g": ..}
    (the file holds its two encoders' rows under one name)."""
    shapes = {}
    for name, rows in lora.embeddings.items():
        if name.endswith(CLIP_G_SUFFIX) and name[:-len(CLIP_G_SUFFIX)] in lora.embeddings:
            continue
        g = lora.embeddings.get(name + CLIP_G_SUFFIX)
        shapes[name] = list(rows.shape) if g is None else {"clip_l": list(rows.shape), "clip_g": list(g.shape)}
    return shapes


def _embedding(path: str | Path) -> Embedding | None:
    try:
        return load_embedding(path)
    except OriginalTextualInversion:
        raise  # its message names the format; the other readers say only "a pickle"
    except SdtuneError:
        return None


def _describe_embedding(path: str | Path, emb: Embedding) -> dict:
    fitting = fitting_families(emb.widths)
    training = dict(emb.training)
    if str(training.get("step", "")).isdigit():  # files store it as text (safetensors metadata) or a number (A1111)
        training["step"] = int(training["step"])
    return {
        "file": str(path),
        "kind": "embedding",
        "format": emb.format,
        "token": emb.token,  # the word it loads under (stored, else the file's name, as load_embedding picks it)
        "a1111_word": a1111_word(emb, path),  # A1111's and ComfyUI's word for it where that is another
        "vectors": emb.num_vectors,
        "widths": emb.widths,
        "family": fitting[0].name if len(fitting) == 1 else None,  # as a LoRA's: the one family it fits
        "family_name": made_for(emb.widths),
        "dtypes": [emb.stored_dtype],
        "norms": {key: round(float(r.norm(dim=1).mean()), 4) for key, r in emb.parts.items()},
        "training": training,  # step, base model and its hash, settings: where the file records them
        "hashes": hashes.describe(path),
    }


def _training_rows(info: dict) -> list[tuple[str, str]]:
    t = info.get("training") or {}
    rows = []
    if "step" in t or "base_model" in t:
        on = f" on {t['base_model']}" if t.get("base_model") else ""
        rows.append(("trained", f"{t.get('step', '?')} steps{on}"
                     + (f" (model hash {t['base_model_hash']})" if t.get("base_model_hash") else "")))
    if "settings" in t:  # a pivotal-tuning word carries its LoRA run's settings
        kind = re.search(r"^\[(\w+)\]", t["settings"], re.M)
        rows.append(("settings", f"stored: sdtune train {kind[1] if kind else 'ti'} --config {info['file']} "
                                 f"reruns them"))
    return rows


def _short(value, width: int = 90) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def _hash_rows(h: dict) -> list[tuple[str, str]]:
    if not h:
        return []
    return [("AutoV2", h["autov2"]),
            ("AutoV3", f"{h['autov3']} (tensor data sha256 {h['tensor_sha256']})" if h["autov3"] else "n/a")]


def _render_embedding(info: dict) -> str:
    widths = ", ".join(f"{key} {w}".strip() for key, w in info["widths"].items())
    norms = ", ".join(f"{key} {n:g}".strip() for key, n in info["norms"].items())
    rows = [("file", info["file"]), ("kind", "Textual Inversion embedding"), ("format", info["format"]),
            ("token", info["token"] + (f" (in sdtune and diffusers; A1111 and ComfyUI: {info['a1111_word']})"
                                       if info.get("a1111_word") else "")),
            ("vectors", str(info["vectors"])), ("width", widths),
            ("base family", info["family_name"]), ("mean vector norm", norms), ("dtype", ", ".join(info["dtypes"])),
            *_training_rows(info)]
    h = info.get("hashes") or {}
    a1111 = [("TI hash", f"{h['sha256'][:12]} (A1111's \"TI hashes\" field: the file's sha256)")] if h else []
    return "\n".join(_table(rows + _hash_rows(h) + a1111))


def _parts(components: dict) -> str:
    return ", ".join(f"{c} {n:,}" if n else f"{c} MISSING" if n == 0 else f"{c} (.bin: not read)"
                     for c, n in components.items())


def _render_folder(info: dict) -> str:
    return "\n".join(_table([
        ("file", info["file"]), ("kind", "diffusers model folder (give it as --model)"),
        ("base family", info["family_name"]), ("parameters", f"{info['parameters']:,}: {_parts(info['components'])}"),
        ("dtypes", ", ".join(f"{d} ({n} weight tensors)" for d, n in info["dtypes"].items()) or "n/a"),
        ("prediction", info["prediction"] or "n/a")]))


def _render_checkpoint(info: dict) -> str:
    parts = _parts(info["components"])
    prediction = info["prediction"] or "n/a (unknown family)"
    if info["prediction"] and info.get("prediction_from") == "weights":
        prediction += (" (the file does not say: read from its weights, as ComfyUI reads it; a .yaml config beside "
                       "it, as A1111 reads one, settles it)")
    if info.get("prediction_from") == "config":
        prediction += f" (from {Path(info['file']).with_suffix('.yaml').name} beside it, as A1111 reads it)"
    if info["zero_terminal_snr"]:
        prediction += ", zero terminal SNR (trailing timesteps)"
    rows = [("file", info["file"]), ("kind", "checkpoint (single file)"),
            ("base family", info["family_name"] or "unknown (a cross-attention width sdtune does not know)"),
            ("parameters", f"{info['parameters']:,}: {parts}"),
            # (the weights' floats: position ids and other integer buffers are no weights)
            ("dtypes", ", ".join(f"{d} ({n} weight tensors)" for d, n in info["dtypes"].items()) or "n/a"),
            ("EMA copy", f"yes ({info['ema_tensors']} tensors, not loaded)" if info["ema_tensors"] else "no"),
            *([("sdtune loads it", f"no: {info['not_loaded']}")] if info.get("not_loaded") else []),
            ("prediction", prediction),
            ("model hash", f"{info['hashes']['autov2']} (A1111's \"Model hash\", civitai's AutoV2; "
                           f"sha256 {info['hashes']['sha256']}; before A1111 1.0 and in LoRAs' ss_sd_model_hash: "
                           f"{info['hashes']['autov1']}, AutoV1)")]
    lines = _table(rows)
    if info["metadata"]:
        lines.append("metadata")
        mw = max(len(k) for k in info["metadata"])
        lines += [f"  {k:<{mw}}  {_short(v)}" for k, v in info["metadata"].items()]
    return "\n".join(lines)


def render(info: dict) -> str:
    """The summary as an aligned two-column table."""
    if info.get("kind") == "embedding":
        return _render_embedding(info)
    if info.get("kind") == "checkpoint":
        return _render_checkpoint(info)
    if info.get("kind") == "model folder":
        return _render_folder(info)
    said = " (as its metadata says)" if info.get("family_from") == "metadata" else " (guess, from its layers)"
    width = info.get("cross_attention_width")
    family = info["family_name"] + said if info.get("family_name") else "unknown" + (
        f" (its cross-attention reads {width}-wide text: {unknown_width(width)})" if width else "")
    alphas = ", ".join(f"{a:g}" for a in info["alphas"]) or "n/a"
    if info["alphas"] and info["alpha_missing"]:
        alphas += f" ({info['alpha_missing']} modules without: alpha = rank)"
    elif info["alpha_missing"]:
        alphas = "none (alpha = rank)"
    rows = [
        ("file", info["file"]),
        ("format", info["format"] or "unknown"),
        ("base family", family),
        *([("trained on", info["trained_on"] + (f" ({info['fine_tune']}: made for it and its fine-tunes; it may "
                                                 f"draw poorly on other {info['family_name']} models)"
                                                 if info.get("fine_tune") else ""))] if info.get("trained_on") else []),
        ("modules", ", ".join(f"{c} {n}" for c, n in info["modules"].items()) or "none"),
        *([(f"fits {info['fits_family']}", ", ".join(f"{c} {info['fits'][c]} of {n}"
                                                     for c, n in info["modules"].items()) or "none")]
          if info.get("fits_family") else []),
        ("adapter kinds", ", ".join(f"{k} {n}" for k, n in info["kinds"].items()) or "none"),
        ("ranks", ", ".join(map(str, info["ranks"])) or "n/a"),
        *([("OFT block sizes", ", ".join(f"{b} x {b} ({n} layer{'s' * (n != 1)})"
                                         for b, n in info["oft_block_sizes"].items()))]
          if info.get("oft_block_sizes") else []),
        ("alphas", alphas),
        ("scales", ", ".join(f"{s:g}" for s in info["scales"]) or "n/a"),
        ("conv layers", f"{info['conv_layers']} (kernel > 1), {info['conv1x1_layers']} (1x1)"),
        ("LyCORIS", info["lycoris"] or "no"),
        ("dtypes", ", ".join(info["dtypes"]) or "n/a"),
        ("parameters", f"{info['parameters']:,}"),
        ("embeddings", ", ".join(f"{n} {_shape_text(s)}" for n, s in info["embeddings"].items()) or "none"),
        ("layers per block", ", ".join(f"{b} {n}" for b, n in info["blocks"].items()) if info.get("blocks")
         else "n/a (unknown family)"),
        ("unread keys", f"{len(info['unknown_keys'])}: " + _short(", ".join(info["unknown_keys"][:5]))
         if info["unknown_keys"] else "none"),
    ]
    lines = _table(rows + _hash_rows(info.get("hashes") or {}))
    if info["metadata"]:
        lines.append("metadata")
        mw = max(len(k) for k in info["metadata"])
        lines += [f"  {k:<{mw}}  {_short(v)}" for k, v in info["metadata"].items()]
    return "\n".join(lines)


def _shape_text(shape) -> str:
    return " + ".join(f"{k} {tuple(v)}" for k, v in shape.items()) if isinstance(shape, dict) else str(tuple(shape))
