"""Run the FL-PSG grid on a lent GPU machine inside one time-limited call.

First a probe: the same short MOTIFS and VCTree federations run side by side on the CPU (one
thread each) and with the model on the GPU, half the workers each, so both kinds share the
cores alike; the device whose jobs finished faster per worker runs the grid for the rest of
the budget (`bench.exp_fl_psg --resumable`), and the probe's numbers (each job's time
extended to 100 rounds) go to `probe.json`.

    python -m bench.fl_psg_device --out $OUT --budget-s 540 --tiers 1 --workers 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.exp_fl_psg import COST_S


def full_run_s(row: dict, probe_rounds: int, rounds: int = 100) -> float:
    """A probe job's wall time extended to `rounds`: its start-up (statistics round, first
    evaluation) once, then its mean round after the first, `rounds - probe_rounds` more times."""
    elapsed = row["elapsed_s"]
    per_round = (elapsed[-1] - elapsed[1]) / max(1, len(elapsed) - 2)
    return row["wall_s"] + (rounds - probe_rounds) * per_round


def grid(argv: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "bench.exp_fl_psg", *argv])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (comes back)")
    p.add_argument("--work", type=Path, default=Path("/tmp/fl_psg"))
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--tiers", default="1")
    p.add_argument("--workers", type=int, default=8, help="8 on the 16-core H200 machine")
    p.add_argument("--probe-rounds", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto (probe) | cpu | cuda")
    p.add_argument("--results", type=Path, help="results folder to resume from")
    args = p.parse_args()
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    device, scale = args.device, 1.0
    if device == "auto":
        device = "cpu"
        if torch.cuda.is_available():
            probe = {}
            half = max(1, args.workers // 2)
            common = ["--tiers", "1", "--seeds", "0",
                      "--rounds", str(args.probe_rounds), "--eval-every", str(args.probe_rounds),
                      "--only", "iid/motifs/fedavg,iid/vctree/fedavg,shard/motifs/fedavg,"
                      "shard/vctree/fedavg", "--workers", str(half)]  # fmt: skip
            procs = {
                dev: subprocess.Popen(
                    [sys.executable, "-m", "bench.exp_fl_psg", *common, "--device", dev,
                     "--out", str(args.work / f"probe_{dev}"),
                     "--results", str(args.work / f"probe_{dev}"), "--name", "probe"]
                )  # fmt: skip
                for dev in ("cpu", "cuda")
            }
            for proc in procs.values():
                proc.wait()
            for dev in procs:
                path = args.work / f"probe_{dev}" / "probe.json"
                rows = json.loads(path.read_text())["rows"] if path.exists() else []
                probe[dev] = {r["job"]: full_run_s(r, args.probe_rounds) for r in rows}
                for log in (args.work / f"probe_{dev}" / "logs").glob("*.log"):
                    if log.stem.replace("__", "/") not in {r["job"] for r in rows}:
                        print(f"probe {dev} {log.name} failed:", log.read_text()[-2000:])
            speed = {
                dev: statistics.fmean(probe[dev].values()) for dev in probe if probe[dev]
            }
            device = min(speed, key=speed.get)
            motifs = [w for job, w in probe[device].items() if "/motifs/" in job]
            if motifs:
                scale = statistics.fmean(motifs) / COST_S["motifs"]
            probe["chosen"], probe["cost_scale"] = device, scale
            probe["card"] = torch.cuda.get_device_name()
            (args.out / "probe.json").write_text(json.dumps(probe, indent=1) + "\n")
    left = args.budget_s - (time.monotonic() - start)
    results = args.out
    if args.results and args.results != args.out:
        for path in args.results.glob("fl_psg_seeds.*"):
            (args.out / path.name).write_bytes(path.read_bytes())
    code = grid(["--out", str(args.work), "--results", str(results), "--tiers", args.tiers,
                 "--workers", str(args.workers), "--device", device, "--resumable",
                 "--budget-s", str(left), "--cost-scale", str(scale)])  # fmt: skip
    sys.exit(code)


if __name__ == "__main__":
    main()
