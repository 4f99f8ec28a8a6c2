"""Loading without code execution, and atomic writes.

Every weight file sdtune reads goes through ``load_state``: safetensors directly, pickle-based files
(.pt/.bin/.ckpt) only through ``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers. Every file sdtune writes goes through a temporary file in the same folder and an
atomic rename, so a kill never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import tomllib
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

try:  # POSIX only; see folder_lock
    import fcntl
except ImportError:
    fcntl = None


class SdtuneError(Exception):
    """A user-facing error: its message is one clear line that names the problem and the fix."""


PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pti"}
# safetensors dtype names <-> torch dtypes (the ones sdtune reads itself; others go through safe_open)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
READ_THREADS = 8  # at most, and no more than the machine has cores


def is_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return len(head) == 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"
    except OSError:
        return False


def read_metadata(path: str | Path) -> dict:
    """A safetensors file's metadata, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise SdtuneError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None


def read_keys(path: str | Path) -> list[str]:
    """A safetensors file's tensor names, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise SdtuneError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None


def load_state(path: str | Path, device: str = "cpu", mmap: bool = False) -> tuple[dict, dict]:
    """(tensors or plain containers, safetensors metadata) from a weight file, never executing code.
    ``mmap``: the tensors are views of a mapping of the file, read when used (for callers that want only a few of
    them, or copy each to a GPU); else a safetensors file's tensors are read into memory of their own."""
    path = Path(path)
    if not path.is_file():
        raise SdtuneError(f"{path}: no such file; check the path")
    if path.is_file() and path.stat().st_size == 0:  # a download or copy that never wrote
        raise SdtuneError(f"{path}: an empty file (0 bytes); re-download or re-export it")
    if is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device=device) as f:  # checks the header: offsets, sizes
                if str(device) == "cpu" and not mmap:
                    read = _read_safetensors(path, f.keys())
                    if read is not None:
                        return read, dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SdtuneError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
            raise SdtuneError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it")
    what = _not_weights(path)
    if what:
        raise SdtuneError(f"{path}: {what}, not a weight file; give a .safetensors, .pt, .ckpt or .bin file"
                          + ("; a PEFT adapter keeps its weights beside it, in adapter_model.safetensors"
                             if path.name == "adapter_config.json" else ""))
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are about torch, not the user's file
            warnings.simplefilter("ignore")
            try:
                obj = _torch_load(path, device, mmap)
            except Exception as e:  # noqa: BLE001 - the training extras' retry, else the same error below
                obj = _load_with_training_extras(path, device, mmap, e)
    except Exception as e:  # noqa: BLE001
        # a pickle (protocol 2+) or torch zip the restricted loader refused holds objects beyond tensors; bytes
        # that start as neither are a damaged file, said below
        with open(path, "rb") as f:
            head = f.read(8)
        pickled = head.startswith((b"PK", b"\x80"))
        if "Weights only load failed" in str(e) and pickled:
            raise SdtuneError(
                f"{path}: this pickle holds Python objects beyond plain tensors, and sdtune refuses to unpickle "
                f"it (it could run code); convert it to .safetensors with a tool you trust")
        if not pickled:  # torch's words would be about pickles; say what the bytes are not
            size = path.stat().st_size
            why = ("shorter than a safetensors header" if size < 8 else
                   f"its header would be {int.from_bytes(head, 'little'):,} bytes, the file has {size:,}")
            raise SdtuneError(f"{path}: neither a readable safetensors file ({why}) nor a torch file; "
                              f"re-download or re-export it")
        if "central directory" in str(e):  # torch's zip reader on an archive whose end is missing
            raise SdtuneError(f"{path}: a torch file cut short (its zip archive has no end); re-download or "
                              f"re-export it")
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg if len(msg) <= 120 else msg[:117] + "..."
        raise SdtuneError(f"{path}: cannot read weights ({msg}); is it a complete .safetensors or .pt file?")
    return obj, {}


def _read_safetensors(path: Path, keys) -> dict | None:
    """Each tensor read with positioned reads into its own (aligned) memory, or None where a dtype is not in
    ST_DTYPES. safe_open's tensors live in a mapping of the file, so a checkpoint copied out of it (a cast, or
    the realignment models._place does) was held twice at the peak: 8.7 GB RSS for a 4.3 GB file; once now.
    Reads run on a few threads: filling fresh memory is bound by page faults, which one thread leaves idle."""
    keys = list(keys)
    header, _, data_start = safetensors_header(path)
    if any(header[k]["dtype"] not in ST_DTYPES for k in keys):
        return None
    with open(path, "rb") as f:
        def read(key: str) -> torch.Tensor:
            info = header[key]
            return read_tensor(f.fileno(), data_start + info["data_offsets"][0], info["shape"],
                               ST_DTYPES[info["dtype"]], path)
        with ThreadPoolExecutor(max(1, min(READ_THREADS, os.cpu_count() or 1))) as pool:
            return dict(zip(keys, pool.map(read, keys)))


