"""Experiment: the FL-PSG model table on the real PSG annotations, FL-PSG's protocol, 3 seeds.

The 24,378 annotated images (labels + box geometry; no pixels), a seeded held-out test split,
100 clients of which 5 train per round, 1 local epoch, SGD lr 0.03 momentum 0.9, batch 16,
100 rounds (FL-PSG's budget), partitioned over the FL-PSG category-map clusters:
`iid` (FL-PSG's "Random"), `shard` (each client holds one cluster: "Shard-non-IID"), and
`alpha=<a>`: each client's cluster mixture drawn from Dirichlet(a), equal client sizes (the
builder's `dirichlet-client`). A seed covers the split and partition (the benchmark build),
the initialisation and the client sampling; every cell runs `--seeds` and reports mean and
range.

Every federated job names its frequency prior (`federated`: the statistics round sums the
clients' predicate-pair counts before round 1; `none`: the table starts at zero, FL-PSG's
setting) and the centralized (CL) row of the same model uses the matching one (`pooled` /
`none`) on the pooled training images for the same number of passes over the data
(`fedpsg.psg.centralized.budget_epochs`). Jobs come in priority tiers:

1. every model x {iid, alpha=10, alpha=1, alpha=0.1, shard}, FedAvg, `federated`; CL `pooled`;
2. MOTIFS and VCTree on the same partitions under `none`; CL `none`;
3. FedProx, FedSAM and SCAFFOLD for MOTIFS and VCTree on {iid, alpha=0.1, shard}, `federated`;
curve: MOTIFS and VCTree, FedAvg, both priors, on the alphas between (100, 3, 0.3, 0.03):
with tiers 1 and 2 these are the heterogeneity curve's 9 points
(`bench/exp_heterogeneity_curve.py`).

Each job is one federation of the real ServerApp and ClientApp in-process
(`fedpsg.run.simulate.simulate_in_process`: Flower's Message API through a LocalGrid, no
Ray), in its own worker process with one torch thread, `--workers` at a time, the model on
`--device` (`cuda` spreads workers over the visible GPUs). Finished jobs are rows of
`<results>/<name>.json`, rewritten after every job; `--resumable` skips the jobs already
there, stops starting jobs that would not end inside `--budget-s`, and stops the run at the
budget. Federations checkpoint every round (`checkpoint`, `resume`): at the budget the
unfinished ones' run folders (checkpoint, metrics so far) are packed into
`<results>/unfinished-<i>.tar` (at most `--pack-files` of `--pack-mib` each, the
furthest-advanced first: a lent machine's call brings back 8 files of 16 MiB), and
`--unpack DIR` puts them back before the next call's jobs start, which then continue after
their last round, exactly as an uninterrupted run (`tests/test_resume.py`). So a grid runs
across several time-limited calls:

    python -m bench.exp_fl_psg --tiers 1 --workers 8 --resumable --budget-s 540
    python -m bench.exp_fl_psg --tiers 1 --workers 8 --resumable --budget-s 540 --unpack prev/
    python -m bench.exp_fl_psg --tiers 1,2,3,curve --only motifs --workers 2

Calls on several machines write several results files; `--merge A.json B.json` adds their
rows (a job already in the results is kept) and rewrites the tables. A resumed federation's
"job s" is its compute time summed over the calls it ran in.

Workers: on the 16-core H200 machine one MOTIFS federation took 344 s with 8 running and
about 730 s with 16 (hyperthreads and memory shared): the same throughput, so 8 workers
finish jobs inside a 10-minute call where 16 do not. A VCTree federation takes about 1,040 s
there (two calls) and packs into one 9 MB file: beside the results' two files a call brings back
six packs, so run it with `--workers 6 --pack-files 6` (with eight, three runs lost their rounds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from benchmark_builder.build import BuildConfig, build_benchmark
from fedpsg.psg.centralized import budget_epochs, run_centralized
from fedpsg.run.simulate import APP_DIR, simulate_in_process

DATA = Path(os.environ.get("FEDPSG_SHARED_DATA", APP_DIR.parent / "shared" / "data"))
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("frequency", "imp", "motifs", "vctree", "gpsnet")
MAIN_PARTITIONS = ("iid", "alpha=10", "alpha=1", "alpha=0.1", "shard")
CURVE_PARTITIONS = ("alpha=100", "alpha=3", "alpha=0.3", "alpha=0.03")
METRICS = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100", "mR-present@50")
CL_PRIOR = {"federated": "pooled", "none": "none"}
# Rough one-thread CPU seconds of a 100-round job, until the grid has measured its own.
COST_S = {"frequency": 120, "imp": 450, "motifs": 450, "gpsnet": 700, "vctree": 1600}
# FL-PSG's published R@100 / mR@100 (SGDet): centralized, FedAvg Random, Shard-non-IID.
FL_PSG = {
    "imp": ((18.37, 7.11), (14.46, 3.56), (13.06, 2.68)),
    "motifs": ((19.15, 8.14), (15.64, 5.16), (15.43, 4.65)),
    "vctree": ((19.02, 7.82), (14.69, 4.87), (14.62, 4.54)),
    "gpsnet": ((20.28, 8.47), (16.34, 6.66), (16.91, 6.49)),
}


def tier_cells(tier: str) -> list[tuple[str, str, str, str]]:
    """(partition, model, method, prior) of one tier, in priority order (CL rows first)."""
    pair = ("motifs", "vctree")
    if tier == "1":
        return [("pooled", m, "CL", "federated") for m in MODELS] + [
            (p, m, "fedavg", "federated") for p in ("iid", "shard", "alpha=0.1", "alpha=1",
                                                    "alpha=10") for m in MODELS
        ]  # fmt: skip
    if tier == "2":
        return [("pooled", m, "CL", "none") for m in pair] + [
            (p, m, "fedavg", "none") for p in MAIN_PARTITIONS for m in pair
        ]
    if tier == "3":
        return [
            (p, m, s, "federated")
            for s in ("fedprox", "fedsam", "scaffold")
            for p in ("iid", "alpha=0.1", "shard")
            for m in pair
        ]
    if tier == "curve":
        return [
            (p, m, "fedavg", prior)
            for prior in ("federated", "none")
            for p in CURVE_PARTITIONS
            for m in pair
        ]
    raise ValueError(f"unknown tier {tier!r}; choose from 1, 2, 3, curve")


def job_name(partition: str, model: str, method: str, prior: str, seed: int) -> str:
    """`partition/model/method/prior/seed`; a CL job's prior is the centralized one."""
    if method == "CL":
        prior = CL_PRIOR[prior]
    return f"{partition}/{model}/{method}/{prior}/{seed}"


