"""`fedpsg`: run federations and their centralized baselines.

    fedpsg simulate BENCHMARK_DIR [--engine ray|in-process] [-c "lr=0.05 local-epochs=2"]
    fedpsg deploy local --benchmark DIR --nodes 3 [--tls]     (also: deploy register | compose)
    fedpsg centralized BENCHMARK_DIR --out runs/cl --epochs 5
    fedpsg certs OUT_DIR --nodes 3
    fedpsg images                                             (compose images, no registry)

`-c` takes run config exactly as `flwr run --run-config` does (Flower's own parser).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedpsg.run import certs, deploy, images, simulate

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help=__doc__.split("\n\n")[0],
)
app.command("simulate")(simulate.main)
app.add_typer(deploy.cli, name="deploy")
app.command("certs")(certs.main)
app.command("images")(images.main)


@app.command()
def centralized(
    benchmark_dir: Annotated[Path, typer.Argument(help="Benchmark folder (from fedpsg-build).")],
    out: Annotated[Path, typer.Option(help="Where metrics, plot and weights go.")],
    epochs: Annotated[int, typer.Option(help="Passes over the pooled data.")] = 5,
    model: str = "motifs",
    mode: str = "predcls",
    features: str = "auto",
    lr: float = 0.03,
    momentum: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    hidden_dim: Annotated[
        int, typer.Option(help="Relation-model width; 0 = the model's own default.")
    ] = 0,
    frequency_prior: Annotated[
        str, typer.Option(help="pooled (the prior a federation's statistics round sums) | none")
    ] = "pooled",
) -> None:
    """Train the centralized (CL) baseline on the pooled client data; print its R@K / mR@K."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from fedpsg.psg.centralized import run_centralized, write_outputs

    config = {
        "benchmark-dir": str(benchmark_dir.resolve()),
        "model": model,
        "mode": mode,
        "features": features,
        "lr": lr,
        "momentum": momentum,
        "batch-size": batch_size,
        "seed": seed,
        "model-hidden-dim": hidden_dim,
        "frequency-prior": frequency_prior,
    }
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"centralized {model}", total=epochs + 1)

        def show(row: dict[str, float]) -> None:
            progress.update(
                bar,
                advance=1,
                description=f"centralized {model} R@50 {row['R@50']:.3f} mR@50 {row['mR@50']:.3f}",
            )

        try:
            result = run_centralized(config, epochs, on_epoch=show)
        except ValueError as error:  # BenchmarkError, bad config: one clear line, exit 1
            progress.stop()
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    write_outputs(result, out)
    final = result.history[-1]
    keys = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100")
    table = Table(title=f"CL {model} ({mode}), {epochs} epochs, test split (%)")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_row(*(f"{100 * final[k]:.2f}" for k in keys))
    Console().print(table)
