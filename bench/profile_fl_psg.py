"""Where one FL-PSG federation's time goes: a profile of the in-process MOTIFS federation.

One federation of the grid's protocol (`bench.exp_fl_psg`: 100 clients, 5 per round, SGD lr
0.03 momentum 0.9, batch 16, `frequency-prior = federated`) for a few rounds, the ServerApp
and ClientApp in this process under cProfile, one torch thread. The table splits its wall
time into the one-time start-up (node discovery, which loads every partition, the statistics
round) and, per round, local training (forward, backward, optimizer step, batching), the
server's test evaluation and the rest (Flower messages, model copies, aggregation,
recording), timed by wrapping the task's methods, and extrapolates each part to the grid's
100 rounds at `--grid-eval-every`.

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
# cProfile buckets inside local training: (label, file suffix, function)
TRAINING_PARTS = [
    ("forward + loss", "fedpsg/psg/train.py", "__call__"),
    ("backward", "torch/_tensor.py", "backward"),
    ("optimizer step", "torch/optim/optimizer.py", "wrapper"),
    ("batching (collate)", "fedpsg/psg/data.py", "collate"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Summed cumulative time of the functions `name` in files ending with `suffix`."""
    return sum(
        entry[3]
        for (path, _, func), entry in stats.stats.items()  # type: ignore[attr-defined]
        if func == name and path.endswith(suffix)
    )


class Timers:
    """Wall time spent inside chosen methods, patched for the run (class attributes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._restore: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        self._restore.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="motifs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=1, help="evaluation period profiled")
    p.add_argument("--grid-eval-every", type=int, default=10, help="period extrapolated to")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "profile_fl_psg")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    from fedpsg.app import server_app
    from fedpsg.psg.task import PSGTask

    torch.set_num_threads(1)
    grid = grid_args(["--out", str(args.out), "--rounds", str(args.rounds),
                      "--eval-every", str(args.eval_every)])  # fmt: skip
    bench = benchmark(grid, "iid", 0)
    name = f"iid/{args.model}/fedavg/federated/0"
    timers = Timers()
    timers.wrap(server_app, "collect_statistics", "statistics round")
    timers.wrap(PSGTask, "load_partition", "partition loading")
    timers.wrap(PSGTask, "load_test", "partition loading")
    timers.wrap(PSGTask, "train", "local training")
    timers.wrap(PSGTask, "evaluate", "server test evaluation")
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    try:
        simulate_in_process(run_config(grid, bench, name), grid.clients, args.out / "run")
    finally:
        profiler.disable()
        timers.restore()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    elapsed = [r["elapsed-s"] for r in
               json.loads((args.out / "run" / "metrics.json").read_text())["rounds"]]  # fmt: skip
    rounds_s = elapsed[-1] - elapsed[0]  # rounds 1..N, their evaluations included
    evals = args.rounds // args.eval_every + 1  # round 0, every period, the last
    eval_s = timers.seconds["server test evaluation"] / evals
    train_s = timers.seconds["local training"] / args.rounds
    rest_s = (rounds_s - train_s * args.rounds - eval_s * (evals - 1)) / args.rounds
    startup_s = wall - rounds_s
    grid_evals = 100 // args.grid_eval_every + 1
    at_100 = {
        "start-up (discovery + partition loading, statistics round, round-0 evaluation)": (
            startup_s
        ),
        "local training (5 clients a round)": train_s * 100,
        f"server test evaluation (every {args.grid_eval_every})": eval_s * (grid_evals - 1),
        "rest of a round (messages, model copies, aggregation, records)": rest_s * 100,
    }
    total_100 = sum(at_100.values())
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores (load average "
               f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, 1 thread")  # fmt: skip
    lines = [
        f"Profile of one in-process {args.model} federation (FL-PSG protocol, iid, "
        f"`frequency-prior = federated`), {args.rounds} rounds, test evaluation every "
        f"{args.eval_every}; {machine}. Wall {wall:.1f} s; start-up {startup_s:.1f} s "
        f"(of it partition loading {timers.seconds.get('partition loading', 0):.1f} s, "
        f"statistics round {timers.seconds.get('statistics round', 0):.1f} s); a round "
        f"{rounds_s / args.rounds:.2f} s: local training {train_s:.2f} s, one test "
        f"evaluation {eval_s:.2f} s, the rest {rest_s:.2f} s.",
        "",
        f"| part, extrapolated to 100 rounds, evaluation every {args.grid_eval_every} | s "
        "| share |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} | {v:.0f} | {100 * v / total_100:.0f}% |" for k, v in at_100.items()]
    lines.append(f"| total | {total_100:.0f} | 100% |")
    training = {label: cumulative(stats, suffix, func) for label, suffix, func in TRAINING_PARTS}
    total_train = timers.seconds["local training"]
    lines += ["", f"Inside local training ({total_train:.1f} s profiled):", "",
              "| part | s | share |", "| --- | ---: | ---: |"]  # fmt: skip
    lines += [f"| {k} | {v:.1f} | {100 * v / total_train:.0f}% |" for k, v in training.items()]
    lines += ["", "Largest own times (tottime, whole run):", "", "| function | calls | own s |",
              "| --- | ---: | ---: |"]  # fmt: skip
    own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]  # type: ignore[attr-defined]
    for (path, line, func), (_, calls, tottime, *_rest) in own:
        where = "/".join(Path(path).parts[-2:])
        lines.append(f"| `{where}:{line}({func})` | {calls} | {tottime:.2f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"fl_psg_profile_{args.model}"
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    payload = {"machine": machine, "rounds": args.rounds, "eval_every": args.eval_every,
               "wall_s": wall, "startup_s": startup_s, "round_s": rounds_s / args.rounds,
               "train_s_per_round": train_s, "eval_s": eval_s, "rest_s_per_round": rest_s,
               "timers_s": timers.seconds, "training_parts_s": training,
               "at_100_rounds_s": at_100}  # fmt: skip
    (args.results / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
