"""Experiment: FedAvg, FedProx, FedSAM and SCAFFOLD on the real PSG annotations, FL-PSG protocol.

The 24,378 annotated images (labels + box geometry; no pixels), one seeded held-out test split,
100 clients of which 5 train per round, partitioned over the FL-PSG category-map clusters: each
client's cluster mixture drawn from Dirichlet(alpha) with equal client sizes (the builder's
`dirichlet-client`; the per-cluster split cannot give 100 clients an image each at alpha 0.1)
for alpha in {0.1, 1, 10}, and IID. MOTIFS in PredCls. Each partition is one
`flwr run` Ray simulation that runs the four strategies one after another on the same
federation (same initial model, same sampled clients per round). The centralized (CL) row
trains the same model on the pooled training images for the same number of passes over the
data (`fedpsg.centralized.budget_epochs`). Each partition's heterogeneity index (size-weighted
JSD to the global distribution, over clusters and over predicates) comes from its manifest.

Run: `python -m bench.exp_fl_psg` (defaults sized for 2 CPU cores and under an hour). Results
are written after every partition to bench/results/fl_psg.json and fl_psg.md; benchmarks and
runs go to runs/exp_fl_psg/ and a finished partition is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmark_builder.build import BuildConfig, build_benchmark
from fedpsg.centralized import budget_epochs, run_centralized, write_outputs
from fedpsg.simulate import APP_DIR, simulate

DATA = APP_DIR.parent / "shared" / "data"
PSG = DATA / "psg_annotations.json.gz"
CATEGORY_MAP = DATA / "fl_psg_word_categorized.json"
RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("fedavg", "fedprox", "fedsam", "scaffold")
PARTITIONS = {"alpha=0.1": 0.1, "alpha=1": 1.0, "alpha=10": 10.0, "iid": None}
METRICS = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100")
console = Console()


def benchmark(root: Path, name: str, alpha: float | None, args: argparse.Namespace) -> Path:
    """The partition's benchmark folder (built once)."""
    out = root / "benchmarks" / name.replace("=", "")
    if not (out / "manifest.json").exists():
        config = BuildConfig(
            num_clients=args.clients,
            partition="iid" if alpha is None else "dirichlet-client",
            alpha=alpha,
            num_clusters=args.clusters,
            featurizer="category-map",
            featurizer_options={"category_map": CATEGORY_MAP},
            seed=args.seed,
            test_fraction=args.test_fraction,
        )
        build_benchmark(PSG, out, config)
    return out


def run_config(bench: Path, args: argparse.Namespace) -> dict:
    return {
        "task": "psg",
        "strategy": ",".join(STRATEGIES),
        "benchmark-dir": str(bench),
        "model": "motifs",
        "mode": "predcls",
        "features": "geometry",
        "num-server-rounds": args.rounds,
        "fraction-train": args.per_round / args.clients,
        "min-train-nodes": args.per_round,
        "local-epochs": args.epochs,
        "lr": args.lr,
        "momentum": args.momentum,
        "batch-size": args.batch_size,
        "seed": args.seed,
        "proximal-mu": args.proximal_mu,
        "rho": args.rho,
    }


def centralized(root: Path, args: argparse.Namespace, epochs: int) -> list[dict]:
    """The CL run's per-epoch history (run once, then read from runs/exp_fl_psg/cl). The
    train/test split precedes partitioning, so every partition's benchmark pools the same
    training images; the first is used."""
    out = root / "cl"
    if not (out / "metrics.json").exists():
        name = next(iter(PARTITIONS))
        bench = benchmark(root, name, PARTITIONS[name], args)
        write_outputs(run_centralized(run_config(bench, args), epochs), out)
    return json.loads((out / "metrics.json").read_text())


def heterogeneity(bench: Path) -> dict:
    het = json.loads((bench / "manifest.json").read_text())["heterogeneity"]
    return {"cluster_jsd": het["cluster_jsd"], "predicate_jsd": het["predicate_jsd"]}


def write_results(payload: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fl_psg.json").write_text(json.dumps(payload, indent=2) + "\n")
    head = "| partition | cluster JSD | predicate JSD | method | " + " | ".join(METRICS) + " |"
    lines = [
        f"Machine: {payload['machine']}.",
        f"Setting: {payload['setting']}",
        "",
        head,
        "| --- | ---: | ---: | --- |" + " ---: |" * len(METRICS),
    ]
    for row in payload["rows"]:
        het = [f"{row[k]:.3f}" if row.get(k) is not None else "-" for k in ("cluster_jsd",
               "predicate_jsd")]  # fmt: skip
        values = " | ".join(f"{100 * row[m]:.2f}" for m in METRICS)
        lines.append(f"| {row['partition']} | {het[0]} | {het[1]} | {row['method']} | {values} |")
    lines += [
        "",
        "Recalls in %, graph-constrained, on the held-out test split, after the last round.",
    ]
    (RESULTS / "fl_psg.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=APP_DIR / "runs" / "exp_fl_psg")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--proximal-mu", type=float, default=0.01)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--clusters", type=int, default=5)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cl", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--partitions", nargs="*", default=list(PARTITIONS), choices=PARTITIONS)
    args = parser.parse_args()
    root = args.out.resolve()
    cl_epochs = budget_epochs(args.rounds, args.per_round, args.clients, args.epochs)
    fl_epochs = args.rounds * args.per_round * args.epochs / args.clients
    payload = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "setting": (
            f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds x "
            f"{args.epochs} local epoch(s), SGD lr {args.lr} momentum {args.momentum}, batch "
            f"{args.batch_size}, MOTIFS PredCls on labels + geometry, FedProx mu "
            f"{args.proximal_mu}, FedSAM rho {args.rho}, {args.clusters} FL-PSG category-map "
            f"clusters, test fraction {args.test_fraction}, seed {args.seed}; "
            + (
                f"CL: {cl_epochs} epoch(s) on the pooled training images (the federation "
                f"passes {fl_epochs:.2g} epochs' worth of images; CL trains whole epochs)"
                if args.cl
                else "no CL row in this run"
            )
        ),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [],
    }
    start = time.monotonic()
    for name in args.partitions:
        console.rule(f"{name} ({time.monotonic() - start:.0f} s)")
        bench = benchmark(root, name, PARTITIONS[name], args)
        out = root / "runs" / name.replace("=", "")
        if not (out / "comparison.json").exists():
            code = simulate(run_config(bench, args), args.clients, out, stream=False)
            if code != 0:
                console.print(f"[red]{name}: flwr run failed ({code}), see {out}/flwr_run.log")
                continue
        final = json.loads((out / "comparison.json").read_text())
        for method in STRATEGIES:
            row = {"partition": name, **heterogeneity(bench), "method": method}
            payload["rows"].append({**row, **{m: final[method][m] for m in METRICS}})
        console.print((out / "comparison.md").read_text())
        write_results(payload)
    if args.cl:
        console.rule(f"CL ({time.monotonic() - start:.0f} s)")
        last = centralized(root, args, cl_epochs)[-1]
        payload["rows"].append(
            {"partition": "pooled", "cluster_jsd": None, "predicate_jsd": None, "method": "CL",
             **{m: last[m] for m in METRICS}}
        )  # fmt: skip
    payload["wall_s"] = round(time.monotonic() - start, 1)
    write_results(payload)
    console.print((RESULTS / "fl_psg.md").read_text())


if __name__ == "__main__":
    main()
