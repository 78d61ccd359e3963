#!/usr/bin/env bash
# The GPU work of issue #6 (Table 6 at the paper's 64k iterations, and its speed), prepared so
# that a session lent a device machine spends its 15 minutes on measuring, not on debugging.
#
# CIFAR-10 (~178 MB) travels in three parts, each under the 64 MiB a call may carry, in three
# back-to-back calls (the machine keeps carried paths while warm, ~30 s after a call):
#
#   here:     bash scripts/gpu_session.sh pack ../shared/data    # .gpudata/p1, p2, p3 + sums
#   device 1: carry [".gpudata/p1"]  bash scripts/gpu_session.sh probe
#   device 2: carry [".gpudata/p2"]  bash scripts/gpu_session.sh compile
#   device 3: carry [".gpudata/p3"]  bash scripts/gpu_session.sh table6    # runs <= TL s each
# (Never run on a GPU yet: time the first call and give the later ones a timeout_s from it.)
#
# probe: the card, its bf16 matmul peak, and benchmarks/bench_gpu.py's eager/graph step times
#   for ResNet-20..110, plus all five at once with and without CUDA MPS (no data needed:
#   synthetic images time the same; the trainer itself first meets the GPU in `table6`).
# compile: bench_gpu.py's torch.compile paths for ResNet-20 and ResNet-110.
# fused: benchmarks/bench_fused.py, K=2 and 5 seeds as one grouped net vs one after another
#   (ResNet-20/56/110, synthetic images; goal: 5 seeds in at most 2x one seed's time). Its
#   result decides fused_runs.FUSED_MAX_K["cuda"] (reproduce --fused auto).
# table6: assembles and checks the data, then `reslab reproduce table6 --budget full` on
#   ResNet-20..110 (1202 left out), JOBS at a time, each run stopped after TL seconds of
#   training if not done (marked STOPPED in the report; the next call on the same warm machine
#   resumes it from its checkpoint), and packs
#   the report, figures and run logs (no checkpoints) into $OUT/table6-full.tgz.
# Settings by environment: MODE (compile mode, default reduce-overhead; "none": eager), JOBS (5),
# TL (seconds per run, 420), BUDGET (full; smoke to try this on a CPU), DEVICE (cuda), MPS (1:
# run the jobs under CUDA MPS; probe measures the five at once with and without it); GPUDATA
# (.gpudata), RESULTS (results), RUNS (runs/gpu): where the data parts, report and runs live.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:?usage: scripts/gpu_session.sh pack DATA_DIR | probe | compile | fused | table6}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
GPUDATA=${GPUDATA:-.gpudata} RESULTS=${RESULTS:-results} RUNS=${RUNS:-runs/gpu}
DEVICE=${DEVICE:-cuda}
FILES="data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch batches.meta"

# CUDA MPS lets the kernels of several processes (the --jobs runs) run at once instead of
# time-slicing the GPU between their contexts.
mps_on() {
    command -v nvidia-cuda-mps-control >/dev/null || { echo "no nvidia-cuda-mps-control"; return 1; }
    nvidia-cuda-mps-control -d && echo "CUDA MPS started" && trap mps_off EXIT
}
mps_off() { echo quit | nvidia-cuda-mps-control || true; }

card() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "no nvidia-smi (device $DEVICE)"
    fi
    "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
}

