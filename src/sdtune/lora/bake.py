"""Bake LoRAs into a base model and write the result: a diffusers folder or one LDM-layout .safetensors file.

A single ``.safetensors`` input baked to a single file is streamed: the header is read, the output header
is written first (shapes and dtypes do not change), then each tensor is read with a plain file read, gets
Σ w·ΔW added if some LoRA targets it, and is written out before the next one is read. Memory stays near
the largest tensor plus the LoRAs, not the model. Every key of the input (EMA weights, schedule buffers,
anything unknown) is copied through in the input's layout, with its metadata.

Every other combination loads the base, patches it in memory with ``patch.LoraSet`` and saves it with
``sdtune.models``; a ``Base`` passed in is restored exactly afterwards.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from accelerate import init_empty_weights

from .. import ldm, models
from ..safeio import SdtuneError, atomic_path, is_safetensors
from . import keys
from .formats import load_lora
from .neutral import Lora
from .patch import LoraSet, as_weights, check_fit, write_patched

# safetensors dtype names <-> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FORMATS = ("diffusers", "single")


def _load(source, modules: dict) -> Lora:
    """A ``Lora`` from a ``Lora`` or a file; kohya names are resolved against the model's own modules."""
    if isinstance(source, Lora):
        return source
    return load_lora(source, model_keys=modules)


def merge(base_or_spec, loras, out, fmt: str = "diffusers", *, dtype=None, allow_partial: bool = False) -> Path:
    """Write ``base_or_spec`` with ``[(lora, weight), ...]`` baked in to ``out``.

    ``base_or_spec``: a loaded ``Base`` or anything ``load_base`` takes. ``lora``: a ``Lora`` or a file;
    ``weight``: a number or ``(unet_w, te_w)``. ``fmt``: "diffusers" (a folder) or "single" (one
    ``.safetensors`` in the original LDM layout). ``dtype``: e.g. "fp16" to store the result smaller.
    """
    if fmt not in FORMATS:
        raise SdtuneError(f"unknown merge format {fmt!r}; use diffusers or single")
    out = Path(out)
    if fmt == "single" and out.suffix != ".safetensors":
        raise SdtuneError(f"{out}: a single-file merge is written as .safetensors; use that suffix")
    pairs = [(src, as_weights(w), str(src) if not isinstance(src, Lora) else f"lora{i}")
             for i, (src, w) in enumerate(loras)]
    if isinstance(base_or_spec, (str, Path)):
        path = Path(base_or_spec).expanduser()
        if fmt == "single" and path.is_file():
            return _merge_single_file(path, pairs, out, dtype, allow_partial)
        base = models.load_base(str(base_or_spec), device="cpu", dtype="fp32")
        return _merge_loaded(base, pairs, out, fmt, dtype, allow_partial)
    return _merge_loaded(base_or_spec, pairs, out, fmt, dtype, allow_partial)


def _merge_loaded(base, pairs, out: Path, fmt: str, dtype, allow_partial: bool) -> Path:
    if len(LoraSet.attach(base)):
        raise SdtuneError("this model has LoRAs applied already; remove them (LoraSet.remove_all) before merging")
    lora_set = LoraSet.attach(base)
    try:
        for i, (src, w, _) in enumerate(pairs):  # names keep list order, the order the sums are taken in
            lora_set.add(f"{i:04d}", _load(src, lora_set.modules), (w["unet"], w["text_encoder"]),
                         allow_partial=allow_partial)
        if fmt == "single":
            return models.save_single_file(base, out, dtype=dtype)
        if dtype is not None:
            raise SdtuneError("dtype is for single-file output; load the base in that dtype for a diffusers folder")
        return models.save_diffusers(base, out)
    finally:
        lora_set.remove_all()


# ---------------------------------------------------------------- streaming single-file merge

