#!/usr/bin/env bash
# The GPU rows of the SDXL training benchmarks: a full-size random-init SDXL at 1024 px, batch 1, bf16, gradient
# checkpointing, sdtune against diffusers' train_dreambooth_lora_sdxl.py and textual_inversion_sdxl.py in the
# same run. Sized for one device call (10 minutes at most): one model folder written once (7 GB in bf16) and
# read by every run, 20 steps each, timed from step 5, one round per trainer (a GPU is not shared).
#   here:             bash benchmarks/gpu_prepare.sh
#   on the GPU:       run(command="bash benchmarks/gpu_sdxl.sh", carry=[".gpu"], timeout_s=600)
# The tables land in $OUT (or /tmp/sdtune-gpu): train_lora.txt, train_ti.txt, and gpu.txt (the machine).
set -uo pipefail
out=${OUT:-/tmp/sdtune-gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 SDTUNE_DIFFUSERS_EXAMPLES=$PWD/.gpu/diffusers-examples
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers, peft, accelerate as a
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'accelerate', a.__version__)"; } 2>&1 | tee "$out/gpu.txt"
args=(--arch sdxl-full --device cuda --dtype bf16 --resolution 1024 --batch 1 --gradient-checkpointing
      --steps 20 --warmup 5 --repeats 1 --threads 8 --model-folder /tmp/sdxl-full)
# (LoRA also with --fp8-base: the UNet's and text encoders' frozen weights in 8 bits, kohya's --fp8_base, its own row)
timeout 330 python3 benchmarks/train_lora.py "${args[@]}" --sdtune-args=--fp8-base 2>&1 | tee "$out/train_lora.txt"
timeout 210 python3 benchmarks/train_ti.py "${args[@]}" 2>&1 | tee "$out/train_ti.txt"
