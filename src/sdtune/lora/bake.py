"""Bake LoRAs into a base model and write the result: a diffusers folder, or one .safetensors file in the
family's original layout (LDM for SD 1.x/2.x, SGM for SDXL).

Safetensors inputs of every family (SD 1.x, SD 2.x, SDXL and the tiny model) are streamed, never loaded as a
model: a single file written as a single file in its own layout or as a diffusers folder, and a diffusers
folder (unet and text encoder weights, SDXL's text_encoder_2 included, in one file each or sharded) written as
a diffusers folder. Only the headers are parsed: ``ldm.single_file_plan`` names the model tensor(s) each key of
a single file holds, and the LoRAs are checked against the shapes. Each output file's header is written first
(shapes do not change), then its tensors in input order: a tensor some LoRA targets is read, gets Σ w·ΔW added
by ``patch.write_patched`` (the code and GEMM threading ``LoraSet`` uses, on a weight of the shape the module
has, so the bits are those of an in-memory patch) and is written; each run of untouched tensors is copied file
to file by the kernel (``os.copy_file_range``) without passing through this process. Memory stays near the
LoRAs plus ``SCRATCH_BYTES`` for the tensors being rewritten, whatever the number of threads (``_Scratch``),
and the time near that of copying the files. Every key of a single-file input (EMA weights, schedule buffers,
anything unknown) is kept in a single-file output, with the input's metadata; a folder output gets every other
file of the input folder (configs, tokenizers, scheduler, VAE, index files) copied unchanged.

A LoRA given with block weights (the lora-block-weight extension's ``lbw=`` vectors and presets, ``lora.blocks``)
adds each layer's ΔW times its component's weight times its block's weight: the very product ``LoraSet`` uses,
so a baked layer has the bits the same LoRA applied in memory with ``blocks=`` gives it.

A LoRA may change part of a stored tensor (``_Cut``): OpenCLIP text encoders (SD 2.x's, SDXL's second) keep
q, k and v stacked in one ``attn.in_proj_weight``, so a LoRA on ``q_proj`` adds its ΔW to the first third of
the rows, and ``text_projection`` is stored transposed. Written as a folder, the fused tensor becomes three
(rows read straight from the file, or copied by the kernel when unchanged), and what SD 2.x files carry beyond
the model (OpenCLIP's last block, its projection and temperature) is left out, as ``load_base`` leaves it.

Everything else (a pickled checkpoint, a folder of .bin weights, the built-in model, a folder written as a
single file, a loaded ``Base``) loads the base, patches it in memory with ``patch.LoraSet`` and saves it with
``sdtune.models``; a ``Base`` passed in is restored exactly afterwards.

Files are read with plain positioned reads, not ``safetensors.safe_open``: that maps the file, and the
mapped pages it reads stay in the process's resident set until the file is closed, so the peak RSS would
grow to the size of the largest input file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from .. import checkpoints, ldm, model_names, models
from ..console import note
from ..families import Family
from ..families.build import text_model
from ..safeio import (
    ST_DTYPES,
    ST_NAMES,
    SdtuneError,
    atomic_folder,
    atomic_path,
    atomic_write_text,
    input_at,
    is_safetensors,
    output_file,
    output_folder,
    read_keys,
    read_tensor,
    safetensors_header,
)
from . import blocks as block_weights
from .formats import bundled_words, load_lora
from .neutral import TEXT_COMPONENTS, Lora, text_path
from .patch import LoraSet, as_weights, check_fit, no_bias, write_patched

FORMATS = ("diffusers", "single")
# The weight file (or shard index) diffusers' and transformers' from_pretrained read in each patched component
# folder when no variant is asked for; other weight files there (variants, .bin copies, Flax/TF/ONNX exports)
# would keep the old weights, so they are left out of a merged folder.
FOLDER_WEIGHTS = {"unet": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}
COMPONENT_WEIGHTS = {**FOLDER_WEIGHTS, "vae": "diffusion_pytorch_model"}  # what a single file -> folder merge writes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data")
META_MERGED = "sdtune.merged_loras"


def merge(base_or_spec, loras, out, fmt: str = "diffusers", *, dtype=None, allow_partial: bool = False) -> Path:
    """Write ``base_or_spec`` with ``[(lora, weight), ...]`` baked in to ``out``.

    ``base_or_spec``: a loaded ``Base`` or anything ``load_base`` takes. ``lora``: a ``Lora`` or a file;
    ``weight``: a number, ``(unet_w, te_w)`` (te_w for both of SDXL's encoders) or ``(unet_w, te1_w, te2_w)``;
    a triple ``(lora, weight, blocks)`` adds block weights as ``LoraSet.add`` takes them (a preset name such as
    ``"INALL"``, ``"1,0,…"`` or numbers; None: none). ``fmt``: "diffusers" (a
    folder) or "single" (one ``.safetensors`` in the family's original layout: LDM, or SGM for SDXL).
    ``dtype``: the output's float weights' dtype, e.g. "fp16" to store it smaller (default: the input's; a
    single file's sampling-schedule tensors keep theirs).
    """
    if fmt not in FORMATS:
        raise SdtuneError(f"unknown merge format {fmt!r}; use diffusers or single")
    out = Path(out)
    if fmt == "single" and out.suffix != ".safetensors":
        raise SdtuneError(f"{out}: a single-file merge is written as .safetensors; use that suffix")
    if fmt == "diffusers" and out.suffix.lower() in WEIGHT_SUFFIXES:  # meant as a file, not a folder's name
        raise SdtuneError(f"{out}: sdtune writes a merged model as one .safetensors file (A1111 and ComfyUI load "
                          f"it; never a pickled {out.suffix}) or a diffusers folder; use "
                          f"{out.with_suffix('.safetensors')} or a folder name")
    dtype = None if dtype is None else models.pick_dtype("cpu", dtype)  # (an unknown name: before anything is read)
    if fmt == "diffusers":  # a file in the way, or no right to write there: said before the bake, not after
        output_folder(out, create=False)
    else:
        output_file(out)
    pairs = []
    for i, entry in enumerate(loras):
        blocks = _blocks_of(entry)
        src = entry[0]
        name = str(src) if not isinstance(src, Lora) else f"lora{i}"
        # a third weight is SDXL's second text encoder's; a file without such layers has nothing it weighs
        pairs.append(_Pair(src, as_weights(entry[1], two_encoders=True), name, blocks))
    path = Path(base_or_spec).expanduser() if isinstance(base_or_spec, (str, Path)) else None
    if path is not None and path.is_file() and out.exists() and out.samefile(path):
        raise SdtuneError(f"{out}: is the input checkpoint; write the merge to a new file")
    if path is not None and path.is_dir() and out.resolve().is_relative_to(path.resolve()):
        raise SdtuneError(f"{out}: is (in) the input model; write the merge outside it")
    _check_not_an_input(out, [p.src for p in pairs] + [path])  # or a folder out names holds one
    if fmt == "single":
        _check_out_file(out)
    _note_words_left_out(pairs)
    if path is None:
        return _merge_loaded(base_or_spec, pairs, out, fmt, dtype, allow_partial)
    if path.is_file() and is_safetensors(path):
        if fmt == "single":
            return _single_to_single(path, pairs, out, dtype, allow_partial)
        return _single_to_folder(path, pairs, out, dtype, allow_partial)
    files = _folder_weight_files(path) if fmt == "diffusers" and path.is_dir() else None
    if files is not None:
        return _folder_to_folder(path, files, pairs, out, dtype, allow_partial)
    base = models.load_base(str(base_or_spec), device="cpu", dtype="fp32")
    # a folder's file written in the dtype its weights are stored in, as the streamed routes write theirs
    return _merge_loaded(base, pairs, out, fmt, dtype or _stored_dtype(path), allow_partial)


@dataclass(frozen=True)
class _Pair:
    """One LoRA to bake: its source, its weight per component, its name in the metadata, its block weights."""

    src: object  # a ``Lora`` or a file
    weights: dict[str, float]
    source: str
    blocks: object = None  # as ``LoraSet.add(blocks=)`` takes them; None: no block weights


def _in_sum_order(pairs) -> list[_Pair]:
    """The pairs in the order ``LoraSet`` sums adapters: by name, a file's stem as ``generate --lora`` names it
    (list order among equal names), so that a baked layer has the bits the same LoRAs applied in memory give it."""
    return sorted(pairs, key=lambda p: Path(p.source).stem if isinstance(p.src, (str, Path)) else p.source)


def _note_words_left_out(pairs) -> None:
    """A merge bakes layers. A word a LoRA bundles (pivotal tuning's) would need a new row in the token table
    and a tokenizer that knows it, which a single checkpoint file has no place for (a grown table does not even
    load in diffusers or A1111); so no output gets it, and the note says where the word is."""
    for p in pairs:
        words = bundled_words(p.src)
        if words:
            note(f"{p.source}: its bundled word(s) {', '.join(words)} are not baked in (a merged model keeps the "
                 f"base's vocabulary); load each beside it as an embedding: `sdtune convert {p.source} OUT "
                 f"--to diffusers` writes them apart")


def _blocks_of(entry) -> object:
    if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
        raise SdtuneError(f"merge: each LoRA is (lora, weight) or (lora, weight, blocks), not {entry!r}")
    return entry[2] if len(entry) == 3 else None


def _merge_loaded(base, pairs, out: Path, fmt: str, dtype, allow_partial: bool) -> Path:
    if len(LoraSet.attach(base)):
        raise SdtuneError("this model has LoRAs applied already; remove them (LoraSet.remove_all) before merging")
    lora_set = LoraSet.attach(base)
    try:
        for i, p in enumerate(_in_sum_order(pairs)):  # named in that order; a file is read
            # by LoraSet, which names it in its messages
            two = "text_encoder_2" in lora_set.modules
            weights = p.weights if two else {c: w for c, w in p.weights.items() if c != "text_encoder_2"}
            lora_set.add(f"{i:04d}", p.src, weights,
                         allow_partial=allow_partial, blocks=p.blocks, words=False)  # _note_words_left_out
        # as the streamed routes check each tensor they patch: in the dtype it is saved in (a float32 sum can be
        # finite and still overflow fp16)
        saved = dtype
        for comp, module in lora_set.modules.items():
            for key, param in module.named_parameters():
                stored = param if saved in (None, param.dtype) else param.to(saved)
                if not torch.isfinite(stored).all():
                    raise SdtuneError(_overflow(f"{comp}.{key}", str(stored.dtype).removeprefix("torch."),
                                                sorted({w for p in pairs for w in p.weights.values()})))
        if fmt == "single":
            return models.save_single_file(base, out, dtype=dtype, metadata={META_MERGED: _merged_note(pairs)})
        return models.save_diffusers(base, out, dtype=dtype)
    finally:
        lora_set.remove_all()


def _load(source, modules: dict) -> Lora:
    """A ``Lora`` from a ``Lora`` or a file; kohya names are resolved against the model's own modules."""
    return source if isinstance(source, Lora) else load_lora(source, model_keys=modules)


# ---------------------------------------------------------------- safetensors files, piece by piece

@dataclass
class _Source:
    """One input safetensors file: its parsed header; tensors are read one at a time."""

    path: Path
    header: dict  # key -> {"dtype", "shape", "data_offsets"}
    metadata: dict
    data_start: int

    @classmethod
    def open(cls, path: Path) -> _Source:
        try:
            header, metadata, data_start = safetensors_header(path)
            if not all(isinstance(i, dict) and {"dtype", "shape", "data_offsets"} <= i.keys() for i in header.values()):
                raise ValueError("a tensor entry lacks dtype, shape or data_offsets")
            end = max((i["data_offsets"][1] for i in header.values()), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
            raise SdtuneError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None
        if path.stat().st_size < data_start + end:  # found before anything is written
            raise SdtuneError(f"{path}: truncated file; re-download it")
        unknown = next((k for k, i in header.items() if i["dtype"] not in ST_DTYPES), None)
        if unknown is not None:
            raise SdtuneError(f"{path}: tensor {unknown} has dtype {header[unknown]['dtype']}, which sdtune cannot "
                              "merge; convert the file to fp16/fp32")
        return cls(path, header, metadata, data_start)

    def span(self, key: str, rows: tuple[int, int] | None = None) -> tuple[int, int]:
        """(offset in the file, byte count) of the tensor, or of a block of its rows (contiguous bytes too)."""
        start, end = self.header[key]["data_offsets"]
        if rows is None:
            return self.data_start + start, end - start
        row_bytes = (end - start) // self.header[key]["shape"][0]
        return self.data_start + start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes

    def read(self, fd: int, key: str, rows: tuple[int, int] | None = None, new=torch.empty) -> torch.Tensor:
        """The tensor (or a block of its rows), read with positioned reads (thread-safe) into aligned memory from
        ``new(shape, dtype=...)``."""
        info = self.header[key]
        offset, _ = self.span(key, rows)
        shape = info["shape"] if rows is None else [rows[1] - rows[0], *info["shape"][1:]]
        return read_tensor(fd, offset, shape, ST_DTYPES[info["dtype"]], self.path, new)


@dataclass(frozen=True)
class _Cut:
    """Where a model weight lies in a stored tensor: all of it, a block of its rows (OpenCLIP's fused
    ``attn.in_proj_weight`` stacks q, k and v), or all of it transposed (OpenCLIP's ``text_projection``)."""

    rows: tuple[int, int] | None = None
    transposed: bool = False

    @classmethod
    def of(cls, target: ldm.Target, stored_shape: list) -> _Cut:
        if target.chunk is None:
            return cls(transposed=target.transposed)
        n = stored_shape[0] // 3
        return cls((target.chunk * n, (target.chunk + 1) * n))

    def shape(self, stored_shape: list) -> list:
        """The model weight's shape."""
        shape = list(stored_shape) if self.rows is None else [self.rows[1] - self.rows[0], *stored_shape[1:]]
        return shape[::-1] if self.transposed else shape

    def patched(self, tensor: torch.Tensor, contribs: list, new=torch.empty) -> torch.Tensor:
        """``tensor`` with Σ w·ΔW added to this weight. The weight is taken out in the model's orientation and
        patched into a fresh buffer of its own shape, as ``LoraSet`` patches the module, so the bits are the same.
        ``new(shape, dtype=...)``: where the buffers come from."""
        base = tensor if self.rows is None else tensor[self.rows[0]:self.rows[1]]  # rows: a contiguous view
        base = new(base.shape[::-1], dtype=base.dtype).copy_(base.T) if self.transposed else base
        # write_patched sums in float32 and casts once at the end: given float32 buffers, it makes no float32
        # temporaries of its own (the sum, the weight in float32) outside ``new``'s memory. Same bits.
        base32 = base if base.dtype == torch.float32 else new(base.shape, dtype=torch.float32).copy_(base)
        out = new(base.shape, dtype=torch.float32)
        write_patched(out, base32, contribs)
        out = out if base.dtype == torch.float32 else new(base.shape, dtype=base.dtype).copy_(out)
        out = new(out.shape[::-1], dtype=out.dtype).copy_(out.T) if self.transposed else out
        if self.rows is None:
            return out
        tensor[self.rows[0]:self.rows[1]] = out  # the rows of the other weights stay as they were
        return tensor

    def work_bytes(self, stored_shape: list, dtype: torch.dtype) -> int:
        """The memory ``patched`` takes from ``new`` for this weight of a tensor stored in ``dtype``: the sum in
        float32, and unless stored in float32 the weight in float32 and the result cast back; with a transposed
        weight a copy of it and of the result."""
        numel = torch.Size(self.shape(stored_shape)).numel()
        half = dtype != torch.float32
        return numel * ((2 * self.transposed + 2 * half) * dtype.itemsize + 4 * (1 + half))


WHOLE = _Cut()


@dataclass
class _Item:
    """One tensor of an output file: where it comes from, what is added to it, how it is stored."""

    key: str  # name in the output file
    src: _Source
    src_key: str
    patches: list  # [(_Cut of the output tensor, [(name, uid, adapter, weight), ...] in list order)]; [] copies
    dtype: str  # safetensors dtype name in the output
    shape: list  # shape in the output (a reshape keeps the bytes)
    cut: _Cut = WHOLE  # the part of the stored tensor that is the output tensor (q, k or v of a fused one...)

    @property
    def copied(self) -> bool:
        return not self.patches and not self.cut.transposed and self.dtype == self.src.header[self.src_key]["dtype"]

    @property
    def work_bytes(self) -> int:
        """The memory ``_rewrite`` takes for this tensor: what it reads (and its transpose), each patch's
        buffers, the result cast to the output dtype, and up to 64 bytes of alignment for each."""
        read, write = (ST_DTYPES[d] for d in (self.src.header[self.src_key]["dtype"], self.dtype))
        work = torch.float32 if self.patches and write != read else read  # patched in float32, cast once
        numel = torch.Size(self.shape).numel()
        total = numel * read.itemsize * (1 + self.cut.transposed) + (numel * 4 if work != read else 0)
        total += (numel * write.itemsize if write != work else 0)
        total += sum(cut.work_bytes(self.shape, work) for cut, _ in self.patches)
        return total + 64 * (3 + 4 * len(self.patches))


COPY_CHUNK = 64 << 20  # unchanged bytes are copied in pieces of this size, so the threads share the work evenly
# Past a few threads the copy is bound by the disk or page cache anyway.
MAX_WORKERS = 8
# Memory the tensors being rewritten take together, whatever the number of threads (``_Scratch``): the largest
# layer of SDXL takes 184 MB in fp16 (``_Item.work_bytes`` of ff.net.0.proj), of SD 1.5 105 MB in fp32; one that
# needs more than this runs alone.
SCRATCH_BYTES = 256 << 20


class _Scratch:
    """The memory for tensors being rewritten: private anonymous mappings, at most ``capacity`` bytes of them
    (a job that needs more waits until it runs alone), each lent to one job at a time and reused.

    Not ``torch.empty``: glibc serves blocks below its mmap threshold from its heaps and keeps them there when
    they are freed, and it raises that threshold (up to 32 MB) each time a larger block is freed, so layer-sized
    buffers piled up in the worker threads' heaps (0.3 GB more peak RSS on SDXL, more with more threads). A fresh
    mapping per tensor would give the memory back but cost a page fault per 4 KB (twice the system time of a
    whole SDXL merge), hence the reuse.
    """

    def __init__(self, capacity: int):
        self.capacity, self.mapped = capacity, 0
        self.free: list[mmap.mmap] = []
        self.changed = threading.Condition()

    @contextmanager
    def lend(self, nbytes: int):
        """A ``_Region`` of at least ``nbytes`` for the duration of the ``with`` block."""
        with self.changed:
            memory = self.changed.wait_for(lambda: self._take(nbytes))
        try:
            yield _Region(memory)
        finally:
            with self.changed:
                self.free.append(memory)
                self.changed.notify_all()

    def _take(self, nbytes: int) -> mmap.mmap | None:
        """The smallest free mapping that is big enough, or a new one if there is room (made by unmapping free
        ones), or None (the caller waits for a job to finish)."""
        fits = [m for m in self.free if len(m) >= nbytes]
        if fits:
            memory = min(fits, key=len)
            self.free.remove(memory)
            return memory
        in_use = self.mapped - sum(len(m) for m in self.free)
        if in_use and in_use + nbytes > self.capacity:
            return None
        while self.free and self.mapped + nbytes > self.capacity:  # unmapped once no tensor refers to it
            self.mapped -= len(self.free.pop(0))
        self.mapped += nbytes
        return mmap.mmap(-1, max(nbytes, 1))


class _Region:
    """Tensors for one job, carved one after the other out of one mapping, 64-byte aligned as torch aligns its
    own (so that CPU kernels take the same paths); ``torch.empty`` for any beyond what it holds."""

    def __init__(self, memory: mmap.mmap):
        self.memory, self.used = memory, 0

    def new(self, shape, dtype: torch.dtype) -> torch.Tensor:
        count = torch.Size(shape).numel()
        start = -(-self.used // 64) * 64
        if not count or start + count * dtype.itemsize > len(self.memory):
            return torch.empty(shape, dtype=dtype)
        self.used = start + count * dtype.itemsize
        return torch.frombuffer(self.memory, dtype=dtype, count=count, offset=start).view(shape)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src: _Source, src_fd: int, dst_fd: int, offset: int, count: int, dst_offset: int) -> None:
    """Copy ``count`` bytes of the source at ``offset`` into the output at ``dst_offset``: by the kernel
    (``copy_file_range``) where it can, through a buffer elsewhere."""
    while count:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count, offset, dst_offset)
        except (AttributeError, OSError):  # not Linux, or file systems that cannot
            chunk = os.pread(src_fd, min(count, COPY_CHUNK), offset)
            _pwrite_all(dst_fd, chunk, dst_offset)
            n = len(chunk)
        if n <= 0:
            raise SdtuneError(f"{src.path}: truncated file; re-download it")
        offset, count, dst_offset = offset + n, count - n, dst_offset + n


def _header(items: list[_Item], metadata: dict) -> tuple[bytes, list[int]]:
    """The output file's header, and where each item's bytes start in the file."""
    entries, starts, offset = {}, [], 0
    for item in items:
        nbytes = torch.Size(item.shape).numel() * ST_DTYPES[item.dtype].itemsize
        entries[item.key] = {"dtype": item.dtype, "shape": list(item.shape), "data_offsets": [offset, offset + nbytes]}
        starts.append(offset)
        offset += nbytes
    head = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data block starts 8-byte aligned, as safetensors writes it
    head = struct.pack("<Q", len(head)) + head
    return head, [len(head) + s for s in starts]


def _jobs(items: list[_Item], starts: list[int]) -> list[tuple]:
    """("tensor", item, output offset) for each tensor that changes; ("copy", source, offset, count, output
    offset) for unchanged tensors that lie back to back in one input, joined up to COPY_CHUNK bytes."""
    jobs: list[tuple] = []
    for item, start in zip(items, starts):
        offset, nbytes = item.src.span(item.src_key, item.cut.rows)
        last = jobs[-1] if jobs else ("tensor",)
        if not item.copied:
            jobs.append(("tensor", item, start))
        elif last[0] == "copy" and last[1] is item.src and last[2] + last[3] == offset and last[3] + nbytes <= COPY_CHUNK:
            jobs[-1] = ("copy", item.src, last[2], last[3] + nbytes, last[4])
        else:
            jobs.append(("copy", item.src, offset, nbytes, start))
    return jobs


@torch.no_grad()  # grad mode is per thread: each worker sets it itself
def _run_job(job: tuple, fds: dict, dst: int, scratch: _Scratch) -> None:
    if job[0] == "copy":
        _, src, offset, count, dst_offset = job
        _copy_range(src, fds[src.path], dst, offset, count, dst_offset)
        return
    _, item, dst_offset = job
    with scratch.lend(item.work_bytes) as region:
        _rewrite(item, fds[item.src.path], dst, dst_offset, region.new)


def _rewrite(item: _Item, src_fd: int, dst: int, dst_offset: int, new) -> None:
    """Read the item's tensor, patch it, cast it and write it at its place in the output (buffers from ``new``)."""
    tensor = item.src.read(src_fd, item.src_key, item.cut.rows, new)
    if item.cut.transposed:
        tensor = new(tensor.shape[::-1], dtype=tensor.dtype).copy_(tensor.T)
    want = ST_DTYPES[item.dtype]
    if item.patches and tensor.dtype != want:  # cast once: the float32 sum, not one rounded to the input's dtype
        tensor = new(tensor.shape, dtype=torch.float32).copy_(tensor)
    for cut, contribs in item.patches:
        tensor = cut.patched(tensor, contribs, new)
    tensor = tensor if tensor.dtype == want else new(tensor.shape, dtype=want).copy_(tensor)
    if item.patches and not torch.isfinite(tensor).all():
        weights = sorted({float(c[3]) for _, contribs in item.patches for c in contribs})
        raise SdtuneError(_overflow(item.key, item.dtype, weights))
    _pwrite_all(dst, tensor.reshape(-1).view(torch.uint8).numpy(), dst_offset)


def _overflow(key: str, dtype: str, weights) -> str:
    """A merged weight that is inf or NaN: every image the model draws would be black."""
    return (f"{key}: the merge makes it inf or NaN in {dtype} (LoRA weight {', '.join(f'{w:g}' for w in weights)}); "
            f"a weight far too large (usual: -2 to 2), or a broken LoRA file; nothing was written")


def _write_file(out: Path, items: list[_Item], metadata: dict) -> None:
    """Write ``items`` as one safetensors file at ``out``, atomically.

    Every piece has its place in the output from the header on, so the pieces are written independently, by
    as many threads as torch uses (up to MAX_WORKERS): copies of unchanged bytes (in the kernel) and tensors that
    change (read, patched, cast, in memory lent by a ``_Scratch``). Each patch runs its GEMM single-threaded, as
    ``LoraSet`` does, so it gets the same bits.
    """
    head, starts = _header(items, metadata)
    jobs = _jobs(items, starts)
    workers = min(torch.get_num_threads(), MAX_WORKERS)
    threads = torch.get_num_threads()
    fds = {}
    torch.set_num_threads(1)
    try:
        for item in items:
            if item.src.path not in fds:
                fds[item.src.path] = os.open(item.src.path, os.O_RDONLY)
        with atomic_path(out) as tmp:
            dst = os.open(tmp, os.O_WRONLY)
            try:
                _pwrite_all(dst, head, 0)
                _run_all(jobs, fds, dst, workers)
            finally:
                os.close(dst)
    finally:
        for fd in fds.values():
            os.close(fd)
        torch.set_num_threads(threads)


def _run_all(jobs: list[tuple], fds: dict, dst: int, workers: int) -> None:
    """Run the jobs on ``workers`` threads, in order; the first error cancels the jobs not yet started."""
    with ThreadPoolExecutor(workers) as pool:
        scratch = _Scratch(SCRATCH_BYTES)
        futures = [pool.submit(_run_job, job, fds, dst, scratch) for job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# ---------------------------------------------------------------- which weights the LoRAs change

def _contributions(where: tuple[dict, dict], pairs, allow_partial: bool, family: Family | None,
                   unet_config) -> dict[tuple[Path, str], dict[_Cut, list]]:
    """{(input file, key): {where in that tensor: [(name, uid, adapter, weight), ...]}} for every weight (and
    bias) some LoRA changes.

    ``where``: ({component: {module path: (_Source, key of the tensor holding its weight, _Cut)}}, the same for
    the biases), the model seen through file headers; the LoRAs are matched against its shapes by the same checks
    ``LoraSet.add`` makes. ``family`` and ``unet_config`` (a dict) place layers in blocks for pairs with block
    weights.
    """
    where, biases = where
    shapes = {comp: {path: tuple(cut.shape(src.header[key]["shape"])) for path, (src, key, cut) in paths.items()}
              for comp, paths in where.items()}
    # every vector checked against the family before any file is read
    pairs = _in_sum_order(pairs)
    block_ws = [None if p.blocks is None else block_weights.parse(p.blocks, family) for p in pairs]
    changes: dict[tuple[Path, str], dict[_Cut, list]] = {}
    for i, (p, blocks) in enumerate(zip(pairs, block_ws)):  # in _in_sum_order: each weight's contributions
        targets = check_fit(_load(p.src, shapes), shapes, allow_partial, p.source)
        factors = {} if blocks is None else block_weights.layer_factors(blocks, targets, unet_config)
        for (comp, path), adapter in targets.items():
            found = text_path(path) if comp in TEXT_COMPONENTS else path
            src, key, cut = where[comp][found]
            w = p.weights[comp] * factors.get((comp, path), 1.0)  # the product LoraSet takes: the same bits
            bias = adapter.bias_part()
            if bias is not None and found not in biases.get(comp, {}):
                raise no_bias(p.source, comp, path)
            if w != 0.0:
                changes.setdefault((src.path, key), {}).setdefault(cut, []).append((f"{i:04d}", i, adapter, w))
                if bias is not None:
                    bsrc, bkey, bcut = biases[comp][found]
                    changes.setdefault((bsrc.path, bkey), {}).setdefault(bcut, []).append((f"{i:04d}", i, bias, w))
    return changes


def _merged_note(pairs) -> str:
    return json.dumps([{"source": p.source, "unet_weight": p.weights["unet"], "te_weight": p.weights["text_encoder"],
                        "te2_weight": p.weights["text_encoder_2"],
                        **({"blocks": _blocks_text(p.blocks)} if p.blocks is not None else {})} for p in pairs])


def _blocks_text(blocks) -> str:
    """Block weights as given (a preset name or the vector), as the ``lbw=`` option writes them."""
    return blocks if isinstance(blocks, str) else ",".join(f"{float(v):g}" for v in blocks)


def _by_offset(src: _Source, keys) -> list[str]:
    return sorted(keys, key=lambda k: src.header[k]["data_offsets"][0])


# ---------------------------------------------------------------- single file in

@dataclass
class _SingleFile:
    """A single-file checkpoint seen through its header: its family, configs, components (shells without
    weights) and the ``ldm.single_file_plan`` of its keys."""

    src: _Source
    family: Family
    configs: dict
    parts: dict
    plan: dict[str, list[ldm.Target]]

    @classmethod
    def open(cls, path: Path, strict: bool) -> _SingleFile:
        src = _Source.open(path)
        shapes = {k: torch.empty(v["shape"], device="meta") for k, v in src.header.items()}
        family = checkpoints.family_from_metadata(src.metadata) or checkpoints.detect_family(shapes, path)
        configs = checkpoints.file_configs(family, src.metadata, path, keys=src.header.keys(),
                                           probe=checkpoints.read_probe(family, path, src.header.keys()))
        with init_empty_weights():  # names and configs only
            parts = models.build_parts(family, configs)
        try:
            plan = ldm.single_file_plan(src.header, family, parts, strict=strict)
        except SdtuneError as e:
            raise SdtuneError(f"{path}: {e}") from None
        return cls(src, family, configs, parts, plan)

    def cut(self, key: str, target: ldm.Target) -> _Cut:
        return _Cut.of(target, self.src.header[key]["shape"])

    def where(self) -> tuple[dict, dict]:
        """({component LoRAs patch: {module path: (_Source, key, _Cut)}} of every weight the file holds, the same
        of every bias)."""
        found: dict[str, dict[str, dict]] = {suffix: {comp: {} for comp in self.parts if comp != "vae"}
                                             for suffix in (".weight", ".bias")}
        for key, targets in self.plan.items():
            for target in targets:
                suffix = "." + target.name.rpartition(".")[2]
                if suffix in found and target.component in found[suffix]:
                    path = target.name.removesuffix(suffix)
                    path = text_path(path) if target.component in TEXT_COMPONENTS else path
                    found[suffix][target.component][path] = (self.src, key, self.cut(key, target))
        return found[".weight"], found[".bias"]


class StoredWeights:
    """The Linear and Conv2d weights of a checkpoint, read from its safetensors files one at a time by module path
    (``lora extract`` compares two checkpoints layer by layer instead of holding both models): a single file
    (``single_file``) or a diffusers folder (``folder``). Use it as a context."""

    def __init__(self, family: Family, scheduler_config, parts: dict, where: dict):
        self.family, self.scheduler_config = family, scheduler_config
        self._parts = parts  # components without weights: names and shapes
        self._where = where  # {component: {module path: (_Source, key, _Cut)}}
        self._fds: dict[Path, int] = {}

    @classmethod
    def single_file(cls, path: Path) -> StoredWeights:
        single = _SingleFile.open(Path(path), strict=False)
        scheduler = models.make_scheduler(single.family, single.configs["scheduler"]).config
        return cls(single.family, scheduler, single.parts, single.where()[0])

    @classmethod
    def folder(cls, folder: Path) -> StoredWeights | None:
        """None for a folder that cannot be read this way (no model_index.json, a component without plain
        safetensors weights, a built-in model's export)."""
        files = None if model_names.tiny_export(folder) else _folder_weight_files(folder)
        if files is None:
            return None
        family = checkpoints.as_loaded(checkpoints.folder_family(folder, json.loads((folder / "model_index.json").read_text())))
        scheduler = models.make_scheduler(family, _json(folder / "scheduler" / "scheduler_config.json")).config
        parts = {}
        for comp in files:
            config = _json(folder / comp / "config.json")
            te = next((t for t in family.text_encoders if t.component == comp), None)
            with init_empty_weights():  # names and shapes only
                parts[comp] = UNet2DConditionModel.from_config(config) if te is None else text_model(te, config)
        return cls(family, scheduler, parts, _folder_where(files)[0])

    def __enter__(self) -> StoredWeights:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def module(self, comp: str) -> torch.nn.Module:
        """The component without weights (names, shapes)."""
        return self._parts[comp]

    def weight(self, comp: str, path: str, shape) -> torch.Tensor | None:
        """The module's weight as stored (its dtype), in the module's ``shape``; None if the files lack it."""
        found = self._where.get(comp, {}).get(path)
        if found is None:
            return None
        src, key, cut = found
        if src.path not in self._fds:
            self._fds[src.path] = os.open(src.path, os.O_RDONLY)
        tensor = src.read(self._fds[src.path], key, cut.rows)
        tensor = tensor.T if cut.transposed else tensor
        return tensor.reshape(shape) if tensor.numel() == math.prod(shape) else None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SdtuneError(f"{path}: unreadable ({e}); re-download or re-export the model") from None


def _single_to_single(path: Path, pairs, out: Path, dtype: torch.dtype | None, allow_partial: bool) -> Path:
    out_float = None if dtype is None else ST_NAMES[dtype]
    single = _SingleFile.open(path, strict=False)  # keys it does not know are copied through
    src = single.src
    changes = _contributions(single.where(), pairs, allow_partial, single.family, dict(single.parts["unet"].config))
    items = []
    for key in _by_offset(src, src.header):
        info = src.header[key]
        cast = out_float and ST_DTYPES[info["dtype"]].is_floating_point and not _schedule_key(key, single.plan)
        items.append(_Item(key, src, key, list(changes.get((path, key), {}).items()),
                           out_float if cast else info["dtype"], info["shape"]))
    _write_file(out, items, dict(src.metadata, **{META_MERGED: _merged_note(pairs)}))
    config = checkpoints.config_beside(path)
    if config is not None:  # the A1111 config that says how to sample the input says it of the merge too
        atomic_write_text(config.read_text(encoding="utf-8"), out.with_suffix(".yaml"))
    return out


def _schedule_key(key: str, plan: dict) -> bool:
    """A sampling-schedule tensor stored beside the model: ldm's top-level buffers (``alphas_cumprod``, ``betas``…)
    or sgm's ``denoiser.sigmas``. A smaller ``--save-dtype`` leaves them as they are: A1111 keeps
    ``alphas_cumprod`` in fp32 when it halves a model (its fp16 copy shifts every sampler's noise levels)."""
    return not plan.get(key) and ("." not in key or key.startswith("denoiser."))


def _single_to_folder(path: Path, pairs, out: Path, out_float: torch.dtype | None, allow_partial: bool) -> Path:
    _check_out_folder(out)
    single = _SingleFile.open(path, strict=True)  # a folder holds only what its components load
    src, prefixes = single.src, ldm.component_prefixes(single.family)
    by_part: dict[str, list] = {comp: [] for comp in single.parts}
    for key in _by_offset(src, single.plan):
        for target in single.plan[key]:
            by_part[target.component].append((key, target))
    for comp, found in by_part.items():
        if not found:
            raise SdtuneError(f"{path}: has no {comp} weights ({prefixes[comp]}*); pass a full checkpoint of "
                              f"{single.family.title} that includes them")
    changes = _contributions(single.where(), pairs, allow_partial, single.family, dict(single.parts["unet"].config))
    with atomic_folder(out) as tmp:
        _write_configs(tmp, single, {comp: out_float or _float_dtype(src, found) for comp, found in by_part.items()})
        for comp, found in by_part.items():
            items = []
            for key, target in found:
                info, cut = src.header[key], single.cut(key, target)
                shape = cut.shape(info["shape"])
                contribs = changes.get((path, key), {}).get(cut)
                items.append(_Item(target.name, src, key, [(WHOLE, contribs)] if contribs else [],
                                   _out_dtype(info["dtype"], out_float), shape[:2] if target.squeeze else shape, cut))
            metadata = {"format": "pt", **({META_MERGED: _merged_note(pairs)} if comp != "vae" else {})}
            _write_file(tmp / comp / f"{COMPONENT_WEIGHTS[comp]}.safetensors", items, metadata)
    return out


def _out_dtype(stored: str, out_float: torch.dtype | None) -> str:
    """The safetensors dtype a tensor stored as ``stored`` is written in: ``out_float`` if it is a float one."""
    return ST_NAMES[out_float] if out_float is not None and ST_DTYPES[stored].is_floating_point else stored


def _float_dtype(src: _Source, found: list) -> torch.dtype:
    """The dtype of a component's weights: the first floating-point one of its (key, target) pairs."""
    return next(d for key, _ in found if (d := ST_DTYPES[src.header[key]["dtype"]]).is_floating_point)


def _write_configs(folder: Path, single: _SingleFile, dtypes: dict[str, torch.dtype]) -> None:
    """The configs, tokenizers and scheduler files ``save_diffusers`` writes for this model, without weights;
    ``dtypes``: each component's, which transformers writes into its config."""
    family, parts = single.family, single.parts
    tokenizers = {te.tokenizer: models.tokenizer_for(te) for te in family.text_encoders}
    scheduler = models.make_scheduler(family, single.configs["scheduler"])
    pipeline = models.Base(**parts, **tokenizers, scheduler=scheduler, device=torch.device("cpu"),
                           dtype=torch.float32, name="", source="", single_file=None, model_hash="",
                           family=family).pipeline()
    pipeline.save_config(folder)
    parts["unet"].save_config(folder / "unet")
    parts["vae"].save_config(folder / "vae")
    for te in family.text_encoders:
        with models.quiet_progress():  # no weights (an empty state dict): transformers writes the config it would
            parts[te.component].to(dtypes[te.component]).save_pretrained(folder / te.component, state_dict={})
        tokenizers[te.tokenizer].save_pretrained(folder / te.tokenizer)
    scheduler.save_pretrained(folder / "scheduler")


# ---------------------------------------------------------------- diffusers folder in

def _folder_weight_files(folder: Path) -> dict[str, list[Path]] | None:
    """{"unet" | text encoder: safetensors files from_pretrained reads}, or None if any has none."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return None
    try:
        family = checkpoints.folder_family(folder, json.loads(index_file.read_text()))
    except (OSError, ValueError) as e:
        raise SdtuneError(f"{index_file}: unreadable ({e}); re-download or re-export the model") from None
    found = {}
    for comp in ("unet", *(te.component for te in family.text_encoders)):
        stem = FOLDER_WEIGHTS[comp]
        single, index = folder / comp / f"{stem}.safetensors", folder / comp / f"{stem}.safetensors.index.json"
        if single.is_file():
            found[comp] = [single]
        elif index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise SdtuneError(f"{index}: unreadable shard index ({e}); re-download or re-export the model") from None
            found[comp] = [index.parent / s for s in shards]
            missing = next((p for p in found[comp] if not p.is_file()), None)
            if missing is not None:
                raise SdtuneError(f"{missing}: a shard listed in {index.name} is missing; re-download the model")
        else:
            return None
    return found


def _folder_to_folder(folder: Path, files: dict, pairs, out: Path, out_float: torch.dtype | None,
                      allow_partial: bool) -> Path:
    _check_out_folder(out)
    where, biases = _folder_where(files)
    sources = list({src.path: src for table in (where, biases) for paths in table.values()
                    for src, _, _ in paths.values()}.values())
    vae = folder / "vae" / f"{COMPONENT_WEIGHTS['vae']}.safetensors"
    if out_float is not None and vae.is_file():  # no LoRA patches it, but the whole model takes the dtype
        sources.append(_Source.open(vae))
    changes = _contributions((where, biases), pairs, allow_partial, *_folder_blocks_context(folder, pairs))
    with atomic_folder(out) as tmp:
        left_out = _copy_folder(folder, tmp, {src.path for src in sources})
        for src in sources:
            items = [_Item(k, src, k, list(changes.get((src.path, k), {}).items()),
                           _out_dtype(src.header[k]["dtype"], out_float), src.header[k]["shape"])
                     for k in _by_offset(src, src.header)]
            merged = {META_MERGED: _merged_note(pairs)} if src.path.parent.name != "vae" else {}
            _write_file(tmp / src.path.relative_to(folder), items, dict(src.metadata, **merged))
        for comp in files if out_float is not None else ():
            if comp in TEXT_COMPONENTS:
                models.set_config_dtype(tmp / comp / "config.json", out_float)
            for index in (tmp / comp).glob("*.safetensors.index.json"):  # its total size is the shards' new one
                _set_total_size(index)
    if left_out:
        warnings.warn(f"{folder}: left out of the merge, as they would keep the unmerged weights: "
                      f"{', '.join(left_out)}", stacklevel=3)
    return out


def _set_total_size(index: Path) -> None:
    """A shard index's ``total_size`` (the bytes of every tensor) made that of the shards it names now."""
    data = json.loads(index.read_text(encoding="utf-8"))
    if isinstance(data.get("metadata"), dict) and "total_size" in data["metadata"]:
        data["metadata"]["total_size"] = sum(
            info["data_offsets"][1] - info["data_offsets"][0]
            for shard in sorted(set(data["weight_map"].values()))
            for info in safetensors_header(index.parent / shard)[0].values())
        atomic_write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", index)


def _folder_where(files: dict[str, list[Path]]) -> tuple[dict, dict]:
    """({component: {module path: (_Source, key, WHOLE)}} of every weight the component files hold, the same of
    every bias), as ``_SingleFile.where`` gives them for a single file."""
    where: dict[str, dict] = {comp: {} for comp in files}
    biases: dict[str, dict] = {comp: {} for comp in files}
    for comp, paths in files.items():
        for src in map(_Source.open, paths):
            for key in src.header:
                for suffix, table in ((".weight", where), (".bias", biases)):
                    if key.endswith(suffix):  # text-encoder paths in transformers-5 naming, whatever the file uses
                        path = key.removesuffix(suffix)
                        table[comp][ldm.text_encoder_key(path) if comp in TEXT_COMPONENTS else path] = (src, key, WHOLE)
    return where, biases


def _folder_blocks_context(folder: Path, pairs) -> tuple[Family | None, dict | None]:
    """The family and UNet config block weights need, read only when some LoRA has them."""
    if all(p.blocks is None for p in pairs):
        return None, None
    index = json.loads((folder / "model_index.json").read_text())  # read already by _folder_weight_files
    unet_config = json.loads((folder / "unet" / "config.json").read_text())  # and by checkpoints.folder_family
    return checkpoints.folder_family(folder, index), unet_config


def _copy_folder(folder: Path, dst: Path, rewritten: set[Path]) -> list[str]:
    """Copy every file of ``folder`` to ``dst`` except ``rewritten``, other weight files of the patched
    components, and hidden files (``.git``, caches). Returns the weight files left out."""
    left_out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(folder)
            if name.startswith(".") or path in rewritten:
                continue
            if rel.parts[0] in FOLDER_WEIGHTS and len(rel.parts) == 2 and name.endswith(WEIGHT_SUFFIXES):
                left_out.append(rel.as_posix())
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst / rel)  # the kernel copies (sendfile); symlinks into a hub cache are followed
    return sorted(left_out)


def _stored_dtype(path: Path) -> torch.dtype | None:
    """The dtype a diffusers folder's UNet weights are stored in (safetensors), by its header; None where only
    loading tells (a .bin folder, a pickled checkpoint, the built-in model, a hub id)."""
    files = _folder_weight_files(path) if path.is_dir() else None
    if not files or not files.get("unet"):
        return None
    src = _Source.open(files["unet"][0])
    floating = [ST_DTYPES[info["dtype"]] for info in src.header.values() if ST_DTYPES[info["dtype"]].is_floating_point]
    return floating[0] if floating else None


def _check_out_file(out: Path) -> None:
    """Refuse to replace an existing file that is not a Stable Diffusion checkpoint (a LoRA, an embedding, a VAE
    named as --out by mistake); an earlier merge is replaced, once the new one is complete."""
    if out.is_file():
        try:
            keys = read_keys(out)
        except SdtuneError:
            keys = ()
        if not any(k.startswith(ldm.UNET_PREFIX) for k in keys):
            raise SdtuneError(f"{out}: exists and is not a checkpoint (a merge replaces only an earlier one); choose "
                              f"a new file name, or delete that file first")


def _check_not_an_input(out: Path, inputs) -> None:
    """Refuse an output that would replace one of the inputs (the model, the LoRAs): named as ``out``, or kept in
    the model folder ``out`` names (that folder is replaced whole)."""
    found = input_at(out, inputs)
    if found and found[1]:
        raise SdtuneError(f"{out}: is an input of this command ({found[0]}); write the merge to a new file")
    if found:
        raise SdtuneError(f"{out}: holds {found[0]}, an input of this command, and a merge replaces the whole "
                          f"folder; write the merge to a new folder, or move the input out first")


def _check_out_folder(out: Path) -> None:
    """Refuse an output that would replace a folder that is not a model (an earlier merge is replaced, by
    ``safeio.atomic_folder``, once the new one is complete, unless it holds files the new one does not)."""
    if out.exists() and not (out.is_dir() and ((out / "model_index.json").is_file() or not any(out.iterdir()))):
        raise SdtuneError(f"{out}: exists and is not a diffusers model folder; choose a new or empty folder")
