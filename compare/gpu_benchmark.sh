#!/usr/bin/env bash
# The GPU comparison: r50, r100 and r180 (617,970 classes), every precision column at batch
# 128 and 256 per device, jaxface against torchref stock and tuned, on one GPU, in under
# ten minutes. Each backbone gets a time budget; rows not started within it are listed as
# skipped, so the run always ends in time and the table says what it left out. Precision
# columns run in order of interest (bf16 and fp16 first).
#
#   bash compare/gpu_benchmark.sh                 # results under $OUT (default work_dirs/gpu_compare)
#   bash compare/gpu_benchmark.sh --steps 50      # extra arguments go to every python -m compare
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-work_dirs/gpu_compare}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
common=(--frameworks jax,torch --precision bf16,fp16,tf32,fp32 --batch 128,256
        --steps 30 --warmup 10 --timeout 150)
start=$SECONDS
for spec in r50:270 r100:130 r180:100; do
    net=${spec%%:*}
    budget=${spec##*:}
    echo "== $net (budget ${budget} s; $((SECONDS - start)) s so far)"
    "$PYTHON" -m compare --config "configs/$net.py" "${common[@]}" --budget "$budget" \
        --out "$OUT/$net" "$@" || echo "compare for $net exited with $?"
done
"$PYTHON" -m compare.merge "$OUT"/r50 "$OUT"/r100 "$OUT"/r180 --out "$OUT/all"
# Where the time goes in the goal's setting (r50, bf16, batch 128): HLO, trace, cost.
timeout 150 "$PYTHON" -m compare.profile --config configs/r50.py --precision bf16 --batch 128 \
    --out "$OUT/profile-r50-bf16" || echo "compare.profile exited with $?"
echo "done in $((SECONDS - start)) s: $OUT/all/table.md"
