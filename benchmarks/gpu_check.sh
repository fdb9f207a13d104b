#!/usr/bin/env bash
# Validate the whole CUDA path on one GPU in one call (sized for < 8 minutes on one H200):
#   lane 1: tests/kernels (the Triton kernels compiled for the GPU against their naive twins, the torch path on
#           the GPU), then benchmarks/kernel_ops.py (apply/write/apply_write vs torch baselines at real shapes);
#   lane 2: tests/core with ADAPT_TEST_DEVICE=cuda (the runtime on the GPU; batched rows use the Triton kernels,
#           which impl="auto" picks on CUDA);
#   lane 3: tests/serving with ADAPT_TEST_DEVICE=cuda (every test server started with --device cuda).
# The lanes run side by side, each under its own time limit; logs, JUnit XML and the benchmark JSON go to $OUT
# (default ./gpu_check_out). Exits non-zero if a lane failed or ran out of time.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, in the project's environment
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export ADAPT_TEST_DEVICE=${ADAPT_TEST_DEVICE:-cuda}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (or this environment has no torch); nothing to check" >&2
    exit 2
fi
python -c "import torch, triton; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee "$OUT/device.txt"

lane() {  # lane NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $OUT/NAME.log, record its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit" >"$OUT/$name.status"
    return $rc
}

PYTEST=(python -m pytest -q -p no:cacheprovider -rfEs)
(
    lane kernels-tests 150 "${PYTEST[@]}" tests/kernels --junitxml="$OUT/kernels.xml"
    lane kernels-bench 150 python benchmarks/kernel_ops.py --reps 5 --warmup 2 --no-compile --out "$OUT/kernels.json"
) &
lane core-tests 420 "${PYTEST[@]}" tests/core --junitxml="$OUT/core.xml" &
lane serving-tests 420 "${PYTEST[@]}" tests/serving --junitxml="$OUT/serving.xml" &
wait

failed=0
for name in kernels-tests kernels-bench core-tests serving-tests; do
    status=$(cat "$OUT/$name.status" 2>/dev/null || echo "$name rc=missing")
    echo "gpu_check: $status"
    tail -n 3 "$OUT/$name.log" 2>/dev/null | sed "s/^/    /"
    case $status in *" rc=0 "*) ;; *) failed=1 ;; esac
done
# the kernels run compiled on the GPU: their CUDA tests must have run, not skipped
if grep -q "needs CUDA" "$OUT/kernels-tests.log" 2>/dev/null; then
    echo "gpu_check: the CUDA kernel tests were skipped" >&2
    failed=1
fi
exit $failed