def jobs(args: argparse.Namespace) -> list[str]:
    """Every job of the chosen tiers, a cell's seeds together, in priority order."""
    names: list[str] = []
    for tier in args.tiers.split(","):
        for cell in tier_cells(tier.strip()):
            for seed in args.seed_list:
                name = job_name(*cell, seed)
                if name not in names:
                    names.append(name)
    keep = args.only.split(",") if args.only else [""]
    return [n for n in names if any(text in n for text in keep)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=APP_DIR / "runs" / "exp_fl_psg")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--name", default="fl_psg_seeds", help="results file stem")
    p.add_argument("--tiers", default="1,2,3,curve")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", help="comma-separated texts: run only jobs whose names contain one")
    p.add_argument("--workers", type=int, default=2, help="jobs at once, one thread each")
    p.add_argument("--device", default="cpu", help="cpu | cuda (workers spread over GPUs)")
    p.add_argument("--resumable", action="store_true", help="skip jobs already in the results")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="wall-clock budget")
    p.add_argument("--cost-scale", type=float, default=1.0, help="scales COST_S (other machine)")
    p.add_argument("--pack-mib", type=float, default=15.0, help="size of an unfinished-*.tar")
    p.add_argument("--pack-files", type=int, default=8, help="most unfinished-*.tar files")
    p.add_argument("--unpack", type=Path, help="folder of unfinished-*.tar from the last call")
    p.add_argument("--merge", type=Path, nargs="+", help="add these results files' rows, write")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--proximal-mu", type=float, default=0.01)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=10, help="server test evaluation period")
    p.add_argument("--clusters", type=int, default=5)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    return args


