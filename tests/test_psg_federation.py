"""The Flower app on a small synthetic PSG benchmark.

One real `flwr run` Ray simulation runs all four strategies back to back (Ray starts once);
the in-process tests drive the same ServerApp and ClientApp through a local Grid to check
what a simulation hides: error replies for bad shards, replay determinism, client state.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import build_synthetic_benchmark
from flwr.app import MessageType

from fedpsg.app.config import round_seed
from fedpsg.app.task import load_task
from fedpsg.run.processes import ManagedProcesses, format_run_config, write_connection
from fedpsg.run.simulate import simulate, simulate_in_process
from strategies.server import sample_clients

NUM_CLIENTS = 5
STRATEGIES = ("fedavg", "fedprox", "fedsam", "scaffold")
OUTPUTS = (
    "metrics.csv",
    "metrics.json",
    "client_metrics.csv",
    "summary.md",
    "run_config.json",
    "final_model.pt",
    "plots/server_metrics.png",
    "plots/client_metrics.png",
)
NAMES = ("plain", "ema", "swa")  # final_model_<name>.pt with any server average kept




@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("federation")
    return build_synthetic_benchmark(
        root, 300, 1, with_pixels=False, num_clients=NUM_CLIENTS, alpha=0.5, seed=0
    )


def run_config(benchmark_dir: Path, out_dir: Path, **extra) -> dict:
    """The app's defaults (pyproject) for a short PredCls MOTIFS run."""
    return {
        "task": "psg",
        "strategy": "fedavg",
        "num-server-rounds": 3,
        "fraction-train": 1.0,
        "min-train-nodes": 2,
        "fraction-evaluate": 0.0,
        "local-epochs": 3,
        "lr": 0.1,
        "momentum": 0.9,
        "batch-size": 8,
        "seed": 0,
        "benchmark-dir": str(benchmark_dir),
        "out-dir": str(out_dir),
        "model": "motifs",
        "mode": "predcls",
        "proximal-mu": 0.01,
        "rho": 0.05,
        "adaptive": False,
        "server-lr": 1.0,
        **extra,
    }


def recall(run_dir: Path, name: str = "R@50") -> list[float]:
    return pd.read_csv(run_dir / "metrics.csv")[f"server/{name}"].tolist()


