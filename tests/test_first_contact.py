"""What a new user meets first (issue 13): plain `flwr run .`, a benchmark that does not fit
the federation, failed runs and their exit codes, the terminal output, the FAB, plain
`pytest`, and plots whose equal series stay visible."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from conftest import ROOT, build_synthetic_benchmark
from typer.testing import CliRunner

from fedpsg.app import outputs
from fedpsg.run.cli import app
from fedpsg.run.processes import flwr_env, free_port, quiet_line, stop_detached
from fedpsg.run.simulate import simulate

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def three_clients(tmp_path_factory) -> Path:
    """A 3-client benchmark without pixels (60 images)."""
    root = tmp_path_factory.mktemp("first-contact")
    return build_synthetic_benchmark(
        root, 60, 0, with_pixels=False, num_clients=3, alpha=1.0, seed=0
    )


def _local_superlink_pids(port: int) -> list[int]:
    """The detached SuperLink that `flwr run` started for `:local:` on our own `port`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in args[:2]) and str(port).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow
def test_plain_flwr_run_works_on_the_default_federation(tmp_path: Path):
    """`flwr run . --stream` with no -c, in a fresh FLWR_HOME: Flower's default `local`
    connection (2 simulated SuperNodes) trains on a 2-client synthetic benchmark the app
    builds and caches on first use."""
    http, control = free_port(), free_port()
    env = flwr_env(tmp_path / "flwr")
    env.update(
        FEDPSG_CACHE_DIR=str(tmp_path / "cache"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http),
        FLWR_LOCAL_CONTROL_API_PORT=str(control),
    )
    try:
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "--stream"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, check=False,
        )  # fmt: skip
        run_id = re.search(r"Successfully started run (\d+)", run.stdout).group(1)
        status = subprocess.run(
            [str(BIN / "flwr"), "ls", "--run-id", run_id, "--format", "json"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        ).stdout  # fmt: skip
    finally:
        for pid in _local_superlink_pids(http):
            stop_detached(pid)
    assert '"finished:completed"' in status, run.stdout[-3000:]
    cached = list((tmp_path / "cache").glob("default-benchmark-*-2-clients/manifest.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["num_clients"] == 2
    summary = (tmp_path / "runs" / f"run-{run_id}" / "summary.md").read_text()
    assert "| R@50 |" in summary and "3 rounds" in summary


@pytest.mark.slow
def test_a_benchmark_that_does_not_fit_fails_at_start_with_the_fix(
    three_clients, tmp_path, capfd
):
    """3 clients on 2 SuperNodes: no node can load its partition when the server asks which
    one it holds, so the run stops before round 1 with the fix in one `[fedpsg]` error line;
    the terminal shows only `[fedpsg]` lines and errors."""
    config = {"benchmark-dir": str(three_clients), "num-server-rounds": 2}
    assert simulate(config, 2, tmp_path) != 0
    shown = [line for line in capfd.readouterr().out.splitlines() if line.strip()]
    fix = '3 clients but the federation has 2 partitions; run it on 3 nodes (flwr run ' \
        '--federation-config "num-supernodes=3"'
    assert any("[fedpsg] only 0 of 2 nodes can load" in line and fix in line for line in shown)
    assert all(quiet_line(line) for line in shown)
    log = (tmp_path / "flwr_run.log").read_text()
    assert "Starting Flower Simulation" in log  # the full log is kept
    assert "[fedpsg] round" not in log and not (tmp_path / "summary.md").exists()


def test_in_process_engine_exits_1_with_one_line_when_the_server_app_fails(
    three_clients, tmp_path
):
    broken = tmp_path / "bench"
    subprocess.run(["cp", "-r", str(three_clients), str(broken)], check=True)
    with open(broken / "test.parquet", "ab") as shard:
        shard.write(b"tampered")
    result = CliRunner().invoke(
        app, ["simulate", str(broken), "--engine", "in-process", "--out-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 1
    assert "test.parquet" in result.output and "Traceback" not in result.output


def test_quiet_view_keeps_one_line_per_round_and_errors():
    log = [
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/3]",
        "\x1b[92mINFO \x1b[0m:      aggregate_train: 5 usable replies, 0 left out",
        "\x1b[92mINFO \x1b[0m:      [fedpsg] round 1/3 | R@20 0.2679 | clients 5 | 3.3s",
        "\x1b[92mINFO \x1b[0m:      \t\t'R@20': '2.3795e-01',",
        "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed",
        "/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray",
        "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception",
    ]
    assert [quiet_line(line) for line in log] == [False, False, True, False, False, False, True]


def test_fab_carries_only_the_app(tmp_path: Path):
    subprocess.run(
        [str(BIN / "flwr"), "build", "--app", str(ROOT)],
        cwd=tmp_path, env=flwr_env(tmp_path / "flwr"), capture_output=True, check=True,
    )  # fmt: skip
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {
        "pyproject.toml", ".info", "fedpsg", "strategies", "benchmark_builder", "diffusion_clients"
    }  # fmt: skip
    assert "fedpsg/app/server_app.py" in names and "fedpsg/psg/default_benchmark.py" in names
    assert fab.stat().st_size < 700_000  # 1.43 MB with bench/, tests/, docs/, docker/


def test_plain_pytest_collects_what_python_m_pytest_does():
    """`bench` is importable without `python -m` (pyproject's pytest `pythonpath`)."""
    result = subprocess.run(
        [str(BIN / "pytest"), "--collect-only", "-q", "tests/test_diffusion_seeds.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]


def test_equal_series_stay_distinguishable(tmp_path: Path, monkeypatch):
    rounds = [
        {"round": r, "server": {"R@20": 0.1 * r, "R@50": 0.3, "R@100": 0.3, "loss": 1.0}}
        for r in range(3)
    ]
    figures = []
    monkeypatch.setattr(outputs.plt, "close", figures.append)
    outputs.plot_server_metrics(rounds, tmp_path / "server.png")
    recall_panel = figures[0].axes[0]
    styles = {(line.get_marker(), line.get_linestyle()) for line in recall_panel.lines}
    assert len(styles) == len(recall_panel.lines) == 3
    plt.close(figures[0])
