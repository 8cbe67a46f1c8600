"""Benchmark of the strategies: client-half cost per local step and server aggregation per round.

1. Time per local step of each client half, as a ratio to plain SGD (FedAvg's client half) on
   the same model and batches, measured interleaved in the same run (SAM's floor is 2x: two
   forward/backward passes per step).
2. Server time per round of each server half's `aggregate_train` (reply checks, NaN scan,
   aggregation, SCAFFOLD's control update) for 10 and 100 clients of a ~10M-parameter model,
   as a ratio to Flower's own FedAvg.aggregate_train on the same replies (which checks nothing).
   Replies are real flwr Messages; 100 clients reuse a pool of 10 distinct ArrayRecords to keep
   memory at ~1 GB (each model is 40 MB, larger than any cache, so timing is unaffected).

Run: `python -m bench.bench_strategies` (about 2-3 minutes on 2 CPU cores). Writes
bench/results/strategies.json and strategies.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import nn
from tqdm import tqdm

from strategies import ALGORITHMS, server_strategy, train_local
from strategies.base import ClientHalf
from strategies.fedprox import FedProxClient
from strategies.fedsam import FedSAMClient
from strategies.local_grid import LocalGrid
from strategies.scaffold import CONTROL_DELTA, SERVER_CONTROL, ScaffoldClient
from strategies.server import to_record

RESULTS = Path(__file__).resolve().parent / "results"
HPARAMS = {"fedprox": {"proximal_mu": 0.01}}


def small_cnn() -> nn.Module:
    """A CIFAR-sized CNN with BatchNorm (~0.14M parameters), the shape of a task model."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def client_step_costs(steps: int, repeats: int) -> list[dict]:
    """ms per local step of each client half (best of `repeats`, the least disturbed by other
    load), and the ratio to plain SGD."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
        for _ in range(steps)
    ]

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    model0 = small_cnn()
    params = {n: p.detach().numpy() for n, p in model0.named_parameters()}
    halves = {
        "fedavg (SGD)": lambda: (ClientHalf(0.01, momentum=0.9), {}),
        "fedprox": lambda: (FedProxClient(0.01, momentum=0.9, mu=0.01), {}),
        "fedsam (SAM)": lambda: (FedSAMClient(0.01, momentum=0.9, rho=0.05), {}),
        "fedsam (ASAM)": lambda: (FedSAMClient(0.01, momentum=0.9, rho=0.5, adaptive=True), {}),
        "scaffold": lambda: (
            ScaffoldClient(0.01, momentum=0.9),
            {SERVER_CONTROL: {n: np.full_like(v, 1e-3) for n, v in params.items()}},
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in halves}
    train_local(small_cnn(), batches[:2], loss_fn, ClientHalf(0.01))  # warm-up
    for _ in tqdm(range(repeats), desc="client halves", leave=False):
        for name, make in halves.items():  # interleaved: load drifts hit all alike
            half, incoming = make()
            model = small_cnn()
            start = time.perf_counter()
            train_local(model, batches, loss_fn, half, incoming, {})
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    base = min(times["fedavg (SGD)"])
    return [
        {"client half": name, "ms/step": round(min(t), 2), "vs SGD": round(min(t) / base, 2)}
        for name, t in times.items()
    ]


def big_model_arrays(seed: int) -> dict[str, np.ndarray]:
    """A ~10M-parameter MLP's state (4 x 1600x1600 layers + biases), float32."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in range(4):
        arrays[f"layer{i}.weight"] = rng.standard_normal((1600, 1600), dtype=np.float32)
        arrays[f"layer{i}.bias"] = rng.standard_normal(1600, dtype=np.float32)
    return arrays


def aggregation_costs(client_counts: list[int], repeats: int, pool: int = 10) -> list[dict]:
    """Seconds per aggregate_train of each server half, and the ratio to Flower's FedAvg."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    global_record = to_record(big_model_arrays(0))
    models = [to_record(big_model_arrays(i + 1)) for i in range(pool)]
    deltas = [
        to_record({k: v * 1e-3 for k, v in big_model_arrays(100 + i).items()}) for i in range(pool)
    ]
    num_params = sum(int(np.prod(a.shape)) for a in global_record.values())
    strategies = {
        "flower FedAvg (baseline)": lambda: FlowerFedAvg(),
        **{
            name: (lambda name=name: server_strategy(name, **HPARAMS.get(name, {})))
            for name in ALGORITHMS
        },
        "fedavg + EMA": lambda: server_strategy("fedavg", ema_decay=0.99),
    }
    rows = []
    for n in client_counts:
        grid = LocalGrid(dict.fromkeys(range(1, n + 1)))
        times: dict[str, list[float]] = {name: [] for name in strategies}
        for _ in tqdm(range(repeats), desc=f"aggregation, {n} clients", leave=False):
            for name, make in strategies.items():
                strategy = make()
                random.seed(0)
                msgs = list(strategy.configure_train(1, global_record, ConfigRecord(), grid))
                extra = name == "scaffold"
                replies = [
                    Message(
                        RecordDict(
                            {
                                "arrays": models[i % pool],
                                "metrics": MetricRecord({"num-examples": 100 + i}),
                                **({CONTROL_DELTA: deltas[i % pool]} if extra else {}),
                            }
                        ),
                        reply_to=msg,
                    )
                    for i, msg in enumerate(msgs)
                ]
                ema = name == "fedavg + EMA"
                if ema:
                    strategy.model_average.begin(strategy.global_arrays)
                start = time.perf_counter()
                arrays, _ = strategy.aggregate_train(1, replies)
                if ema:
                    strategy.model_average.update(1, {k: v.numpy() for k, v in arrays.items()})
                times[name].append(time.perf_counter() - start)
        base = min(times["flower FedAvg (baseline)"])
        rows += [
            {
                "clients": n,
                "server half": name,
                "s/round": round(min(t), 3),
                "vs Flower FedAvg": round(min(t) / base, 2),
                "parameters": num_params,
            }
            for name, t in times.items()
        ]
    return rows


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="local steps per timing")
    parser.add_argument("--repeats", type=int, default=9, help="timings per client half")
    parser.add_argument("--agg-repeats", type=int, default=2, help="timings per server half")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (more oversubscribe a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    machine = (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    client = client_step_costs(args.steps, args.repeats)
    server = aggregation_costs(args.clients, args.agg_repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "args": vars(args), "client_step": client, "aggregation": server}
    (RESULTS / "strategies.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = (
        f"Machine: {machine}\n\n"
        f"### Client half cost per local step (small CNN, batch 32, {args.steps} steps, "
        f"best of {args.repeats})\n\n{markdown(client)}\n\n"
        f"### Server aggregate_train per round (~{server[0]['parameters'] / 1e6:.1f}M-parameter "
        f"model, best of {args.agg_repeats})\n\n{markdown(server)}\n"
    )
    (RESULTS / "strategies.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
