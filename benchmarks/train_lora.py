"""LoRA (rank 4, attention), whole process, same run: sdtune against diffusers' train_text_to_image_lora.py
(SD 1.x) or train_dreambooth_lora_sdxl.py (SDXL; see ``_common.ARCHS`` for why that one).

    python benchmarks/train_lora.py [--arch sd1|sdxl] [--steps 60] [--repeats 3] [--threads 2] [--warmup 10]
                                    [--sdtune-args="--flag value ..." ...] [--profile] [--no-diffusers]

Both read the same model folder (``--arch sd1``: a mid-size SD 1.x architecture; ``sdxl``: a small SDXL
architecture) and the same 8 images: SD 1.x each with its caption (the script through ``datasets``' imagefolder
and metadata.jsonl), SDXL with one prompt for all (the DreamBooth script's ``--instance_prompt``, sdtune's
``--default-caption``). At 64 px, batch 4, lr 1e-4 constant, seed 0, fp32, weight decay 0.01, LoRA rank 4 /
alpha 4 on the UNet's attention projections (to_q, to_k, to_v, to_out.0), gradient clipping at 1.0 (the
scripts' default), no Min-SNR, no gradient checkpointing, no samples or checkpoints on the way. sdtune runs with
``--no-report`` (the scripts draw nothing either) but keeps its validation loss at the start and the end.
See ``_common`` for how time, memory, FLOPs and MFU are measured. ``--profile`` prints where one sdtune
step's time goes.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402  (benchmarks are scripts, not a package)

PROMPT = "a shape, outline style"  # SDXL's one caption for all images (the DreamBooth script's instance prompt)


def main(argv=None) -> None:
    a = c.arguments("lora", __doc__).parse_args(argv)
    arch = c.ARCHS[a.arch]
    script = arch.scripts["lora"]
    dreambooth = "dreambooth" in script  # one prompt for a folder of images only (it opens every file as one)
    examples = None if a.no_diffusers else c.diffusers_examples()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = arch.write_model(tmp / "model")
        images = c.write_images(tmp / "images", style="outline", captions=not dreambooth)
        caption = ["--default-caption", PROMPT] if dreambooth else []
        api = dict(data=str(images), steps=a.steps, batch_size=a.batch, resolution=a.resolution, lr=1e-4, seed=0,
                   rank=4, alpha=4.0, targets="attn", min_snr_gamma=0.0, lr_scheduler="constant", buckets=False,
                   max_grad_norm=1.0, grad_accum=1, save_every=0, sample_every=0, weight_decay=0.01,
                   gradient_checkpointing=False, default_caption=PROMPT if dreambooth else None)

        def sdtune(out, extra=""):
            return c.sdtune_cmd("lora", [
                "--model", str(model), "--device", "cpu", "--dtype", "fp32", "--data", str(images), "--out", str(out),
                "--steps", str(a.steps), "--batch-size", str(a.batch), "--grad-accum", "1", "--resolution",
                str(a.resolution), "--lr", "1e-4", "--seed", "0", "--rank", "4", "--alpha", "4", "--targets", "attn",
                "--min-snr-gamma", "0", "--lr-scheduler", "constant", "--no-buckets", "--max-grad-norm", "1",
                "--weight-decay", "0.01", "--no-gradient-checkpointing", "--save-every", "0", "--sample-every", "0",
                "--no-report", *caption, *shlex.split(extra)])

        trainers = {"sdtune train lora": sdtune}
        for flags in a.sdtune_args:
            trainers[f"sdtune train lora {flags}"] = lambda out, flags=flags: sdtune(out, flags)
        if examples:
            data = (["--instance_data_dir", str(images), "--instance_prompt", PROMPT, "--adam_weight_decay", "0.01",
                     "--lr_scheduler", "constant", "--lr_warmup_steps", "0"] if dreambooth
                    else ["--train_data_dir", str(images), "--caption_column", "text"])
            trainers[f"diffusers {script}"] = lambda out: c.diffusers_cmd(examples, script, [
                "--pretrained_model_name_or_path", str(model), *data, "--output_dir", str(out), "--resolution",
                str(a.resolution), "--center_crop", "--train_batch_size", str(a.batch), "--max_train_steps",
                str(a.steps), "--learning_rate", "1e-4", "--rank", "4", "--seed", "0", "--mixed_precision", "no",
                "--dataloader_num_workers", "0", "--checkpointing_steps", "100000"])
        rates = c.matmul_rates(a.threads)
        results = c.compare(trainers, tmp / "runs", a.threads, a.repeats, a.warmup, a.steps)
        flops = c.sdtune_step_flops("lora", model, dict(api, out=str(tmp / "flops")))
        # the DreamBooth script encodes its one prompt once; the text-to-image one encodes each batch's captions
        extra = c.diffusers_extra_flops(model, a.batch, a.resolution, with_text=not dreambooth)
        title = (f"LoRA rank 4 attention, {arch.title}, {a.resolution} px, batch {a.batch}, {a.steps} steps, fp32, "
                 f"{a.threads} threads, {c.cpu_name()}")
        print(c.report(title, results, flops, extra, rates, a.repeats))
        if a.profile:
            print(c.profile_sdtune("lora", model, dict(api, out=str(tmp / "profile")), a.threads))


if __name__ == "__main__":
    main()
