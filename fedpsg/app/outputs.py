"""A federated run's outputs, written round by round so a half-finished run still shows
its curves: metrics (CSV/JSON), per-client metrics, a final table, plots, the final model.

Layout of `<out-dir>`:
    run_config.json      the run config the ServerApp saw
    metrics.json         per round: server metrics, aggregated train metrics, per-client results,
                         the partitions sampled per stage ("sampled": {"train": [...]})
    metrics.csv          one row per round (server/<metric>, train/<metric>, clients, failures,
                         sampled-train: the sampled partition ids, space-separated)
    client_metrics.csv   one row per (round, client, stage)
    summary.md           final table: round 0, last round, best round of every server metric
    plots/server_metrics.png, plots/client_metrics.png
    final_model.pt       the served global model's state dict after the last round (the
                         average when one of server-ema / server-swa-start is on, else plain)
    final_model_plain.pt, final_model_ema.pt, final_model_swa.pt
                         with any server average on: the plain aggregate and each average kept
                         (SWA: the plain model until it starts), e.g. to evaluate all three of
                         one training
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedpsg.app.config import WEIGHT  # noqa: E402


class RunRecorder:
    """Collects one run's per-round results and writes its output folder.

    Parameters
    ----------
    out_dir : Path
        Where the outputs go (created).
    config : Mapping
        The run config, saved with the outputs.
    resume : bool
        Keep the rounds an earlier, interrupted run already recorded.
    """

    def __init__(self, out_dir: Path, config: Mapping[str, Any], resume: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.rounds: list[dict[str, Any]] = []
        if resume and (self.out_dir / "metrics.json").exists():
            self.rounds = json.loads((self.out_dir / "metrics.json").read_text())["rounds"]
        # elapsed-s counts the training's time across resumes, not this call's only
        self._start = time.monotonic() - (self.rounds[-1]["elapsed-s"] if self.rounds else 0.0)
        _write_json(self.out_dir / "run_config.json", self.config)

    def record(
        self,
        server_round: int,
        server: Mapping[str, float],
        clients: Sequence[Mapping[str, Any]] = (),
        sampled: Mapping[str, Sequence[int]] | None = None,
    ) -> str:
        """Add one round and rewrite the metric files; returns a one-line progress summary.

        `clients` holds one entry per reply: `partition-id`, `stage` (train/evaluate) and
        either its metrics (with `num-examples`) or an `error`; `sampled` the partitions
        the server sent work to, per stage.
        """
        ok = [c for c in clients if "error" not in c]
        row = {
            "round": server_round,
            "elapsed-s": round(time.monotonic() - self._start, 3),
            "server": {k: float(v) for k, v in server.items()},
            "train": _weighted_mean([c for c in ok if c["stage"] == "train"]),
            "evaluate": _weighted_mean([c for c in ok if c["stage"] == "evaluate"]),
            "clients": [dict(c) for c in clients],
            "sampled": {stage: list(ids) for stage, ids in (sampled or {}).items()},
        }
        self.rounds = [r for r in self.rounds if r["round"] < server_round] + [row]
        self._write_metrics()
        return _progress_line(row, int(self.config.get("num-server-rounds", 0)))

    def finish(
        self,
        state_dict: Mapping[str, torch.Tensor] | None,
        named: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Write the final model (and each of the `named` ones as `final_model_<name>.pt`),
        the summary table and the plots."""
        if state_dict is not None:
            torch.save(dict(state_dict), self.out_dir / "final_model.pt")
        for name, state in (named or {}).items():
            torch.save(dict(state), self.out_dir / f"final_model_{name}.pt")
        (self.out_dir / "summary.md").write_text(self.summary())
        plot_dir = self.out_dir / "plots"
        plot_dir.mkdir(exist_ok=True)
        plot_server_metrics(self.rounds, plot_dir / "server_metrics.png")
        plot_client_metrics(self.rounds, plot_dir / "client_metrics.png")

    def summary(self) -> str:
        """Markdown: server metrics at round 0, at the last round and at their best round,
        then per-client participation and last train/evaluate metrics."""
        if not self.rounds:
            return "# Run summary\n\nNo round finished.\n"
        first, last = self.rounds[0], self.rounds[-1]
        lines = [
            "# Run summary",
            "",
            f"task `{self.config.get('task')}`, strategy `{self.config.get('strategy')}`, "
            f"model `{self.config.get('model')}`, {last['round']} rounds, "
            f"seed {self.config.get('seed')}, {last['elapsed-s']:.0f} s",
            "",
            f"| metric | round {first['round']} | round {last['round']} | best (round) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name in last["server"]:
            values = [(r["server"][name], r["round"]) for r in self.rounds if name in r["server"]]
            lower = "loss" in name
            best, at = (min if lower else max)(values, key=lambda v: v[0])
            lines.append(
                f"| {name} | {first['server'].get(name, math.nan):.4f} | "
                f"{last['server'][name]:.4f} | {best:.4f} ({at}) |"
            )
        clients = self.client_frame()
        if not clients.empty:
            lines += ["", "## Clients", "", _client_table(clients)]
        return "\n".join(lines) + "\n"

    def client_frame(self) -> pd.DataFrame:
        """One row per (round, client, stage)."""
        rows = [{"round": r["round"], **c} for r in self.rounds for c in r["clients"]]
        return pd.DataFrame(rows)

    def _write_metrics(self) -> None:
        _write_json(self.out_dir / "metrics.json", {"config": self.config, "rounds": self.rounds})
        flat = [
            {
                "round": r["round"],
                "elapsed-s": r["elapsed-s"],
                **{f"server/{k}": v for k, v in r["server"].items()},
                **{f"train/{k}": v for k, v in r["train"].items()},
                **{f"evaluate/{k}": v for k, v in r["evaluate"].items()},
                "clients": sum("error" not in c for c in r["clients"]),
                "failures": sum("error" in c for c in r["clients"]),
                "sampled-train": " ".join(map(str, r.get("sampled", {}).get("train", []))),
            }
            for r in self.rounds
        ]
        pd.DataFrame(flat).to_csv(self.out_dir / "metrics.csv", index=False)
        self.client_frame().to_csv(self.out_dir / "client_metrics.csv", index=False)


def round_metrics(run_dir: Path, server_round: int | None = None) -> dict[str, float]:
    """The server metrics of one recorded round of a run (the last when None), with its
    `round` number."""
    rounds = json.loads((Path(run_dir) / "metrics.json").read_text())["rounds"]
    row = (
        rounds[-1]
        if server_round is None
        else next(r for r in rounds if r["round"] == server_round)
    )
    return {"round": row["round"], **row["server"]}


def write_comparison(out_dir: Path, names: Sequence[str]) -> str:
    """`comparison.md` / `.json` in `out_dir`: the last-round server metrics of the runs in
    `out_dir/<name>/`, one row per name; returns the markdown."""
    rows = {name: round_metrics(Path(out_dir) / name) for name in names}
    metrics = [m for m in next(iter(rows.values())) if m != "round"]
    lines = [
        "| run | round | " + " | ".join(metrics) + " |",
        "| --- | ---: |" + " ---: |" * len(metrics),
    ]
    for name, row in rows.items():
        values = " | ".join(f"{row.get(m, math.nan):.4f}" for m in metrics)
        lines.append(f"| {name} | {row['round']} | {values} |")
    table = "\n".join(lines) + "\n"
    (Path(out_dir) / "comparison.md").write_text(table)
    _write_json(Path(out_dir) / "comparison.json", rows)
    return table


def _weighted_mean(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of every metric, weighted by `num-examples`, as Flower's FedAvg aggregates."""
    total = sum(float(r.get(WEIGHT, 0)) for r in results)
    if not results or total <= 0:
        return {}
    names = {k for r in results for k in r if k not in ("partition-id", "stage", WEIGHT)}
    return {
        k: sum(float(r[k]) * float(r[WEIGHT]) for r in results if k in r) / total
        for k in sorted(names)
    }


def _progress_line(row: Mapping[str, Any], num_rounds: int) -> str:
    parts = [f"[fedpsg] round {row['round']}/{num_rounds}"]
    if row["server"]:
        parts.append(" ".join(f"{k} {v:.4f}" for k, v in row["server"].items()))
    if row["train"]:
        parts.append(" ".join(f"{k} {v:.4f}" for k, v in row["train"].items()))
    failures = sum("error" in c for c in row["clients"])
    parts.append(
        f"clients {len(row['clients']) - failures}" + (f" ({failures} failed)" * bool(failures))
    )
    parts.append(f"{row['elapsed-s']:.1f}s")
    return " | ".join(parts)


def _client_table(clients: pd.DataFrame) -> str:
    ok = clients[clients.get("error", pd.Series(index=clients.index)).isna()]
    lines = []
    for stage, group in ok.groupby("stage"):
        last = group.sort_values("round").groupby("partition-id").last()
        rounds = group.groupby("partition-id")["round"].nunique()
        metrics = [
            c
            for c in last.columns
            if c not in ("round", "stage", "error") and last[c].notna().any()
        ]
        lines += [
            f"{stage}: last result per client",
            "",
            "| partition | rounds | " + " | ".join(metrics) + " |",
            "| ---: | ---: |" + " ---: |" * len(metrics),
        ]
        for pid, rec in last.iterrows():
            values = " | ".join(f"{rec[m]:.4g}" for m in metrics)
            lines.append(f"| {pid} | {rounds[pid]} | {values} |")
        lines.append("")
    failed = clients[clients.get("error", pd.Series(index=clients.index)).notna()]
    for _, rec in failed.iterrows():
        lines.append(f"- round {rec['round']}, partition {rec['partition-id']}: {rec['error']}")
    return "\n".join(lines)


# One style per K in a panel: R@50 equal to R@100 (common once recall saturates) would hide
# under it with one marker and one line style; a big hollow marker under a smaller filled
# one and a dashed line over a solid one stay visible.
SERIES_STYLES = (
    {"marker": "o", "markersize": 9, "markerfacecolor": "none", "linestyle": "-"},
    {"marker": "s", "markersize": 6, "linestyle": "--"},
    {"marker": "^", "markersize": 4, "linestyle": ":"},
    {"marker": "x", "markersize": 7, "linestyle": "-."},
)


def plot_server_metrics(rounds: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One panel per metric family (`R@K`, `mR@K`, ... grouped by the text before `@`),
    one line per K, against the round."""
    evaluated = [{"round": r["round"], **r["server"]} for r in rounds if r["server"]]
    frame = pd.DataFrame(evaluated).set_index("round")
    families: dict[str, list[str]] = {}
    for name in frame.columns:
        families.setdefault(name.split("@")[0], []).append(name)
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(4.5 * max(len(families), 1), 3.5))
    for ax, (family, names) in zip(_flat(axes), families.items(), strict=False):
        for name, style in zip(names, itertools.cycle(SERIES_STYLES), strict=False):
            ax.plot(frame.index, frame[name], label=name, **style)
        ax.set(title=family, xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Global model on the test split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_client_metrics(rounds: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per-client view: each train metric against the round (one line per client), the
    examples each client trained on, and the last local-evaluation value of each evaluate
    metric per client (bars)."""
    rows = [{"round": r["round"], **c} for r in rounds for c in r["clients"] if "error" not in c]
    frame = pd.DataFrame(rows)
    panels: list[tuple[str, str]] = []
    if not frame.empty:
        skip = {"round", "partition-id", "stage", "error"}
        for stage in ("train", "evaluate"):
            part = frame[frame["stage"] == stage]
            panels += [(stage, c) for c in part.columns if c not in skip and part[c].notna().any()]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.5))
    for ax, (stage, name) in zip(_flat(axes), panels, strict=False):
        part = frame[frame["stage"] == stage]
        if stage == "train" and name != WEIGHT:
            for pid, group in part.groupby("partition-id"):
                ax.plot(group["round"], group[name], marker=".", alpha=0.7, label=str(pid))
            ax.set(xlabel="round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if part["partition-id"].nunique() <= 10:
                ax.legend(title="client", fontsize=7)
        else:
            last = part.sort_values("round").groupby("partition-id")[name].last()
            ax.bar(last.index.astype(str), last.values)
            ax.set(xlabel="client")
            if len(last) > 20:
                ax.set_xticks([])
        ax.set(title=f"{stage}: {name}")
        ax.grid(alpha=0.3)
    if not panels:
        _flat(axes)[0].text(0.5, 0.5, "no client results", ha="center", va="center")
    fig.suptitle("Per-client metrics")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flat(axes: Any) -> list:
    return list(axes.flat) if hasattr(axes, "flat") else [axes]


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
