"""PSNR by image category of the built-in VAE against another one, on held-out synthetic images.

    python tools/vae_psnr.py --old git:461c5a5 [--new PATH/vae.safetensors] [--per-category 64]
    python tools/vae_psnr.py --old runs/tiny/model/vae.safetensors --sheet /tmp/vae_sheet.png

``--old``/``--new`` take a vae.safetensors path or ``git:REV`` (the shipped VAE at that commit, read with
``git show``; the commit before the general VAE is the world-only one). ``--new`` defaults to the VAE in
the package. ``--sheet`` writes a picture: per category, originals then each VAE's reconstructions.
The images come from ``sdtune.tiny.images`` at seeds the VAE recipe never trains on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.tiny import files, vae_quality, vae_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = "src/sdtune/tiny/assets/model/vae.safetensors"


def load(spec: str, tmp: Path):
    if spec.startswith("git:"):
        blob = subprocess.run(["git", "-C", str(REPO), "show", f"{spec[4:]}:{SHIPPED}"], capture_output=True)
        if blob.returncode:
            sys.exit(f"{spec}: git show failed: {blob.stderr.decode().strip()}")
        path = tmp / f"{spec[4:]}.safetensors"
        path.write_bytes(blob.stdout)
        spec = str(path)
    if not Path(spec).is_file():
        sys.exit(f"{spec}: no such VAE file; give a vae.safetensors path or git:REV")
    return vae_recipe.load_vae(Path(spec)).eval()


def sheet(vaes: dict, test_set: dict, path: Path, n: int = 6) -> None:
    rows = []
    for px in test_set.values():
        px = px[:n]
        rows.append(np.concatenate([px, *[vae_quality.reconstruct(v, px) for v in vaes.values()]], axis=0))
    tiles = np.stack(rows)  # [categories, n * (1 + vaes), 64, 64, 3]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in tiles], axis=0)
    Image.fromarray(grid).save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", help="the VAE to compare with: vae.safetensors or git:REV")
    p.add_argument("--new", default=str(files.WEIGHTS / "vae.safetensors"))
    p.add_argument("--per-category", type=int, default=64)
    p.add_argument("--sheet", help="also write a picture of originals and reconstructions here")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        vaes = {}
        if a.old:
            vaes["old"] = load(a.old, Path(tmp))
        vaes["new"] = load(a.new, Path(tmp))
    test_set = vae_quality.held_out_set(a.per_category)
    print(f"PSNR (dB) on {a.per_category} held-out 64x64 images per category")
    print(vae_quality.table({name: vae_quality.category_psnr(v, test_set) for name, v in vaes.items()}))
    if a.sheet:
        sheet(vaes, test_set, Path(a.sheet))
        print(f"wrote {a.sheet}")


if __name__ == "__main__":
    main()
