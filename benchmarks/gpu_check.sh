#!/usr/bin/env bash
# Everything that needs a real GPU, in one run: the compiled Pallas SSD kernel tests, the kernel-vs-XLA SSD benchmark,
# and the elastic step's time and MFU for the ~1B proxy, next to the planner's expectation for the same config.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default OUT_DIR: gpu_check/)
#
# Each part writes its own log under OUT_DIR and a failing part does not stop the others; the exit status is the
# number of failed parts. Record what it prints in benchmarks/RESULTS.md with the date and the GPU.
set -u
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
failed=0

part() {  # part NAME COMMAND...: runs COMMAND, tees its output to OUT_DIR/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" 2>&1 | tee "$out/$name.log"; then
    echo "== $name: ok"
  else
    echo "== $name: FAILED (see $out/$name.log)"
    failed=$((failed + 1))
  fi
}

part devices python -c "import jax; print(jax.__version__, jax.devices())"
part kernel_tests python -m pytest -q tests/test_kernels_ssd.py tests/test_ssd.py
part ssd_benchmark python benchmarks/ssd.py --gpu
part plan python -m elastic_jax.plan --config configs/proxy_1b.py
part mfu python benchmarks/mfu.py --config configs/proxy_1b.py
echo "== $failed part(s) failed; logs in $out/"
exit "$failed"
