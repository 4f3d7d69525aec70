#!/usr/bin/env bash
# One-command GPU check of bkn-export (issue #12; how to run it: docs/gpu-check.md).
#
#   bash benchmarks/gpu_check.sh [--only STEP[,STEP...]] [--dry-run] [--help]
#
# Steps, in order (each timed; a failure or timeout is recorded and the next step runs):
#   env      nvidia-smi, versions, device bandwidth (benchmarks.gpu.device_info), pip install -e .
#   pytest   pytest -m gpu on the test files that have gpu tests (Triton kernels, CUDA paths of the op,
#            the plugin's CUDA kernel through the kernel-only CMake library, built for sm_90 only)
#   plugin   the TensorRT plugin's own code on the GPU without libnvinfer: CMake build (sm_90) of
#            plugins/tensorrt/test/pluginGpuHarness.cpp against third_party/TensorRT/include, reference
#            from benchmarks/gpu/plugin_reference.py, the harness, bkn_plugin_library_test, and the
#            harness under compute-sanitizer memcheck
#   kernels  benchmarks/bench_kernels.py (Triton BKN vs cuDNN BatchNorm) for float32, bfloat16, float16
#   network  benchmarks/gpu/network_step.py: timm ResNet-50 and MobileNetV3, BKN vs BN, eager and graphed
# Optional (only with --only): ncu  Nsight Compute's DRAM bytes of one BN and one BKN step on a large
#            shape (benchmarks/gpu/ncu_kernels.py): checks bench_kernels.py's bandwidth accounting
# Then the summary (always): $OUT/summary.md (RESULTS.md-ready markdown, also printed) and
# $OUT/gpu-check-details.tar.gz (every log and JSON). Nothing else is written under $OUT.
#
# Environment:
#   OUT                     output folder (default ./gpu-check-out)
#   PYTHON                  interpreter (default python3)
#   GPU_CHECK_BUDGET_S      total seconds for the steps (default 480); each step's timeout is
#                           min(its own limit, what is left); a step with < 20 s left is skipped
#   GPU_CHECK_WORK          work folder (default a new mktemp -d)
#   GPU_CHECK_KERNEL_BATCHES  batches for bench_kernels.py (default "2 32 256")
#   GPU_CHECK_PYTEST_FILES  the test files of the pytest step (default: every tests/test_*.py with gpu tests)
#   GPU_CHECK_NETWORK_ARGS  extra arguments for network_step.py (e.g. "--amp bf16")
#   TENSORRT_INCLUDE        TensorRT headers (default third_party/TensorRT/include: carry it to the device)
#   GPU_CHECK_SMOKE=1       for tests/test_gpu_check.py only: no GPU needed; no pip install, the harness
#                           --host-only (no enqueue), the benchmarks with --smoke on the CPU; figures mean nothing
# Exit status: 0 every step that ran passed; 1 a step failed or timed out; 2 no GPU (without
# --dry-run) or bad arguments. --dry-run lists the steps, checks the files they need, exits 0 or 1.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/benchmarks/gpu_check.sh"
STEPS=(env pytest plugin kernels network)
OPTIONAL_STEPS=(ncu)
declare -A LIMIT=([env]=60 [pytest]=240 [plugin]=60 [kernels]=150 [network]=240 [ncu]=120)
PYTHON="${PYTHON:-python3}"
TENSORRT_INCLUDE="${TENSORRT_INCLUDE:-$ROOT/third_party/TensorRT/include}"
KERNEL_BATCHES="${GPU_CHECK_KERNEL_BATCHES:-2 32 256}"
NETWORK_MODELS=(resnet50 mobilenetv3_large_100)
CUDA_ARCH="90-real"   # H200: sm_90 SASS only

# Files the steps need (relative to the repository root); the TensorRT headers are checked apart
# because they are an ignored, carried folder (never committed).
REQUIRED_FILES=(
  pyproject.toml
  tests/conftest.py
  tests/test_kernels.py
  tests/test_tensorrt_plugin.py
  benchmarks/__init__.py
  benchmarks/bench_kernels.py
  benchmarks/gpu/__init__.py
  benchmarks/gpu/device_info.py
  benchmarks/gpu/plugin_reference.py
  benchmarks/gpu/network_step.py
  benchmarks/gpu/ncu_kernels.py
  benchmarks/gpu/summarize.py
  plugins/tensorrt/CMakeLists.txt
  plugins/tensorrt/test/pluginGpuHarness.cpp
  plugins/tensorrt/test/pluginLibraryTest.cpp
)
TOOLS=(nvidia-smi nvcc cmake ninja compute-sanitizer ncu timeout tar "$PYTHON")
SMOKE="${GPU_CHECK_SMOKE:-0}"

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# ------------------------------------------------------------------ the steps (run in a child under timeout)

