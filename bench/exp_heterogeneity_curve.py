"""The heterogeneity curve: R@50 and mR@50 against the measured heterogeneity index.

Reads the FL-PSG grid's rows (`bench/exp_fl_psg.py`: its tiers 1 and 2 give iid, alpha = 10,
1, 0.1 and shard, its `curve` tier alpha = 100, 3, 0.3 and 0.03, so 9 partitions from iid to
shard), keeps FedAvg MOTIFS and VCTree under both frequency-prior modes, and for each (model,
prior) fits recall = a_seed + b * index by least squares over every seed's point (each seed
has its own split and partition, so its own measured index, and its own test split, whose
offset a_seed the fit removes). The slope is reported per 0.1 of index with its 95% interval
(Student t, points - seeds - 1 degrees of freedom); "costs recall" is read only when that
interval excludes 0.

    python -m bench.exp_heterogeneity_curve          # after bench.exp_fl_psg --tiers 1,2,curve

Writes bench/results/<name>.{md,json,png} (`--name`, default heterogeneity_curve); `--models`
picks other models of the grid (the frequency baseline's rows give a 5-partition curve).
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


def fit(x: list[float], y: list[float], seeds: list[int]) -> dict[str, float]:
    """Least-squares slope with seed fixed effects and its 95% interval, per 0.1 of index in
    recall points.

    Each seed has its own test split, which moves every partition's recall by the same
    amount (about 3 R@50 points between seeds here); centring x and y within each seed
    removes that offset, so the slope is read from the partitions' differences within a
    seed. Degrees of freedom: points - seeds - 1.
    """
    x_arr, y_arr, s_arr = np.asarray(x), np.asarray(y), np.asarray(seeds)
    xc, yc = x_arr.copy(), y_arr.copy()
    for seed in np.unique(s_arr):
        mask = s_arr == seed
        xc[mask] -= x_arr[mask].mean()
        yc[mask] -= y_arr[mask].mean()
    slope = float((xc @ yc) / (xc @ xc))
    dof = len(x) - len(np.unique(s_arr)) - 1
    residual = yc - slope * xc
    stderr = float(np.sqrt((residual @ residual) / dof / (xc @ xc)))
    half = stats.t.ppf(0.975, dof) * stderr
    scale = 0.1 * 100  # per 0.1 of index, in recall points
    return {
        "n": len(x),
        "slope_per_0.1": slope * scale,
        "ci95_low": (slope - half) * scale,
        "ci95_high": (slope + half) * scale,
        "intercept": float(y_arr.mean() - slope * x_arr.mean()) * 100,
        "r2_within": 1 - float(residual @ residual) / float(yc @ yc) if yc.any() else 0.0,
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
    p.add_argument("--models", default="motifs,vctree")
    p.add_argument("--name", default="heterogeneity_curve", help="output file stem")
    args = p.parse_args()
    series = [(m, prior) for m in args.models.split(",") for prior in ("federated", "none")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(args.rows.read_text())["rows"]
    fits, lines = [], []
    fig, axes = plt.subplots(len(METRICS), len(INDICES), figsize=(11, 8), squeeze=False)
    for model, prior in series:
        groups = points(rows, model, prior)
        if len(groups) < 3:
            continue
        for i, metric in enumerate(METRICS):
            for j, index in enumerate(INDICES):
                xs = [r[index] for g in groups.values() for r in g]
                ys = [r[metric] for g in groups.values() for r in g]
                seeds = [r["seed"] for g in groups.values() for r in g]
                f = fit(xs, ys, seeds) | {"model": model, "prior": prior, "metric": metric,
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
    shown = ",".join(dict.fromkeys(f["model"] for f in fits))  # those with 3+ partitions
    fig.suptitle(f"FedAvg ({shown}), 100 clients x 5 per round, 100 rounds: mean and "
                 "range over seeds; line: slope fitted within seeds")  # fmt: skip
    fig.tight_layout()
    args.results.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.results / f"{args.name}.png", dpi=110)
    plt.close(fig)
    lines = [
        "Slope of recall (points) per 0.1 of heterogeneity index, least squares over every "
        "seed's point with a per-seed offset (each seed has its own test split), 95% interval "
        "(t, points - seeds - 1 df). Source: " + args.rows.name + ".",
        "",
        "| model | prior | metric | index | partitions | points | slope / 0.1 | 95% interval "
        "| R^2 within seeds | reading |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for f in fits:
        lines.append(
            f"| {f['model']} | {f['prior']} | {f['metric']} | {f['index']} | {f['partitions']}"
            f" | {f['n']} | {f['slope_per_0.1']:+.2f} | [{f['ci95_low']:+.2f}, "
            f"{f['ci95_high']:+.2f}] | {f['r2_within']:.2f} | {reading(f)} |"
        )
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.results / f"{args.name}.json").write_text(json.dumps(fits, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
