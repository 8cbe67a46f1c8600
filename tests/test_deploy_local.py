"""The local federation, started from docker-compose.yml: it replays the in-process engine,
survives losing a SuperNode mid-run, and turns a badly configured node into a named error.

Every federation here is Flower's own deployment engine: a SuperLink, a SuperExec for the
ServerApp, and per node a SuperNode with its SuperExec for the ClientApp, as separate processes
talking HTTP on loopback ports, exactly the commands of the compose services.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmark_builder.build import BuildConfig, build_benchmark
from benchmark_builder.synthetic import generate_synthetic_psg
from fedpsg.run import compose
from fedpsg.run.deploy import (
    COMPOSE_FILE,
    Deployment,
    DeploymentError,
    app_run_config,
    cli,
    local_paths,
    plan_federation,
)
from fedpsg.run.processes import _alive, free_port
from fedpsg.run.simulate import simulate_in_process

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
RUN = {  # a short PredCls MOTIFS run
    "num-server-rounds": 2,
    "fraction-train": 1.0,
    "min-train-nodes": 2,
    "local-epochs": 1,
    "lr": 0.1,
    "momentum": 0.9,
    "batch-size": 8,
    "seed": 7,
    "model": "motifs",
}
TIMEOUT = 600


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deploy")
    psg = generate_synthetic_psg(root / "synthetic", 48, seed=3)
    config = BuildConfig(
        num_clients=NODES,
        partition="iid",
        alpha=None,
        num_clusters=3,
        featurizer_options={"cache_dir": str(root / "embedding-cache")},
    )
    build_benchmark(psg, root / "bench", config, images_root=psg.parent)
    return root / "bench"


def metrics(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "metrics.json").read_text())["rounds"]


def run_federation(benchmark, run_dir, *, doc=None, during=None, **config):
    """Start every service of docker-compose.yml (or of `doc`) locally, wait for the
    SuperNodes, `flwr run` the app; `during(deployment)` runs in a thread while the run is
    going. Returns (exit code, deployment)."""
    if doc is None:
        _, plan = plan_federation(benchmark, run_dir)
    else:
        plan = compose.localize(doc, local_paths(benchmark, run_dir), free_port)
    with Deployment(plan, run_dir) as deployment:
        deployment.start()
        deployment.wait_for_nodes(len(plan.supernodes()), timeout=180)
        watcher = threading.Thread(target=during, args=(deployment,)) if during else None
        if watcher is not None:
            watcher.start()
        run_config = app_run_config(local_paths(benchmark, run_dir), {**RUN, **config})
        code = deployment.run(ROOT, run_config, timeout=TIMEOUT, stream=False)
        if watcher is not None:
            watcher.join()
    return code, deployment


def test_local_federation_replays_the_in_process_engine_with_sampling(benchmark, tmp_path):
    """2 of the 3 nodes train per round: the deployment samples the partitions the in-process
    engine samples (which replays the Ray simulation: tests/test_sampling_replay.py) and
    ends with the same metrics."""
    sampling = {"fraction-train": 0.5, "num-server-rounds": 3}
    run_dir = tmp_path / "deploy"
    code, _ = run_federation(benchmark, run_dir, **sampling)
    flwr_log = (run_dir / "logs" / "flwr-run.log").read_text()
    assert code == 0, flwr_log[-3000:]

    # the compose file's services ran, each logged to its own file, and all are gone
    services = json.loads((run_dir / "deployment.json").read_text())["services"]
    assert set(services) == set(compose.load_compose(COMPOSE_FILE)["services"])
    for name, record in services.items():
        assert Path(record["log"]).stat().st_size > 0, name
        assert not _alive(record["pid"]), f"{name} (pid {record['pid']}) still running"
    assert "2 usable replies, 0 left out" in flwr_log

    local_dir = tmp_path / "in-process"
    simulate_in_process({**RUN, **sampling, "benchmark-dir": str(benchmark)}, NODES, local_dir)

    deployed, local = metrics(run_dir / "results"), metrics(local_dir)
    assert [r["round"] for r in deployed] == [r["round"] for r in local] == [0, 1, 2, 3]
    assert [r["sampled"] for r in deployed] == [r["sampled"] for r in local]
    samples = [tuple(r["sampled"]["train"]) for r in deployed[1:]]
    assert all(len(s) == 2 for s in samples) and len(set(samples)) > 1
    for ours, theirs in zip(deployed, local, strict=True):
        assert ours["server"].keys() == theirs["server"].keys()
        for key, value in ours["server"].items():
            assert value == pytest.approx(theirs["server"][key], rel=1e-5, abs=1e-7), key
        by_partition = {c["partition-id"]: c for c in theirs["clients"]}
        for client in ours["clients"]:
            other = by_partition[client["partition-id"]]
            assert client["num-examples"] == other["num-examples"]
            assert client["train_loss"] == pytest.approx(other["train_loss"], rel=1e-5)
    # and training moved the model: the federation did real work
    assert deployed[-1]["server"]["loss"] < deployed[0]["server"]["loss"]


def _kill_in_round(name: str, server_round: int, killed: dict):
    """A `during` hook: SIGTERM SuperNode `name` (as `docker compose stop` does) once it has
    pulled its train message of `server_round`, i.e. while it trains in that round."""

    def during(deployment: Deployment) -> None:
        log = deployment.logs / f"{name}.log"
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if log.exists() and log.read_text().count("Receiving: train message") >= server_round:
                killed["code"] = deployment.stop_service(name)
                return
            time.sleep(0.2)

    return during


def test_bad_nodes_and_a_lost_node_do_not_stop_the_run(benchmark, tmp_path):
    """Four SuperNodes, three rounds: partition 0 good; partition 1 good but stopped while it
    trains in round 2; partition 2 with a modified shard; a partition id out of range. Each bad
    node answers with an error naming the file and the cause, the lost node is logged and
    recorded under its partition, and round 3 goes on with the nodes left instead of waiting
    for it. (One federation for both cases keeps the suite inside its time budget.)"""
    bench = tmp_path / "bench"
    shutil.copytree(benchmark, bench)
    shard = bench / "clients" / "client_00002.parquet"
    shard.write_bytes(shard.read_bytes() + b"tampered")
    doc = compose.compose_spec(4)
    for i, partition_id in enumerate([0, 1, 2, 7]):
        command = doc["services"][f"supernode-{i}"]["command"]
        command[command.index("--node-config") + 1] = compose.node_config(partition_id, 3)
    killed: dict = {}
    start = time.monotonic()
    code, _ = run_federation(
        bench,
        tmp_path / "deploy",
        doc=doc,
        during=_kill_in_round("supernode-1", 2, killed),
        **{"min-train-nodes": 1, "num-server-rounds": 3},
    )
    flwr_log = (tmp_path / "deploy" / "logs" / "flwr-run.log").read_text()
    assert "code" in killed, "supernode-1 never received its round-2 train message"
    assert code == 0, flwr_log[-3000:]
    assert time.monotonic() - start < TIMEOUT
    rounds = metrics(tmp_path / "deploy" / "results")

    # bad configuration: named errors from those nodes, every round
    for server_round in (1, 2, 3):
        clients = rounds[server_round]["clients"]
        errors = {c["partition-id"]: c["error"] for c in clients if "error" in c}
        assert f"{shard}: sha256 does not match the manifest" in errors[2]
        assert f"{bench / 'manifest.json'}: no client 7 (it has 3)" in errors[7]
        for reason in errors.values():
            assert reason in flwr_log
    assert sorted(c["partition-id"] for c in rounds[1]["clients"] if "error" not in c) == [0, 1]
    assert "2 usable replies, 2 left out" in flwr_log

    # the lost node: an error reply in round 2, logged; round 3 went on without it
    second = rounds[2]["clients"]
    assert [c["partition-id"] for c in second if "error" not in c] == [0]
    lost = [c for c in second if "Node Unavailable" in c.get("error", "")]
    assert len(lost) == 1 and lost[0]["error"] in flwr_log
    assert lost[0]["partition-id"] == 1  # the SuperLink's reply, traced to the lost node
    assert "1 usable replies, 3 left out" in flwr_log
    assert "[Fleet.DeactivateNode]" in (tmp_path / "deploy" / "logs" / "superlink.log").read_text()
    assert sorted(c["partition-id"] for c in rounds[3]["clients"]) == [0, 2, 7]
    assert "1 usable replies, 2 left out" in flwr_log
    assert rounds[3]["server"]["loss"] < rounds[0]["server"]["loss"]


def _terminal_sigint() -> None:
    """Run as a terminal's foreground job: SIGINT at its default, whatever this process
    inherited (a non-interactive shell starts background jobs with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("rounds", "log", "mark"),
    [(1, "clientapp-2.log", ""), (50, "flwr-run.log", "[ROUND 1/")],
    ids=["while-starting", "mid-run"],
)
def test_ctrl_c_stops_every_process(benchmark, tmp_path, rounds, log, mark):
    """Ctrl-C while the federation comes up, or while it runs: the command fails, and every
    process it started is gone afterwards."""
    run_dir = tmp_path / "deploy"
    cmd = [sys.executable, "-m", "fedpsg", "deploy", "local", "--benchmark", str(benchmark),
           "--run-dir", str(run_dir), "--rounds", str(rounds)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=_terminal_sigint,
    )  # fmt: skip
    path, deadline = run_dir / "logs" / log, time.monotonic() + 180
    while time.monotonic() < deadline and not (path.exists() and mark in path.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out.decode()[-2000:]
    services = json.loads((run_dir / "deployment.json").read_text())["services"]
    started = {name: s["pid"] for name, s in services.items() if s["pid"] is not None}
    assert len(started) == 8
    assert [name for name, pid in started.items() if _alive(pid)] == []


def test_a_service_that_cannot_start_is_named_and_nothing_is_left(tmp_path):
    doc = compose.compose_spec(1)
    doc["services"]["superlink"]["command"].append("--no-such-flag")
    plan = compose.localize(doc, local_paths(tmp_path, tmp_path / "run"), free_port)
    deployment = Deployment(plan, tmp_path / "run")
    expected = r"(?s)service 'superlink'.*--no-such-flag"
    with pytest.raises(DeploymentError, match=expected), deployment:
        deployment.start()
    assert [n for n, p in deployment.processes.items() if _alive(p.pid)] == []


def test_cli_refuses_a_missing_benchmark(tmp_path):
    result = CliRunner().invoke(
        cli,
        ["local", "--benchmark", str(tmp_path / "none"), "--run-dir", str(tmp_path)],
        env={"COLUMNS": "400"},
    )
    assert result.exit_code != 0
    assert f"{tmp_path / 'none'} is not a folder" in result.output
    assert not (tmp_path / "logs").exists()  # nothing was started