step_env() {
  nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1 || true
  nvidia-smi -q > "$WORK/nvidia-smi-q.txt" 2>&1 || true
  for tool in nvcc cmake ninja compute-sanitizer ncu; do
    echo "== $tool"; command -v "$tool" && "$tool" --version 2>&1 | tail -n 3
  done > "$WORK/tools.txt" 2>&1
  cat "$WORK/nvidia-smi.txt" "$WORK/tools.txt"
  if [[ $SMOKE == 1 ]]; then
    echo "pip install skipped (GPU_CHECK_SMOKE=1)" > "$WORK/pip-install.txt"
  elif timeout 75 "$PYTHON" -m pip install --no-deps --no-build-isolation -e "$ROOT" > "$WORK/pip-install.log" 2>&1; then
    echo "pip install -e . ok" > "$WORK/pip-install.txt"
  else
    echo "pip install -e . failed (see pip-install.log); PYTHONPATH + -p runtime.pytest_plugin used" \
      > "$WORK/pip-install.txt"
  fi
  cat "$WORK/pip-install.txt"
  "$PYTHON" -m benchmarks.gpu.device_info --json "$WORK/env.json"
}

step_pytest() {
  local files=() plugin_args=()
  if [[ -n ${GPU_CHECK_PYTEST_FILES:-} ]]; then
    read -r -a files <<< "$GPU_CHECK_PYTEST_FILES"
  else
    mapfile -t files < <(grep -l "mark.gpu" "$ROOT"/tests/test_*.py)
  fi
  if ! "$PYTHON" -c "import importlib.metadata as m, sys; \
sys.exit(not any(e.name == 'bkn_parity' for e in m.entry_points(group='pytest11')))"; then
    plugin_args=(-p runtime.pytest_plugin)
  fi
  echo "pytest -m gpu on: ${files[*]#"$ROOT/"}"
  # faulthandler_timeout: a test still running after 100 s prints every thread's stack (slow compile or hang?)
  CUDAARCHS="$CUDA_ARCH" "$PYTHON" -m pytest -m gpu -p no:cacheprovider "${plugin_args[@]}" -rfEs --durations=15 \
    -o faulthandler_timeout=100 --continue-on-collection-errors --junitxml="$WORK/pytest.xml" "${files[@]}"
}

step_plugin() {
  local build="$WORK/scratch/plugin-build" log="$WORK/plugin" generator=()
  mkdir -p "$log"
  if [[ ! -f "$TENSORRT_INCLUDE/NvInferRuntime.h" ]]; then
    echo "no TensorRT headers in $TENSORRT_INCLUDE: carry third_party/TensorRT/include (docs/gpu-check.md)" \
      | tee "$log/harness.log"
    return 1
  fi
  command -v ninja > /dev/null && generator=(-G Ninja)
  cmake -S "$ROOT/plugins/tensorrt" -B "$build" "${generator[@]}" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
    -DTensorRT_INCLUDE_DIR="$TENSORRT_INCLUDE" > "$log/cmake.log" 2>&1 \
    && cmake --build "$build" -j "$(nproc)" --target bkn_plugin_gpu_harness bkn_plugin_library_test \
      >> "$log/cmake.log" 2>&1
  local built=$?
  grep -E "BKN:|error|warning" "$log/cmake.log" | head -n 40
  if [[ $built -ne 0 ]]; then
    echo "CMake build failed (exit $built); see plugin/cmake.log"
    tail -n 40 "$log/cmake.log"
    return 1
  fi
  "$PYTHON" -m benchmarks.gpu.plugin_reference "$WORK/scratch/plugin-reference" \
    && "$PYTHON" -m benchmarks.gpu.plugin_reference "$WORK/scratch/plugin-reference-small" --small || return 1
  local library="$build/libbkn_tensorrt_plugin.so" status=0 host_only=()
  [[ $SMOKE == 1 ]] && host_only=(--host-only)
  "$build/bkn_plugin_gpu_harness" "$library" "$WORK/scratch/plugin-reference" "${host_only[@]}" > "$log/harness.log" 2>&1 \
    || status=1
  grep -E "^(FAIL|CASE|INFO|OK|FAILED)" "$log/harness.log"
  "$build/bkn_plugin_library_test" "$library" > "$log/library_test.log" 2>&1 || status=1
  tail -n 1 "$log/library_test.log"
  if [[ $SMOKE == 1 ]]; then
    echo "memcheck not run (GPU_CHECK_SMOKE=1)" > "$log/memcheck.log"
  elif command -v compute-sanitizer > /dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 9 "$build/bkn_plugin_gpu_harness" "$library" \
      "$WORK/scratch/plugin-reference-small" > "$log/memcheck.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|^(OK|FAILED) \(" "$log/memcheck.log"
  else
    echo "compute-sanitizer not on PATH: memcheck not run" | tee "$log/memcheck.log"
  fi
  return $status
}