def benchmark(args: argparse.Namespace, partition: str, seed: int) -> Path:
    """The partition's benchmark folder for one seed (built once)."""
    out = args.out.resolve() / "benchmarks" / f"seed{seed}" / partition.replace("=", "")
    if not (out / "manifest.json").exists():
        alpha = float(partition.split("=")[1]) if partition.startswith("alpha=") else None
        config = BuildConfig(
            num_clients=args.clients,
            partition="dirichlet-client" if alpha is not None else partition,
            alpha=alpha,
            num_clusters=args.clusters,
            featurizer="category-map",
            featurizer_options={"category_map": DATA / "fl_psg_word_categorized.json"},
            seed=seed,
            test_fraction=args.test_fraction,
        )
        build_benchmark(DATA / "psg_annotations.json.gz", out, config)
    return out


def run_config(args: argparse.Namespace, bench: Path, name: str) -> dict:
    partition, model, method, prior, seed = name.split("/")
    return {
        "task": "psg",
        "strategy": "fedavg" if method == "CL" else method,
        "benchmark-dir": str(bench),
        "model": model,
        "mode": "predcls",
        "features": "geometry",
        "frequency-prior": prior,
        "num-server-rounds": args.rounds,
        "fraction-train": args.per_round / args.clients,
        "min-train-nodes": args.per_round,
        "local-epochs": args.epochs,
        "lr": args.lr,
        "momentum": args.momentum,
        "batch-size": args.batch_size,
        "seed": int(seed),
        "proximal-mu": args.proximal_mu,
        "rho": args.rho,
        "eval-every": args.eval_every,
        "device": args.device,
        "checkpoint": method != "CL",  # every round; a killed federation resumes from it
        "resume": method != "CL",
    }


def machine(device: str) -> str:
    """What a job ran on: CPU cores, and the card when the model was on a GPU."""
    text = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if device.startswith("cuda"):
        text += f", {torch.cuda.get_device_name()}"
    return text


def run_job(args: argparse.Namespace, name: str) -> dict:
    """One federation (or the CL run) -> its result row (final metrics, a short history)."""
    torch.set_num_threads(1)
    partition, model, method, prior, seed = name.split("/")
    out = job_dir(args, name)
    start = time.perf_counter()
    if method == "CL":
        # The split precedes partitioning: every partition of a seed pools the same images.
        bench = benchmark(args, "iid", int(seed))
        epochs = budget_epochs(args.rounds, args.per_round, args.clients, args.epochs)
        history = run_centralized(run_config(args, bench, name), epochs).history
        final = history[-1]
        het = {"cluster_jsd": None, "predicate_jsd": None}
        curve = [{"round": row["epoch"], **{m: row[m] for m in METRICS}} for row in history]
        elapsed = [row["wall_s"] for row in history]
    else:
        bench = benchmark(args, partition, int(seed))
        simulate_in_process(run_config(args, bench, name), args.clients, out)
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        evaluated = [r for r in rounds if r["server"]]
        final = evaluated[-1]["server"]
        manifest = json.loads((bench / "manifest.json").read_text())["heterogeneity"]
        het = {k: manifest[k] for k in ("cluster_jsd", "predicate_jsd")}
        curve = [{"round": r["round"], **{m: r["server"][m] for m in METRICS}} for r in evaluated]
        elapsed = [r["elapsed-s"] for r in rounds]
    return {
        "job": name,
        "partition": partition,
        "model": model,
        "method": method,
        "prior": prior,
        "seed": int(seed),
        **het,
        **{m: final[m] for m in METRICS},
        "curve": curve,
        "elapsed_s": elapsed,  # after each round (epoch), from the run's start
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": machine(args.device),
    }


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def job_seconds(row: dict) -> float:
    """A job's compute time over all the calls it ran in: a resumed federation's round
    times restart from zero in each call, so the last time before every restart adds up."""
    elapsed = row["elapsed_s"]
    if row["method"] == "CL" or not elapsed:
        return row["wall_s"]
    ends = [a for a, b in itertools.pairwise(elapsed) if b < a]
    return sum(ends) + elapsed[-1]


def merge(args: argparse.Namespace) -> None:
    """Add the rows of `--merge` files that the results lack; rewrite the tables."""
    rows = load_rows(args.results / f"{args.name}.json")
    done = {r["job"] for r in rows}
    for path in args.merge:
        for row in load_rows(path):
            if row["job"] not in done:
                rows.append(row)
                done.add(row["job"])
    write_results(args, rows)
    print(f"{len(rows)} jobs in {args.results / f'{args.name}.json'}")


