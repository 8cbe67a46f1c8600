"""docker-compose.yml and its TLS overlay under a real Docker engine, as a user runs them.

The images are the ones `make images` builds (a debootstrap base, Flower and the app from a
host-side wheelhouse; built once, then kept while their inputs are unchanged). Each test brings
up its own compose project (`-p`, its own network and `results` volume) from the committed
files, drives it with the host's `flwr` CLI through the published SuperLink port, and takes it
down again. A Docker daemon is started for the session where none runs, and stopped by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import build_synthetic_benchmark

from fedpsg.run import compose
from fedpsg.run.certs import make_certificates, write_node_key
from fedpsg.run.deploy import COMPOSE_FILE, TLS_OVERLAY
from fedpsg.run.images import Dockerd, build_images
from fedpsg.run.processes import flwr_env, flwr_run, free_port, write_connection
from fedpsg.run.simulate import simulate_in_process

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
CONNECTION = "fedpsg-docker"
APP_UID = 49999  # the user the Flower images (and ours) run as
RUN = {  # a short PredCls MOTIFS run on labels + geometry
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
IN_CONTAINERS = {"benchmark-dir": compose.BENCHMARK, "out-dir": compose.RESULTS}
TIMEOUT = 600


@pytest.fixture(scope="session")
def engine():
    """A Docker daemon with the compose images built (or kept from an earlier build)."""
    reason = Dockerd.why_not()
    if reason is not None:
        pytest.skip(f"Docker cannot run here: {reason}")
    with Dockerd():
        build_images()
        yield


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """3 iid partitions of 48 synthetic images (no pixels), readable by the containers' user."""
    bench = build_synthetic_benchmark(
        tmp_path_factory.mktemp("docker"), 48, 3, with_pixels=False,
        num_clients=NODES, partition="iid", alpha=None, num_clusters=3,
    )  # fmt: skip
    for folder in [bench, *(p for p in bench.rglob("*") if p.is_dir())]:
        folder.chmod(0o755)
    return bench


def compose_cli() -> list[str]:
    """Compose v2 (`docker compose`) where the CLI has it, else docker-compose 1.x."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return ["docker", "compose"] if v2.returncode == 0 else ["docker-compose"]


class Stack:
    """One compose project from the committed files; `down -v` on exit."""

    def __init__(self, files: list[Path], env: dict[str, str]) -> None:
        self.project = f"fedpsgtest{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.argv = [*compose_cli(), "-p", self.project, "--project-directory", str(ROOT)]
        for file in files:
            self.argv += ["-f", str(file)]
        self.env = {**os.environ, **env, "FEDPSG_SUPERLINK_PORT": str(self.port)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 300):
        proc = subprocess.run([*self.argv, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)}: {proc.stdout}\n{proc.stderr}")
        return proc

    def __enter__(self) -> Stack:
        try:
            self("up", "--detach", "--no-build", timeout=TIMEOUT)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", service).stdout

    def copy_out(self, service: str, path: str, dest: Path) -> Path:
        """`path` from `service`'s container to `dest` on the host (`docker cp`)."""
        container = self("ps", "-q", service).stdout.strip()
        subprocess.run(["docker", "cp", f"{container}:{path}", str(dest)], check=True)
        return dest


def connect(home: Path, port: int, ca: Path | None = None) -> Path:
    write_connection(home, CONNECTION, f"127.0.0.1:{port}", insecure=ca is None,
                     root_certificates=ca)  # fmt: skip
    return home


def online_nodes(home: Path, count: int, timeout: float = 180) -> list[dict]:
    """The SuperLink's online SuperNodes once `count` of them are (`flwr supernode list`)."""
    deadline, online = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["flwr", "supernode", "list", CONNECTION, "--format", "json"],
            env=flwr_env(home), capture_output=True, text=True, timeout=60, check=False,
        ).stdout  # fmt: skip
        nodes = json.loads(out[out.find("{") :]).get("nodes", []) if "{" in out else []
        online = [n for n in nodes if n.get("status") == "online"]
        if len(online) >= count:
            return online
        time.sleep(3)  # each `flwr` call costs a second of CPU: poll gently
    raise AssertionError(f"{len(online)} of {count} SuperNodes online after {timeout:.0f}s")


def metrics(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "metrics.json").read_text())["rounds"]


