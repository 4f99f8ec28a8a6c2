"""Textual Inversion, whole process, same run: sdtune against diffusers' textual_inversion.py (SD 1.x) or
textual_inversion_sdxl.py (SDXL: one token with a vector in each text encoder).

    python benchmarks/train_ti.py [--arch sd1|sdxl|sdxl-full] [--steps 60] [--repeats 3] [--threads 2] [--warmup 10]
                                  [--sdtune-args="--flag value ..." ...] [--profile] [--no-diffusers]
                                  [--device cuda] [--dtype bf16] [--gradient-checkpointing] [--model-folder DIR]

Both read the same model folder (``--arch sd1``: a mid-size SD 1.x architecture; ``sdxl``: a small SDXL
architecture; ``sdxl-full``: SDXL's real sizes, for a GPU, see ``gpu_sdxl.sh``) and the same 8 uncaptioned
images (both fall back to "a photo of a <token>"-style templates), at 64 px, batch 4, lr 5e-3, seed 0, fp32,
constant lr, no gradient clipping (the scripts have none), no gradient checkpointing (sdtune's SDXL preset turns
it on; the scripts do not), no samples or checkpoints on the way. The size, batch, dtype, device and
checkpointing are options, the same for both (with ``--gradient-checkpointing`` textual_inversion_sdxl.py
checkpoints only its text encoders, sdtune its UNet too). sdtune runs with ``--no-report`` (the scripts draw
nothing either) but keeps its validation loss at the start and the end.
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

TOKEN, INIT = "<pstar>", "star"


def main(argv=None) -> None:
    a = c.arguments("ti", __doc__).parse_args(argv)
    c.check_device(a.device)
    arch = c.ARCHS[a.arch]
    examples = None if a.no_diffusers else c.diffusers_examples()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = c.model_folder(a, tmp)
        images = c.write_images(tmp / "images", captions=False)
        common = dict(steps=a.steps, batch_size=a.batch, resolution=a.resolution, lr=5e-3, seed=0)
        api = dict(common, data=str(images), token=TOKEN, init_token=INIT, max_grad_norm=0.0, grad_accum=1,
                   save_every=0, sample_every=0)
        checkpointing = "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing"
        precision = "bf16" if a.dtype == "bf16" else "no"  # the scripts' --mixed_precision

        def sdtune(out, extra=""):
            return c.sdtune_cmd("ti", [
                "--model", str(model), "--device", a.device, "--dtype", a.dtype, "--data", str(images), "--out", str(out),
                "--token", TOKEN, "--init-token", INIT, "--steps", str(a.steps), "--batch-size", str(a.batch),
                "--grad-accum", "1", "--resolution", str(a.resolution), "--lr", "5e-3", "--seed", "0",
                "--max-grad-norm", "0", "--save-every", "0", "--sample-every", "0", "--no-report",
                checkpointing, *shlex.split(extra)])

        trainers = {"sdtune train ti": sdtune}
        for flags in a.sdtune_args:
            trainers[f"sdtune train ti {flags}"] = lambda out, flags=flags: sdtune(out, flags)
        if examples:
            script = arch.scripts["ti"]
            trainers[f"diffusers {script}"] = lambda out: c.diffusers_cmd(examples, script, [
                "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images), "--output_dir",
                str(out), "--learnable_property", "object", "--placeholder_token", TOKEN, "--initializer_token",
                INIT, "--resolution", str(a.resolution), "--train_batch_size", str(a.batch), "--max_train_steps",
                str(a.steps), "--learning_rate", "5e-3", "--seed", "0", "--mixed_precision", precision,
                "--dataloader_num_workers", "0", "--save_steps", "100000", "--checkpointing_steps", "100000",
                *(["--gradient_checkpointing"] if a.gradient_checkpointing else [])])
        rates = c.matmul_rates(a.threads, a.device)
        results = c.compare(trainers, tmp / "runs", a.threads, a.repeats, a.warmup, a.steps, a.device)
        flops = c.sdtune_step_flops("ti", model, dict(api, out=str(tmp / "flops")), a.device, a.dtype)
        extra = c.diffusers_extra_flops(model, a.batch, a.resolution, with_text=False, device=a.device)
        title = (f"Textual Inversion, {arch.title}, {a.resolution} px, batch {a.batch}, {a.steps} steps, "
                 f"{c.run_conditions(a)}")
        print(c.report(title, results, flops, extra, rates, a.repeats, a.dtype))
        if a.profile:
            print(c.profile_sdtune("ti", model, dict(api, out=str(tmp / "profile")), a.threads))


if __name__ == "__main__":
    main()
