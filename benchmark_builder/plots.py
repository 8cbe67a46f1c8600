"""PNG plots of a benchmark, drawn from its manifest (so any benchmark folder can be re-plotted)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path


def cluster_heatmap(manifest: dict, path: Path) -> Path:
    """Clients x clusters heatmap of the share of each client's images per cluster."""
    counts = np.array([c["cluster_histogram"] for c in manifest["clients"]], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    num_clients, num_clusters = shares.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * num_clusters, 1.2 + 0.25 * num_clients))
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("cluster")
    ax.set_ylabel("client")
    ax.set_xticks(range(num_clusters))
    partition = manifest["partition"]
    alpha = "" if partition.get("alpha") is None else f", alpha={partition['alpha']:.3g}"
    ax.set_title(
        f"{partition['method']}{alpha}: cluster JSD {manifest['heterogeneity']['cluster_jsd']:.3f}"
    )
    fig.colorbar(image, ax=ax, label="share of client images")
    return _save(fig, path)


def predicate_distribution(manifest: dict, path: Path, top: int = 12) -> Path:
    """Stacked share of the ``top`` most frequent predicates (rest pooled) per client."""
    counts = np.array([c["predicate_histogram"] for c in manifest["clients"]], dtype=float)
    names = manifest["classes"]["predicates"]
    order = np.argsort(-counts.sum(axis=0), kind="stable")[:top]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * len(counts)))
    left = np.zeros(len(counts))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, top + 1))
    for color, p in zip(colors, order, strict=False):
        ax.barh(range(len(counts)), shares[:, p], left=left, color=color, label=names[p])
        left += shares[:, p]
    ax.barh(range(len(counts)), 1 - left, left=left, color="lightgrey", label="other")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of client relations")
    ax.set_ylabel("client")
    ax.set_title(f"predicates per client: JSD {manifest['heterogeneity']['predicate_jsd']:.3f}")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7)
    return _save(fig, path)


def heterogeneity_vs_alpha(rows: Sequence[dict], path: Path) -> Path:
    """Cluster and predicate JSD (and the cluster maximum) against alpha, log x-axis.

    Rows with ``feasible`` false (no partition meets the min size) are marked on the x-axis.
    """
    feasible = [r for r in rows if r["feasible"]]
    alphas = [r["alpha"] for r in feasible]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(alphas, [r["cluster_jsd"] for r in feasible], "o-", label="cluster JSD")
    ax.plot(alphas, [r["predicate_jsd"] for r in feasible], "s-", label="predicate JSD")
    if feasible:
        ax.axhline(feasible[0]["cluster_jsd_max"], ls="--", c="grey", label="cluster JSD max")
    infeasible = [r["alpha"] for r in rows if not r["feasible"]]
    if infeasible:
        ax.plot(infeasible, [0] * len(infeasible), "rx", ms=10, clip_on=False,
                label="infeasible (min size unreachable)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("Dirichlet alpha")
    ax.set_ylabel("heterogeneity index (JSD, base 2)")
    ax.set_ylim(bottom=0)
    ax.legend()
    return _save(fig, path)


def benchmark_plots(manifest: dict, out_dir: Path) -> list[Path]:
    """The standard plots of one benchmark into ``out_dir``."""
    return [
        cluster_heatmap(manifest, out_dir / "clients_x_clusters.png"),
        predicate_distribution(manifest, out_dir / "predicates_per_client.png"),
    ]
