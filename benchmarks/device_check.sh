#!/usr/bin/env bash
# Device check on a lent GPU machine (H100/H200), as two commands, each one `run` call of the
# device tool. Each stage keeps to a time budget (seconds; every step's timeout is cut to what is
# left of it, and a step with under 10 s left is skipped), and writes to $OUT as it goes: a
# timeout still returns everything done so far.
#
#   stage 1 (the must-have):  bash benchmarks/device_check.sh 1 [BUDGET_S, default 520]
#     environment (GPU, driver, torch, nvcc, ninja: stops if ninja is missing); build with
#     MAX_JOBS=16 and a -Xptxas -v table per kernel; tests/test_persistent_cuda.py (the persistent
#     kernel against the per-step path for lstm, gru, rnn_tanh, rnn_relu, and the tensor-core
#     variant's tests: bf16/fp16 every cell, TF32, the switch, determinism; without -x; the sequence
#     path is left out of later steps only on a hang or crash: exit 124/137 or >= 128); memcheck on
#     the persistent forward and backward kernels of every cell, FMA (fp32) and tensor-core (bf16)
#     variants; bench_grouped_lstm.py (LSTM) on seed-tasks, seed-branches, many-small, multitask in
#     fp32 and bf16 (bf16: a column per variant, tensor cores and FMA; JSON rewritten after every
#     row).
#   stage 2:                  bash benchmarks/device_check.sh 2 [BUDGET_S, default 520]
#     rebuilds only if mtl_kernels/_C*.so with CUDA kernels is missing (a fresh machine); the
#     error-path check; the full test suite on both recurrence paths; racecheck and synccheck on the
#     small persistent cases (every cell); the GRU benchmark (nn.GRU loop vs GroupedGRU, fp32, the
#     stage-1 configs); FlashRNN against GroupedLSTM, multitask bf16 first and alone (needs the
#     wheel carried in .whl/); the `wide` config; the branch-attention benchmark; the remaining
#     FlashRNN cases with whatever time is left.
#
# The device tool's calls (15 minutes of device time per session include the machine's start, so
# give stage 2 what `status` says is left, less ~40 s, and call it within 30 s of stage 1's reply,
# before the warm machine goes back):
#   run(command="bash benchmarks/device_check.sh 1", timeout_s=600)
#   run(command="bash benchmarks/device_check.sh 2 <budget_left_s - 40, at most 540>",
#       carry=[".whl"], timeout_s=600)
# .whl/ holds flashrnn-1.0.8-py3-none-any.whl (git-ignored; fetch it with the command in
# benchmarks/NOTES.md, "Device check").
#
# $OUT (at most 8 files come back): console_stageN.log (everything printed), summary_stageN.txt
# (one line per step), logs_stageN.tgz (every step's full log, rewritten after each step), and in
# stage 1 ptxas.txt, lstm_fp32.json, lstm_bf16.json; in stage 2 gru_fp32.json, flashrnn.jsonl (wide
# and branch-attention JSON are inside the tgz).
# Dry run (prints every step's command, runs nothing):  MTL_DEVICE_CHECK_DRY=1 bash benchmarks/device_check.sh 1
set -uo pipefail
STAGE=${1:-}
case "$STAGE" in 1 | 2) ;; *) echo "usage: bash benchmarks/device_check.sh 1|2 [BUDGET_S]"; exit 64 ;; esac
BUDGET=${2:-${MTL_DEVICE_CHECK_BUDGET:-520}}
DRY=${MTL_DEVICE_CHECK_DRY:-0}
OUT=${OUT:-/tmp/mtl_kernels_device_check}
mkdir -p "$OUT" build
LOGS=/tmp/mtl_device_check_logs/stage$STAGE
rm -rf "$LOGS" && mkdir -p "$LOGS"
CONSOLE=$OUT/console_stage$STAGE.log
SUMMARY=$OUT/summary_stage$STAGE.txt
STATE=build/device_check.state  # what stage 1 found, for stage 2 (build/ is git-ignored: a warm machine keeps it)
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
RESERVE=15   # seconds kept at the end for the summary and the last pack
MIN_STEP=10
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export MTL_KERNELS_FORCE_CUDA=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=$PWD/build/torch_extensions  # FlashRNN's first-use builds, kept when warm
status=0

