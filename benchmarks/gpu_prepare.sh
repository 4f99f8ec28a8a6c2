#!/usr/bin/env bash
# Run here, before a device call: gathers in .gpu/ (git-ignored; the call carries it) what gpu_sdxl.sh needs on a
# GPU machine that has PyTorch, transformers, accelerate and peft but not diffusers, and reaches neither PyPI nor
# ../shared: the wheels of this environment's diffusers and of the one requirement of it that machine lacks
# (importlib_metadata), and a copy of diffusers' example scripts and their runner.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/whl
version=$(python -c "import diffusers; print(diffusers.__version__)")
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl \
    "diffusers==$version" importlib_metadata
cp -r ../shared/oracles/diffusers-examples .gpu/diffusers-examples
du -sh .gpu
