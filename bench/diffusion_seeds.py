"""Seed spread of the diffusion flatness experiment: one table over replicates of the same arms.

`bench.exp_diffusion_flatness --seed S --tag _seedS` replicates a setting with another seed
(train/test split, initialisation, noise draws, samples). This reads the replicates' result
files (files of the same seed, e.g. arms run in two batches, are merged) and gives, per arm
and measure, the mean and the range over the seeds, so a difference between arms can be read
against the spread within an arm, and plots FID@100 against the top Hessian eigenvalue over
every arm and seed (`<out>_fid_eigenvalue.png`). Arms missing from any seed are left out.

    python -m bench.diffusion_seeds bench/results/diffusion_flatness_central.json \
        bench/results/diffusion_flatness_central_seed1.json \
        --out bench/results/diffusion_flatness_central_seeds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

MEASURES = {
    "FID@20": lambda r: r["fid_20"],
    "FID@100": lambda r: r["fid_100"],
    "FID@100 vs train": lambda r: r["fid_100_train"],
    "FID@20 8-bit": lambda r: r["fid_20_q8"],
    "FID@20 4-bit": lambda r: r["fid_20_q4"],
    "test-loss rise 4-bit": lambda r: r["test_loss_q4"] - r["test_loss"],
    "test-loss ratio 4-bit": lambda r: r["test_loss_q4"] / r["test_loss"],
    "lambda_max": lambda r: r["hessian_top_eigenvalue"],
    "lambda_min": lambda r: r["hessian"]["all"]["smallest"],
    "lambda_max weights": lambda r: r["hessian"]["weights"]["largest"],
    "exposure gap@20": lambda r: r["exposure_20"]["mean_gap"],
    "exposure largest gap@20": lambda r: r["exposure_20"]["largest_gap"],
}
PLOTTED = ("FID@100", "lambda_max", "test-loss rise 4-bit")


def by_seed(results: list[dict]) -> dict[int, dict[str, dict]]:
    """Seed -> arm -> result row, merging the files of one seed."""
    seeds: dict[int, dict[str, dict]] = {}
    for result in results:
        rows = seeds.setdefault(int(result["config"]["seed"]), {})
        rows.update({row["arm"]: row for row in result["arms"]})
    return seeds


def _read(read, row: dict) -> float | None:
    try:
        return float(read(row))
    except KeyError:  # a measure that files of earlier runs do not have
        return None


def seed_values(results: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Arm -> measure -> one value per seed (ascending), for the arms every seed has and the
    measures every one of their rows has."""
    seeds = by_seed(results)
    by_run = [seeds[seed] for seed in sorted(seeds)]
    arms = [arm for arm in by_run[0] if all(arm in run for run in by_run)]
    values = {
        arm: {name: [_read(read, run[arm]) for run in by_run] for name, read in MEASURES.items()}
        for arm in arms
    }
    complete = [n for n in MEASURES if all(None not in values[a][n] for a in arms)]
    return {arm: {n: values[arm][n] for n in complete} for arm in arms}


def _cell(values: list[float]) -> str:
    digits = 4 if max(abs(v) for v in values) < 1 else 1
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f} to {max(values):.{digits}f})"


def table(values: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    names = list(next(iter(values.values()))) if values else list(MEASURES)
    lines = [
        f"Mean (min to max) over seeds {', '.join(map(str, seeds))}.",
        "",
        "| arm | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for arm, measures in values.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(v) for v in measures.values()) + " |")
    return "\n".join(lines)


def plot(values: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 4))
    arms = list(values)
    for ax, name in zip(axes, PLOTTED, strict=True):
        for x, arm in enumerate(arms):
            ys = values[arm][name]
            ax.scatter([x] * len(ys), ys, color="tab:blue", s=14)
            ax.hlines(np.mean(ys), x - 0.3, x + 0.3, color="black")
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(name)
        if name == "lambda_max":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fid_against_eigenvalue(values: dict[str, dict[str, list[float]]], path: Path) -> None:
    """FID@100 against the top Hessian eigenvalue, one point per arm and seed: whether flatter
    models sample better across every arm, not only on average per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, measures in values.items():
        ax.scatter(measures["lambda_max"], measures["FID@100"], label=arm, s=22)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("top Hessian eigenvalue (lambda_max)")
    ax.set_ylabel("FID@100")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="result JSONs of the seeds")
    p.add_argument("--out", type=Path, required=True, help="output stem (.md, .json, .png)")
    args = p.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.results]
    seeds = sorted(by_seed(results))
    values = seed_values(results)
    cards = sorted({result.get("device", "unrecorded") for result in results})
    text = f"Trained on: {', '.join(cards)}.\n\n{table(values, seeds)}"
    args.out.with_suffix(".md").write_text(text + "\n")
    payload = {"seeds": seeds, "files": [str(p) for p in args.results], "arms": values}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(values, args.out.with_suffix(".png"))
    plot_fid_against_eigenvalue(values, args.out.with_name(f"{args.out.name}_fid_eigenvalue.png"))
    print(text)


if __name__ == "__main__":
    main()
