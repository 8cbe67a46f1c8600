#!/usr/bin/env bash
# The paper-preset diffusion experiment on an offline GPU machine, in calls of bounded length:
# each call continues every job (resumable trainings under /tmp/diffrun) for DEADLINE seconds,
# prints the trainings' progress each minute, and copies the result files to $OUT/res.
#   bash bench/offline_gpu/diffusion_paper.sh SETTING DEADLINE_S JOB...
# JOB is SEED[:ARMS[:TAG]] (one exp process each, all at once), e.g. 1 or "0:sam-0.1,sam-0.1+ema:_x".
# Carried from bench/offline_gpu/pack.sh: .offline/whl (installed once, to /tmp/site) and the
# Inception parts (.offline/inception-N, one or two a call to the same machine), joined and
# checked once all three are there. FID needs them: an arm evaluated before is reported failed
# and evaluated again by the next call (its training is kept).
set -u
SETTING=$1; DEADLINE=$2; shift 2
OUT=${OUT:-out}
if [ -d .offline/whl ] && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .offline/whl/*.whl \
        || exit 1
fi
mkdir -p /tmp/inc /tmp/diffrun /tmp/difflog "$OUT/res"
for n in 1 2 3; do
    [ -f ".offline/inception-$n/part" ] && cp ".offline/inception-$n/part" "/tmp/inc/$n"
    [ -f ".offline/inception-$n/sha256" ] && cp ".offline/inception-$n/sha256" /tmp/inc/sha256
done
if [ ! -f /tmp/inc/weights.pt ] && [ -f /tmp/inc/1 ] && [ -f /tmp/inc/2 ] && [ -f /tmp/inc/3 ]; then
    cat /tmp/inc/1 /tmp/inc/2 /tmp/inc/3 > /tmp/inc/weights.pt
    [ "$(sha256sum /tmp/inc/weights.pt | cut -d' ' -f1)" = "$(cat /tmp/inc/sha256)" ] \
        || { echo "Inception weights: checksum mismatch"; rm /tmp/inc/weights.pt; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLWR_HOME=/tmp/flwrhome FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1
[ -f /tmp/inc/weights.pt ] && export FEDPSG_INCEPTION=/tmp/inc/weights.pt
echo "Inception weights: ${FEDPSG_INCEPTION:-not yet}"
if [ "$SETTING" = central ]; then extra=(--rounds 400 --batch-clients off)
else extra=(--rounds 80 --local-epochs 5 --client-batch-size 32); fi
progress() {
    python3 - <<'PY'
import json, time
from pathlib import Path
print(time.strftime("%H:%M:%S"), flush=True)
for path in sorted(Path("/tmp/diffrun").glob("*/metrics.json")):
    rounds = json.loads(path.read_text())["rounds"]
    print(f"  {path.parent.name}: {len(rounds)} rounds, {rounds[-1].get('elapsed-s', 0):.0f} s", flush=True)
for path in sorted(Path("/tmp/diffrun").glob("*/samples-*.npy")):
    print(f"  evaluated: {path.parent.name}/{path.stem}", flush=True)
PY
}
pids=()
for job in "$@"; do
    IFS=: read -r seed arms tag <<< "$job"
    tag=${tag:-_paper_seed$seed}
    arms_option=(); [ -n "$arms" ] && arms_option=(--arms "$arms")
    python3 -m bench.exp_diffusion_flatness --preset paper --setting "$SETTING" "${extra[@]}" \
        --seed "$seed" --tag "$tag" "${arms_option[@]}" --parallel 3 --gpus 0 \
        --deadline "$DEADLINE" --out /tmp/diffrun > "/tmp/difflog/$SETTING$tag.log" 2>&1 &
    pids+=($!)
done
( while sleep 60; do progress; done ) &
monitor=$!
for pid in "${pids[@]}"; do wait "$pid"; echo "job $pid: exit $?"; done
kill "$monitor"
progress
for log in /tmp/difflog/*.log; do echo "== $log"; tail -c 1500 "$log"; done
cp /tmp/diffrun/diffusion_flatness_*.{json,md} "$OUT/res/" 2>/dev/null
ls "$OUT/res"