say() { printf '%s\n' "$*" | tee -a "$CONSOLE"; }
show() { tee -a "$CONSOLE"; }
summary() { printf '%-28s %-16s %5ss  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"; }
pack() {
  [ "$DRY" = 1 ] && return 0
  tar -czf "$OUT/.logs.tgz.tmp" -C "$(dirname "$LOGS")" "stage$STAGE" 2>/dev/null &&
    mv -f "$OUT/.logs.tgz.tmp" "$OUT/logs_stage$STAGE.tgz"
  local n
  n=$(find "$OUT" -type f | wc -l)
  [ "$n" -le 8 ] || say "WARNING: $n files under \$OUT (only 8 come back)"
}
left() { echo $((DEADLINE - $(date +%s) - RESERVE)); }

# step NAME CAP_S LOGFILE COMMAND: runs COMMAND (bash -c, pipefail) under `timeout`, min(CAP_S, time
# left); its output goes to $LOGS/LOGFILE, its last lines to the console. Returns its exit code
# (125: skipped for lack of time).
step() {
  local name=$1 cap=$2 log=$3 cmd=$4 now t rc secs st
  now=$(date +%s)
  t=$(left)
  [ "$cap" -lt "$t" ] && t=$cap
  say ""
  say "=== [$name] $(date +%T) +$((now - T0))s, timeout ${t}s"
  say "+ $cmd"
  if [ "$t" -lt "$MIN_STEP" ]; then
    say "SKIPPED: $(left)s left of the ${BUDGET}s budget"
    summary "$name" SKIPPED 0 "no time left"
    return 125
  fi
  if [ "$DRY" = 1 ]; then summary "$name" DRY 0 ""; return 0; fi
  timeout -k 5 "$t" bash -o pipefail -c "$cmd" >"$LOGS/$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - now))
  tail -n "${TAIL:-12}" "$LOGS/$log" | show
  st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="TIMEOUT(${t}s)"; elif [ $rc -ne 0 ]; then st="FAIL(rc=$rc)"; fi
  summary "$name" "$st" "$secs" "$(tail -n 1 "$LOGS/$log" | cut -c1-110)"
  say "--- [$name] $st in ${secs}s"
  pack
  return $rc
}

hang_or_crash() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ] || { [ "$1" -ge 128 ] && [ "$1" -ne 125 ]; }; }

has_cuda_build() {
  ls mtl_kernels/_C*.so >/dev/null 2>&1 && python3 -c "import torch, mtl_kernels; import sys; \
sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('mtl_kernels::grouped_recurrence_forward', 'CUDA') else 1)" 2>/dev/null
}

build() {
  step build 330 build.log "NVCC_APPEND_FLAGS='-Xptxas -v' python3 setup.py build_ext --inplace && python3 -c \"import torch, mtl_kernels; assert torch._C._dispatch_has_kernel_for_dispatch_key('mtl_kernels::grouped_recurrence_forward', 'CUDA'), 'no CUDA kernels in the build'; print('build has CUDA kernels')\""
  local rc=$?
  if [ $rc -ne 0 ]; then
    say "BUILD FAILED (rc=$rc): nothing else can run"; tail -n 40 "$LOGS/build.log" | show
    return $rc
  fi
  [ "$DRY" = 1 ] && return 0
  python3 benchmarks/ptxas_summary.py "$LOGS/build.log" >"$LOGS/ptxas.txt" 2>&1
  [ "$STAGE" = 1 ] && cp "$LOGS/ptxas.txt" "$OUT/ptxas.txt"
  head -n 40 "$LOGS/ptxas.txt" | show
  pack
}

: >"$SUMMARY"
say "# device_check stage $STAGE, budget ${BUDGET}s, $(date -u +%FT%TZ)$([ "$DRY" = 1 ] && echo ', DRY RUN: commands are printed, not run')"
printf '%-28s %-16s %6s  %s\n' step status time "last line of its log" >>"$SUMMARY"

