"""fedpsg-build end to end: synth, build, inspect, FL-PSG round trip; bad input exits cleanly."""

import csv
import json
from pathlib import Path

import pytest
from builder_helpers import cache_dir
from typer.testing import CliRunner

from benchmark_builder.cli import app

runner = CliRunner()


def run(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset made by ``synth`` and a benchmark made by ``build``."""
    tmp = tmp_path_factory.mktemp("cli")
    result = run("synth", "--out", tmp / "syn", "--images", 30, "--seed", 2, "--quiet")
    assert result.exit_code == 0, result.output
    result = run(
        "build", "--psg", tmp / "syn" / "psg.json", "--images-root", tmp / "syn",
        "--out", tmp / "bench", "--clients", 3, "--partition", "dirichlet", "--alpha", 0.3,
        "--clusters", 3, "--featurizer", "embedding", "--seed", 0, "--test-fraction", 0.2,
        "--cache-dir", cache_dir(tmp), "--alpha-sweep", "0.1,1,10",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cluster JSD" in result.stdout
    return tmp


def test_build_writes_benchmark_plots_and_inspect_json(workspace: Path) -> None:
    bench = workspace / "bench"
    for name in (
        "clients_x_clusters.png",
        "predicates_per_client.png",
        "heterogeneity_vs_alpha.png",
        "heterogeneity_vs_alpha.csv",
    ):
        assert (bench / "plots" / name).stat().st_size > 0, name
    result = run("inspect", bench, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["verified"] and summary["num_clients"] == 3
    assert summary["partition"]["method"] == "dirichlet" and summary["partition"]["alpha"] == 0.3
    assert sum(summary["client_sizes"]) + summary["test_size"] == 30
    assert 0 <= summary["heterogeneity"]["cluster_jsd"] <= 1
    assert run("inspect", bench).exit_code == 0


def test_flpsg_round_trip_through_the_cli(workspace: Path) -> None:
    folder, again = workspace / "flpsg", workspace / "again"
    assert run("export-flpsg", workspace / "bench", "--out", folder).exit_code == 0
    result = run(
        "import-flpsg", folder, "--out", again, "--clusters-from", workspace / "bench",
        "--images-root", workspace / "syn", "--cache-dir", cache_dir(workspace), "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    first, second = (
        json.loads((p / "manifest.json").read_text()) for p in (workspace / "bench", again)
    )
    assert [c["sha256"] for c in first["clients"]] == [c["sha256"] for c in second["clients"]]


def test_bad_input_exits_nonzero_naming_the_error_and_writes_nothing(
    workspace: Path, tmp_path: Path
) -> None:
    doc = json.loads((workspace / "syn" / "psg.json").read_text())
    doc["data"][2]["relations"][0][0] = 50  # subject index out of range
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    out = tmp_path / "out"
    result = run("build", "--psg", bad, "--out", out, "--partition", "iid", "--quiet")
    assert result.exit_code == 1
    assert "relations[0]" in result.stderr and "image 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]

    result = run("build", "--psg", bad, "--out", out, "--partition", "iid", "--alpha", 1)
    assert result.exit_code == 2 and "--alpha" in result.output

    shard = workspace / "bench" / "clients" / "client_00002.parquet"
    original = shard.read_bytes()
    shard.write_bytes(original + b"x")
    try:
        result = run("inspect", workspace / "bench")
        assert result.exit_code == 1 and "client_00002.parquet" in result.stderr
    finally:
        shard.write_bytes(original)

    result = run(
        "build", "--psg", workspace / "syn" / "psg.json", "--out", out, "--featurizer",
        "category-map", "--category-map", workspace / "syn" / "psg.json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 1 and "categories" in result.stderr
    assert not out.exists()


def test_alpha_sweep_points_that_cannot_be_partitioned_are_reported_not_fatal(
    workspace: Path,
) -> None:
    """README's sweep 0.01..100 with 10 clients: alpha 0.01 is infeasible, the build goes on."""
    out = workspace / "sweep"
    result = run(
        "build", "--psg", workspace / "syn" / "psg.json", "--out", out, "--clients", 10,
        "--clusters", 3, "--alpha", 100, "--cache-dir", cache_dir(workspace), "--quiet",
        "--alpha-sweep", "0.0001,0.01,0.1,1,10,100",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    with open(out / "plots" / "heterogeneity_vs_alpha.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["alpha"]) for r in rows] == [0.0001, 0.01, 0.1, 1, 10, 100]
    feasible = {float(r["alpha"]): r["feasible"] == "True" for r in rows}
    assert not feasible[0.0001] and feasible[100]
    for row in rows:
        assert (row["cluster_jsd"] != "") == (row["feasible"] == "True")
    assert (out / "plots" / "heterogeneity_vs_alpha.png").stat().st_size > 0