def rounds(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


def test_flwr_run_simulates_every_strategy_and_writes_outputs(benchmark_dir, tmp_path):
    """3 of the 5 clients train per round: every strategy samples the partitions that
    (seed, round) alone pick, and the in-process engine replays the Ray run."""
    out = tmp_path / "sim"
    home = tmp_path / "flwr-home"
    config = run_config(
        benchmark_dir, out, strategy=",".join(STRATEGIES), **{"fraction-train": 0.6}
    )
    identity = {p: p for p in range(NUM_CLIENTS)}
    sampled = [sample_clients(identity, 3, 0, r, MessageType.TRAIN) for r in (1, 2, 3)]
    code = simulate(config, NUM_CLIENTS, out, flwr_home=home, stream=False, timeout=400)
    log = (out / "flwr_run.log").read_text()
    assert code == 0, log[-3000:]
    for name in STRATEGIES:
        run = out / name
        for output in OUTPUTS:
            assert (run / output).stat().st_size > 0, f"{name}: {output}"
        r50 = recall(run)
        assert len(r50) == 4  # round 0 + 3 rounds
        assert r50[-1] > r50[0], f"{name}: R@50 {r50}"
        assert [r["sampled"]["train"] for r in rounds(run)[1:]] == sampled
        clients = pd.read_csv(run / "client_metrics.csv")
        assert [sorted(clients[clients["round"] == r]["partition-id"]) for r in (1, 2, 3)] == (
            sampled
        )
        assert "mR@50" in (run / "summary.md").read_text()
        state = torch.load(run / "final_model.pt")
        model = load_task("psg").build_model(config)
        model.load_state_dict(state)  # the checkpoint is the model's own state dict
    comparison = json.loads((out / "comparison.json").read_text())
    assert sorted(comparison) == sorted(STRATEGIES)
    assert "[fedpsg] round 3/3" in log
    # the SuperLink is gone and its connection removed
    port = int(log.split("Using SuperLink: fedpsg-sim-")[1].split()[0])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert f"fedpsg-sim-{port}" not in (home / "config.toml").read_text()
    # the in-process engine runs the same app code: same partitions, metrics and weights
    local = tmp_path / "local"
    simulate_in_process({**config, "strategy": "fedavg"}, NUM_CLIENTS, local)
    ours, theirs = rounds(out / "fedavg"), rounds(local)
    assert [r["sampled"] for r in ours] == [r["sampled"] for r in theirs]
    for mine, other in zip(ours, theirs, strict=True):
        assert mine["server"] == pytest.approx(other["server"], rel=1e-5, abs=1e-7)
        assert [(c["partition-id"], c["num-examples"]) for c in mine["clients"]] == [
            (c["partition-id"], c["num-examples"]) for c in other["clients"]
        ]
    wa, wb = torch.load(out / "fedavg" / "final_model.pt"), torch.load(local / "final_model.pt")
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


def test_a_tampered_shard_is_an_error_reply_and_the_round_goes_on(benchmark_dir, tmp_path):
    bench = tmp_path / "bench"
    shutil.copytree(benchmark_dir, bench)
    shard = bench / "clients" / "client_00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-64] + bytes(64))
    out = tmp_path / "out"
    config = run_config(bench, out, **{"num-server-rounds": 1, "local-epochs": 1})
    simulate_in_process(config, NUM_CLIENTS, out)
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    failures = [c for c in rounds[1]["clients"] if "error" in c]
    assert [c["partition-id"] for c in failures] == [2]
    assert "client_00002.parquet" in failures[0]["error"]
    assert len([c for c in rounds[1]["clients"] if "error" not in c]) == NUM_CLIENTS - 1
    loss = recall(out, "loss")
    assert loss[1] < loss[0]  # the other four clients' updates were aggregated
    assert "client_00002.parquet" in (out / "summary.md").read_text()


def test_a_node_reads_its_own_benchmark_dir_and_a_missing_one_is_an_error_reply(
    benchmark_dir, tmp_path
):
    """A node's `benchmark-dir` (a SuperNode's `--node-config`) wins over the run config's; a
    node whose folder is missing answers with an error naming it, and the round goes on."""
    missing = tmp_path / "not-mounted"
    out = tmp_path / "out"
    config = run_config(benchmark_dir, out, **{"num-server-rounds": 1, "local-epochs": 1})
    simulate_in_process(config, NUM_CLIENTS, out, node_configs={1: {"benchmark-dir": str(missing)}})
    clients = json.loads((out / "metrics.json").read_text())["rounds"][1]["clients"]
    errors = {c["partition-id"]: c["error"] for c in clients if "error" in c}
    assert list(errors) == [1] and str(missing) in errors[1]
    assert len([c for c in clients if "error" not in c]) == NUM_CLIENTS - 1


def test_a_seeded_run_replays_exactly_and_samples_by_partition(benchmark_dir, tmp_path):
    def run(out: Path) -> list[dict]:
        options = {"num-server-rounds": 2, "fraction-train": 0.6, "min-train-nodes": 3}
        config = run_config(benchmark_dir, out, strategy="scaffold", **options)
        config["local-epochs"] = 1
        contexts = simulate_in_process(config, NUM_CLIENTS, out)
        # SCAFFOLD's client control variate lives in the node's context.state
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        trained = {c["partition-id"] for r in rounds for c in r["clients"]}
        for context in contexts.values():
            has_state = "scaffold-control" in context.state.array_records
            assert has_state == (context.node_config["partition-id"] in trained)
        return rounds

    first, again = run(tmp_path / "a"), run(tmp_path / "b")
    sampled = [[c["partition-id"] for c in r["clients"]] for r in first]
    assert [len(s) for s in sampled] == [0, 3, 3]
    assert sampled == [[c["partition-id"] for c in r["clients"]] for r in again]
    assert [r["server"] for r in first] == [r["server"] for r in again]
    assert [r["clients"] for r in first] == [r["clients"] for r in again]
    assert round_seed(0, 1, 2) == round_seed(0, 1, 2) != round_seed(0, 2, 1)


def test_eval_every_evaluates_on_schedule_and_after_the_last_round(benchmark_dir, tmp_path):
    options = {"num-server-rounds": 3, "eval-every": 2, "local-epochs": 1}
    simulate_in_process(run_config(benchmark_dir, tmp_path, **options), NUM_CLIENTS, tmp_path)
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [bool(r["server"]) for r in rounds] == [True, False, True, True]
    assert all(r["train"] for r in rounds[1:])  # every round's training is still recorded
    assert recall(tmp_path)[1] != recall(tmp_path)[1]  # NaN in the CSV for round 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| R@50 |" in summary and "nan" not in summary
    assert (tmp_path / "plots" / "server_metrics.png").stat().st_size > 0


def test_both_server_averages_are_written_beside_the_served_plain_model(benchmark_dir, tmp_path):
    options = {"num-server-rounds": 2, "local-epochs": 1, "server-ema": 0.5}
    config = run_config(benchmark_dir, tmp_path, **options, **{"server-swa-start": 1})
    simulate_in_process(config, NUM_CLIENTS, tmp_path)
    served = torch.load(tmp_path / "final_model.pt")
    models = {name: torch.load(tmp_path / f"final_model_{name}.pt") for name in NAMES}
    weights = [key for key, value in served.items() if value.is_floating_point()]
    assert all(torch.equal(served[k], models["plain"][k]) for k in served)
    for name in ("ema", "swa"):  # both averaged x_1, x_2: neither equals x_2
        assert models[name].keys() == served.keys()
        assert not all(torch.equal(served[k], models[name][k]) for k in weights), name
    assert not all(torch.equal(models["ema"][k], models["swa"][k]) for k in weights)


def test_write_connection_is_what_flower_reads(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    write_connection(tmp_path, "first", "127.0.0.1:9093")
    write_connection(tmp_path, "tls", "10.0.0.2:9093", insecure=False, root_certificates=tmp_path)
    first, tls = read_superlink_connection("first"), read_superlink_connection("tls")
    assert (first.address, first.insecure) == ("127.0.0.1:9093", True)
    assert (tls.address, tls.insecure, tls.root_certificates) == (
        "10.0.0.2:9093",
        False,
        str(tmp_path),
    )
    assert read_superlink_connection(None).name == "first"  # the first one is the default


def test_run_config_arguments_parse_back_in_flower():
    from flwr.common.config import parse_config_args

    config = {"lr": 0.1, "seed": 3, "adaptive": True, "out-dir": "/a b/c", "model": "motifs"}
    args = format_run_config(config)
    assert parse_config_args(args[1::2]) == config
    with pytest.raises(ValueError, match="quotes"):
        format_run_config({"model": 'a"b'})


def test_managed_processes_stop_detached_descendants(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    script = f"setsid sleep 300 & echo $! > {pidfile}; wait"
    with pytest.raises(KeyboardInterrupt), ManagedProcesses(grace=2) as procs:
        parent = procs.start(["bash", "-c", script])
        while not pidfile.exists() or not pidfile.read_text().strip():
            time.sleep(0.05)
        grandchild = int(pidfile.read_text())
        raise KeyboardInterrupt  # Ctrl-C inside the block
    assert parent.poll() is not None
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_simulate_cli_refuses_a_missing_benchmark(tmp_path):
    proc = subprocess.run(
        [".venv/bin/python", "-m", "fedpsg", "simulate", str(tmp_path / "nope")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "manifest.json" in proc.stderr
    assert "Traceback" not in proc.stderr
