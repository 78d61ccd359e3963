#!/usr/bin/env bash
# Issue 14's proof on a real card in ONE call of at most 6 minutes, needing only the repository
# (no data carried: a CIFAR-shaped synthetic set is written on the machine):
#
#   device: run  command="bash scripts/gpu_check.sh"  timeout_s=420
#
# Steps, each bounded by what is left of DEADLINE seconds; every file lands in $OUT as the
# step runs, so a call killed at its limit still returns what finished (8 files at most):
#   card.txt           GPU name, memory, driver, torch/torchvision/python versions
#   cuda-tests.txt     pytest -m gpu tests/cuda (issue 14's on-card proofs)
#   bench-eager.txt    bench_gpu.py, ResNet-20/56/110: eager bf16 and the whole-step CUDA graph
#   bench-compile.txt  the same nets under torch.compile: default and reduce-overhead
#   bench-shared.txt   the three depths at once in three processes (under CUDA MPS if MPS=1
#                      and nvidia-cuda-mps-control exists; without it otherwise, never fatal)
#   bench.jsonl        every bench row as JSON (ms/step, img/s, fraction of the measured
#                      bf16 matmul peak), appended as each is measured
#   steps.txt          each step's exit status and seconds
#   check.log          everything above, in order
# cudnn.benchmark is on in every bench path (bench_gpu.py sets it, as the trainer does).
#
# Settings by environment (tiny values let tests/scripts/test_gpu_check.py run it on a CPU):
#   OUT (/tmp/gpu-check), PY (python3), DEVICE (cuda), DEADLINE (330 s), DEPTHS (20,56,110),
#   STEPS (60), WARMUP (15), BATCH (128, section 4.2), EAGER_PATHS (eager,graph), COMPILE_PATHS (compile,cudagraph;
#   empty: skipped), SHARED (1: run the shared step), MPS (1), SYNTH_PER_BATCH (10000),
#   TESTS (1; 0 skips the cuda tests, e.g. in a second call that finishes the bench),
#   TESTS_BUDGET (170 s at most for the cuda tests).
# Priority when time runs short: the card, the tests, eager/graph, then the compiled paths
# depth by depth (20, 56, 110; each row kept as it is measured), then the shared step.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu-check}
PY=${PY:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the bench steps run from benchmarks/
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-330}
DEPTHS=${DEPTHS:-20,56,110}
STEPS=${STEPS:-60}
WARMUP=${WARMUP:-15}
BATCH=${BATCH:-128}
BENCH_ARGS=${BENCH_ARGS:-}  # more bench_gpu.py options (tests: fewer images, a shorter peak)
EAGER_PATHS=${EAGER_PATHS-eager,graph}
COMPILE_PATHS=${COMPILE_PATHS-compile,cudagraph}
SHARED=${SHARED:-1}
MPS=${MPS:-1}
TESTS_BUDGET=${TESTS_BUDGET:-170}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RESLAB_DATA=${RESLAB_DATA:-/tmp/gpu-check-data}
LOG=$OUT/check.log

left() { echo $((DEADLINE - ($(date +%s) - T0))); }

# step NAME FILE SECONDS CMD...: runs CMD under `timeout` (at most SECONDS and what is left),
# its output into FILE as it comes; the status goes to steps.txt when it ends.
step() {
    local name=$1 file=$2 want=$3
    shift 3
    local budget
    budget=$(left)
    [ "$want" -lt "$budget" ] && budget=$want
    if [ "$budget" -lt 10 ]; then
        echo "$name: skipped, ${budget}s left of DEADLINE=${DEADLINE}s" | tee -a "$OUT/steps.txt" "$LOG"
        return 0
    fi
    local t=$(date +%s) rc
    echo "== $name (at most ${budget}s): $*" | tee -a "$LOG"
    # bash -c: the step may be one of the functions below (exported); timeout signals the
    # whole process group, so the python processes under it stop too.
    timeout --kill-after=5 "$budget" bash -c '"$@"' step "$@" 2>&1 | tee "$OUT/$file" >>"$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && rc="124 (stopped at its ${budget}s limit)"
    echo "$name: exit $rc after $(($(date +%s) - t))s" | tee -a "$OUT/steps.txt" "$LOG"
}

card() {
    date -u +"start %Y-%m-%dT%H:%M:%SZ"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    else
        echo "no nvidia-smi (device $DEVICE)"
    fi
    "$PY" -c 'import platform, torch, torchvision
print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision",
      torchvision.__version__, "python", platform.python_version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"cc {p.major}.{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB", "bf16 native:",
          torch.cuda.is_bf16_supported(including_emulation=False))'
    "$PY" scripts/cifar_parts.py synthetic "$RESLAB_DATA" --per-batch "$SYNTH_PER_BATCH"
}

bench() {  # bench PATHS [extra args]: ResNet-$DEPTHS on synthetic CIFAR-shaped batches
    local paths=$1
    shift
    (cd benchmarks && "$PY" bench_gpu.py --synthetic --device "$DEVICE" --depths "$DEPTHS" \
        --steps "$STEPS" --warmup "$WARMUP" --batch "$BATCH" --paths "$paths" \
        --out "$OUT/bench.jsonl" $BENCH_ARGS "$@")
}

shared() {
    local mps=0
    if [ "$MPS" = 1 ]; then
        if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
            mps=1
            trap 'echo quit | nvidia-cuda-mps-control' EXIT
            echo "CUDA MPS started"
        else
            echo "CUDA MPS not available here: the processes share the card by time-slicing"
        fi
    fi
    local k
    k=$(echo "$DEPTHS" | tr ',' '\n' | grep -c .)
    local wait=$(($(left) - 5))
    [ "$wait" -lt 5 ] && wait=5
    bench "" --concurrent "$k" --concurrent-path eager --worker-timeout "$wait"
}
export -f left card bench shared
export OUT PY DEVICE DEADLINE DEPTHS STEPS WARMUP BATCH BENCH_ARGS MPS T0 SYNTH_PER_BATCH=${SYNTH_PER_BATCH:-10000}

: >"$OUT/steps.txt"
: >"$LOG"
step card card.txt 60 card
[ "${TESTS:-1}" = 1 ] && step cuda-tests cuda-tests.txt "$TESTS_BUDGET" \
    "$PY" -m pytest -m gpu tests/cuda -v -rfEs --durations=0 -p no:cacheprovider
[ -n "$EAGER_PATHS" ] && step bench-eager bench-eager.txt 90 bench "$EAGER_PATHS"
[ -n "$COMPILE_PATHS" ] && step bench-compile bench-compile.txt 240 bench "$COMPILE_PATHS"
[ "$SHARED" = 1 ] && step bench-shared bench-shared.txt 60 shared
echo "done in $(($(date +%s) - T0))s of DEADLINE=${DEADLINE}s" | tee -a "$OUT/steps.txt" "$LOG"
