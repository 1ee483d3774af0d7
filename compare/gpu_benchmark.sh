#!/usr/bin/env bash
# The GPU comparison: r50, r100 and r180 (617,970 classes), every precision column at batch
# 128 and 256 per device, jaxface against torchref stock and tuned, on one GPU, in under
# ten minutes. Each backbone gets a time budget; rows not started within it are listed as
# skipped, so the run always ends in time and the table says what it left out. Precision
# columns run in order of interest (bf16 and fp16 first).
#
#   bash compare/gpu_benchmark.sh                 # results under $OUT (default work_dirs/gpu_compare)
#   bash compare/gpu_benchmark.sh --steps 50      # extra arguments go to every python -m compare
#                                                 # (--config.* and --steps to the profile too)
#   TOTAL=900 bash compare/gpu_benchmark.sh       # more than the default 570 s in all
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-work_dirs/gpu_compare}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
common=(--frameworks jax,torch --precision bf16,fp16,tf32,fp32 --batch 128,256
        --steps 30 --warmup 10 --timeout 150)
# The profile takes the config overrides and --steps of the arguments (a tiny dry run stays
# tiny); compare's own options (--frameworks, --budget, ...) are not its.
profile_args=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --config.*=*) profile_args+=("${args[$i]}") ;;
        --config.* | --steps) profile_args+=("${args[$i]}" "${args[$((i + 1))]:-}"); i=$((i + 1)) ;;
    esac
done
failed=0
start=$SECONDS
TOTAL=${TOTAL:-570}  # seconds for everything; a row already started may run past its budget
for spec in r50:220 r100:110 r180:90; do
    net=${spec%%:*}
    left=$((TOTAL - (SECONDS - start) - 150))  # keep time for overruns and the profile
    budget=$(( ${spec##*:} < left ? ${spec##*:} : left ))
    if [ "$budget" -le 0 ]; then
        echo "== $net: no time left (TOTAL=$TOTAL s); skipped"
        continue
    fi
    echo "== $net (budget ${budget} s; $((SECONDS - start)) s so far)"
    "$PYTHON" -m compare --config "configs/$net.py" "${common[@]}" --budget "$budget" \
        --out "$OUT/$net" "$@" || { echo "compare for $net exited with $?"; failed=1; }
done
"$PYTHON" -m compare.merge "$OUT"/r50 "$OUT"/r100 "$OUT"/r180 --out "$OUT/all" \
    || { echo "compare.merge exited with $?"; failed=1; }
# Where the time goes in the goal's setting (r50, bf16, batch 128): HLO, trace, cost.
left=$((TOTAL - (SECONDS - start)))
if [ "$left" -ge 60 ]; then
    timeout "$left" "$PYTHON" -m compare.profile --config configs/r50.py --precision bf16 \
        --batch 128 --out "$OUT/profile-r50-bf16" "${profile_args[@]}" \
        || { echo "compare.profile exited with $? (124: out of time)"; failed=1; }
else
    echo "no time left for compare.profile ($left s)"
fi
echo "done in $((SECONDS - start)) s: $OUT/all/table.md"
# 1 when any part failed or ran out of time (its table may still be partial), 0 otherwise.
exit "$failed"