def safetensors_header(path: Path) -> tuple[dict, dict, int]:
    """(key -> {"dtype", "shape", "data_offsets"}, metadata, where the tensor data starts) of a safetensors file,
    read from its header alone; raises OSError, ValueError, KeyError or struct.error on a damaged one."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return header, header.pop("__metadata__", None) or {}, 8 + size


def read_tensor(fd: int, offset: int, shape, dtype: torch.dtype, path: Path, new=torch.empty) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` whose bytes start at ``offset`` of the open file, read with positioned
    reads (thread-safe) into memory from ``new(shape, dtype=...)``."""
    tensor = new(shape, dtype=dtype)
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done, nbytes = 0, len(view)
    while done < nbytes:
        n = _pread_into(fd, view[done:], offset + done)
        if n <= 0:
            raise SdtuneError(f"{path}: truncated file; re-download it")
        done += n
    return tensor


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):  # straight into the tensor's memory
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # platforms without preadv: one copy more
    view[:len(data)] = data
    return len(data)


class _Inert:
    """Stands in for a training run's object saved beside the weights (Lightning's ``ModelCheckpoint`` callback in
    CompVis/Stability checkpoints): made without its class's code, its state dropped, never used."""

    def __setstate__(self, state) -> None:
        pass


# What original training checkpoints hold beside their tensors, as A1111's restricted unpickler allows it: numpy
# scalars (``global_step``, ``epoch``) and Lightning's callback; nothing here runs code from the file.
_SCALAR = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # numpy 2 moved it (either name read)
_TRAINING_EXTRAS = {"numpy.dtype": np.dtype, "numpy.core.multiarray.scalar": _SCALAR,
                    "numpy._core.multiarray.scalar": _SCALAR,
                    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": _Inert}


def _load_with_training_extras(path: Path, device, mmap: bool, error: Exception):
    """A torch file whose only objects beyond tensors are ``_TRAINING_EXTRAS``, loaded with those allowed; any
    other file raises ``error`` again (its refusal)."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip archive (torch's legacy format): no list to check
        raise error from None
    if not needed or not set(needed) <= set(_TRAINING_EXTRAS):
        raise error
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]  # a numpy scalar's dtype
    with torch.serialization.safe_globals([(_TRAINING_EXTRAS[n], n) for n in needed] + dtypes):
        return _torch_load(path, device, mmap)


def _torch_load(path: Path, device, mmap: bool):
    """``torch.load`` restricted to weights; an open file where it need not map it (torch picks its reader by a
    path's suffix: a torch file named .safetensors was read as safetensors)."""
    if mmap:
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    with open(path, "rb") as f:
        return torch.load(f, map_location=device, weights_only=True)


# the first bytes of files people pass by mistake (a pickle starts with 0x80, a torch zip with PK)
_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"RIFF": "a WEBP image", b"GIF8": "a GIF image"}


def _not_weights(path: Path) -> str | None:
    """What ``path`` is when it cannot be weights (an image, a text file); None when it may be."""
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    if head and not head.startswith((b"\x80", b"PK")) and all(c in b"\t\n\r" or 32 <= c < 127 for c in head[:64]):
        return "a text file" if not head.lstrip().startswith((b"{", b"[")) else "a JSON file"
    return None


TEMP_SUFFIX = ".tmp"  # an atomic write's temporary folder beside NAME: .NAME.PID-XXXXXX.tmp (holding NAME)
OLD_SUFFIX = ".old"  # a replaced folder set aside until its successor is in place: .NAME.PID-XXXXXX.old


def _temp_prefix(path: Path) -> str:
    """The prefix of ``path``'s temporaries: the writer's process id in it tells a stale one (its writer killed)
    from one being written now."""
    return f".{path.name}.{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def visible_paths(root: Path, folders: bool = False) -> list[Path]:
    """The files (and with ``folders`` the folders) under ``root`` in path order, hidden ones and what hidden
    folders hold left out. Those are atomic writes' temporaries (and .git, caches): one can vanish while it is
    walked, which made ``Path.rglob`` raise; ``os.walk`` skips a folder gone meanwhile."""
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(here) / name for name in (dirs if folders else []) + files if not name.startswith(".")]
    return sorted(found)


