#!/usr/bin/env bash
# Run ON the lent GPU machine, from the repo root, with .whl carried (benchmarks/device_wheels.sh made it):
#   bash benchmarks/gpu_device.sh tests              # the CUDA tests + the accel/solver CPU-path tests   (~3 min)
#   bash benchmarks/gpu_device.sh bench [ARGS...]    # benchmarks/gpu.py ARGS --profile, JSON and logs to $OUT
# Installs the carried wheels into /tmp/site (nothing is fetched there), then runs; results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/reflow-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
what=${1:-tests}
shift || true
case "$what" in
    tests)
        python3 -m pytest -q -p no:cacheprovider tests/core/test_gpu.py tests/core/test_accel.py tests/core/test_core_math.py \
            tests/core/test_nets.py 2>&1 | tee "$OUT/gpu_tests.log"
        exit "${PIPESTATUS[0]}" ;;
    bench)
        python3 benchmarks/gpu.py --json "$OUT/gpu.json" --profile "$OUT/prof" "$@" 2>&1 | grep -v '^USDT:' \
            | tee "$OUT/gpu_bench.log"
        exit "${PIPESTATUS[0]}" ;;
    *)
        echo "usage: $0 tests | bench [gpu.py args]" >&2; exit 2 ;;
esac