step_kernels() {
  local status=0 dtype smoke=()
  [[ $SMOKE == 1 ]] && smoke=(--smoke)
  for dtype in float32 bfloat16 float16; do
    # shellcheck disable=SC2086  # the batch list is meant to split into words
    "$PYTHON" "$ROOT/benchmarks/bench_kernels.py" --dtype "$dtype" --batches $KERNEL_BATCHES --rep-ms 40 "${smoke[@]}" \
      --json "$WORK/kernels-$dtype.json" || status=1
    # bench_kernels.py exits 0 without measuring when the op would not take the Triton kernels
    [[ -f "$WORK/kernels-$dtype.json" ]] || { echo "kernels: nothing measured for $dtype"; status=1; }
  done
  return $status
}

step_network() {
  local status=0 model
  if [[ $SMOKE == 1 ]]; then
    "$PYTHON" -m benchmarks.gpu.network_step --smoke --batches 2 4 --json "$WORK/network-smoke.json"
    return $?
  fi
  for model in "${NETWORK_MODELS[@]}"; do  # one process per model: a crash or timeout costs one model
    # shellcheck disable=SC2086
    "$PYTHON" -m benchmarks.gpu.network_step --models "$model" --batches 2 32 --repeats 3 ${GPU_CHECK_NETWORK_ARGS:-} \
      --json "$WORK/network-$model.json" || status=1
  done
  return $status
}

step_ncu() {
  local status=0 variant metrics="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum"
  command -v ncu > /dev/null || { echo "ncu not on PATH"; return 1; }
  mkdir -p "$WORK/ncu"
  for variant in bn bkn; do
    ncu --profile-from-start off --clock-control none --csv --page raw --print-units base --metrics "$metrics" \
      --log-file "$WORK/ncu/$variant.csv" "$PYTHON" -m benchmarks.gpu.ncu_kernels target --variant "$variant" \
      || status=1
  done
  "$PYTHON" -m benchmarks.gpu.ncu_kernels parse "$WORK/ncu" --json "$WORK/ncu.json" || status=1
  return $status
}

# ------------------------------------------------------------------ driver

