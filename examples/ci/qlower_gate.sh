#!/usr/bin/env bash
# CI gate: lower every QONNX model in MODELS_DIR, verify what was written, fail on any error.
#
#   bash qlower_gate.sh MODELS_DIR OUT_DIR [TARGET]     (TARGET: qcdq (default) or qop)
#
# For each MODELS_DIR/*.onnx: `qlower convert` (which verifies before writing) writes
# OUT_DIR/<name>.<target>.onnx and its JSON report, then `qlower verify` checks the written
# file again on more batches and writes <name>.<target>.verify.json. The first non-zero exit
# (1: verification failed, 2: model refused, 3: internal error) stops the gate with that code.
set -euo pipefail

models_dir=${1:?usage: qlower_gate.sh MODELS_DIR OUT_DIR [TARGET]}
out_dir=${2:?usage: qlower_gate.sh MODELS_DIR OUT_DIR [TARGET]}
target=${3:-qcdq}
batches=${QLOWER_VERIFY_BATCHES:-32}  # random input batches for the second verification

shopt -s nullglob
models=("$models_dir"/*.onnx)
if (( ${#models[@]} == 0 )); then
  echo "qlower gate: no .onnx models in $models_dir" >&2
  exit 2
fi
mkdir -p "$out_dir"
qlower --version
for model in "${models[@]}"; do
  name=$(basename "$model" .onnx)
  lowered="$out_dir/$name.$target.onnx"
  qlower convert "$model" --to "$target" -o "$lowered" --report "$out_dir/$name.$target.json" -q
  qlower verify "$model" "$lowered" --to "$target" --batches "$batches" --report "$out_dir/$name.$target.verify.json" -q
  echo "$model -> $lowered: lowered and verified"
done