def clear_stale(path: Path) -> None:
    """Remove what writes of ``path`` killed midway left beside it (a whole checkpoint, hidden, each time), and
    put back a folder a kill left set aside between the two renames of ``atomic_folder``."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[^/]*({re.escape(TEMP_SUFFIX)}|{re.escape(OLD_SUFFIX)})$")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _process_alive(int(m.group(1))):
            continue
        try:
            if m.group(2) == OLD_SUFFIX and not path.exists() and (entry / path.name).exists():
                os.replace(entry / path.name, path)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # another process cleaning it, or no right to: left as it is
            continue


def user_path(path: str | bytes | Path) -> Path:
    """The place a user chose behind a path a system error names: the file an atomic write's temporary stands for.
    Some libraries (TensorBoard's writer) raise with the path as bytes."""
    path = Path(os.fsdecode(path))
    for part in (path, *path.parents):
        if part.name.startswith(".") and part.name.endswith(TEMP_SUFFIX):
            if part != path:  # the file inside the temporary folder: the output it becomes
                return part.parent / path.relative_to(part)
            return part.parent / re.sub(r"\.\d+-\w*" + re.escape(TEMP_SUFFIX) + "$", "", part.name[1:])
    return path


def input_path(path: str | Path, what: str, option: str) -> Path:
    """``path`` (``~`` expanded) where it exists; else one line naming it and the ``option`` that gave it."""
    found = Path(path).expanduser()
    if not found.exists():
        raise SdtuneError(f"{path}: no such {what}; check {option}")
    return found


def output_folder(path: str | Path, option: str = "--out", create: bool = True) -> Path:
    """The output folder ``path``, created with its parents (``create``) or only checked; a file standing where a
    folder must be is one line naming ``option``, not a traceback."""
    path = Path(path)
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        where = "" if blocked == path else f" {blocked}"
        raise SdtuneError(f"{path}:{where} is a file, not a folder; choose another place for {option}")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise SdtuneError(f"{path}: no permission to create this folder; choose another place for "
                              f"{option}") from None
    existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):  # found before the work, not after
        raise SdtuneError(f"{existing}: no permission to write in this folder; choose another place for {option}")
    return path


def output_file(path: str | Path, option: str = "--out") -> Path:
    """An output file's path, checked before any work: not a folder, and its folder creatable."""
    path = Path(path)
    if path.is_dir():
        raise SdtuneError(f"{path}: is a folder; give a file name for {option}, e.g. {path / 'out.safetensors'}")
    output_folder(path.parent, option, create=False)
    return path


