#!/usr/bin/env bash
# Does `reslab train --compile` shorten a real run on this machine? Eager and compiled runs of
# the progressive recipe's shape order (first half at 24x24, then 32x32), each in its own
# process, alternating ROUNDS times so that a machine whose speed drifts hits both alike.
# bench_compile.py times the two paths in alternating rounds inside one process; this is the
# whole `reslab train` command as a user runs it (start-up, compile, data, final evaluation).
#
#   bash scripts/compile_ab.sh ../shared/data [OUT]       # ~15 min on 2 cores (3 rounds)
#
# Prints each run's wall seconds, then img/s per phase from its steps.jsonl (iterations after
# the first 60 at 24x24 and the first 20 at 32x32, so compiling is not counted) and medians.
# Settings by environment: ROUNDS (3), ITERS (700), PY (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/compile_ab.sh DATA_DIR [OUT]   (DATA_DIR holds cifar-10-batches-py)}
[ -d "$DATA/cifar-10-batches-py" ] || {
    echo "compile_ab: $DATA/cifar-10-batches-py not found: pass the directory that holds it" >&2
    exit 2; }
OUT=${2:-runs/compile-ab}
PY=${PY:-python3}
ROUNDS=${ROUNDS:-3} ITERS=${ITERS:-700}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
    for mode in no-compile compile; do
        run="$OUT/r$round-$mode"
        rm -rf "$run"
        t0=$(date +%s)
        "$PY" -m reslab train --recipe cifar10-progressive --iters "$ITERS" --set small_until=0.5 \
            --set eval_every=100000 --set eval_views=center --set save_every=100000 --"$mode" \
            --data "$DATA" --out "$run" >/dev/null 2>"$run.err"
        echo "$round $mode rc=$? wall=$(( $(date +%s) - t0 ))" | tee -a "$OUT/ab.log"
        find "$run" -name '*.pt' -delete
    done
done
"$PY" - "$OUT" "$ITERS" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, iters = Path(sys.argv[1]), int(sys.argv[2])
half = iters // 2
rates: dict[str, dict[str, list[float]]] = {}
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    if not (run / "steps.jsonl").is_file():  # a run that failed: its .err file says why
        print(f"{run.name:16s} no steps.jsonl: see {run}.err")
        continue
    rows = [r for r in map(json.loads, (run / "steps.jsonl").read_text().splitlines()) if "iter" in r]
    def at(i):
        return min(rows, key=lambda r: abs(r["iter"] - i))
    def rate(a, b):
        ra, rb = at(a), at(b)
        return (rb["iter"] - ra["iter"]) * 256 / (rb["wall_time"] - ra["wall_time"])
    mode = run.name.split("-", 1)[1]
    r24 = rate(min(60, half // 2), half - 5)
    r32 = rate(half + min(20, half // 4), iters - 10)
    rates.setdefault(mode, {"24": [], "32": []})
    rates[mode]["24"].append(r24)
    rates[mode]["32"].append(r32)
    print(f"{run.name:16s} 24x24 {r24:6.0f} img/s   32x32 {r32:6.0f} img/s")
for size in ("24", "32") if len(rates) == 2 else ():
    e, c = (statistics.median(rates[m][size]) for m in ("no-compile", "compile"))
    print(f"{size}x{size}: compiled / eager = x{c / e:.2f} (medians {c:.0f} / {e:.0f} img/s)")
PYEOF
