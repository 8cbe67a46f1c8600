"""``fedpsg-build``: synthesize PSG data, build and inspect federated benchmarks, FL-PSG interop.

Bad input (``PSGFormatError``, ``BenchmarkError``, ``PartitionError``) prints one line to stderr
and exits 1 with nothing written; usage errors (flag values out of range, ``ConfigError``) exit 2.
The error line is the only line on stderr: progress bars are transient and drawn only on a
terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmark_builder.build import STAGES, BuildConfig, StageCallback, build_benchmark
from benchmark_builder.partition import (
    DIRICHLET_METHODS,
    SEED_END,
    ConfigError,
    PartitionError,
)
from benchmark_builder.psg import PSGFormatError
from benchmark_builder.shards import BenchmarkError, open_benchmark

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__,
    pretty_exceptions_show_locals=False,
)
out_console = Console()
err_console = Console(stderr=True)
INPUT_ERRORS = (PSGFormatError, BenchmarkError, PartitionError, FileExistsError)
SeedOption = Annotated[
    int, typer.Option(min=0, max=SEED_END - 1, help="Random seed, in [0, 2**32).")
]


class Method(StrEnum):
    dirichlet = "dirichlet"
    dirichlet_client = "dirichlet-client"
    iid = "iid"
    shard = "shard"


class FeaturizerName(StrEnum):
    embedding = "embedding"
    category_map = "category-map"


# Featurizer options shared by `build` and `import-flpsg`.
FeaturizerOption = Annotated[FeaturizerName, typer.Option(help="Image featurizer.")]
CategoryMapOption = Annotated[Path | None, typer.Option(help="FL-PSG category map JSON.")]
ModelOption = Annotated[str | None, typer.Option(help="sentence-transformers model path or id.")]
CacheDirOption = Annotated[Path | None, typer.Option(help="Embedding cache folder.")]


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn bad-input errors into one stderr line and exit code 1 (2 for a ``ConfigError``)."""
    try:
        yield
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None
    except INPUT_ERRORS as error:
        err_console.print(
            f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None


def progress_bar(quiet: bool) -> Progress:
    """The one progress style of the CLI: rich, on stderr, transient, only on a terminal."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    return Progress(
        *columns,
        console=err_console,
        disable=quiet or not err_console.is_terminal,
        transient=True,
    )


@contextmanager
def stage_progress(stages: tuple[str, ...], quiet: bool) -> Iterator[StageCallback]:
    """A progress bar advanced by the build's stage callback."""
    with progress_bar(quiet) as progress:
        task = progress.add_task("start", total=len(stages))

        def on_stage(name: str) -> None:
            progress.update(task, description=name, completed=stages.index(name))

        yield on_stage
        progress.update(task, description="done", completed=len(stages))


def featurizer_options(
    featurizer: FeaturizerName,
    category_map: Path | None,
    model: str | None,
    cache_dir: Path | None,
) -> dict:
    """Constructor arguments of the chosen featurizer, checking the CLI combination."""
    if featurizer is FeaturizerName.category_map:
        if category_map is None:
            raise typer.BadParameter("--featurizer category-map needs --category-map FILE")
        return {"category_map": category_map}
    if category_map is not None:
        raise typer.BadParameter("--category-map is only for --featurizer category-map")
    return {"model": model, "cache_dir": cache_dir}


def summary_table(manifest: dict) -> Table:
    """Per-client sizes and indices, with the overall indices in the caption."""
    het, partition = manifest["heterogeneity"], manifest["partition"]
    alpha = partition.get("alpha")
    table = Table(
        title=f"{manifest['num_clients']} clients, {partition['method']}"
        + ("" if alpha is None else f" alpha={alpha:.4g}"),
        caption=(
            f"cluster JSD {het['cluster_jsd']:.4f} (max {het['cluster_jsd_max']:.4f}) | "
            f"predicate JSD {het['predicate_jsd']:.4f} | "
            f"largest-cluster share {het['mean_largest_cluster_share']:.3f} | "
            f"entropy {het['mean_cluster_entropy']:.3f} bits | "
            f"test {manifest['test']['num_images']}"
        ),
    )
    for column in (
        "client",
        "images",
        "relations",
        "top cluster",
        "share",
        "entropy",
        "cl. JSD",
        "pred. JSD",
    ):
        table.add_column(column, justify="right")
    for client in manifest["clients"]:
        h = client["heterogeneity"]
        histogram = client["cluster_histogram"]
        table.add_row(
            str(client["id"]),
            str(client["num_images"]),
            str(client["num_relations"]),
            str(max(range(len(histogram)), key=histogram.__getitem__)),
            _fmt(h["largest_cluster_share"]),
            _fmt(h["cluster_entropy"]),
            _fmt(h["cluster_jsd"]),
            _fmt(h["predicate_jsd"]),
        )
    return table


def cluster_table(manifest: dict) -> Table:
    """Each cluster's size and most frequent triplets."""
    clustering = manifest["clustering"]
    silhouette = clustering["silhouette"]
    table = Table(
        title=f"{clustering['num_clusters']} clusters ({manifest['featurizer']['name']})",
        caption="silhouette " + ("n/a" if silhouette is None else f"{silhouette:.3f}"),
    )
    table.add_column("cluster", justify="right")
    table.add_column("images", justify="right")
    table.add_column("top triplets")
    for cluster in clustering["clusters"]:
        table.add_row(str(cluster["id"]), str(cluster["num_images"]), cluster["description"])
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def manifest_summary(manifest: dict) -> dict:
    """The machine-readable summary ``inspect --json`` prints."""
    return {
        "verified": True,
        "format_version": manifest["format_version"],
        "source": manifest["source"],
        "num_clients": manifest["num_clients"],
        "partition": manifest["partition"],
        "featurizer": manifest["featurizer"],
        "num_clusters": manifest["clustering"]["num_clusters"],
        "silhouette": manifest["clustering"]["silhouette"],
        "heterogeneity": manifest["heterogeneity"],
        "client_sizes": [c["num_images"] for c in manifest["clients"]],
        "test_size": manifest["test"]["num_images"],
    }


def show(manifest: dict, out: Path, timings: dict[str, float]) -> None:
    out_console.print(cluster_table(manifest))
    out_console.print(summary_table(manifest))
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    out_console.print(f"wrote {out} ({stages}); plots in {out / 'plots'}", highlight=False)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write images/, panoptic/ and psg.json.")],
    images: Annotated[int, typer.Option(min=1, help="Number of images.")] = 200,
    seed: SeedOption = 0,
    image_size: Annotated[
        int, typer.Option(min=16, max=4096, help="Square image side in pixels.")
    ] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Write a synthetic PSG dataset (the embedded default input)."""
    from benchmark_builder.synthetic import generate_synthetic_psg

    with friendly_errors(), progress_bar(quiet) as progress:
        task = progress.add_task("synthesizing", total=images)
        path = generate_synthetic_psg(
            out,
            images,
            seed,
            image_size,
            overwrite=overwrite,
            on_image=lambda: progress.advance(task),
        )
    out_console.print(f"wrote {path} ({images} images; --images-root {out})", highlight=False)


@app.command()
def build(
    psg: Annotated[Path, typer.Option(help="OpenPSG psg.json or psg.json.gz.")],
    out: Annotated[Path, typer.Option(help="Benchmark folder to create.")],
    images_root: Annotated[
        Path | None, typer.Option(help="Root of file_name / pan_seg_file_name (pixels in shards).")
    ] = None,
    clients: Annotated[int, typer.Option(min=1, help="Number of clients.")] = 10,
    partition: Annotated[Method, typer.Option(help="Partition method.")] = Method.dirichlet,
    alpha: Annotated[
        float | None, typer.Option(help="Dirichlet concentration (dirichlet only).")
    ] = None,
    target_index: Annotated[
        float | None, typer.Option(help="Search alpha for this cluster JSD instead of --alpha.")
    ] = None,
    clusters: Annotated[
        int, typer.Option(min=1, help="Number of semantic clusters (KMeans k).")
    ] = 5,
    featurizer: FeaturizerOption = FeaturizerName.embedding,
    category_map: CategoryMapOption = None,
    model: ModelOption = None,
    cache_dir: CacheDirOption = None,
    seed: SeedOption = 0,
    test_fraction: Annotated[float, typer.Option(help="Held-out share, in (0, 1).")] = 0.1,
    min_size: Annotated[int, typer.Option(min=1, help="Fewest images per client.")] = 1,
    alpha_sweep: Annotated[
        str | None, typer.Option(help="Comma-separated alphas: plot heterogeneity vs alpha.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing benchmark folder.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars or tables.")] = False,
) -> None:
    """Build a federated benchmark folder from a PSG file."""
    dirichlet = partition.value in DIRICHLET_METHODS
    if not dirichlet and (alpha is not None or target_index is not None):
        raise typer.BadParameter(
            f"only for dirichlet partitions, not {partition.value}", param_hint="--alpha"
        )
    if dirichlet and alpha is not None and target_index is not None:
        raise typer.BadParameter("give --alpha or --target-index, not both", param_hint="--alpha")
    if dirichlet and alpha is None and target_index is None:
        alpha = 1.0
    try:
        sweep = [float(a) for a in alpha_sweep.split(",")] if alpha_sweep else []
    except ValueError:
        raise typer.BadParameter(
            f"not a comma-separated list of numbers: {alpha_sweep}", param_hint="--alpha-sweep"
        ) from None
    config = BuildConfig(
        num_clients=clients,
        partition=partition.value,
        alpha=alpha,
        num_clusters=clusters,
        featurizer=featurizer.value,
        featurizer_options=featurizer_options(featurizer, category_map, model, cache_dir),
        seed=seed,
        test_fraction=test_fraction,
        min_size=min_size,
        target_index=target_index,
        alpha_sweep=sweep,
    )
    with friendly_errors():
        config.validate()
    with friendly_errors(), stage_progress(STAGES, quiet) as on_stage:
        result = build_benchmark(psg, out, config, images_root, overwrite, on_stage)
    if not quiet:
        show(result.manifest, out, result.timings)


@app.command()
def inspect(
    benchmark: Annotated[Path, typer.Argument(help="Benchmark folder.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest summary as JSON.")
    ] = False,
) -> None:
    """Verify every shard's checksum and summarise the benchmark."""
    with friendly_errors():
        manifest = open_benchmark(benchmark).manifest
    if as_json:
        typer.echo(json.dumps(manifest_summary(manifest), indent=2))
        return
    out_console.print(cluster_table(manifest))
    out_console.print(summary_table(manifest))
    out_console.print(
        f"{benchmark}: all {manifest['num_clients'] + 1} shards verified",
        highlight=False,
        soft_wrap=True,
    )


@app.command("export-flpsg")
def export_flpsg_command(
    benchmark: Annotated[Path, typer.Argument(help="Benchmark folder.")],
    out: Annotated[Path, typer.Option(help="Folder for User{i}.json and test.json.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Export a benchmark as FL-PSG User{i}.json files (+ test.json)."""
    from benchmark_builder.flpsg import export_flpsg

    with friendly_errors():
        export_flpsg(benchmark, out, overwrite)
    out_console.print(f"wrote {out}", highlight=False)


@app.command("import-flpsg")
def import_flpsg_command(
    folder: Annotated[Path, typer.Argument(help="Folder of User{i}.json files (+ test.json).")],
    out: Annotated[Path, typer.Option(help="Benchmark folder to create.")],
    clusters_from: Annotated[
        Path | None, typer.Option(help="Take cluster labels from this benchmark folder.")
    ] = None,
    clusters: Annotated[int, typer.Option(min=1, help="KMeans k (when clustering anew).")] = 5,
    featurizer: FeaturizerOption = FeaturizerName.embedding,
    category_map: CategoryMapOption = None,
    model: ModelOption = None,
    cache_dir: CacheDirOption = None,
    images_root: Annotated[Path | None, typer.Option(help="Root of the image files.")] = None,
    seed: SeedOption = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing benchmark folder.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars or tables.")] = False,
) -> None:
    """Import an FL-PSG split folder as a benchmark (our manifest and indices)."""
    from benchmark_builder.flpsg import import_flpsg

    options = featurizer_options(featurizer, category_map, model, cache_dir)
    with friendly_errors(), stage_progress(STAGES, quiet) as on_stage:
        result = import_flpsg(
            folder,
            out,
            featurizer.value,
            options,
            clusters,
            seed,
            clusters_from,
            images_root,
            overwrite,
            on_stage,
        )
    if not quiet:
        show(result.manifest, out, result.timings)
