#!/usr/bin/env bash
# The GPU measurement of issue 9 in one command (BENCHMARKS.md, "The GPU run").
#
# Prepare here once:   bash scripts/prepare_devbench.sh        (fills the git-ignored .devbench/)
# Run on the GPU:      bash scripts/gpu_bench.sh                (device tool: carry [".devbench"], timeout_s 600)
#
# In priority order, each under its own time limit inside a total budget (DEADLINE seconds,
# default 560) so a 10-minute command always returns: install the carried wheels, the `cuda`
# tests, the plain diffusers + peft reference step, then `zturbo bench --model synthetic`
# for high (1024 + 512 px, and 8-step sampling), 16gb, 8gb and 12gb at 1024 px, then a
# CUDA-graphs variant at 512 px if time is left. Results go to $OUT: gpu_bench.log (all
# output), bench.json (every row, the plain rows), compare.md (targets, ratios, verdicts).
# ONLY="16gb 8gb" runs just those bench presets (to fill gaps on a second call).
# SMOKE=1 runs the same sequence on the CPU with tiny shapes, uncompiled (checks the script here).
set -u
START=$(date +%s)
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-bench_out}
WORK=$(mktemp -d)
LOG="$OUT/gpu_bench.log"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" "$WORK/plain"
cd "$ROOT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 ZTURBO_HOME="$WORK/home"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"   # shared by the bench processes: later presets reuse kernels

MODEL=synthetic R1=1024 R2=512 EXTRA=()
if [ "${SMOKE:-0}" = 1 ]; then
  MODEL=synthetic:tiny R1=64 R2=32 EXTRA=(--set train.compile=false --device cpu)
  export TINY=1
fi

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
say() { echo "$*" | tee -a "$LOG"; }
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

# step NAME LIMIT COMMAND...: run with a time limit cut to what is left; full output to the log,
# the last lines to stdout (the device tool returns only the tail of stdout).
step() {
  local name=$1 limit=$2
  shift 2
  local remain
  remain=$(left)
  if (( remain < 40 )); then say "SKIPPED $name: ${remain}s left of ${DEADLINE}s"; return 0; fi
  (( limit > remain - 15 )) && limit=$(( remain - 15 ))
  say "== $name (limit ${limit}s, ${remain}s left)"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "== $name: rc=$rc at $(( $(date +%s) - START ))s$( ((rc == 124)) && echo ' (timed out)')"
  return 0
}

bench() {  # bench NAME LIMIT ARGS...: one preset per process, its own JSON
  local name=$1 limit=$2
  shift 2
  step "bench $name" "$limit" python3 -m zturbo_train bench --model "$MODEL" --profile --quiet \
    --out "$WORK/bench-$name.json" "$@" "${EXTRA[@]}"
  [ -f "$WORK/bench-$name.json" ] && python3 - "$WORK/bench-$name.json" <<'PY' | tee -a "$LOG"
import json, sys
doc = json.load(open(sys.argv[1]))
for r in doc["rows"]:
    print("  ", r["preset"], r["resolution"], "px:", r.get("error") or f"{r['s_per_step']:.4f} s/step, peak {r['peak_gib']} GiB (est {r['estimate_gib']}), first step {r['first_step_s']} s, {r['levers']['attention_backend']}")
for s in doc["sampling"]:
    print("  ", s["preset"], "sampling", s["resolution"], "px:", s.get("error") or f"{s['seconds']} s with LoRA, {s['seconds_no_lora']} s without")
PY
}

say "gpu_bench start $(date -u +%FT%TZ), budget ${DEADLINE}s"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,driver_version --format=csv >>"$LOG" 2>&1

# 1. wheels carried in .devbench/whl (diffusers, pydantic, bitsandbytes, ...), our code from src/
if ls .devbench/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .devbench/whl/*.whl >>"$LOG" 2>&1 || say "wheel install failed (see log)"
  export PYTHONPATH="/tmp/site:$ROOT/src"
else
  say "no .devbench/whl: run scripts/prepare_devbench.sh here and carry .devbench"
  export PYTHONPATH="$ROOT/src"
fi
python3 -c "import torch, diffusers, pydantic; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

# 2. correctness first: the GPU-only tests of the levers and the bench
step "cuda tests" 150 python3 -m pytest -v -p no:cacheprovider -m cuda tests/memory tests/commands/test_bench.py
grep -E "(PASSED|FAILED|ERROR|SKIPPED)( |$)|passed|failed" "$LOG" | tail -n 20

# 3. the plain diffusers + peft step, same machine, same call
if [ -f .devbench/plain_step.py ]; then
  step "plain reference" 150 env OUT="$WORK/plain" python3 scripts/plain_ref.py
else
  say "no .devbench/plain_step.py: the ratios to the plain step cannot be computed"
fi

# 4. our step per preset (compiled presets first compile, ~1 min; kernels are cached for the next)
wanted high && bench high 200 --preset high -r $R1 -r $R2 --sample-size $R1
wanted 16gb && bench 16gb 100 --preset 16gb -r $R1 --sample-steps 0
wanted 8gb && bench 8gb 100 --preset 8gb -r $R1 --sample-steps 0 --steps 5 --warmup 2
wanted 12gb && bench 12gb 80 --preset 12gb -r $R1 --sample-steps 0 --steps 5 --warmup 2
wanted graphs && bench graphs 120 --preset high -r $R2 --sample-steps 0 --label cuda-graphs \
  --set 'train.compile_mode="reduce-overhead"'

# 5. the verdict
python3 scripts/bench_compare.py --plain "$WORK/plain/results.jsonl" --out "$OUT" "$WORK"/bench-*.json \
  2>&1 | tee -a "$LOG"
say "gpu_bench done in $(( $(date +%s) - START ))s"
