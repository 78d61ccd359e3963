#!/usr/bin/env bash
# Issue 17's measurements for one CPU kind, in one command, so that a session on a kind not
# measured lately records all of it side by side in one sitting (AMD Zen 4 in session 12, Intel
# Xeon with AMX in 14, AMD Zen 5 in 44: results/cpu-kind/). Run it on a quiet machine: no helper,
# no other job.
#
#   bash scripts/cpu_kind_check.sh ../shared/data            # about 6-8 min on 2 cores
#   RECIPE=1 bash scripts/cpu_kind_check.sh ../shared/data   # + the ResNet-20 time goal (6-20 min)
#
# Writes, step by step (a step that fails is recorded and the next one runs):
#   cpu.txt             lscpu's model, vendor, bf16/AMX flags; torch's ISA; load average
#   train-r20-b128.txt  bench_train.py, ResNet-20, batch 128 (section 4.2): reference eager fp32
#   train-r20-b256.txt  vs reslab's default vs --compile; ratios, fraction of the measured bf16
#   train-r56-b128.txt  peak, what 4x would need of that peak, the profile, the conv-only ceiling
#   sizes.txt           bench_sizes.py: img/s at 32/28/24/20 (what progressive resizing buys)
#   compile-r20.txt     bench_compile.py --sizes 24 32 --static: does compile repay itself in
#                       the progressive order on this kind (on AMD: x1.02-1.08, it stays off)
#   recipe/             RECIPE=1: `reslab train --recipe cifar10-progressive --seed 0`, with
#                       wall.txt (seconds from the command to its exit); goal 91.25% in 20 min
#   steps.txt           each step's exit status and seconds
# Settings by environment: OUT (results/cpu-kind/<vendor>-<bf16 kind>-<date>), PY (python3),
# STEPS (30, bench_train's timed steps), ROUNDS (4) and RSTEPS (8, the round benchmarks),
# MODELS56 (1: also ResNet-56), RECIPE (0). Tiny values are for trying the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/cpu_kind_check.sh DATA_DIR   (the directory holding cifar-10-batches-py)}
[ -d "$DATA/cifar-10-batches-py" ] || {
    echo "cpu_kind_check: $DATA/cifar-10-batches-py not found: pass the directory that holds it" >&2
    exit 2; }
DATA=$(cd "$DATA" && pwd)
PY=${PY:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # benches run from benchmarks/
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=${STEPS:-30} ROUNDS=${ROUNDS:-4} RSTEPS=${RSTEPS:-8}

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
vendor=$(grep -m1 '^vendor_id' /proc/cpuinfo 2>/dev/null | awk '{print $NF}')
case $vendor in GenuineIntel) vendor=intel ;; AuthenticAMD) vendor=amd ;; *) vendor=cpu ;; esac
kind=nobf16
if grep -qw amx_bf16 <<<"$flags"; then kind=amx; elif grep -qw avx512_bf16 <<<"$flags"; then kind=avx512bf16; fi
OUT=${OUT:-results/cpu-kind/$vendor-$kind-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/steps.txt"

step() {  # step NAME FILE CMD...: run CMD (from benchmarks/ for the benches), tee it into FILE
    local name=$1 file=$2; shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== $name: $*" | tee "$OUT/$file"
    "$@" 2>&1 | tee -a "$OUT/$file"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/steps.txt"
}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    lscpu | grep -E '^(Model name|Vendor ID|CPU\(s\)|Thread|Core|Socket)' || true
    # "AMD EPYC" alone does not say which: family 25 model 1 is Zen 3 (no AVX-512), 17 Zen 4.
    grep -m1 -E '^cpu family' /proc/cpuinfo || true
    grep -m1 -E '^model\s' /proc/cpuinfo || true
    echo "bf16/AMX flags: $(grep -ow -E 'amx_bf16|amx_tile|amx_int8|avx512_bf16|avx512f' <<<"$flags" | sort -u | tr '\n' ' ')"
    "$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from common import hardware; print(hardware())'
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$OUT/cpu.txt"

cd benchmarks
step train-r20-b128 train-r20-b128.txt "$PY" bench_train.py --data "$DATA" --steps "$STEPS" --batch 128
step train-r20-b256 train-r20-b256.txt "$PY" bench_train.py --data "$DATA" --steps "$STEPS" --batch 256
if [ "${MODELS56:-1}" = 1 ]; then
    step train-r56-b128 train-r56-b128.txt "$PY" bench_train.py --data "$DATA" --model resnet56 \
        --steps "$STEPS" --batch 128
fi
step sizes sizes.txt "$PY" bench_sizes.py --data "$DATA" --rounds "$ROUNDS" --steps "$RSTEPS"
step compile-r20 compile-r20.txt "$PY" bench_compile.py --data "$DATA" --model resnet20 \
    --sizes 24 32 --static --rounds "$ROUNDS" --steps "$RSTEPS"
cd ..

if [ "${RECIPE:-0}" = 1 ]; then
    # The issue's ResNet-20 time goal, timed as a user runs it: from the command to its exit.
    rm -rf "$OUT/recipe"
    t0=$(date +%s)
    step recipe recipe.log "$PY" -m reslab train --recipe cifar10-progressive --seed 0 \
        --data "$DATA" --out "$OUT/recipe"
    echo "$(( $(date +%s) - t0 )) s from the command to its exit" >"$OUT/recipe/wall.txt"
    find "$OUT/recipe" -name '*.pt' -delete  # the record keeps configs and metrics, not weights
fi
echo "done: $OUT"; cat "$OUT/steps.txt"
