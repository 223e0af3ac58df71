#!/usr/bin/env bash
# One call on a 2-GPU machine for issue 9: the GPU tests of tensor parallelism, CUDA graphs and
# the layer split (NCCL over 2 GPUs), then in bench_engine.py
#   W-latency 1b + 8b: fast (1 GPU, core process) against thread (core in the bench process)
#     and, on 8b, tp2 (tensor parallel over 2 GPUs: the W-tp record, vs_1gpu and its floor);
#   W-throughput 1b: fast against thread; 8b: fast against layer2 (layer split over 2 GPUs).
# Every step runs under `timeout` (SIGTERM, SIGKILL 20 s later), so a hang costs only its own
# step; bench_engine.py writes each JSON file as soon as a contender finishes.
#
#   source .devbundle/enter.sh && TIDEQ_COMMIT=<sha> bash bench/gpu_issue9.sh
#
# Environment: OUT (results and logs; default bench/results), TIDEQ_COMMIT (the commit measured:
# the device's copy of the tree has no .git), ISSUE9_TOTAL_S (seconds for all steps, default
# 540), ISSUE9_STEPS (comma list of tests,latency,throughput; default all three, e.g.
# ISSUE9_STEPS=throughput for a second call), PYTHON (default python3).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1

OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
TOTAL=${ISSUE9_TOTAL_S:-540}
STEPS=",${ISSUE9_STEPS:-tests,latency,throughput},"
START=$(date +%s)
mkdir -p "$OUT"

# Seconds a step keeps for itself at most, and at least for the steps after it when they run.
TESTS_MAX_S=120
LATENCY_MAX_S=300
LATENCY_NEEDS_S=170
THROUGHPUT_NEEDS_S=190
# --time-budget = step limit minus this: the last contender started may overrun the budget by
# one engine start and its runs (8b: about a minute), and a SIGTERM'd run still shuts down.
LATENCY_OVERRUN_S=75
THROUGHPUT_OVERRUN_S=85

selected() { [[ $STEPS == *",$1,"* ]]; }
left() { echo $((TOTAL - ($(date +%s) - START))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
max() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }
# Seconds to keep for the selected steps after $1.
reserve_after() {
  local keep=0
  case $1 in
    tests) selected latency && keep=$((keep + LATENCY_NEEDS_S))
           selected throughput && keep=$((keep + THROUGHPUT_NEEDS_S)) ;;
    latency) selected throughput && keep=$((keep + THROUGHPUT_NEEDS_S)) ;;
  esac
  echo "$keep"
}

SUMMARY=""
# run_step NAME LIMIT_S COMMAND...: the command under timeout, its output also in
# $OUT/issue9_NAME.log.
run_step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  if [ "$limit" -lt 30 ]; then
    echo "== $name: not run (${limit}s of the ${TOTAL}s left for it)"
    SUMMARY+="$name: not run, no time left"$'\n'
    return
  fi
  echo "== $name: up to ${limit}s: $*"
  t0=$(date +%s)
  timeout -k 20 "$limit" "$@" 2>&1 | tee "$OUT/issue9_$name.log"
  rc=${PIPESTATUS[0]}
  SUMMARY+="$name: rc $rc in $(($(date +%s) - t0))s (limit ${limit}s)"$'\n'
  echo "== $name: rc $rc after $(($(date +%s) - t0))s; $(($(date +%s) - START))s so far"
}

echo "== issue 9: $(nvidia-smi -L 2>/dev/null | wc -l) GPU(s), ${TOTAL}s, steps ${STEPS//,/ }"

if selected tests; then
  run_step tests "$(min $TESTS_MAX_S $(($(left) - $(reserve_after tests))))" \
    "$PY" -m pytest -m gpu --confcutdir=tests/engine -o addopts= -p no:cacheprovider \
    tests/engine/test_parallel.py tests/engine/test_cuda_graphs.py tests/engine/test_layer_split.py -q
fi

if selected latency; then
  limit=$(min $LATENCY_MAX_S $(($(left) - $(reserve_after latency))))
  # tp2 first after the 1-GPU figures (W-tp is the issue's target), the thread core after;
  # the HF static-cache peer only if the budget is not spent by then.
  run_step latency "$limit" "$PY" bench/bench_engine.py --workload latency --model 1b,8b \
    --variants fast,tp2@8b,thread --peers hf_static_cache \
    --time-budget "$(max $((limit - LATENCY_OVERRUN_S)) 1)" --out "$OUT"
fi

if selected throughput; then
  limit=$(($(left) - 5))
  # W-throughput is defined on 1b; --all-pairs adds 8b for the layer split against 1 GPU.
  # No HF peers: each takes 40-50 s a repetition on 1b.
  run_step throughput "$limit" "$PY" bench/bench_engine.py --workload throughput \
    --model 1b,8b --all-pairs --variants fast,thread@1b,layer2@8b --peers none \
    --time-budget "$(max $((limit - THROUGHPUT_OVERRUN_S)) 1)" --out "$OUT"
fi

echo "== issue 9 done in $(($(date +%s) - START))s"
printf '%s' "$SUMMARY"
# The figures of the files this call wrote, one line each.
"$PY" - "$OUT" "$START" <<'EOF'
import json, sys
from pathlib import Path

for f in sorted(Path(sys.argv[1]).glob("*_w-*.json")):
    if f.stat().st_mtime < float(sys.argv[2]):
        continue
    r = json.loads(f.read_text())
    figures = r.get("project_variants") or {"project": r.get("project")}
    print(f"{f.name}: gpus {r.get('gpus')};",
          ", ".join(f"{k} {v:,.1f}" if v is not None else f"{k} -" for k, v in figures.items()),
          "|", ", ".join(f"{k} {v:.3f}" for k, v in r.get("ratios", {}).items()),
          "|", "; ".join(f"{k}: {str(v)[:80]}" for k, v in
                         {**r.get("errors", {}), **r.get("skipped", {})}.items()))
EOF