ENV_CMD="nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; \
python3 -c \"import sys, torch; print('python', sys.version.split()[0], sys.executable); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'cxx11 abi', int(torch._C._GLIBCXX_USE_CXX11_ABI)); \
print(torch.cuda.get_device_properties(0))\"; \
nvcc --version | tail -n 2; echo ninja \$(ninja --version); \${CXX:-c++} --version | head -n 1; \
echo '#include <string>' | \${CXX:-c++} -x c++ -dM -E - | grep -m1 _GLIBCXX_USE_CXX11_ABI; \
compute-sanitizer --version 2>/dev/null | tail -n 1; nproc; \
python3 benchmarks/envinfo.py --device cuda"
TAIL=20 step env 60 env.log "$ENV_CMD"

# The build falls back to a serial distutils compile without ninja (many minutes): stop instead.
if ! ninja --version >/dev/null 2>&1; then
  say "NINJA MISSING: torch.utils.cpp_extension would build serially (far over the budget). Stopping."
  summary ninja MISSING 0 "stopped"
  pack
  exit 3
fi

if [ "$STAGE" = 1 ]; then
  build || exit 1
  [ "$DRY" = 1 ] || echo "built_at=$(date +%s)" >"$STATE"

  # ---- the persistent kernel on its own, every cell: first, without -x ----
  TAIL=25 step persistent-tests 200 tests_persistent.log \
    "python3 -m pytest tests/test_persistent_cuda.py -v -p no:cacheprovider -rfE --durations=15"
  rc=$?
  [ $rc -eq 0 ] || status=1
  persistent=ok
  if hang_or_crash $rc; then
    persistent=dropped
    say "PERSISTENT TESTS HUNG OR CRASHED (rc=$rc): the sequence path (the persistent kernel) is left out of the steps below"
  fi
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && persistent=hung
  [ "$DRY" = 1 ] || echo "persistent=$persistent" >>"$STATE"
  GPATH=sequence
  [ "$persistent" = ok ] || { GPATH=per_step; export MTL_KERNELS_LSTM_PATH=per_step; }

  # ---- memcheck: the persistent forward and backward kernels, one small multi-slice case per cell
  # for the FMA variant (fp32) and the tensor-core variant (bf16) ----
  if [ "$persistent" != hung ]; then
    step memcheck 170 memcheck.log \
      "compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/sanitize_case.py sequence-min"
    [ $? -eq 0 ] || status=1
  else
    say "memcheck skipped: the persistent tests hung"; summary memcheck SKIPPED 0 "persistent tests hung"
  fi

  # ---- the benchmark: loop, batched, per-step, sequence (persistent); JSON after every row ----
  B="python3 benchmarks/bench_grouped_lstm.py --device cuda --grouped-path $GPATH --configs seed-tasks,seed-branches,many-small,multitask --repeats 10 --min-time 0.2"
  TAIL=16 step bench-fp32 130 bench_fp32.log "$B --dtype float32 --json $OUT/lstm_fp32.json"
  [ $? -eq 0 ] || status=1
  TAIL=16 step bench-bf16 150 bench_bf16.log "$B --dtype bfloat16 --json $OUT/lstm_bf16.json"
  [ $? -eq 0 ] || status=1
