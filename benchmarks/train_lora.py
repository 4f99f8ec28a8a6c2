"""LoRA (rank 4, attention), whole process, same run: sdtune against diffusers' train_text_to_image_lora.py
(SD 1.x) or train_dreambooth_lora_sdxl.py (SDXL; see ``_common.ARCHS`` for why that one).

    python benchmarks/train_lora.py [--arch sd1|sdxl|sdxl-full] [--steps 60] [--repeats 3] [--threads 2] [--warmup 10]
                                    [--sdtune-args="--flag value ..." ...] [--profile] [--no-diffusers]
                                    [--device cuda] [--dtype bf16] [--gradient-checkpointing] [--model-folder DIR]

Both read the same model folder (``--arch sd1``: a mid-size SD 1.x architecture; ``sdxl``: a small SDXL
architecture; ``sdxl-full``: SDXL's real sizes, for a GPU, see ``gpu_sdxl.sh``) and the same 8 images: SD 1.x each with its caption (the script through ``datasets``' imagefolder
and metadata.jsonl), SDXL with one prompt for all (the DreamBooth script's ``--instance_prompt``, sdtune's
``--default-caption``). At 64 px, batch 4, lr 1e-4 constant, seed 0, fp32, weight decay 0.01, LoRA rank 4 /
alpha 4 on the UNet's attention projections (to_q, to_k, to_v, to_out.0), gradient clipping at 1.0 (the
scripts' default), no Min-SNR, no gradient checkpointing, no samples or checkpoints on the way (the size,
batch, dtype, device and checkpointing are options, the same for both). sdtune runs with
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
    c.check_device(a.device)
    arch = c.ARCHS[a.arch]
    script = arch.scripts["lora"]
    dreambooth = "dreambooth" in script  # one prompt for a folder of images only (it opens every file as one)
    examples = None if a.no_diffusers else c.diffusers_examples()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = c.model_folder(a, tmp)
        images = c.write_images(tmp / "images", style="outline", captions=not dreambooth)
        caption = ["--default-caption", PROMPT] if dreambooth else []
        api = dict(data=str(images), steps=a.steps, batch_size=a.batch, resolution=a.resolution, lr=1e-4, seed=0,
                   rank=4, alpha=4.0, targets="attn", min_snr_gamma=0.0, lr_scheduler="constant", buckets=False,
                   max_grad_norm=1.0, grad_accum=1, save_every=0, sample_every=0, weight_decay=0.01,
                   gradient_checkpointing=a.gradient_checkpointing, default_caption=PROMPT if dreambooth else None)
        checkpointing = "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing"
        precision = "bf16" if a.dtype == "bf16" else "no"  # the scripts' --mixed_precision

        def sdtune(out, extra=""):
            return c.sdtune_cmd("lora", [
                "--model", str(model), "--device", a.device, "--dtype", a.dtype, "--data", str(images), "--out", str(out),
                "--steps", str(a.steps), "--batch-size", str(a.batch), "--grad-accum", "1", "--resolution",
                str(a.resolution), "--lr", "1e-4", "--seed", "0", "--rank", "4", "--alpha", "4", "--targets", "attn",
                "--min-snr-gamma", "0", "--lr-scheduler", "constant", "--no-buckets", "--max-grad-norm", "1",
                "--weight-decay", "0.01", checkpointing, "--save-every", "0", "--sample-every", "0",
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
                str(a.steps), "--learning_rate", "1e-4", "--rank", "4", "--seed", "0", "--mixed_precision", precision,
                "--dataloader_num_workers", "0", "--checkpointing_steps", "100000",
                *(["--gradient_checkpointing"] if a.gradient_checkpointing else [])])
        rates = c.matmul_rates(a.threads, a.device)
        results = c.compare(trainers, tmp / "runs", a.threads, a.repeats, a.warmup, a.steps, a.device)
        flops = c.sdtune_step_flops("lora", model, dict(api, out=str(tmp / "flops")), a.device, a.dtype)
        # the DreamBooth script encodes its one prompt once; the text-to-image one encodes each batch's captions
        extra = c.diffusers_extra_flops(model, a.batch, a.resolution, with_text=not dreambooth, device=a.device)
        title = (f"LoRA rank 4 attention, {arch.title}, {a.resolution} px, batch {a.batch}, {a.steps} steps, "
                 f"{c.run_conditions(a)}")
        print(c.report(title, results, flops, extra, rates, a.repeats, a.dtype))
        if a.profile:
            print(c.profile_sdtune("lora", model, dict(api, out=str(tmp / "profile")), a.threads))


if __name__ == "__main__":
    main()
