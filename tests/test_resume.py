"""Resume: a federation killed with SIGTERM and resumed from its checkpoint ends bit for bit
where the uninterrupted run ends, for every algorithm, SCAFFOLD's client state included; a
damaged checkpoint or a resume with nothing to do is one error line naming the file.

Each killed run is `fedpsg simulate --engine in-process` in a child process (one thread, as
the in-process runs here), on a small synthetic benchmark where half the clients train per
round, so a client's state comes from an earlier round than the last.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_synthetic_benchmark
from typer.testing import CliRunner

from fedpsg.run.cli import app
from fedpsg.run.simulate import simulate_in_process
from strategies.server import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from strategies.state import ClientStateStore

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 6
ROUNDS = 6  # the target; the killed run is stopped after its round-2 checkpoint
RUN = {
    "task": "psg",
    "model": "motifs",
    "fraction-train": 0.5,
    "min-train-nodes": 1,
    "local-epochs": 1,
    "lr": 0.1,
    "momentum": 0.9,
    "batch-size": 8,
    "seed": 3,
    "proximal-mu": 0.1,
    "rho": 0.05,
}



@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    return build_synthetic_benchmark(
        root, 96, 2, with_pixels=False, num_clients=CLIENTS, partition="iid", alpha=None,
        num_clusters=3, seed=0, featurizer_options={"cache_dir": str(root / "cache")},
    )  # fmt: skip


def config(bench: Path, strategy: str, **extra) -> dict:
    return {**RUN, "benchmark-dir": str(bench), "strategy": strategy, **extra}


def rounds(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rounds"]


def checkpoint_at(out: Path) -> int:
    try:
        return int(load_checkpoint(out / "checkpoints" / CHECKPOINT_NAME)[1]["round"])
    except (CheckpointError, FileNotFoundError):
        return 0


def kill_after_round(bench: Path, strategy: str, out: Path, after: int) -> int:
    """Start `fedpsg simulate` for 50 rounds, SIGTERM it once it has checkpointed round
    `after`; returns the round its checkpoint holds."""
    options = " ".join(
        f"{key}={json.dumps(value)}" for key, value in RUN.items() if key != "model"
    )
    cmd = [sys.executable, "-m", "fedpsg", "simulate", str(bench), "--engine", "in-process",
           "--out-dir", str(out), "--rounds", "50", "--strategy", strategy,
           "--model", RUN["model"], "-c", f"{options} checkpoint=true"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while checkpoint_at(out) < after and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(0.1)  # into the next round: some clients may have trained in it
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, err.decode()[-2000:]
    return checkpoint_at(out)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedsam", "scaffold"])
def test_a_run_killed_with_sigterm_resumes_bit_for_bit(bench, tmp_path, strategy):
    straight = tmp_path / "straight"
    simulate_in_process(config(bench, strategy, **{"num-server-rounds": ROUNDS}), CLIENTS,
                        straight)  # fmt: skip

    resumed = tmp_path / "resumed"
    done = kill_after_round(bench, strategy, resumed, after=2)
    assert 2 <= done < ROUNDS, f"the killed run got to round {done}"
    if strategy == "scaffold":  # the clients' control variates outlived the process
        assert list((resumed / "checkpoints" / "clients").rglob("client-*.npz"))
    options = {"num-server-rounds": ROUNDS, "checkpoint": True, "resume": True}
    simulate_in_process(config(bench, strategy, **options), CLIENTS, resumed)

    ours = torch.load(resumed / "final_model.pt")
    theirs = torch.load(straight / "final_model.pt")
    assert ours.keys() == theirs.keys()
    differ = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert differ == [], f"{len(differ)} of {len(ours)} tensors differ"
    # the same partitions trained in every round, and the record is the uninterrupted one's
    ours, theirs = rounds(resumed), rounds(straight)
    assert [r["round"] for r in ours] == list(range(ROUNDS + 1))
    assert [r["sampled"] for r in ours] == [r["sampled"] for r in theirs]
    assert [r["server"] for r in ours] == [r["server"] for r in theirs]
    assert [r["clients"] for r in ours] == [r["clients"] for r in theirs]
    elapsed = [r["elapsed-s"] for r in ours]  # the training's time, counted across the resume
    assert elapsed == sorted(elapsed)
    trained = {p for r in ours for p in r["sampled"].get("train", [])}
    assert len(trained) > CLIENTS // 2  # partial participation: state skips rounds


def run_cli(*args: str):
    return CliRunner().invoke(app, ["simulate", *map(str, args)])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_a_damaged_checkpoint_is_one_line_naming_the_file(bench, tmp_path):
    out = tmp_path / "run"
    simulate_in_process(config(bench, "fedavg", **{"num-server-rounds": 1, "checkpoint": True}),
                        CLIENTS, out)  # fmt: skip
    path = out / "checkpoints" / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    before = (out / "metrics.json").read_text()
    result = run_cli(bench, "--engine", "in-process", "--out-dir", out, "--rounds", 3,
                     "--model", "motifs", "-c", "checkpoint=true resume=true")  # fmt: skip
    assert result.exit_code == 1
    assert error_lines(result) == [error_lines(result)[0]]
    assert str(path) in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.output
    assert (out / "metrics.json").read_text() == before
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_a_resume_at_or_below_the_checkpoint_round_is_refused(bench, tmp_path):
    out = tmp_path / "run"
    options = {"num-server-rounds": 3, "checkpoint": True, "fraction-train": 1.0}
    simulate_in_process(config(bench, "fedavg", **options), CLIENTS, out)
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for target in (2, 3):
        result = run_cli(bench, "--engine", "in-process", "--out-dir", out, "--rounds", target,
                         "--model", "motifs", "-c", "checkpoint=true resume=true")  # fmt: skip
        assert result.exit_code == 1, result.output
        lines = error_lines(result)
        assert len(lines) == 1, lines
        assert "checkpoint is at round 3" in lines[0] and f"target is round {target}" in lines[0]
        assert str(out / "checkpoints" / CHECKPOINT_NAME) in lines[0]
    # the ServerApp itself refuses too (plain `flwr run`, a deployment)
    with pytest.raises(CheckpointError, match="checkpoint is at round 3"):
        simulate_in_process(config(bench, "fedavg", **{**options, "num-server-rounds": 3,
                                                       "resume": True}), CLIENTS, out)  # fmt: skip
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    assert "3 rounds" in (out / "summary.md").read_text()


def test_client_state_files_keep_the_last_state_before_the_round(tmp_path):
    store = ClientStateStore(tmp_path / "run", 4)
    state = {"scaffold-control": {"w": np.arange(3, dtype=np.float32)}}
    store.save(2, state)
    store.save(5, {"scaffold-control": {"w": np.ones(3, np.float32)}})
    store.save(7, {"scaffold-control": {"w": np.zeros(3, np.float32)}})  # a killed attempt's
    # round 6 arrives: the server checkpointed round 5, so round 5's state is the one
    loaded = store.load(6)
    np.testing.assert_array_equal(loaded["scaffold-control"]["w"], np.ones(3))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["client-00004.round-00005.npz"]
    assert store.load(1) == {} and not any((tmp_path / "run").iterdir())
    store.save(1, {})
    assert not any((tmp_path / "run").iterdir())  # no state, no file
    store.save(3, state)
    store.path(3).write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="client-00004.round-00003.npz"):
        store.load(4)


def test_a_node_with_its_own_state_dir_keeps_its_state_there(bench, tmp_path):
    """In a deployment each node keeps its own state: `state-dir` in its node config wins
    over the folder the server names."""
    out = tmp_path / "run"
    own = {i: {"state-dir": str(tmp_path / f"node-{i}")} for i in range(CLIENTS)}
    options = {"num-server-rounds": 2, "checkpoint": True}
    simulate_in_process(config(bench, "scaffold", **options), CLIENTS, out, node_configs=own)
    trained = {p for r in rounds(out) for p in r["sampled"].get("train", [])}
    assert trained
    for pid in range(CLIENTS):
        files = list((tmp_path / f"node-{pid}").rglob(f"client-{pid:05d}.round-*.npz"))
        assert bool(files) == (pid in trained), pid
    assert not list((out / "checkpoints").rglob("client-*.npz"))
