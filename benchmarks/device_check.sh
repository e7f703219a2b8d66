#!/usr/bin/env bash
# The one script for a lent GPU machine (H100/H200): build there, run the persistent-kernel tests
# first (the newest CUDA code), then the whole suite (every CUDA test on both recurrence paths),
# compute-sanitizer memcheck, racecheck and synccheck on a small case, then the benchmarks (fp32
# with TF32 off, bf16, branch attention; fp32 with TF32 on if MTL_DEVICE_CHECK_TF32=1) and a
# profile of a small case. Logs and JSON go to $OUT. About 6-7 minutes; every step has a timeout.
#   run from the repository root:  bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/mtl_kernels_device_check}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export MTL_KERNELS_FORCE_CUDA=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
# The C++ ABI of torch and the compiler's default (a mismatch crashed error paths before setup.py
# passed -D_GLIBCXX_USE_CXX11_ABI explicitly).
python3 -c "import torch; print('torch cxx11 abi', int(torch._C._GLIBCXX_USE_CXX11_ABI))" | tee -a "$OUT/gpu.txt"
echo '#include <string>' | ${CXX:-c++} -x c++ -dM -E - 2>/dev/null | grep -m1 "define _GLIBCXX_USE_CXX11_ABI" | tee -a "$OUT/gpu.txt"

step "build (-Xptxas -v resource report in build.log)"
export NVCC_APPEND_FLAGS="-Xptxas -v"
timeout 400 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
unset NVCC_APPEND_FLAGS
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -12

step "persistent-kernel tests"
# First, and alone: if the persistent kernel fails or hangs (a barrier that never opens), the rest
# of the script leaves it out instead of hanging in every later step.
persistent_ok=1
timeout 150 python3 -m pytest tests/test_persistent.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests_persistent.log" | tail -15
rc=${PIPESTATUS[0]}
if [ $rc -ne 0 ]; then
  status=1; persistent_ok=0
  [ $rc -eq 124 ] && echo "PERSISTENT TESTS TIMED OUT (a hang?)"
  echo "persistent path left out of the steps below"
fi
PATHS="per_step persistent"; KSEL=""; GPATH=persistent
[ $persistent_ok -eq 1 ] || { PATHS="per_step"; KSEL="not persistent"; GPATH=per_step; }

step "tests"
timeout 360 python3 -m pytest tests -q -p no:cacheprovider ${KSEL:+-k "$KSEL"} 2>&1 | tee "$OUT/tests.log" | tail -15
[ ${PIPESTATUS[0]} -eq 0 ] || status=1

step "compute-sanitizer"
for tool in memcheck racecheck synccheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/sanitize_case.py $PATHS \
    > "$OUT/sanitizer_$tool.log" 2>&1
  rc=$?; echo "$tool exit $rc"; tail -4 "$OUT/sanitizer_$tool.log"; [ $rc -eq 0 ] || status=1
done

step "benchmarks"
B="python3 benchmarks/bench_grouped_lstm.py --device cuda --grouped-path $GPATH --repeats 10 --min-time 0.2"
timeout 200 $B --dtype float32 --json "$OUT/lstm_fp32.json" 2>&1 | tee "$OUT/bench.txt"
timeout 150 $B --dtype bfloat16 --json "$OUT/lstm_bf16.json" 2>&1 | tee -a "$OUT/bench.txt"
timeout 60 python3 benchmarks/bench_branch_attention.py --device cuda --dtype float32 --json "$OUT/attn_fp32.json" 2>&1 | tee -a "$OUT/bench.txt"
timeout 60 python3 benchmarks/bench_branch_attention.py --device cuda --dtype bfloat16 2>&1 | tee -a "$OUT/bench.txt"
if [ "${MTL_DEVICE_CHECK_TF32:-0}" = 1 ]; then  # fp32 with TF32 allowed (cuDNN's default): optional
  timeout 200 $B --dtype float32 --tf32 --json "$OUT/lstm_fp32_tf32.json" 2>&1 | tee -a "$OUT/bench.txt"
fi

step "profile (where a small f+b spends its time)"
timeout 60 python3 benchmarks/profile_case.py --config seed-branches > "$OUT/profile_seed_branches.txt" 2>&1
tail -5 "$OUT/profile_seed_branches.txt"
echo; echo "device_check status $status"
exit $status
