#!/usr/bin/env bash
# The FL-PSG grid (`bench.exp_fl_psg`) on an offline GPU machine's CPU cores, in calls of
# bounded length: each call runs the grid for BUDGET_S seconds, skipping the jobs already in
# the carried results, and writes the results (and the stopped federations' packs) to $OUT.
#   bash bench/offline_gpu/fl_psg_grid.sh BUDGET_S [bench.exp_fl_psg options...]
# e.g. bash bench/offline_gpu/fl_psg_grid.sh 530 --tiers 3 --only vctree/fedsam --workers 8
# Carried: .offline/whl (bench/offline_gpu/pack.sh; installed once, to /tmp/site),
# .offline/data (psg_annotations.json.gz and fl_psg_word_categorized.json from shared/data),
# and .offline/grid: the results file to resume from (fl_psg_seeds.json) and the last call's
# unfinished-*.tar. On a machine still warm from the last call the stopped federations are
# still under /tmp/fl_psg and continue from there; on a fresh one they are unpacked.
set -u
BUDGET=$1; shift
OUT=${OUT:-out}
if [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .offline/whl/*.whl \
        || exit 1
fi
mkdir -p "$OUT"
[ -f .offline/grid/fl_psg_seeds.json ] && cp .offline/grid/fl_psg_seeds.json "$OUT/"
unpack=()
if [ ! -d /tmp/fl_psg/runs ] && compgen -G ".offline/grid/unfinished-*.tar" > /dev/null; then
    unpack=(--unpack .offline/grid)
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLWR_HOME=/tmp/flwrhome FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FEDPSG_SHARED_DATA=$PWD/.offline/data
python3 -m bench.exp_fl_psg --resumable --budget-s "$BUDGET" --device cpu --out /tmp/fl_psg \
    --results "$OUT" "${unpack[@]}" "$@"
status=$?
python3 - <<'PY'
import json
from pathlib import Path
for path in sorted(Path("/tmp/fl_psg/runs").rglob("metrics.json")):
    rounds = json.loads(path.read_text())["rounds"]
    print(f"{path.parent.relative_to('/tmp/fl_psg/runs')}: {len(rounds)} rounds")
PY
exit $status
