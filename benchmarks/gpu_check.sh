#!/usr/bin/env bash
# The GPU check: CUDA tests, agreement with the CPU and torchvision, throughput and where the time
# goes, on one GPU machine in a few minutes. Installs nothing: it needs torch, torchvision, numpy,
# pillow, click and pytest, and runs the project from this checkout (PYTHONPATH).
#
#     bash benchmarks/gpu_check.sh            # or: make gpu-check
#
# Everything it prints also lands in $OUT (or ./gpu-check/) as one log per step.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-gpu-check}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: runs, logs, remembers failure, never stops the check
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
    summary+=("$name: exit $rc, $((SECONDS - start)) s")
}
summary=()

step env "$PY" -c "import torch, torchvision, sys; print(sys.version.split()[0], 'torch', torch.__version__, \
'torchvision', torchvision.__version__); print(torch.cuda.get_device_name(0), \
f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
step cuda-tests "$PY" -m pytest -q -m cuda -p no:cacheprovider -s tests/test_cuda.py tests/test_codecs.py
step decode "$PY" benchmarks/decode.py --count 64
step throughput "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --save-dtype float16 \
    --size 800x1333 --small 48 --large 160 --writers 1,4 --out-dir "${BENCH_DIR:-/tmp}"
# issue 22: int8 against float16, images/s to the disk and to RAM, beside the bare forward
step savedtypes-disk "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --save-dtype float16,int8 \
    --size 800x1333 --small 48 --large 160 --cli-only --out-dir "${BENCH_DIR:-/tmp}"
step savedtypes-shm "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --save-dtype float16,int8 \
    --size 800x1333 --small 48 --large 160 --cli-only --out-dir /dev/shm

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
grep -h -E "passed|failed|error" "$LOGS/cuda-tests.log" | tail -1
grep -h -E "img/s|/ |writers|RSS|error|where the time|bytes written|nvJPEG|Pillow|gpu " "$LOGS/throughput.log" "$LOGS/decode.log"
for where in disk shm; do
    echo "--- save dtypes, $where"
    grep -h -E "img/s|/ |writes to" "$LOGS/savedtypes-$where.log"
done
exit $status
