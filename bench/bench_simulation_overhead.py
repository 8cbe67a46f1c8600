"""Flower simulation overhead: `flwr run` (Ray) against the same local training in a plain loop.

Same task (MOTIFS, PredCls, label + geometry), same benchmark, same clients, same budget: R
rounds in which every client trains E local epochs from the global model, FedAvg aggregation,
and an evaluation of the global model on the test split before the first and after every
round. Three ways of running it, timed in the same process, one after another:

- `loop`: plain Python - for each round, for each client, train; average; evaluate. The same
  seeds as the app (fedpsg.app.config.round_seed), so the same work.
- `in-process`: the real ServerApp and ClientApp, their messages delivered in this process by
  `strategies.local_grid.LocalGrid` (Flower's Message API, strategy and app logic; no Ray, no
  SuperLink, no serialisation).
- `flwr run`: `fedpsg.run.simulate` - a SuperLink in simulation mode, `flwr run`, Ray actors;
  with 1 CPU per ClientApp two clients train side by side on 2 cores, with 2 CPUs one at a
  time, like the loop.

Torch runs one intra-op thread in this process, as Ray gives a 1-CPU actor (OMP_NUM_THREADS=1):
tiny scene graphs train faster on one thread, and the comparison would otherwise time thread
settings, not Flower. Reported per setting: wall time of the whole command (start-up
included), wall time of the rounds alone (from the first to the last server evaluation, as
the run records them), and both as ratios to the loop.

Run: `python -m bench.bench_simulation_overhead` (~20 minutes on 2 loaded cores). Writes
bench/results/simulation_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmark_builder.build import BuildConfig, build_benchmark
from benchmark_builder.synthetic import generate_synthetic_psg
from fedpsg.app.config import client_config, seed_everything
from fedpsg.app.task import load_task
from fedpsg.run.simulate import simulate, simulate_in_process
from strategies import client_half
from strategies.server import weighted_mean

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()


def base_config(bench: Path, rounds: int, epochs: int) -> dict:
    return {
        "task": "psg",
        "strategy": "fedavg",
        "num-server-rounds": rounds,
        "fraction-train": 1.0,
        "min-train-nodes": 1,
        "fraction-evaluate": 0.0,
        "local-epochs": epochs,
        "lr": 0.1,
        "momentum": 0.9,
        "batch-size": 16,
        "seed": 0,
        "benchmark-dir": str(bench),
        "model": "motifs",
        "mode": "predcls",
        "features": "geometry",
    }


def plain_loop(config: dict, num_clients: int) -> dict:
    """The federation as a plain Python loop; returns wall times and the final R@50."""
    start = time.perf_counter()
    task = load_task("psg")
    seed_everything(int(config["seed"]))
    model = task.build_model(config)
    test = task.load_test(config)
    _, metrics = task.evaluate(model, test, config)
    rounds_start = time.perf_counter()  # as the app records: after the round-0 evaluation
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    for server_round in range(1, int(config["num-server-rounds"]) + 1):
        updates, weights = [], []
        for pid in range(num_clients):
            message = {"algorithm": "fedavg", "server-round": server_round}
            cfg = client_config(config, message, pid)
            seed_everything(cfg["seed"])
            local = task.build_model(cfg)
            local.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
            half = client_half(message, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]))
            data = task.load_partition(cfg, pid, num_clients)  # read once, cached, as in the app
            n, _, _ = task.train(local, data, half, cfg, {}, {})
            updates.append({k: v.detach().numpy().copy() for k, v in local.state_dict().items()})
            weights.append(n)
        state = weighted_mean(updates, weights, like=state)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        _, metrics = task.evaluate(model, test, config)
    end = time.perf_counter()
    return {"total_s": end - start, "rounds_s": end - rounds_start, "R@50": metrics["R@50"]}


def in_process(config: dict, num_clients: int, out: Path) -> dict:
    """ServerApp + ClientApp through LocalGrid (Flower's Message API, no Ray)."""
    start = time.perf_counter()
    simulate_in_process(config, num_clients, out)
    return {"total_s": time.perf_counter() - start, **recorded(out)}


def flwr_simulation(config: dict, num_clients: int, out: Path, cpus_per_client: int) -> dict:
    """`flwr run` on a fresh simulation SuperLink (fedpsg.run.simulate)."""
    start = time.perf_counter()
    code = simulate(
        config, num_clients, out, cpus_per_client=cpus_per_client, stream=False, timeout=1800
    )
    if code != 0:
        raise RuntimeError(f"flwr run failed ({code}); see {out / 'flwr_run.log'}")
    return {"total_s": time.perf_counter() - start, **recorded(out)}


def recorded(out: Path) -> dict:
    """Rounds' wall time (first to last server evaluation) and final R@50 of a recorded run."""
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    return {
        "rounds_s": rounds[-1]["elapsed-s"] - rounds[0]["elapsed-s"],
        "R@50": rounds[-1]["server"]["R@50"],
    }


def make_benchmark(root: Path, images: int, num_clients: int) -> Path:
    psg = root / "synthetic" / "psg.json"
    if not psg.exists():
        generate_synthetic_psg(psg.parent, images, seed=0)
    out = root / f"bench-{num_clients}"
    build_benchmark(psg, out, BuildConfig(num_clients=num_clients, partition="iid", alpha=None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1100)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpsg-overhead-") as tmp:
        root = Path(tmp)
        for num_clients in args.clients:
            bench = make_benchmark(root, args.images, num_clients)
            config = base_config(bench, args.rounds, args.epochs)
            console.print(f"[bold]{num_clients} clients[/]: plain loop")
            loop = plain_loop(config, num_clients)
            console.print(f"[bold]{num_clients} clients[/]: in-process Flower app")
            local = in_process(config, num_clients, root / f"local-{num_clients}")
            results = {"loop": loop, "in-process": local}
            for cpus in (1, 2):
                console.print(f"[bold]{num_clients} clients[/]: flwr run, {cpus} CPU per client")
                out = root / f"ray-{num_clients}-{cpus}"
                results[f"flwr run, {cpus} CPU/client"] = flwr_simulation(
                    config, num_clients, out, cpus
                )
            for name, result in results.items():
                rows.append(
                    {
                        "clients": num_clients,
                        "runner": name,
                        **{k: round(v, 4) for k, v in result.items()},
                        "total_ratio": round(result["total_s"] / loop["total_s"], 3),
                        "rounds_ratio": round(result["rounds_s"] / loop["rounds_s"], 3),
                    }
                )
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    setting = (
        f"{args.rounds} rounds x {args.epochs} local epoch(s), every client every round, "
        f"{args.images} synthetic images (label + geometry), MOTIFS PredCls, batch 16"
    )
    table = Table(title=f"Simulation overhead ({setting})")
    columns = ["clients", "runner", "total_s", "rounds_s", "total_ratio", "rounds_ratio", "R@50"]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": machine, "setting": setting, "rows": rows}
    (RESULTS / "simulation_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"Machine: {machine}. Setting: {setting}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + " ---: |" * len(columns),
        *("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows),
    ]
    (RESULTS / "simulation_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
