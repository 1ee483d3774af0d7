#!/usr/bin/env bash
# The XLA flags that may matter for jaxface's step on one GPU, measured: r50 bf16 at batch
# 128 and 256 per device (617,970 classes), jaxface only, one `python -m compare` per flag
# set with the flags in XLA_FLAGS, then one summary of all of them. Prepared for a GPU session, not
# run here (no GPU was lent to the task that wrote it; see docs/gpu.md).
#
#   OUT=work_dirs/flag_sweep bash compare/gpu_flag_sweep.sh            # results under $OUT
#   bash compare/gpu_flag_sweep.sh --steps 50                          # more timed steps
#   SETS="default no_command_buffers" bash compare/gpu_flag_sweep.sh   # fewer flag sets
#   TOTAL=300 bash compare/gpu_flag_sweep.sh                           # seconds in all
#
# Flag sets (each is one section of $OUT/summary.md; $OUT/<name>/results.json records the
# flags the run had):
#   default              XLA's defaults (command buffers on, autotuning level 4)
#   no_command_buffers   --xla_gpu_enable_command_buffer=  (every kernel launched alone)
#   autotune_0           --xla_gpu_autotune_level=0 (what the compile-time estimate sees)
#   lhs                  --xla_gpu_enable_latency_hiding_scheduler=true
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-work_dirs/flag_sweep}
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/r50.py}
TOTAL=${TOTAL:-540}
SETS=${SETS:-default no_command_buffers autotune_0 lhs}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -A FLAGS=(
    [default]=""
    [no_command_buffers]="--xla_gpu_enable_command_buffer="
    [autotune_0]="--xla_gpu_autotune_level=0"
    [lhs]="--xla_gpu_enable_latency_hiding_scheduler=true"
)
base_flags=${XLA_FLAGS:-}
start=$SECONDS
read -r -a names <<< "$SETS"
done_dirs=()
for i in "${!names[@]}"; do
    name=${names[$i]}
    if [ -z "${FLAGS[$name]+set}" ]; then
        echo "unknown flag set '$name': known are ${!FLAGS[*]}" >&2
        exit 2
    fi
    left=$((TOTAL - (SECONDS - start)))
    budget=$((left / (${#names[@]} - i)))  # an even share of what is left
    if [ "$budget" -le 10 ]; then
        echo "== $name: no time left (TOTAL=$TOTAL s); skipped"
        continue
    fi
    echo "== $name: XLA_FLAGS='${FLAGS[$name]}' (budget ${budget} s; $((SECONDS - start)) s so far)"
    XLA_FLAGS="$base_flags ${FLAGS[$name]}" "$PYTHON" -m compare --config "$CONFIG" \
        --frameworks jax --precision bf16 --batch 128,256 --steps 30 --warmup 10 \
        --timeout 150 --budget "$budget" --out "$OUT/$name" "$@" \
        || echo "compare for $name exited with $?"
    done_dirs+=("$OUT/$name")
done
# One summary: each flag set's rows (samples/s, ms/step, memory) under its name.
summary="$OUT/summary.md"
mkdir -p "$OUT"
{
    echo "# XLA flag sweep: $CONFIG, jaxface bf16 (python -m compare rows per flag set)"
    for dir in "${done_dirs[@]}"; do
        name=$(basename "$dir")
        echo
        echo "## $name: XLA_FLAGS='${FLAGS[$name]}'"
        echo
        if [ -f "$dir/table.md" ]; then cat "$dir/table.md"; else echo "(no table: see the log above)"; fi
    done
} > "$summary"
echo "done in $((SECONDS - start)) s: $summary (one directory per flag set under $OUT)"