case "$PHASE" in
pack)
    src=${2:?give the directory holding cifar-10-batches-py}/cifar-10-batches-py
    for f in $FILES; do [ -f "$src/$f" ] || { echo "missing $src/$f" >&2; exit 1; }; done
    if [ "$GPUDATA" = .gpudata ]; then  # ignored by git, so it travels only when carried
        exclude=$(git rev-parse --git-path info/exclude)
        mkdir -p "$(dirname "$exclude")"
        grep -qx '/.gpudata/' "$exclude" 2>/dev/null || echo '/.gpudata/' >>"$exclude"
    fi
    rm -rf "$GPUDATA" && mkdir -p "$GPUDATA"/p1 "$GPUDATA"/p2 "$GPUDATA"/p3
    cp "$src"/data_batch_1 "$src"/data_batch_2 "$GPUDATA"/p1/
    cp "$src"/data_batch_3 "$src"/data_batch_4 "$GPUDATA"/p2/
    cp "$src"/data_batch_5 "$src"/test_batch "$src"/batches.meta "$GPUDATA"/p3/
    (cd "$src" && sha256sum $FILES) >"$GPUDATA"/p3/SHA256SUMS
    du -sh "$GPUDATA"/p1 "$GPUDATA"/p2 "$GPUDATA"/p3
    ;;
probe)
    { card
      (cd benchmarks && "$PY" bench_gpu.py --synthetic --device "$DEVICE" \
        --paths reference,eager,graph --concurrent 5 --concurrent-path eager)
      if mps_on; then
          (cd benchmarks && "$PY" bench_gpu.py --synthetic --device "$DEVICE" --paths "" \
            --concurrent 5 --concurrent-path eager)
      fi; } 2>&1 | tee "$OUT/probe.txt"
    ;;
compile)
    (cd benchmarks && "$PY" bench_gpu.py --synthetic --device "$DEVICE" --depths 20,110 \
        --paths eager,compile,cudagraph) 2>&1 | tee "$OUT/compile.txt"
    ;;
fused)
    (cd benchmarks && "$PY" bench_fused.py --synthetic --device "$DEVICE" --conv \
        --models resnet20,resnet56,resnet110 --ks 2,5 --steps 30 --warmup 5 --repeats 3 \
        --json "$OUT/bench_fused.json") 2>&1 | tee "$OUT/fused.txt"
    ;;
table6)
    data=$GPUDATA/cifar-10-batches-py
    mkdir -p "$data"
    for f in $FILES; do
        part=
        for p in p1 p2 p3; do [ -f "$GPUDATA/$p/$f" ] && part=$(realpath "$GPUDATA/$p/$f"); done
        [ -n "$part" ] || { echo "missing $f: carry $GPUDATA/p1, p2, p3 in turn" >&2; exit 1; }
        ln -sf "$part" "$data/$f"
    done
    sums=$(realpath "$GPUDATA/p3/SHA256SUMS")
    (cd "$data" && sha256sum -c --quiet "$sums") || {
        echo "CIFAR-10 parts do not match $GPUDATA/p3/SHA256SUMS: pack and carry them again" >&2
        exit 1; }
    MODE=${MODE:-reduce-overhead} JOBS=${JOBS:-5} TL=${TL:-420} BUDGET=${BUDGET:-full}
    compile=(--compile-mode "$MODE"); [ "$MODE" = none ] && compile=()
    only=resnet20-s0,resnet32-s0,resnet44-s0,resnet56-s0,resnet110-s0
    [ "$BUDGET" = full ] || only=resnet20-s0,resnet32-s0
    res=$RESULTS/table6-$BUDGET
    [ "${MPS:-0}" = 1 ] && mps_on
    cmd=(reproduce table6 --budget "$BUDGET" --only "$only" --jobs "$JOBS" "${compile[@]}"
         --time-limit "$TL" --device "$DEVICE" --data "$GPUDATA" --out "$res" --runs "$RUNS")
    { card; echo "+ reslab ${cmd[*]}"; time "$PY" -m reslab "${cmd[@]}" --quiet; } 2>&1 |
        tee "$OUT/table6.log"
    # The report, figures, configs and logs come back; checkpoints (*.pt) stay.
    tar czf "$OUT/table6-$BUDGET.tgz" --exclude='*.pt' $(ls -d "$res" "$RUNS" 2>/dev/null)
    ls -la "$OUT"
    ;;
*)
    echo "unknown phase $PHASE" >&2
    exit 2
    ;;
esac
