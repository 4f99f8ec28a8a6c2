#!/usr/bin/env bash
# Train tiny-model candidates side by side on a lent GPU, judge each, and bring the best back.
#   CANDIDATES="name:recipe-args;name:recipe-args" LIMIT=seconds KEEP=2 tools/device_train_tiny.sh
# Each candidate is `python -m sdtune.tiny.recipe`; one cut off by LIMIT exports its last checkpoint.
# $OUT gets report.txt and, for the KEEP best by held-in score, NAME.tar (its model folder, ~15 MB).
set -u
OUT=${OUT:-/tmp/tiny_out}
mkdir -p "$OUT" runs
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-400}
KEEP=${KEEP:-2}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
IFS=';' read -ra SPECS <<< "$CANDIDATES"
train() {
  local name=$1; shift
  timeout "$LIMIT" $PY -m sdtune.tiny.recipe --out "runs/$name" --device "$DEVICE" "$@" > "runs/$name.log" 2>&1
  [ -f "runs/$name/model/unet.safetensors" ] || $PY -m sdtune.tiny.recipe --out "runs/$name" --export-only >> "runs/$name.log" 2>&1
}
for spec in "${SPECS[@]}"; do train "${spec%%:*}" ${spec#*:} & done
wait
for spec in "${SPECS[@]}"; do
  name=${spec%%:*}
  # the log without library noise, progress lines only every 500 steps
  { echo "== $name"; grep -v transformers "runs/$name.log" | grep -v "step [0-9]*[1-46-9]00/" | tail -n 30; } >> "$OUT/report.txt"
done
: > runs/scores
for spec in "${SPECS[@]}"; do
  name=${spec%%:*}
  [ -f "runs/$name/model/unet.safetensors" ] || continue
  $PY -m sdtune.cli eval-tiny --model "runs/$name/model" --device "$DEVICE" --dtype fp32 ${EVAL_ARGS:-} 2>&1 \
      | tr '\r' '\n' | grep -v -e transformers -e '%|' -e '^ *$' > "runs/$name.eval"
  { echo "== eval $name"; cat "runs/$name.eval"; } >> "$OUT/report.txt"
  echo "$(awk '/held-in overall/ {print $NF+0}' "runs/$name.eval") $name" >> runs/scores
done
sort -rn runs/scores | head -n "$KEEP" | while read -r score name; do
  tar -cf "$OUT/$name.tar" -C "runs/$name/model" .
done
{ echo "== ranking (held-in overall %)"; sort -rn runs/scores; } >> "$OUT/report.txt"
cat "$OUT/report.txt"