def _read_header(path: Path) -> tuple[dict, dict, int]:
    """({key: info}, metadata, offset of the data block) of a safetensors file, without mapping it."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None) or {}
        if not all(isinstance(i, dict) and {"dtype", "shape", "data_offsets"} <= i.keys() for i in header.values()):
            raise ValueError("a tensor entry lacks dtype, shape or data_offsets")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise SdtuneError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None
    return header, metadata, 8 + size


def _read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    start, end = info["data_offsets"]
    f.seek(data_start + start)
    buf = bytearray(end - start)  # read straight into the tensor's memory: no second copy
    if f.readinto(buf) != end - start:
        raise SdtuneError(f"{f.name}: truncated file; re-download it")
    dtype = ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise SdtuneError(f"{f.name}: tensor dtype {info['dtype']} is not supported; convert the file to fp16/fp32")
    if not buf:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _ldm_targets(header: dict, metadata: dict, pairs, path: Path, allow_partial: bool) -> dict[str, list]:
    """{file key: [(name, uid, adapter, weight), ...]} for every weight a LoRA changes, after checking fit."""
    shapes = {k: torch.empty(v["shape"], device="meta") for k, v in header.items()}
    family = models.family_from_metadata(metadata) or models.detect_family(shapes, path)
    configs = family.component_configs()
    with init_empty_weights():  # a shape-only model: the shared key matcher gives its usual messages
        parts = models.build_parts(family, configs)
    unet, text_encoder = parts["unet"], parts["text_encoder"]
    unet_inverse = {d: f"{ldm.UNET_PREFIX}{m}" for m, d in ldm.unet_module_map(configs["unet"]).items()}
    text_prefix = next((p for p in ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
                        if any(k.startswith(p + "encoder.") for k in header)), ldm.TEXT_PREFIX)
    targets: dict[str, list] = {}
    modules = {"unet": unet, "text_encoder": text_encoder}
    for i, (src, weights, source) in enumerate(pairs):
        fitting = check_fit(_load(src, modules), modules, allow_partial, source)
        for (comp, module_path), adapter in fitting.items():
            if comp == "unet":
                key = f"{unet_inverse.get(module_path, module_path)}.weight"
            else:
                key = f"{text_prefix}{ldm.text_encoder_key(module_path)}.weight"
            if key not in header or not keys.fits(adapter, tuple(header[key]["shape"])):
                raise SdtuneError(f"{path}: weight {key} is missing or misshapen although the file passed as "
                                  f"{family.title}; the checkpoint is damaged, re-download or re-export it")
            if weights[comp] != 0.0:
                targets.setdefault(key, []).append((f"{i:04d}", i, adapter, weights[comp]))
    return targets


def _merge_single_file(path: Path, pairs, out: Path, dtype, allow_partial: bool) -> Path:
    if not is_safetensors(path):  # pickled checkpoints cannot be read piecewise: load, patch, save
        return _merge_loaded(models.load_base(str(path), device="cpu", dtype="fp32"), pairs, out, "single", dtype,
                             allow_partial)
    if out.resolve() == path.resolve():
        raise SdtuneError(f"{out}: is the input checkpoint; write the merge to a new file")
    out_float = None if dtype is None else models.pick_dtype("cpu", dtype)
    header, metadata, data_start = _read_header(path)
    targets = _ldm_targets(header, metadata, pairs, path, allow_partial)

    # Output header: same keys, shapes and (unless converted) dtypes, packed in input order.
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    out_header, offset = {}, 0
    for key in order:
        info = header[key]
        name = info["dtype"]
        if out_float is not None and ST_DTYPES.get(name, torch.int8).is_floating_point:
            name = ST_NAMES[out_float]
        nbytes = torch.Size(info["shape"]).numel() * ST_DTYPES[name].itemsize if name in ST_DTYPES else 0
        if name not in ST_DTYPES:
            raise SdtuneError(f"{path}: tensor {key} has dtype {name}, which sdtune cannot merge; convert the file")
        out_header[key] = {"dtype": name, "shape": info["shape"], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    merged = [{"source": source, "unet_weight": w["unet"], "te_weight": w["text_encoder"]} for _, w, source in pairs]
    out_meta = dict(metadata, **{"sdtune.merged_loras": json.dumps(merged)})
    head = json.dumps({"__metadata__": out_meta, **out_header}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data block starts 8-byte aligned, as safetensors writes it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the GEMM threading LoraSet uses, so a bake gives the bits of an in-memory patch
    try:
        _stream(path, out, header, data_start, order, out_header, head, targets)
    finally:
        torch.set_num_threads(threads)
    return out


def _stream(path, out, header, data_start, order, out_header, head, targets) -> None:
    with torch.no_grad(), open(path, "rb") as src, atomic_path(out) as tmp, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(head)))
        dst.write(head)
        for key in order:
            tensor = _read_tensor(src, header[key], data_start)
            if key in targets:
                patched = torch.empty_like(tensor)
                write_patched(patched, tensor, targets[key])
                tensor = patched
            want = ST_DTYPES[out_header[key]["dtype"]]
            dst.write(_tensor_bytes(tensor.to(want) if tensor.dtype != want else tensor))
            del tensor
        dst.flush()
