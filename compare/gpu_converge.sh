#!/usr/bin/env bash
# Same recipe, same model, on one GPU: r50 (configs/converge_r50.py, 2,000 steps of 128),
# jaxface bf16 against torchref fp16 with GradScaler, each repeated with a second seed for
# the run-to-run spread: four runs in about ten minutes on an H100 or H200
# (docs/converge.md). Each run is stopped after --timeout seconds (a stuck run ends the
# comparison with exit status 1 instead of the whole budget).
#
#   bash compare/gpu_converge.sh                          # results under $OUT
#   bash compare/gpu_converge.sh --plan                   # check and list the runs only
#   bash compare/gpu_converge.sh --config.max_steps=500   # extra arguments go to compare.converge
#   OUT=/data/cmp bash compare/gpu_converge.sh            # a new (or empty) folder
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-work_dirs/gpu_converge-$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
status=0
"$PYTHON" -m compare.converge --config configs/converge_r50.py --precision bf16 \
    --spread both --timeout 240 --out "$OUT" "$@" || status=$?
echo "compare.converge exited with $status after $((SECONDS - start)) s: $OUT/table.md"
exit "$status"
