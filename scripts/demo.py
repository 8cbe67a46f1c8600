"""The whole pipeline in a few minutes on a laptop: `make demo` (or `python -m scripts.demo`).

1. synthesize a small PSG dataset (images, panoptic PNGs, psg.json) - `fedpsg-build synth`
2. build a federated benchmark from it: 5 clients, Dirichlet(0.5) over semantic clusters -
   `fedpsg-build build`
3. run a 3-round federation of MOTIFS with FedAvg as a Ray simulation through `flwr run`
4. print the results table and where the builder's and the run's plots are
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from benchmark_builder.cli import app as build_cli
from fedpsg.app.outputs import round_metrics
from fedpsg.run.simulate import APP_DIR, num_clients, simulate

console = Console()


def build_step(args: list[str]) -> None:
    """Run one `fedpsg-build` command in this process; stop the demo if it fails."""
    try:
        build_cli(args, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    except Exception as exc:  # the CLI's own errors are already one clear line
        console.print(f"[red]fedpsg-build {args[0]} failed: {exc}")
        raise typer.Exit(1) from None


def results_table(run_dir: Path) -> Table:
    """Server metrics of the global model on the test split, before and after training."""
    first, last = round_metrics(run_dir, 0), round_metrics(run_dir)
    table = Table(title=f"Global model on the test split (round 0 -> {last['round']})")
    table.add_column("metric")
    table.add_column("round 0", justify="right")
    table.add_column(f"round {last['round']}", justify="right")
    for name in (m for m in last if m != "round"):
        table.add_row(name, f"{first[name]:.3f}", f"{last[name]:.3f}")
    return table


def main(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data and runs.")] = APP_DIR
    / "runs"
    / "demo",
    images: Annotated[int, typer.Option(help="Synthetic images.")] = 300,
    clients: Annotated[int, typer.Option(help="Clients.")] = 5,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
) -> None:
    """Synthesize, partition, federate, report."""
    start = time.monotonic()
    out = out.resolve()
    data, bench, run = out / "synthetic", out / "benchmark", out / "run"

    console.rule("1/3  synthetic PSG dataset")
    build_step(["synth", "--out", str(data), "--images", str(images), "--overwrite"])

    console.rule("2/3  federated benchmark")
    build_step(
        [
            "build", "--psg", str(data / "psg.json"), "--images-root", str(data),
            "--out", str(bench), "--clients", str(clients), "--alpha", str(alpha), "--overwrite",
        ]
    )  # fmt: skip

    console.rule(f"3/3  federation: MOTIFS + FedAvg, {rounds} rounds, Ray simulation")
    config = {
        "benchmark-dir": str(bench),
        "num-server-rounds": rounds,
        "strategy": "fedavg",
        "model": "motifs",
        "local-epochs": 2,
        "lr": 0.1,
        "momentum": 0.9,
        "batch-size": 8,
    }
    code = simulate(config, num_clients(bench), run)
    if code != 0:
        console.print(f"[red]the federation failed (exit {code}); log: {run / 'flwr_run.log'}")
        raise typer.Exit(code)

    console.rule("results")
    console.print(results_table(run))
    console.print(f"benchmark plots: {bench / 'plots'}")
    for plot in sorted((bench / "plots").glob("*.png")):
        console.print(f"  {plot.name}")
    console.print(f"run plots:       {run / 'plots'}")
    for plot in sorted((run / "plots").glob("*.png")):
        console.print(f"  {plot.name}")
    console.print(f"metrics:         {run / 'metrics.csv'}, {run / 'summary.md'}")
    console.print(f"final model:     {run / 'final_model.pt'}")
    console.print(f"done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    cli = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    cli.command()(main)
    sys.exit(cli())
