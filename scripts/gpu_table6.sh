#!/usr/bin/env bash
# Issue 19's GPU session: Table 6 at the paper's 64k iterations on one card (it needs issue 14's
# fixes, which scripts/gpu_check.sh proved in session 9, and the real CIFAR-10). One 15-minute
# lease holds the staging calls and one table6 call of at most 600 s: not all five depths at 64k
# (~40 min one after another); choose what finishes with ONLY (README, GPU sessions).
#
# CIFAR-10 (178 MB) travels losslessly in parts that each fit one call beside the working tree (a
# call carries 64 MiB with the repository; pack prints how many: 3 with session 43's 22.5 MiB
# tree), packed by scripts/cifar_parts.py (prediction residuals + xz; measured in README "GPU
# sessions"), one part per call; the machine keeps ignored paths while warm:
#
#   here:     bash scripts/gpu_table6.sh pack ../shared/data    # .gpudata/p1..pN (+ SHA256SUMS)
#   device 1: carry [".gpudata/p1"]  bash scripts/gpu_table6.sh stage    # unpacks and checks p1
#   ...       (the same for p2..pN-1)
#   device N: carry [".gpudata/pN"]  bash scripts/gpu_table6.sh table6   # pN, all sums, trains
#
# stage/table6 rebuild each file and check its SHA-256 before anything trains; table6 refuses to
# start unless all seven files are there and match. It then runs `reslab reproduce table6
# --budget full` on ResNet-20..110 (1202 left out), JOBS at a time, each run stopped after TL
# seconds of training if not done (marked STOPPED in the report; the next call resumes it from
# its checkpoint), and packs the report, figures and run logs (no checkpoints) into
# $OUT/table6-full.tgz.
# Settings by environment: MODE (compile mode, default reduce-overhead; "none": eager), JOBS (5),
# TL (seconds per run, 420), BUDGET (full; smoke to try this on a CPU), DEVICE (cuda), MPS (0; 1:
# run the jobs under CUDA MPS when nvidia-cuda-mps-control exists, never fatal when it does not);
# ONLY (the runs to train, e.g. resnet20-s0,resnet32-s0: all five depths at 64k need ~40 min of an
# H200 one after another at session 9's step times, more than a 15-minute lease);
# GPUDATA (.gpudata), RESULTS (results), RUNS (runs/gpu): where the parts, report and runs live;
# PRESET (xz preset for pack; default -9e).
# fused (issue 18, needs no data): benchmarks/bench_fused.py, K=2 and 5 seeds as one grouped net
#   vs one after another (ResNet-20/56/110, synthetic images; goal: 5 seeds in at most 2x one
#   seed's time). Its result decides fused_runs.FUSED_MAX_K["cuda"] (reproduce --fused auto).
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:?usage: scripts/gpu_table6.sh pack DATA_DIR | stage | table6 | fused}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
GPUDATA=${GPUDATA:-.gpudata} RESULTS=${RESULTS:-results} RUNS=${RUNS:-runs/gpu}
DEVICE=${DEVICE:-cuda}

mps_on() {  # CUDA MPS runs the kernels of the --jobs processes at once instead of time-slicing
    if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
        echo "CUDA MPS started"
        trap 'echo quit | nvidia-cuda-mps-control || true' EXIT
    else
        echo "CUDA MPS not available: the jobs share the card by time-slicing"
    fi
}

card() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "no nvidia-smi (device $DEVICE)"
    fi
    "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
}

parts() { ls -d "$GPUDATA"/p[0-9]* 2>/dev/null || true; }

some_part() {  # stage/table6 with no part carried: one line, not cifar_parts' usage message
    [ -n "$(parts)" ] && return
    echo "no part under $GPUDATA: carry one part made by \`pack\` with each call ($1)" >&2
    exit 1
}

case "$PHASE" in
pack)
    src=${2:?give the directory holding cifar-10-batches-py}
    if [ "$GPUDATA" = .gpudata ]; then  # ignored by git, so it travels only when carried
        exclude=$(git rev-parse --git-path info/exclude)
        mkdir -p "$(dirname "$exclude")"
        grep -qx '/.gpudata/' "$exclude" 2>/dev/null || echo '/.gpudata/' >>"$exclude"
    fi
    rm -rf "$GPUDATA" && mkdir -p "$GPUDATA"
    # A call carries the working tree (tracked and untracked-not-ignored files) and one part,
    # 64 MiB together: a part gets what the tree leaves, less 2 MiB for what is added before the
    # calls. (Session 43: the tree was 22.5 MiB, so two parts of 49.3 MiB no longer fit a call.)
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null |
        awk '{s += $1} END {print s + 0}')
    limit=$(( 64 * 1048576 - tree - 2 * 1048576 ))
    echo "the working tree that travels with each part: $tree bytes; a part may hold $limit"
    "$PY" scripts/cifar_parts.py pack "$src" "$GPUDATA" --limit "$limit" ${PRESET:+--preset "$PRESET"}
    n=$(ls -d "$GPUDATA"/p[0-9]* | wc -l)
    echo "$n parts: one device call each, in order; p1..p$((n - 1)) with \`stage\`, p$n with \`table6\`"
    echo "(carry [\"$GPUDATA/pK\"]; the staged files stay on the machine while it is warm)"
    ;;
stage)
    some_part "stage"
    # shellcheck disable=SC2046
    "$PY" scripts/cifar_parts.py unpack --partial $(parts) "$GPUDATA"
    ;;
table6)
    some_part "table6"
    # shellcheck disable=SC2046
    "$PY" scripts/cifar_parts.py unpack $(parts) "$GPUDATA" || {
        echo "CIFAR-10 is not complete and checked under $GPUDATA: stage every part first" >&2
        exit 1; }
    MODE=${MODE:-reduce-overhead} JOBS=${JOBS:-5} TL=${TL:-420} BUDGET=${BUDGET:-full}
    compile=(--compile-mode "$MODE"); [ "$MODE" = none ] && compile=()
    only=resnet20-s0,resnet32-s0,resnet44-s0,resnet56-s0,resnet110-s0
    [ "$BUDGET" = full ] || only=resnet20-s0,resnet32-s0
    only=${ONLY:-$only}
    res=$RESULTS/table6-$BUDGET
    [ "${MPS:-0}" = 1 ] && mps_on
    cmd=(reproduce table6 --budget "$BUDGET" --only "$only" --jobs "$JOBS" "${compile[@]}"
         --time-limit "$TL" --device "$DEVICE" --data "$GPUDATA" --out "$res" --runs "$RUNS")
    # JOBS concurrent compiles: one compile thread pool each, sized to share the cores.
    export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
    { card; echo "+ reslab ${cmd[*]}"; time "$PY" -m reslab "${cmd[@]}" --quiet; } 2>&1 |
        tee "$OUT/table6.log"
    # The report, figures, configs and logs come back; checkpoints (*.pt) stay.
    tar czf "$OUT/table6-$BUDGET.tgz" --exclude='*.pt' $(ls -d "$res" "$RUNS" 2>/dev/null)
    ls -la "$OUT"
    ;;
fused)
    card | tee "$OUT/fused.txt"
    (cd benchmarks && "$PY" bench_fused.py --synthetic --device "$DEVICE" --conv \
        --models resnet20,resnet56,resnet110 --ks 2,5 --steps 30 --warmup 5 --repeats 3 \
        --json "$OUT/bench_fused.json") 2>&1 | tee -a "$OUT/fused.txt"
    ;;
*)
    echo "unknown phase $PHASE: use pack DATA_DIR, stage or table6" >&2
    exit 2
    ;;
esac
