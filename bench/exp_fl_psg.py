"""Experiment: the FL-PSG model table on the real PSG annotations, FL-PSG's protocol.

The 24,378 annotated images (labels + box geometry; no pixels), one seeded held-out test split,
100 clients of which 5 train per round, 1 local epoch, SGD lr 0.03, batch 16, partitioned over
the FL-PSG category-map clusters (FL-PSG runs 100 rounds; the default here is 50, what the grid's
45 federations cost on a few CPU cores in a few hours):

- `iid` (FL-PSG's "Random"), `shard` (each client holds one cluster: FL-PSG's
  "Shard-non-IID"), and `alpha=10/1/0.1`: each client's cluster mixture drawn from
  Dirichlet(alpha) with equal client sizes (the builder's `dirichlet-client`).

Every model runs FedAvg on every partition; the models in `--strategy-models` also run FedSAM
and SCAFFOLD: MOTIFS, the best by the centralized table in bench/results/psg_models.md, chosen
in advance, and VCTree, the best federated model of the FedAvg grid. The CL row trains each
model on the pooled training images for the same number of passes over the data
(`fedpsg.psg.centralized.budget_epochs`). Each partition's heterogeneity index (size-weighted JSD to
the global distribution, over clusters and over predicates) comes from its manifest.

Each (partition, model, strategy) is one federation of the real ServerApp and ClientApp run
in-process (`fedpsg.run.simulate.simulate_in_process`: Flower's Message API through a LocalGrid, no
Ray start-up), in its own worker process with one torch thread, `--workers` at a time. A
finished job is not run again, so the grid can be stopped and resumed or run in pieces on
several machines (`--only`) and gathered in one place.

    python -m bench.exp_fl_psg --workers 2                   # the whole grid, 50 rounds
    python -m bench.exp_fl_psg --only vctree,shard/ --workers 16  # a piece of it

Results: bench/results/fl_psg.json and fl_psg.md (rewritten after every job); each run's
outputs (metrics, plots, model) under runs/exp_fl_psg/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from benchmark_builder.build import BuildConfig, build_benchmark
from fedpsg.app.outputs import round_metrics
from fedpsg.psg.centralized import budget_epochs, run_centralized, write_outputs
from fedpsg.run.simulate import APP_DIR, simulate_in_process

DATA = APP_DIR.parent / "shared" / "data"
PSG = DATA / "psg_annotations.json.gz"
CATEGORY_MAP = DATA / "fl_psg_word_categorized.json"
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("frequency", "imp", "motifs", "vctree", "gpsnet")
PARTITIONS = {"iid": None, "alpha=10": 10.0, "alpha=1": 1.0, "alpha=0.1": 0.1, "shard": None}
METRICS = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100")
# FL-PSG's published R@100 / mR@100 (SGDet): centralized, FedAvg Random, Shard-non-IID.
FL_PSG = {
    "imp": ((18.37, 7.11), (14.46, 3.56), (13.06, 2.68)),
    "motifs": ((19.15, 8.14), (15.64, 5.16), (15.43, 4.65)),
    "vctree": ((19.02, 7.82), (14.69, 4.87), (14.62, 4.54)),
    "gpsnet": ((20.28, 8.47), (16.34, 6.66), (16.91, 6.49)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=APP_DIR / "runs" / "exp_fl_psg")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument(
        "--strategy-models", default="motifs,vctree", help="models that also run --extra-strategies"
    )
    p.add_argument("--extra-strategies", default="fedsam,scaffold")
    p.add_argument("--partitions", default=",".join(PARTITIONS))
    p.add_argument("--cl", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--only", help="comma-separated texts: run only jobs whose names contain one")
    p.add_argument("--workers", type=int, default=2, help="jobs at once, one thread each")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--proximal-mu", type=float, default=0.01)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=5, help="server test evaluation period")
    p.add_argument("--clusters", type=int, default=5)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def benchmark(args: argparse.Namespace, partition: str) -> Path:
    """The partition's benchmark folder (built once)."""
    out = args.out.resolve() / "benchmarks" / partition.replace("=", "")
    if not (out / "manifest.json").exists():
        alpha = PARTITIONS[partition]
        method = partition if alpha is None else "dirichlet-client"
        config = BuildConfig(
            num_clients=args.clients,
            partition=method,
            alpha=alpha,
            num_clusters=args.clusters,
            featurizer="category-map",
            featurizer_options={"category_map": CATEGORY_MAP},
            seed=args.seed,
            test_fraction=args.test_fraction,
        )
        build_benchmark(PSG, out, config)
    return out


