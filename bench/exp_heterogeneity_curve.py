"""The heterogeneity curve: R@50 and mR@50 against the measured heterogeneity index.

Reads the FL-PSG grid's rows (`bench/exp_fl_psg.py`: its tiers 1 and 2 give iid, alpha = 10,
1, 0.1 and shard, its `curve` tier alpha = 100, 3, 0.3 and 0.03, so 9 partitions from iid to
shard), keeps FedAvg MOTIFS and VCTree under both frequency-prior modes, and for each (model,
prior) fits recall = a + b * index by least squares over every seed's point (each seed has
its own split and partition, so its own measured index). The slope is reported per 0.1 of
index with its 95% interval (Student t, n - 2 degrees of freedom); "costs recall" is read
only when that interval excludes 0.

    python -m bench.exp_heterogeneity_curve          # after bench.exp_fl_psg --tiers 1,2,curve

Writes bench/results/heterogeneity_curve.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from scipy import stats

RESULTS = Path(__file__).resolve().parent / "results"
INDICES = ("cluster_jsd", "predicate_jsd")
METRICS = ("R@50", "mR@50")
SERIES = [(m, p) for m in ("motifs", "vctree") for p in ("federated", "none")]


def fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares slope with its 95% interval, scaled to 0.1 of index and to % points."""
    result = stats.linregress(x, y)
    half = stats.t.ppf(0.975, len(x) - 2) * result.stderr
    scale = 0.1 * 100  # per 0.1 of index, in recall points
    return {
        "n": len(x),
        "slope_per_0.1": result.slope * scale,
        "ci95_low": (result.slope - half) * scale,
        "ci95_high": (result.slope + half) * scale,
        "intercept": result.intercept * 100,
        "r2": result.rvalue**2,
    }


def points(rows: list[dict], model: str, prior: str) -> dict[str, list[dict]]:
    """FedAvg rows of one series, grouped by partition."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        if (row["model"], row["prior"], row["method"]) == (model, prior, "fedavg"):
            out.setdefault(row["partition"], []).append(row)
    return out


def reading(f: dict) -> str:
    if f["ci95_high"] < 0:
        return "costs recall"
    if f["ci95_low"] > 0:
        return "raises recall"
    return "no effect readable (interval spans 0)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=Path, default=RESULTS / "fl_psg_seeds.json")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(args.rows.read_text())["rows"]
    fits, lines = [], []
    fig, axes = plt.subplots(len(METRICS), len(INDICES), figsize=(11, 8), squeeze=False)
    for model, prior in SERIES:
        groups = points(rows, model, prior)
        if len(groups) < 3:
            continue
        for i, metric in enumerate(METRICS):
            for j, index in enumerate(INDICES):
                xs = [r[index] for g in groups.values() for r in g]
                ys = [r[metric] for g in groups.values() for r in g]
                f = fit(xs, ys) | {"model": model, "prior": prior, "metric": metric,
                                   "index": index, "partitions": len(groups)}  # fmt: skip
                fits.append(f)
                ax = axes[i][j]
                mx = [statistics.fmean(r[index] for r in g) for g in groups.values()]
                my = [100 * statistics.fmean(r[metric] for r in g) for g in groups.values()]
                lo = [my[k] - 100 * min(r[metric] for r in g) for k, g in
                      enumerate(groups.values())]  # fmt: skip
                hi = [100 * max(r[metric] for r in g) - my[k] for k, g in
                      enumerate(groups.values())]  # fmt: skip
                style = "-" if prior == "federated" else "--"
                bars = ax.errorbar(mx, my, yerr=[lo, hi], fmt="o", capsize=3, ms=4,
                                   label=f"{model}, prior {prior}: "
                                   f"{f['slope_per_0.1']:+.2f} [{f['ci95_low']:+.2f}, "
                                   f"{f['ci95_high']:+.2f}] / 0.1")  # fmt: skip
                grid_x = np.linspace(0, max(xs), 20)
                ax.plot(grid_x, f["intercept"] + f["slope_per_0.1"] * grid_x / 0.1, style,
                        color=bars[0].get_color())  # fmt: skip
                ax.set(xlabel=f"{index} (measured)", ylabel=f"{metric} (%)")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle("FedAvg, 100 clients x 5 per round, 100 rounds: mean and range over seeds, "
                 "least-squares fit over every seed's point")  # fmt: skip
    fig.tight_layout()
    args.results.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.results / "heterogeneity_curve.png", dpi=110)
    plt.close(fig)
    lines = [
        "Slope of recall (points) per 0.1 of heterogeneity index, least squares over every "
        "seed's point, 95% interval (t, n - 2 df). Source: " + args.rows.name + ".",
        "",
        "| model | prior | metric | index | partitions | points | slope / 0.1 | 95% interval "
        "| R^2 | reading |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for f in fits:
        lines.append(
            f"| {f['model']} | {f['prior']} | {f['metric']} | {f['index']} | {f['partitions']}"
            f" | {f['n']} | {f['slope_per_0.1']:+.2f} | [{f['ci95_low']:+.2f}, "
            f"{f['ci95_high']:+.2f}] | {f['r2']:.2f} | {reading(f)} |"
        )
    (args.results / "heterogeneity_curve.md").write_text("\n".join(lines) + "\n")
    (args.results / "heterogeneity_curve.json").write_text(json.dumps(fits, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