def input_at(out: Path, inputs) -> tuple[str | Path, bool] | None:
    """The first of ``inputs`` (paths; other objects, built-in names and hub ids are skipped) that writing ``out``
    would replace, and whether ``out`` is that very file (else a folder holding it); None when there is none."""
    if not out.exists():
        return None
    for given in inputs:
        if not isinstance(given, (str, Path)) or not Path(given).expanduser().exists():
            continue
        path = Path(given).expanduser()
        if out.samefile(path):
            return given, True
        if out.is_dir() and path.resolve().is_relative_to(out.resolve()):
            return given, False
    return None


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success rename it over ``path`` atomically.

    The temporary file has ``path``'s name, in a hidden folder of its own beside it: a writer that makes its own
    temporary beside the file it is given (safetensors' save_file does) leaves nothing else behind, and a write
    killed midway leaves one folder, which the next write of ``path`` removes (``clear_stale``)."""
    path = Path(path)
    output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent))
    tmp = folder / path.name
    tmp.touch()
    umask = os.umask(0)
    os.umask(umask)
    try:
        try:
            yield Path(tmp)
        except OSError as e:  # a full disk, say, raised by a writer that names no file (PIL): the output is named
            if not e.filename:
                e.filename = str(path)
            raise
        # mkstemp makes 0600, and writers that recreate the file (safetensors' save_file) keep that: outputs get
        # the usual permissions, so another account's A1111 or ComfyUI can read a LoRA written here
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | Path):
    """Yield a new folder beside ``path`` to fill; on success it takes the place of ``path`` (replacing a folder
    there, unless that holds files the new one does not: they would be lost), on failure it is deleted."""
    path = Path(path)
    output_folder(path.parent)
    clear_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        try:
            yield tmp
        except SafetensorError as e:  # a full disk in a writer (save_pretrained): not an OSError
            raise SdtuneError(f"{path}: could not be written ({e}); free some space or choose another place") from None
        except Exception as e:
            # the tokenizers library's (Rust) write error is a bare Exception: "No space left on device (os error 28)"
            if type(e) is Exception and "(os error " in str(e):
                raise SdtuneError(f"{path}: could not be written ({e}); free some space or choose another "
                                  f"place") from None
            raise
        # mkdtemp makes 0700, and safetensors writes its files 0600: a model folder and its files get the usual
        # permissions, as single files do, so another account's A1111 or ComfyUI can read them
        for sub, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(sub, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(sub, f), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if path.exists():  # the old folder is moved aside, not deleted, until the new one is in place
            lost = _only_in(path, tmp)
            if lost:  # notes, previews, a file the user keeps there: replacing the folder would delete them
                raise SdtuneError(f"{path}: holds {len(lost)} file(s) the new folder does not have "
                                  f"({', '.join(lost[:3])}), which replacing it would delete; move them out, or "
                                  f"write to a new folder (the folder is left as it was)")
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=OLD_SUFFIX, dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _only_in(old: Path, new: Path) -> list[str]:
    """The files under ``old`` with no file of the same relative path under ``new``."""
    return sorted(p.relative_to(old).as_posix() for p in old.rglob("*")
                  if not p.is_dir() and not (new / p.relative_to(old)).exists())


def _sort_header(path: Path) -> None:
    """Rewrite a just-written safetensors header in place with its metadata keys sorted.

    safetensors keeps the metadata in a hash map, so two runs writing the same tensors and metadata gave files
    that differed in bytes (and so in their AutoV2 hash, which civitai and A1111 key files by). The sorted header
    has the same keys and values, so the same length (it is compact JSON either way); the tensor data does not
    move. Were it ever longer, the file is left as written."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
        text = json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(text) <= size:
            f.seek(8)
            f.write(text.ljust(size, b" "))  # the format pads headers with spaces


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Write ``tensors`` atomically, byte for byte the same file for the same tensors and metadata."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors' own error for a failed write (a full disk): not an OSError
            raise SdtuneError(f"{path}: could not be written ({e}); free some space or choose another place") from None
        if metadata:
            _sort_header(Path(tmp))


def atomic_save_torch(obj, path: str | Path, legacy: bool = False) -> None:
    """``torch.save`` atomically. ``legacy``: torch's pre-1.6 format, for files other tools check before they
    unpickle: A1111's safe loader refuses a zip archive holding any member but data.pkl, version and data/N, and
    current torch adds others (.format_version, byteorder...), so its embeddings folder drops a zip .pt unread."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp, _use_new_zipfile_serialization=not legacy)
        except RuntimeError as e:  # the zip writer's error for a failed write (a full disk): not an OSError
            raise SdtuneError(f"{path}: could not be written ({str(e).splitlines()[-1]}); free some space or choose "
                              f"another place") from None


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def read_toml(path: str | Path, what: str = "config") -> dict:
    """A TOML file's table; a missing or malformed ``what`` file is one line naming it and the fix."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdtuneError(f"{path}: no such {what} file; check the path") from None
    except IsADirectoryError:
        raise SdtuneError(f"{path}: is a folder, not a {what} file; give the .toml file") from None
    except PermissionError:
        raise SdtuneError(f"{path}: no permission to read this {what} file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SdtuneError(f"{path}: not valid TOML ({e}); fix the file") from None


LOCK_FILE = ".sdtune.lock"


@contextmanager
def folder_lock(folder: str | Path, what: str):
    """Hold ``folder`` for one process's ``what`` (a training run): a second one there would set the first's
    files aside, or write over them, and the first would crash. The system releases the lock when the process
    ends, however it ends, so a killed run's file (``LOCK_FILE``, naming the run) locks nothing; a run that ends
    removes it. Where the system has no ``flock`` (Windows), folders are not locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise SdtuneError(f"{folder}: {holder} is using this folder; wait for it to end, or use another "
                                  f"--out") from None
        f.truncate(0)
        f.write(f"{what} (process {os.getpid()})")
        f.flush()
        try:
            yield
        finally:  # removed while still held: a run that opened it meanwhile is refused, not left holding it
            (folder / LOCK_FILE).unlink(missing_ok=True)
