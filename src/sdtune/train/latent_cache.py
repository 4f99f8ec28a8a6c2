"""Latents cached on disk (kohya's --cache_latents_to_disk): each image's encoding kept in a hidden folder of the
training data, so that a rerun, a resume or the next run of a queue on the same images skips the VAE.

An entry is found by what its latents are a function of, never by the image's name alone: the image's bytes,
the bucket size it is fitted to, and the VAE (its weights, dtype and scaling). An edited image, another bucket or
another VAE is encoded again; nothing has to be deleted by hand, as kohya's .npz files beside the images must be.
Entries are written atomically, so a killed run or several processes writing the same one leave whole files.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..console import note
from ..safeio import SdtuneError, atomic_save_safetensors

FOLDER = ".sdtune-latents"  # hidden: the scan of the data folder skips it
# a run's training, validation and class images share one VAE: its weights are hashed once, not per image set
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's weights (bytes, dtypes, shapes) and of what encoding reads from its config (kept per
    VAE module, which a run does not change)."""
    if vae in _FINGERPRINTS:
        return _FINGERPRINTS[vae]
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    config = {k: vae.config.get(k) for k in ("scaling_factor", "shift_factor", "force_upcast")}
    digest.update(json.dumps(config, sort_keys=True).encode())
    _FINGERPRINTS[vae] = digest.hexdigest()
    return _FINGERPRINTS[vae]


class LatentCache:
    """The cached encodings of one VAE in ``folder``: ``get`` and ``put`` by image and bucket size."""

    def __init__(self, folder: Path, vae):
        self.folder = Path(folder)
        self.vae_id = vae_fingerprint(vae)
        self.writable = True
        self._paths: dict[tuple[Path, tuple[int, int]], Path] = {}  # an image is hashed once, for get and put

    @classmethod
    def at(cls, data: str | Path, vae) -> LatentCache:
        """The cache of the --data folder, or of the folder of a dataset config (kohya's) given as --data."""
        data = Path(data)
        return cls((data if data.is_dir() else data.parent) / FOLDER, vae)

    def _path(self, image: Path, size: tuple[int, int]) -> Path:
        if (image, size) not in self._paths:
            self._paths[(image, size)] = self._key_path(image, size)
        return self._paths[(image, size)]

    def _key_path(self, image: Path, size: tuple[int, int]) -> Path:
        with open(image, "rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
        key = hashlib.sha256(json.dumps([content, list(size), self.vae_id]).encode()).hexdigest()
        return self.folder / f"{key}.safetensors"

    def get(self, image: Path, size: tuple[int, int], flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(latents, flipped latents or None) of ``image`` fitted to ``size``; None when not cached (or cached
        without the flipped ones that ``flipped`` asks for)."""
        path = self._path(image, size)
        if not path.is_file():
            return None
        try:
            entry = load_file(str(path))
        except Exception:  # noqa: BLE001 - a damaged entry is encoded again and rewritten
            return None
        if "latents" not in entry or (flipped and "flipped" not in entry):
            return None
        return entry["latents"], entry.get("flipped") if flipped else None

    def put(self, image: Path, size: tuple[int, int], latents: torch.Tensor, flipped: torch.Tensor | None) -> None:
        if not self.writable:
            return
        tensors = {"latents": latents} | ({"flipped": flipped} if flipped is not None else {})
        try:
            atomic_save_safetensors(tensors, self._path(image, size))
        except (OSError, SdtuneError) as e:  # a read-only data folder, a full disk: the run goes on without it
            self.writable = False
            note(f"--cache-latents-to-disk: cannot write in {self.folder} ({getattr(e, 'strerror', None) or e}); "
                 f"this run encodes its images without keeping them")
