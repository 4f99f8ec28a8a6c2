#!/usr/bin/env bash
# Train tiny-model candidates side by side on a lent GPU, judge each, and leave their weights in $OUT.
#   CANDIDATES="name:recipe-args;name:recipe-args" LIMIT=seconds tools/device_train_tiny.sh
# Each candidate is `python -m sdtune.tiny.recipe`; one cut off by LIMIT exports its last checkpoint.
set -u
OUT=${OUT:-/tmp/tiny_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-400}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
IFS=';' read -ra SPECS <<< "$CANDIDATES"
train() {
  local name=$1; shift
  timeout "$LIMIT" $PY -m sdtune.tiny.recipe --out "runs/$name" --device "$DEVICE" "$@" > "runs/$name.log" 2>&1
  [ -f "runs/$name/model/unet.safetensors" ] || $PY -m sdtune.tiny.recipe --out "runs/$name" --export-only >> "runs/$name.log" 2>&1
}
mkdir -p runs
for spec in "${SPECS[@]}"; do train "${spec%%:*}" ${spec#*:} & done
wait
for spec in "${SPECS[@]}"; do
  name=${spec%%:*}
  mkdir -p "$OUT/$name"
  cp runs/$name/model/*.safetensors "$OUT/$name/" 2>/dev/null
  { echo "== $name"; grep -v transformers "runs/$name.log" | tail -n 25; } >> "$OUT/report.txt"
done
for spec in "${SPECS[@]}"; do
  name=${spec%%:*}
  [ -f "$OUT/$name/unet.safetensors" ] || continue
  { echo "== eval $name"; $PY -m sdtune.cli eval-tiny --model "$OUT/$name" --device "$DEVICE" --dtype fp32 ${EVAL_ARGS:-} 2>&1 \
      | tr '\r' '\n' | grep -v -e transformers -e '%|'; } >> "$OUT/report.txt"
done
cat "$OUT/report.txt"