dry_run() {
  local missing=0 step file tool
  echo "gpu_check --dry-run: repository $ROOT"
  echo "steps (limit s; total budget ${GPU_CHECK_BUDGET_S:-480} s):"
  for step in "${SELECTED[@]}"; do echo "  $step (${LIMIT[$step]} s)"; done
  [[ -z $ONLY ]] && echo "  optional, with --only: ${OPTIONAL_STEPS[*]}"
  echo "  summary -> \$OUT/summary.md, \$OUT/gpu-check-details.tar.gz"
  for file in "${REQUIRED_FILES[@]}"; do
    if [[ -f "$ROOT/$file" ]]; then echo "present  $file"; else echo "MISSING  $file"; missing=1; fi
  done
  if [[ -f "$TENSORRT_INCLUDE/NvInferRuntime.h" && -f "$TENSORRT_INCLUDE/NvInferImpl.h" ]]; then
    echo "present  TensorRT headers $TENSORRT_INCLUDE ($(du -sh "$TENSORRT_INCLUDE" | cut -f1)); the device call needs" \
      "carry: [\"third_party/TensorRT/include\"]"
  else
    echo "absent   TensorRT headers $TENSORRT_INCLUDE: the plugin step will fail; copy NVIDIA/TensorRT's include/" \
      "there and carry it (docs/gpu-check.md)"
  fi
  for tool in "${TOOLS[@]}"; do
    if command -v "$tool" > /dev/null; then echo "tool     $tool"; else echo "no tool  $tool (needed on the GPU machine)"; fi
  done
  if ! "$PYTHON" -m py_compile "$ROOT"/benchmarks/bench_kernels.py "$ROOT"/benchmarks/gpu/*.py; then
    echo "a benchmark script does not compile"; missing=1
  fi
  if [[ $missing -ne 0 ]]; then echo "gpu_check --dry-run: files missing or broken"; return 1; fi
  echo "gpu_check --dry-run: ok"
  return 0
}

run_step() {  # run_step NAME: time it under its timeout, record one line in steps.tsv
  local step=$1 now elapsed left limit start rc status note=""
  now=$(date +%s)
  elapsed=$((now - T0))
  left=$((BUDGET - elapsed))
  limit=${LIMIT[$step]}
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    printf '%s\tskipped\t0\t-\tbudget exhausted (%s of %s s used)\n' "$step" "$elapsed" "$BUDGET" >> "$WORK/steps.tsv"
    echo "== $step: skipped, budget exhausted"
    return 0
  fi
  echo "== $step (limit ${limit} s)"
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" bash "$SELF" --run-step "$step" > "$WORK/logs/$step.log" 2>&1
  rc=$?
  local seconds
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout; note="killed after ${limit} s" ;;
    *) status=failed; note="exit $rc" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$step" "$status" "$seconds" "$rc" "$note" >> "$WORK/steps.tsv"
  tail -n 25 "$WORK/logs/$step.log"
  echo "== $step: $status ($seconds s)"
  [[ $status == ok ]]
}

summarize() {
  local summary="$OUT/summary.md"
  if ! timeout 60 "$PYTHON" -m benchmarks.gpu.summarize "$WORK" --command "$COMMAND" > "$summary" 2> "$WORK/logs/summary.log"; then
    { echo "## GPU check (benchmarks/gpu_check.sh)"; echo; echo "summarize.py failed (see logs/summary.log); steps:";
      echo; echo '```'; cat "$WORK/steps.tsv"; echo '```'; } > "$summary"
  fi
  cp "$summary" "$WORK/summary.md"
  tar -czf "$OUT/gpu-check-details.tar.gz" -C "$WORK" --exclude=./scratch .
  cat "$summary"
  echo
  echo "gpu_check: $summary and $OUT/gpu-check-details.tar.gz (total $(($(date +%s) - T0)) s)"
}

main() {
  local only="" dry=0
  while (($#)); do
    case $1 in
      --only) only=${2:-}; shift 2 || { echo "--only needs a step" >&2; exit 2; } ;;
      --only=*) only=${1#--only=}; shift ;;
      --dry-run) dry=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --run-step)
        # internal: one step in a child process (so that `timeout` can kill it and its children)
        cd "$ROOT" || exit 2
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        "step_$2"
        exit $? ;;
      *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
  done
  SELECTED=("${STEPS[@]}")
  ONLY=$only
  if [[ -n $only ]]; then
    IFS=, read -r -a SELECTED <<< "$only"
    local step
    for step in "${SELECTED[@]}"; do
      [[ -n $step && -n ${LIMIT[$step]+x} ]] \
        || { echo "gpu_check: unknown step '$step' (steps: ${STEPS[*]} ${OPTIONAL_STEPS[*]})" >&2; exit 2; }
    done
  fi
  if ((dry)); then
    dry_run
    exit $?
  fi
  if [[ $SMOKE != 1 ]] && { ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L 2> /dev/null | grep -q "^GPU"; }; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or lists no GPU); nothing run. This script is for a" \
      "machine with a GPU; on a CPU machine use --dry-run (docs/gpu-check.md)." >&2
    exit 2
  fi
  OUT=${OUT:-./gpu-check-out}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
  mkdir -p "$WORK/logs" "$WORK/scratch"
  BUDGET=${GPU_CHECK_BUDGET_S:-480}
  COMMAND="benchmarks/gpu_check.sh${only:+ --only $only}"
  T0=$(date +%s)
  export WORK PYTHON TENSORRT_INCLUDE KERNEL_BATCHES CUDA_ARCH
  [[ $SMOKE == 1 ]] && echo "gpu_check: GPU_CHECK_SMOKE=1: a CPU check of the script itself; its figures mean nothing"
  cd "$ROOT" || exit 2
  echo "gpu_check: steps ${SELECTED[*]}; budget $BUDGET s; work $WORK; out $OUT"
  local failed=0 step
  for step in "${SELECTED[@]}"; do
    run_step "$step" || failed=1
  done
  summarize
  exit $failed
}

main "$@"