else
  # ---- stage 2: on the warm machine of stage 1, or a fresh one (then build again) ----
  if [ "$DRY" != 1 ] && has_cuda_build; then
    say "build: mtl_kernels/_C*.so with CUDA kernels is there (stage 1's): not rebuilt"
    summary build "kept" 0 "$(ls mtl_kernels/_C*.so | head -n 1)"
  else
    build || exit 1
  fi
  persistent=$(sed -n 's/^persistent=//p' "$STATE" 2>/dev/null | tail -n 1)
  if [ -z "$persistent" ]; then  # a fresh machine: a quick smoke run decides
    step persistent-smoke 60 persistent_smoke.log "python3 benchmarks/sanitize_case.py sequence-min"
    rc=$?
    persistent=ok
    hang_or_crash $rc && persistent=dropped
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && persistent=hung
  fi
  say "persistent kernel: $persistent"
  GPATH=sequence
  KSEL=""  # every test of the GPU's sequence path says "cuda-sequence" in its id (conftest.py)
  if [ "$persistent" != ok ]; then
    GPATH=per_step
    KSEL="--ignore=tests/test_persistent_cuda.py -k 'not cuda-sequence'"
    export MTL_KERNELS_LSTM_PATH=per_step  # the default path of everything else
  fi

  step error-paths 90 error_paths.log "python3 benchmarks/error_path_check.py"
  [ $? -eq 0 ] || status=1

  # the whole suite: every CUDA test on both recurrence paths (xdist workers where installed)
  XDIST=""
  if [ "${MTL_DEVICE_CHECK_XDIST:-8}" != 0 ] && python3 -c "import xdist" 2>/dev/null; then
    XDIST="-n ${MTL_DEVICE_CHECK_XDIST:-8}"
  fi
  TAIL=25 step tests 240 tests.log \
    "OMP_NUM_THREADS=2 python3 -m pytest tests -q -p no:cacheprovider -rfE --durations=20 $XDIST $KSEL"
  [ $? -eq 0 ] || status=1

  for tool in racecheck synccheck; do
    if [ "$persistent" = hung ]; then summary "$tool" SKIPPED 0 "persistent kernel hung"; continue; fi
    step "$tool" 90 "$tool.log" \
      "compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/sanitize_case.py sequence-min"
    [ $? -eq 0 ] || status=1
  done

  # the GRU: nn.GRU loop vs GroupedGRU on stage 1's configs, fp32 (before FlashRNN, whose first-use
  # build takes an unknown time)
  TAIL=16 step bench-gru-fp32 90 bench_gru_fp32.log \
    "python3 benchmarks/bench_grouped_lstm.py --cell gru --device cuda --grouped-path $GPATH --configs seed-tasks,seed-branches,many-small,multitask --repeats 10 --min-time 0.2 --dtype float32 --json $OUT/gru_fp32.json"
  [ $? -eq 0 ] || status=1

  # FlashRNN: its wheel is carried in .whl/ (einops, triton, ninja, packaging are in the image)
  FR_OK=0
  if ls .whl/flashrnn-*.whl >/dev/null 2>&1 || [ "$DRY" = 1 ]; then
    step flashrnn-install 60 flashrnn_install.log \
      "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/flashrnn-*.whl && PYTHONPATH=/tmp/site python3 -c 'import flashrnn; print(flashrnn.__file__)'"
    [ $? -eq 0 ] && FR_OK=1
  else
    say "FlashRNN: no .whl/flashrnn-*.whl (carry .whl): skipped"; summary flashrnn SKIPPED 0 "wheel not carried"
  fi
  FR="PYTHONPATH=/tmp/site:$PYTHONPATH python3 benchmarks/bench_flashrnn.py"
  if [ $FR_OK = 1 ]; then
    step flashrnn-layout 60 flashrnn_layout.log "$FR --check-vanilla --device cuda"
    [ $? -eq 0 ] || status=1
    TAIL=20 step flashrnn-multitask-bf16 220 flashrnn_1.log "$FR --cases multitask:bfloat16 --json $OUT/flashrnn.jsonl"
    [ $? -eq 0 ] || status=1
  fi

  B="python3 benchmarks/bench_grouped_lstm.py --device cuda --grouped-path $GPATH --configs wide --repeats 10 --min-time 0.2"
  step wide-fp32 60 bench_wide_fp32.log "$B --dtype float32 --json $LOGS/lstm_wide_fp32.json"
  [ $? -eq 0 ] || status=1
  step wide-bf16 60 bench_wide_bf16.log "$B --dtype bfloat16 --json $LOGS/lstm_wide_bf16.json"
  [ $? -eq 0 ] || status=1
  A="python3 benchmarks/bench_branch_attention.py --device cuda"
  step attention 90 bench_attention.log \
    "$A --dtype float32 --json $LOGS/attn_fp32.json && $A --dtype bfloat16 --json $LOGS/attn_bf16.json"
  [ $? -eq 0 ] || status=1

  if [ $FR_OK = 1 ]; then
    TAIL=30 step flashrnn-rest 600 flashrnn_2.log \
      "$FR --cases many-small:bfloat16,multitask:float32,many-small:float32 --json $OUT/flashrnn.jsonl"
    [ $? -eq 0 ] || status=1
  fi
fi

say ""
say "# summary, stage $STAGE ($(($(date +%s) - T0))s of ${BUDGET}s):"
show <"$SUMMARY"
[ -f "$LOGS/env.log" ] && { echo; echo "## environment (env.log)"; cat "$LOGS/env.log"; } >>"$SUMMARY"
say "device_check stage $STAGE status $status"
pack
exit $status