def cells(rows: list[dict]) -> list[dict]:
    """Rows grouped by (partition, model, method, prior): mean, min and max over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["partition"], row["model"], row["method"], row["prior"])
        groups.setdefault(key, []).append(row)
    out = []
    for (partition, model, method, prior), group in groups.items():
        cell = {"partition": partition, "model": model, "method": method, "prior": prior,
                "seeds": sorted(r["seed"] for r in group)}  # fmt: skip
        for key in (*METRICS, "cluster_jsd", "predicate_jsd", "job_s"):
            values = [job_seconds(r) if key == "job_s" else r[key] for r in group]
            values = [v for v in values if v is not None]
            if values:
                cell[key] = {"mean": statistics.fmean(values), "min": min(values),
                             "max": max(values)}  # fmt: skip
        out.append(cell)
    order = {p: i for i, p in enumerate(("pooled", *MAIN_PARTITIONS, *CURVE_PARTITIONS))}
    methods = ("CL", "fedavg", "fedprox", "fedsam", "scaffold")
    out.sort(key=lambda c: (c["prior"] == "none", MODELS.index(c["model"]),
                            methods.index(c["method"]), order.get(c["partition"], 99)))  # fmt: skip
    return out


def fmt(stat: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """`mean [min, max]`."""
    if not stat:
        return "-"
    return (f"{scale * stat['mean']:.{digits}f} [{scale * stat['min']:.{digits}f}, "
            f"{scale * stat['max']:.{digits}f}]")  # fmt: skip


def effects(rows: list[dict]) -> list[str]:
    """FedAvg iid / CL and shard / iid (R@100, mR@100) beside FL-PSG's ratios. The ratio is
    taken per seed (both runs share the seed's test split) and read only where every seed's
    ratio lies on the same side of 1."""
    by = {(r["partition"], r["model"], r["method"], r["prior"], r["seed"]): r for r in rows}

    def reading(a: tuple, b: tuple, key: str) -> str:
        ratios = [
            by[(*a, seed)][key] / by[(*b, seed)][key]
            for seed in sorted({r["seed"] for r in rows})
            if (*a, seed) in by and (*b, seed) in by and by[(*b, seed)][key] > 0
        ]
        if not ratios:
            return "-"
        text = f"{statistics.fmean(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"
        if min(ratios) > 1:
            return f"{text} higher"
        if max(ratios) < 1:
            return f"{text} lower"
        return f"{text} no reading"

    lines = [
        "| model | prior | seeds | FedAvg iid / CL, R@100 | mR@100 | FL-PSG Random / CL (R, mR) "
        "| shard / iid, R@100 | mR@100 | FL-PSG Shard / Random (R, mR) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for prior in ("federated", "none"):
        for model in MODELS:
            cl = ("pooled", model, "CL", CL_PRIOR[prior])
            iid, shard = ("iid", model, "fedavg", prior), ("shard", model, "fedavg", prior)
            seeds = sorted(r["seed"] for r in rows if (r["partition"], r["model"], r["method"],
                                                       r["prior"]) == iid)  # fmt: skip
            if not seeds:
                continue
            ref = FL_PSG.get(model)
            ref_cl = ref_shard = "-"
            if ref:
                (cr, cm), (rr, rm), (sr, sm) = ref
                ref_cl = f"{rr / cr:.2f}, {rm / cm:.2f}"
                ref_shard = f"{sr / rr:.2f}, {sm / rm:.2f}"
            lines.append(
                f"| {model} | {prior} | {','.join(map(str, seeds))} "
                f"| {reading(iid, cl, 'R@100')} | {reading(iid, cl, 'mR@100')} | {ref_cl} "
                f"| {reading(shard, iid, 'R@100')} | {reading(shard, iid, 'mR@100')} "
                f"| {ref_shard} |"
            )
    return lines


def by_partition(table: list[dict], prior: str, seeds: int = 3) -> list[str]:
    """FedAvg's R@50 / mR@50 (mean [min, max]) per partition and model under one prior, the
    partition's measured index beside it and the CL row last: the README's table. A cell with
    fewer than `seeds` seeds names them; "-" where none has run."""
    cell = {(c["partition"], c["model"], c["method"]): c for c in table if c["prior"] == prior
            or (c["method"] == "CL" and c["prior"] == CL_PRIOR[prior])}  # fmt: skip
    models = [m for m in MODELS if any(k[1] == m for k in cell)]
    if not models:
        return []

    def text(c: dict | None) -> str:
        if c is None:
            return "-"
        partial = "" if len(c["seeds"]) >= seeds else f" (seeds {','.join(map(str, c['seeds']))})"
        return f"{fmt(c.get('R@50'))} / {fmt(c.get('mR@50'))}{partial}"

    lines = [
        f"| partition | cluster JSD | predicate JSD | {' | '.join(models)} |",
        "| --- | ---: | ---: |" + " --- |" * len(models),
    ]
    index = {k[0]: c for k, c in cell.items() if k[2] == "fedavg"}  # one cell per partition
    for partition in sorted(index, key=lambda p: index[p]["cluster_jsd"]["mean"]):
        het = [f"{index[partition][k]['mean']:.3f}" for k in ("cluster_jsd", "predicate_jsd")]
        row = [text(cell.get((partition, m, "fedavg"))) for m in models]
        lines.append(f"| {partition} | {het[0]} | {het[1]} | {' | '.join(row)} |")
    row = [text(cell.get(("pooled", m, "CL"))) for m in models]
    lines.append(f"| CL, prior {CL_PRIOR[prior]} | | | {' | '.join(row)} |")
    return lines


TIER3_METHODS = ("fedprox", "fedsam", "scaffold")


def by_method(rows: list[dict], seeds: int = 3) -> list[str]:
    """Tier 3 against FedAvg, prior `federated`: per model and partition, each method's R@50 /
    mR@50 (mean over seeds) and its paired difference from FedAvg in points, per seed (same
    split, partition, initialisation and sampling), mean [min, max]. A difference is read only
    where every seed's lies on the same side of 0 ("+"/"-" marks it). A cell with fewer than
    `seeds` seeds names them."""
    by = {(r["partition"], r["model"], r["method"], r["seed"]): r
          for r in rows if r["prior"] == "federated"}  # fmt: skip
    ran = sorted({(k[1], k[0]) for k in by if k[2] in TIER3_METHODS},
                 key=lambda mp: (MODELS.index(mp[0]), MAIN_PARTITIONS.index(mp[1])))  # fmt: skip
    if not ran:
        return []

    def cell(model: str, partition: str, method: str) -> str:
        ran = sorted(k[3] for k in by if k[:3] == (partition, model, method))
        if not ran:
            return "-"
        mean = " / ".join(
            f"{100 * statistics.fmean(by[(partition, model, method, s)][k] for s in ran):.1f}"
            for k in ("R@50", "mR@50")
        )
        if len(ran) < seeds:
            mean += f" (seeds {','.join(map(str, ran))})"
        if method == "fedavg":
            return mean
        diffs = []
        for key in ("R@50", "mR@50"):
            d = [100 * (by[(partition, model, method, s)][key] - by[(partition, model, "fedavg",
                 s)][key]) for s in ran if (partition, model, "fedavg", s) in by]  # fmt: skip
            if not d:
                return mean
            sign = "+" if min(d) > 0 else "-" if max(d) < 0 else ""
            diffs.append(f"{statistics.fmean(d):+.2f} [{min(d):+.2f}, {max(d):+.2f}]{sign}")
        return f"{mean} ({' / '.join(diffs)})"

    lines = [
        "| model | partition | fedavg | " + " | ".join(TIER3_METHODS) + " |",
        "| --- | --- | --- |" + " --- |" * len(TIER3_METHODS),
    ]
    for model, partition in ran:
        row = [cell(model, partition, m) for m in ("fedavg", *TIER3_METHODS)]
        lines.append(f"| {model} | {partition} | {' | '.join(row)} |")
    return lines


def write_results(args: argparse.Namespace, rows: list[dict]) -> None:
    """`<name>.json` (every job's row, and the cells) and `<name>.md` (the cells)."""
    cl_epochs = budget_epochs(args.rounds, args.per_round, args.clients, args.epochs)
    setting = (
        f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds x "
        f"{args.epochs} local epoch(s), SGD lr {args.lr} momentum {args.momentum}, batch "
        f"{args.batch_size}, PredCls on labels + geometry, FedProx mu {args.proximal_mu}, "
        f"FedSAM rho {args.rho}, {args.clusters} FL-PSG category-map clusters, test fraction "
        f"{args.test_fraction}, test evaluation every {args.eval_every} rounds and after the "
        f"last; CL: {cl_epochs} epoch(s) on the pooled training images"
    )
    table = cells(rows)
    args.results.mkdir(parents=True, exist_ok=True)
    payload = {"setting": setting, "cells": table, "rows": rows}
    (args.results / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    head = ["partition", "cluster JSD", "predicate JSD", "model", "method", "prior", "seeds",
            *METRICS, "job s", "ran on"]  # fmt: skip
    lines = [
        f"Setting: {setting}.",
        "",
        "Each cell: mean [min, max] over the seeds listed (a seed = split + partition, "
        "initialisation, client sampling). Recalls in %, graph-constrained, on the seed's "
        "held-out test split after the last round; mR@K over all 56 predicate classes "
        "(OpenPSG), mR-present@50 over those in the split.",
        "",
        "| " + " | ".join(head) + " |",
        "| --- | ---: | ---: | --- | --- | --- | --- |" + " ---: |" * (len(METRICS) + 1) + " --- |",
    ]
    machines = {}
    for row in rows:
        machines.setdefault((row["partition"], row["model"], row["method"], row["prior"]),
                            set()).add(row["machine"])  # fmt: skip
    for c in table:
        key = (c["partition"], c["model"], c["method"], c["prior"])
        het = [fmt(c.get(k), 1.0, 3) for k in ("cluster_jsd", "predicate_jsd")]
        values = " | ".join(fmt(c.get(m)) for m in METRICS)
        seeds = ",".join(map(str, c["seeds"]))
        lines.append(
            f"| {c['partition']} | {het[0]} | {het[1]} | {c['model']} | {c['method']} "
            f"| {c['prior']} | {seeds} | {values} | {c['job_s']['mean']:.0f} "
            f"| {'; '.join(sorted(machines[key]))} |"
        )
    lines += ["", "Effect directions: per-seed ratios, mean [min, max]; a direction is read only "
              "where every seed's ratio lies on the same side of 1 (FL-PSG's ratios from its "
              "SGDet table, single runs):", ""]  # fmt: skip
    lines += effects(rows)
    for prior in ("federated", "none"):
        pivot = by_partition(table, prior, len(args.seed_list))
        if pivot:
            title = (
                f"FedAvg R@50 / mR@50 by partition, prior `{prior}` (CL: "
                f"`{CL_PRIOR[prior]}`), partitions by their cluster JSD:"
            )
            lines += ["", title, "", *pivot]
    methods = by_method(rows, len(args.seed_list))
    if methods:
        lines += ["", "Strategies against FedAvg, prior `federated`: R@50 / mR@50 (mean over "
                  "seeds), then the per-seed paired difference from FedAvg in points, mean "
                  "[min, max], marked +/- where every seed agrees:", "", *methods]  # fmt: skip
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def job_dir(args: argparse.Namespace, name: str) -> Path:
    return args.out.resolve() / "runs" / name.replace("=", "")


def pack_unfinished(args: argparse.Namespace, names: list[str]) -> list[Path]:
    """The run folders of stopped federations (checkpoint, metrics so far; no plots or final
    model) in at most `--pack-files` tar files of at most `--pack-mib` each (what a lent
    machine's call brings back: 8 files of 16 MiB), for the next call's `--unpack`. The
    furthest-advanced federations go first; those that do not fit are named and left."""

    def rounds_done(name: str) -> int:
        metrics = job_dir(args, name) / "metrics.json"
        return len(json.loads(metrics.read_text())["rounds"]) if metrics.exists() else 0

    limit = args.pack_mib * 2**20
    chunks: list[list[Path]] = []
    size, left = limit, []
    for name in sorted(names, key=rounds_done, reverse=True):
        root = job_dir(args, name)
        if not (root / "checkpoints" / "checkpoint.npz").exists():
            continue
        files = [f for f in root.rglob("*") if f.is_file() and "plots" not in f.parts
                 and f.name != "final_model.pt"]  # fmt: skip
        need = sum(f.stat().st_size for f in files)
        if size + need > limit:
            if len(chunks) == args.pack_files or need > limit:
                left.append(name)
                continue
            chunks.append([])
            size = 0.0
        chunks[-1] += files
        size += need
    if left:
        print(f"not packed (over {args.pack_files} x {args.pack_mib} MiB): {', '.join(left)}")
    packs = []
    args.results.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks):
        packs.append(args.results / f"unfinished-{i}.tar")
        with tarfile.open(packs[-1], "w") as tar:
            for path in chunk:
                tar.add(path, arcname=str(path.relative_to(args.out.resolve())))
    return packs


def unpack(args: argparse.Namespace) -> None:
    """Put the last call's stopped federations back under `--out`."""
    for pack in sorted(args.unpack.glob("unfinished-*.tar")):
        with tarfile.open(pack) as tar:
            tar.extractall(args.out.resolve(), filter="data")


def estimate_s(rows: list[dict], model: str, method: str, scale: float = 1.0) -> float:
    """Expected wall seconds of a job: the median of this grid's finished ones, else a guess."""
    done = [job_seconds(r) for r in rows if r["model"] == model and r["method"] == method]
    return statistics.median(done) if done else COST_S[model] * scale


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        merge(args)
        return
    if args.job:
        row = run_job(args, args.job)
        (args.out / "rows").mkdir(parents=True, exist_ok=True)
        path = args.out / "rows" / (args.job.replace("/", "__").replace("=", "") + ".json")
        path.write_text(json.dumps(row) + "\n")
        return
    start = time.monotonic()
    if args.unpack:
        unpack(args)
    results = args.results / f"{args.name}.json"
    rows = load_rows(results) if args.resumable else []
    done = {r["job"] for r in rows}
    pending = [n for n in jobs(args) if n not in done]
    builds = sorted({(n.split("/")[0] if n.split("/")[2] != "CL" else "iid", int(n.split("/")[4]))
                     for n in pending})  # fmt: skip
    with ProcessPoolExecutor(max(1, min(args.workers, len(builds) or 1))) as pool:
        list(pool.map(benchmark, [args] * len(builds), *zip(*builds, strict=True)))
    base = [sys.executable, "-m", "bench.exp_fl_psg", *(argv if argv is not None else sys.argv[1:])]
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    running: dict[str, tuple[subprocess.Popen, int]] = {}
    failed: list[str] = []
    with tqdm(total=len(pending), desc="FL-PSG grid", unit="job") as bar:
        while pending or running:
            slots = set(range(args.workers)) - {slot for _, slot in running.values()}
            for name in list(pending):
                if not slots:
                    break
                _, model, method, _, _ = name.split("/")
                left = args.budget_s - (time.monotonic() - start)
                if left < 120:
                    continue  # too late to reach a first checkpoint
                if method == "CL" and estimate_s(rows, model, method, args.cost_scale) * 1.1 > left:
                    continue  # a CL run does not checkpoint: left for the next call
                pending.remove(name)
                slot = slots.pop()
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                log = args.out / "logs" / (name.replace("/", "__").replace("=", "") + ".log")
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as handle:
                    proc = subprocess.Popen([*base, "--job", name], env=env, stdout=handle,
                                            stderr=subprocess.STDOUT)  # fmt: skip
                running[name] = (proc, slot)
            if not running:
                break  # nothing fits the budget any more
            time.sleep(1)
            if time.monotonic() - start > args.budget_s:
                for name, (proc, _) in running.items():
                    proc.kill()
                    proc.wait()
                    bar.write(f"{name}: stopped at the budget")
                packs = pack_unfinished(args, list(running))
                bar.write(f"packed {len(packs)} file(s) of unfinished runs: {packs}")
                break
            for name, (proc, _) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                path = args.out / "rows" / (name.replace("/", "__").replace("=", "") + ".json")
                if proc.returncode or not path.exists():
                    failed.append(name)
                    bar.write(f"{name}: failed (exit {proc.returncode}), see {args.out / 'logs'}")
                else:
                    rows.append(json.loads(path.read_text()))
                    write_results(args, rows)
                bar.update()
    write_results(args, rows)
    left = [n for n in jobs(args) if n not in {r["job"] for r in rows}]
    print(f"{len(rows)} jobs in {results}; {len(left)} left; failed: {failed or 'none'}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