def jobs(args: argparse.Namespace) -> list[str]:
    """Job names `partition/model/strategy`, and `pooled/model/CL` for the CL rows."""
    names = []
    for partition in args.partitions.split(","):
        for model in args.models.split(","):
            names.append(f"{partition}/{model}/fedavg")
            if model in args.strategy_models.split(","):
                names += [f"{partition}/{model}/{s}" for s in args.extra_strategies.split(",")]
    if args.cl:
        names += [f"pooled/{model}/CL" for model in args.models.split(",")]
    keep = args.only.split(",") if args.only else [""]
    return [n for n in names if any(text in n for text in keep)]


def job_dir(args: argparse.Namespace, name: str) -> Path:
    return args.out.resolve() / "runs" / name.replace("=", "")


def run_config(args: argparse.Namespace, bench: Path, model: str, strategy: str) -> dict:
    return {
        "task": "psg",
        "strategy": strategy,
        "benchmark-dir": str(bench),
        "model": model,
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
        "eval-every": args.eval_every,
    }


def run_job(args: argparse.Namespace, name: str) -> None:
    """One federation (or the CL run); `result.json` marks it finished."""
    torch.set_num_threads(1)
    partition, model, strategy = name.split("/")
    out = job_dir(args, name)
    start = time.perf_counter()
    if strategy == "CL":
        # The split precedes partitioning: every partition pools the same training images.
        bench = benchmark(args, "iid")
        epochs = budget_epochs(args.rounds, args.per_round, args.clients, args.epochs)
        write_outputs(run_centralized(run_config(args, bench, model, "fedavg"), epochs), out)
        final = json.loads((out / "metrics.json").read_text())[-1]
        het = {"cluster_jsd": None, "predicate_jsd": None}
    else:
        bench = benchmark(args, partition)
        simulate_in_process(run_config(args, bench, model, strategy), args.clients, out)
        final = round_metrics(out)
        manifest = json.loads((bench / "manifest.json").read_text())["heterogeneity"]
        het = {k: manifest[k] for k in ("cluster_jsd", "predicate_jsd")}
    row = {"partition": partition, "model": model, "method": strategy, **het}
    row |= {m: final[m] for m in METRICS} | {"wall_s": round(time.perf_counter() - start, 1)}
    row["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    (out / "result.json").write_text(json.dumps(row, indent=2) + "\n")


def gather(args: argparse.Namespace) -> list[dict]:
    """Rows of every finished job of the grid, in grid order."""
    rows = []
    for name in jobs(argparse.Namespace(**{**vars(args), "only": None})):
        path = job_dir(args, name) / "result.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
    return rows


def effects(rows: list[dict]) -> list[str]:
    """Per model: FedAvg's R@100/mR@100 relative to CL and to iid, beside FL-PSG's."""
    by = {(r["partition"], r["model"], r["method"]): r for r in rows}
    lines = [
        "| model | FedAvg iid / CL (R, mR) | FL-PSG Random / CL | shard / iid (R, mR) "
        "| FL-PSG Shard-non-IID / Random | alpha=0.1 / iid (R, mR) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in MODELS:
        cl, iid = by.get(("pooled", model, "CL")), by.get(("iid", model, "fedavg"))
        shard, a01 = by.get(("shard", model, "fedavg")), by.get(("alpha=0.1", model, "fedavg"))

        def ratio(a: dict | None, b: dict | None) -> str:
            if not a or not b:
                return "-"
            return f"{a['R@100'] / b['R@100']:.2f}, {a['mR@100'] / b['mR@100']:.2f}"

        ref = FL_PSG.get(model)
        ref_cl = ref_shard = "-"
        if ref:
            (cr, cm), (rr, rm), (sr, sm) = ref
            ref_cl, ref_shard = f"{rr / cr:.2f}, {rm / cm:.2f}", f"{sr / rr:.2f}, {sm / rm:.2f}"
        lines.append(
            f"| {model} | {ratio(iid, cl)} | {ref_cl} | {ratio(shard, iid)} | {ref_shard} "
            f"| {ratio(a01, iid)} |"
        )
    return lines


def write_results(args: argparse.Namespace, rows: list[dict]) -> None:
    cl_epochs = budget_epochs(args.rounds, args.per_round, args.clients, args.epochs)
    setting = (
        f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds x "
        f"{args.epochs} local epoch(s), SGD lr {args.lr} momentum {args.momentum}, batch "
        f"{args.batch_size}, PredCls on labels + geometry, FedSAM rho {args.rho}, "
        f"{args.clusters} FL-PSG category-map clusters, test fraction {args.test_fraction}, "
        f"seed {args.seed}, test evaluation every {args.eval_every} rounds; CL: {cl_epochs} "
        "epoch(s) on the pooled training images"
    )
    args.results.mkdir(parents=True, exist_ok=True)
    payload = {"setting": setting, "rows": rows}
    (args.results / "fl_psg.json").write_text(json.dumps(payload, indent=2) + "\n")
    head = "| partition | cluster JSD | predicate JSD | model | method | " + " | ".join(METRICS)
    lines = [
        f"Setting: {setting}; torch {torch.__version__}, one thread per job.",
        "",
        head + " | wall s | ran on |",
        "| --- | ---: | ---: | --- | --- |" + " ---: |" * (len(METRICS) + 1) + " --- |",
    ]
    for r in rows:
        het = ["-" if r[k] is None else f"{r[k]:.3f}" for k in ("cluster_jsd", "predicate_jsd")]
        values = " | ".join(f"{100 * r[m]:.2f}" for m in METRICS)
        lines.append(
            f"| {r['partition']} | {het[0]} | {het[1]} | {r['model']} | {r['method']} "
            f"| {values} | {r['wall_s']:.0f} | {r['machine']} |"
        )
    lines += [
        "",
        "Recalls in %, graph-constrained, on the held-out test split, after the last round.",
        "",
        "Direction of the effects (ratios of R@100, mR@100; FL-PSG's from its SGDet table):",
        "",
        *effects(rows),
    ]
    (args.results / "fl_psg.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.job:
        run_job(args, args.job)
        return
    partitions = args.partitions.split(",")
    unknown = set(partitions) - set(PARTITIONS)
    if unknown:
        sys.exit(f"unknown partition(s) {sorted(unknown)}; choose from {list(PARTITIONS)}")
    # built once, side by side, before the workers read them
    with ProcessPoolExecutor(min(args.workers, len(partitions))) as pool:
        list(pool.map(partial(benchmark, args), partitions))
    pending = [n for n in jobs(args) if not (job_dir(args, n) / "result.json").exists()]
    base = [sys.executable, "-m", "bench.exp_fl_psg", *(argv if argv is not None else sys.argv[1:])]
    running: dict[str, subprocess.Popen] = {}
    failed = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tqdm(total=len(pending), desc="FL-PSG grid", unit="job") as bar:
        while pending or running:
            while pending and len(running) < args.workers:
                name = pending.pop(0)
                log = job_dir(args, name).with_suffix(".log")
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as handle:
                    cmd = [*base, "--job", name]
                    running[name] = subprocess.Popen(cmd, env=env, stdout=handle, stderr=handle)
            time.sleep(2)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode:
                    failed.append(name)
                    bar.write(f"{name}: failed, see {job_dir(args, name).with_suffix('.log')}")
                bar.update()
                write_results(args, gather(args))
    write_results(args, gather(args))
    print((args.results / "fl_psg.md").read_text())
    if failed:
        sys.exit(f"failed jobs: {failed}")


if __name__ == "__main__":
    main()
