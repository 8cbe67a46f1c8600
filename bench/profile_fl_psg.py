"""Where one FL-PSG federation's time goes: a profile of the in-process MOTIFS federation.

One federation of the grid's protocol (`bench.exp_fl_psg`: 100 clients, 5 per round, SGD lr
0.03 momentum 0.9, batch 16, `frequency-prior = federated`) for a few rounds, the ServerApp
and ClientApp in this process under cProfile, one torch thread. The table splits its wall
time into the statistics round, server-side test evaluation, local training (forward,
backward, optimizer step, batching) and the rest (Flower messages, model copies,
aggregation, recording), and extrapolates each part to the grid's 100 rounds at the chosen
`--eval-every`.

    python -m bench.profile_fl_psg --rounds 5 --model motifs
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import tempfile
import time
from pathlib import Path

import torch

from bench.exp_fl_psg import benchmark, run_config
from bench.exp_fl_psg import parse_args as grid_args
from fedpsg.run.simulate import simulate_in_process

RESULTS = Path(__file__).resolve().parent / "results"
# (label, file suffix, function): cumulative time of these calls
PARTS = [
    ("statistics round", "fedpsg/app/server_app.py", "collect_statistics"),
    ("server test evaluation", "fedpsg/psg/train.py", "evaluate"),
    ("local training", "fedpsg/psg/train.py", "train"),
    ("  forward + loss", "fedpsg/psg/train.py", "__call__"),
    ("  backward", "torch/_tensor.py", "backward"),
    ("  optimizer step", "torch/optim/optimizer.py", "wrapper"),
    ("  batching (collate)", "fedpsg/psg/data.py", "collate"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Summed cumulative time of the functions `name` in files ending with `suffix`."""
    return sum(
        entry[3]
        for (path, _, func), entry in stats.stats.items()  # type: ignore[attr-defined]
        if func == name and path.endswith(suffix)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="motifs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=1, help="evaluation period profiled")
    p.add_argument("--grid-eval-every", type=int, default=10, help="period extrapolated to")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "profile_fl_psg")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)
    grid = grid_args(["--out", str(args.out), "--rounds", str(args.rounds),
                      "--eval-every", str(args.eval_every)])  # fmt: skip
    bench = benchmark(grid, "iid", 0)
    name = f"iid/{args.model}/fedavg/federated/0"
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    simulate_in_process(run_config(grid, bench, name), grid.clients, args.out / "run")
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    parts = {label: cumulative(stats, suffix, func) for label, suffix, func in PARTS}
    top = ("statistics round", "server test evaluation", "local training")
    parts["rest (messages, model copies, aggregation, records)"] = wall - sum(
        parts[k] for k in top
    )
    evals = args.rounds // args.eval_every + 1  # round 0, every period, the last
    grid_evals = 100 // args.grid_eval_every + 1
    per_round = {
        "server test evaluation": parts["server test evaluation"] / evals * grid_evals / 100,
        "local training": parts["local training"] / args.rounds,
    }
    rest = parts["rest (messages, model copies, aggregation, records)"] / args.rounds
    at_100 = {
        "statistics round": parts["statistics round"],
        "server test evaluation": per_round["server test evaluation"] * 100,
        "local training": per_round["local training"] * 100,
        "rest (messages, model copies, aggregation, records)": rest * 100,
    }
    total_100 = sum(at_100.values())
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores (load average "
               f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, 1 thread")  # fmt: skip
    lines = [
        f"Profile of one in-process {args.model} federation (FL-PSG protocol, iid, "
        f"`frequency-prior = federated`), {args.rounds} rounds, test evaluation every "
        f"{args.eval_every}; {machine}. Wall {wall:.1f} s.",
        "",
        "| part | profiled s | share | at 100 rounds, eval every "
        f"{args.grid_eval_every} (s) | share |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, value in parts.items():
        extra = at_100.get(label)
        projected = f"{extra:.0f} | {100 * extra / total_100:.0f}%" if extra is not None else "|"
        lines.append(f"| {label} | {value:.1f} | {100 * value / wall:.0f}% | {projected} |")
    lines.append(f"| total | {wall:.1f} | 100% | {total_100:.0f} | 100% |")
    lines += ["", "Largest own times (tottime):", "", "| function | calls | own s |",
              "| --- | ---: | ---: |"]  # fmt: skip
    own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]  # type: ignore[attr-defined]
    for (path, line, func), (_, calls, tottime, *_rest) in own:
        where = "/".join(Path(path).parts[-2:])
        lines.append(f"| `{where}:{line}({func})` | {calls} | {tottime:.2f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"fl_psg_profile_{args.model}"
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    payload = {"machine": machine, "rounds": args.rounds, "eval_every": args.eval_every,
               "wall_s": wall, "parts_s": parts, "at_100_rounds_s": at_100}  # fmt: skip
    (args.results / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
