#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine with torch and Triton installed:
#   bash scripts/gpu_check.sh OUT_DIR [stage ...]
# stages (default: all, in this order):
#   tests        the test suite on the GPU (Triton kernels on CUDA tensors), junit XML + log
#   ops          bench_masked_norm, bench_window_attention, bench_sparse_conv (bf16, published shapes)
#   models       bench_s3d (ResEnc-L 160^3 b2), bench_bertswin (224^3 b2), bench_swinunetr (MONAI
#                SwinUNETR encoder, 96^3 b2; needs MONAI), bf16 autocast
#   convergence  bench/convergence.py's GPU analogue (BertsWin vs ViT-MAE, CSV + PNG + JSON)
# Each stage runs under its own time limit (seconds; MAE3D_LIMIT_<STAGE>, e.g.
# MAE3D_LIMIT_TESTS=300) so one slow stage cannot eat the others; its log and the benchmark CSV
# (OUT_DIR/gpu.csv) are written as it goes. Extra pytest arguments: MAE3D_PYTEST_ARGS.
# The project is used from this checkout (PYTHONPATH); build the native CPU extension first
# (pip install --no-deps --no-build-isolation -e .) if the CPU-kernel tests should run too.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [tests|ops|models|convergence ...]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests ops models convergence)
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
csv="$out/gpu.csv"
status=0

limit() {  # limit STAGE DEFAULT
    local var="MAE3D_LIMIT_${1^^}"
    echo "${!var:-$2}"
}

run() {  # run STAGE LOG CMD...: time-limited, appended to LOG, failure recorded, never fatal
    local stage=$1 log=$2
    shift 2
    local t0=$SECONDS
    echo "=== $stage: $*" | tee -a "$log"
    timeout --signal=INT --kill-after=20 "$(limit "$stage" 600)" "$@" >>"$log" 2>&1
    local rc=$?
    echo "=== $stage: rc $rc after $((SECONDS - t0)) s" | tee -a "$log"
    [ $rc -ne 0 ] && status=1
    return 0
}

"$py" -m mae3d.env >"$out/env.txt" 2>&1
nvidia-smi >>"$out/env.txt" 2>&1 || true

for stage in "${stages[@]}"; do
    case $stage in
    tests)
        # shellcheck disable=SC2086
        run tests "$out/tests.log" "$py" -m pytest -q -rfE -p no:cacheprovider \
            --junitxml="$out/tests.xml" ${MAE3D_PYTEST_ARGS:-}
        ;;
    ops)
        for b in masked_norm window_attention sparse_conv; do
            run ops "$out/ops.log" "$py" bench/bench_$b.py --out "$csv"
        done
        ;;
    models)
        for b in s3d bertswin swinunetr; do
            run models "$out/models.log" "$py" bench/bench_$b.py --out "$csv"
        done
        ;;
    convergence)
        run convergence "$out/convergence.log" "$py" bench/convergence.py --out "$out"
        ;;
    *)
        echo "unknown stage '$stage' (expected tests, ops, models or convergence)" >&2
        exit 2
        ;;
    esac
done
exit $status
