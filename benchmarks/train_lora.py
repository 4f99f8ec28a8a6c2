"""LoRA training speed and memory: sdtune on a small model and on the real SD 1.5 architecture, and
diffusers' example script when given.

    python benchmarks/train_lora.py [--steps 20] [--threads 2] [--no-sd15]
                                    [--diffusers-script path/to/train_text_to_image_lora.py]

Small model: UNet channels 32/64 (see ``train_ti.py``), rank 4 on the attention projections, 64 px, batch 4,
CPU. SD 1.5: a random-init model of the real architecture (860M-parameter UNet) at 256 px, batch 1, same
LoRA, with gradient checkpointing off and on. Each run is a fresh process; peak RSS is its maximum
resident memory; seconds per step are timed between steps after the first ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_ti import script_run, sdtune_child, table, write_images, write_small_model


def write_metadata(images: Path) -> None:
    """The captions as metadata.jsonl, the layout the diffusers script's image-folder loader reads."""
    lines = [json.dumps({"file_name": p.name, "text": p.with_suffix(".txt").read_text().strip()})
             for p in sorted(images.glob("*.png"))]
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sd15-steps", type=int, default=4)
    p.add_argument("--sd15-batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sd15", action="store_true", help="skip the SD 1.5-architecture runs")
    p.add_argument("--diffusers-script", help="a copy of diffusers' examples/text_to_image/train_text_to_image_lora.py")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_small_model(tmp / "model")
        images = write_images(tmp / "images", style="outline")
        common = dict(data=str(images), rank=4, alpha=4, targets="attn", lr=1e-4, progress=False)
        small = dict(common, out=str(tmp / "small"), steps=a.steps, batch_size=4, resolution=64)
        rows.append(("sdtune train lora (channels 32/64, 64 px, batch 4)",
                     sdtune_child("lora", small, str(model), a.threads)))
        if a.diffusers_script:
            write_metadata(images)
            args = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images),
                    "--caption_column", "text", "--resolution", "64", "--train_batch_size", "4", "--rank", "4",
                    "--learning_rate", "1e-4", "--seed", "0", "--dataloader_num_workers", "0",
                    "--checkpointing_steps", "100000", "--mixed_precision", "no"]
            rows.append(("diffusers train_text_to_image_lora.py (same)",
                         script_run(a.diffusers_script, args, (3, 3 + a.steps), a.threads, tmp)))
        if not a.no_sd15:
            for gc in (False, True):
                sd15 = dict(common, out=str(tmp / f"sd15-{gc}"), steps=a.sd15_steps, batch_size=a.sd15_batch,
                            resolution=256, gradient_checkpointing=gc)
                name = f"sdtune, SD 1.5 arch, 256 px, batch {a.sd15_batch}, checkpointing {'on' if gc else 'off'}"
                rows.append((name, sdtune_child("lora", sd15, "sd15-random", a.threads)))
    print(f"LoRA training (rank 4, attention), CPU, {a.threads} threads")
    print(table(rows))
    if a.diffusers_script:
        print(f"speed-up on the small model: {rows[1][1]['s_per_step'] / rows[0][1]['s_per_step']:.2f}x, "
              f"memory ratio: {rows[0][1]['peak_rss_gb'] / rows[1][1]['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