def test_compose_federation_equals_the_simulation_and_survives_a_killed_node(
    engine, benchmark, tmp_path
):
    """`docker compose up` + `flwr run`, 3 SuperNode containers, 3 rounds. Round 1 equals
    the in-process simulation of the same run; `docker compose kill supernode-1` (SIGKILL)
    in round 2: the SuperLink gives up on it after its heartbeat lapses, its partition is
    recorded as lost, and round 3 goes on with the other two. The outputs reach the host.
    (One federation for both: each containerized round costs tens of seconds on 2 cores.)"""
    home = tmp_path / "flwr-home"
    log = tmp_path / "flwr-run.log"
    killed = threading.Event()
    with Stack([COMPOSE_FILE], {"FEDPSG_BENCHMARK": str(benchmark)}) as stack:
        connect(home, stack.port)
        online_nodes(home, NODES)

        def kill_in_round_2() -> None:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                if log.exists() and "[ROUND 2/" in log.read_text():
                    stack("kill", "supernode-1")
                    killed.set()
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=kill_in_round_2)
        watcher.start()
        config = {**RUN, **IN_CONTAINERS, "num-server-rounds": 3}
        code = flwr_run(ROOT, CONNECTION, config, home, stream=False, timeout=TIMEOUT,
                        log_file=log)  # fmt: skip
        watcher.join()
        results = stack.copy_out("serverapp", compose.RESULTS, tmp_path / "results")
        state = stack("ps", "supernode-1").stdout
    assert killed.is_set(), "the run never reached round 2"
    assert code == 0, log.read_text()[-3000:]
    assert "Exit 137" in state or "exited (137)" in state.lower(), state
    for output in ("metrics.json", "metrics.csv", "summary.md", "final_model.pt"):
        assert (results / output).stat().st_size > 0, output
    deployed = metrics(results)
    assert [r["round"] for r in deployed] == [0, 1, 2, 3]

    # before the kill: the simulation's numbers, every node
    simulate_in_process({**RUN, "benchmark-dir": str(benchmark), "num-server-rounds": 3},
                        NODES, tmp_path / "sim")  # fmt: skip
    simulated = metrics(tmp_path / "sim")
    for ours, theirs in zip(deployed[:2], simulated[:2], strict=True):
        assert ours["server"].keys() == theirs["server"].keys()
        for key, value in ours["server"].items():
            assert value == pytest.approx(theirs["server"][key], rel=1e-5, abs=1e-7), key
        assert len(ours["clients"]) == (NODES if ours["round"] else 0)
        by_partition = {c["partition-id"]: c for c in theirs["clients"]}
        for client in ours["clients"]:
            other = by_partition[client["partition-id"]]
            assert client["num-examples"] == other["num-examples"]
            assert client["train_loss"] == pytest.approx(other["train_loss"], rel=1e-5)

    # the kill: partition 1 lost in round 2, round 3 without it
    lost = [c for c in deployed[2]["clients"] if "error" in c]
    assert [c["partition-id"] for c in lost] == [1], deployed[2]["clients"]
    assert "Node Unavailable" in lost[0]["error"]
    assert sorted(c["partition-id"] for c in deployed[3]["clients"]) == [0, 2]
    assert all("error" not in c for c in deployed[3]["clients"])
    assert deployed[3]["server"]["loss"] < deployed[0]["server"]["loss"]


def test_tls_overlay_runs_and_refuses_an_unregistered_node(engine, benchmark, tmp_path):
    """With docker/compose.tls.yml: the registered SuperNodes join over TLS and a round runs;
    the same SuperNode service started with a key the SuperLink never registered is refused."""
    certs = make_certificates(tmp_path / "certs", NODES)
    intruder = tmp_path / "intruder-certs"
    shutil.copytree(certs, intruder)
    write_node_key(intruder / "supernode-2", comment="intruder")  # same CA, unknown key
    for folder in (certs, intruder):
        subprocess.run(["chown", "-R", f"{APP_UID}:{APP_UID}", str(folder)], check=True)
    env = {"FEDPSG_BENCHMARK": str(benchmark), "FEDPSG_CERTS": str(certs)}
    home = tmp_path / "flwr-home"
    with Stack([COMPOSE_FILE, TLS_OVERLAY], env) as stack:
        connect(home, stack.port, ca=certs / "ca.crt")
        online_nodes(home, NODES)
        log = tmp_path / "flwr-run.log"
        config = {**RUN, **IN_CONTAINERS, "num-server-rounds": 1}
        code = flwr_run(ROOT, CONNECTION, config, home, stream=False, timeout=TIMEOUT,
                        log_file=log)  # fmt: skip
        assert code == 0, log.read_text()[-3000:]
        assert f"{NODES} usable replies, 0 left out" in log.read_text()

        stack.env["FEDPSG_CERTS"] = str(intruder)
        refused = stack("run", "--rm", "--no-deps", "supernode-2", check=False, timeout=180)
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert "No SuperNode found with the given public key" in stack.logs("superlink")
        assert len(online_nodes(home, NODES)) == NODES
