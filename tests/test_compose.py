"""docker-compose.yml and its TLS overlay: structure, pinning, mounts, partitions, ports, and
their translation into the loopback commands the local federation runs."""

import importlib.metadata
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from fedpsg.run import compose
from fedpsg.run.deploy import (
    COMPOSE_FILE,
    TLS_OVERLAY,
    app_run_config,
    local_paths,
    plan_federation,
)

ROOT = Path(__file__).resolve().parents[1]
FLWR = importlib.metadata.version("flwr")
BASE = compose.load_compose(COMPOSE_FILE)
TLS = compose.load_compose(COMPOSE_FILE, TLS_OVERLAY)


def supernodes(doc):
    return {n: s for n, s in doc["services"].items() if s["image"].startswith("flwr/supernode:")}


def listening(doc):
    """service -> the port it listens on inside its container."""
    ports = {}
    for name, service in doc["services"].items():
        port = compose.flag_value(service["command"], "--port")
        if port is not None:
            ports[name] = int(port)
    return ports


def test_committed_files_are_what_the_spec_writes():
    for relative, text in compose.compose_files(3).items():
        assert (ROOT / relative).read_text() == text, (
            f"{relative} drifted from fedpsg/run/compose.py"
        )


def test_services_and_images_pinned_to_the_installed_flower():
    names = set(BASE["services"])
    nodes = [f"supernode-{i}" for i in range(3)]
    assert names == {"superlink", "serverapp", *nodes, *(f"clientapp-{i}" for i in range(3))}
    for name, service in BASE["services"].items():
        image, tag = service["image"].rsplit(":", 1)
        if image.startswith("flwr/"):
            assert tag == FLWR, f"{name}: {service['image']} is not flwr {FLWR}"
        else:
            assert service["build"]["dockerfile"] == "docker/Dockerfile"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^ARG BASE_IMAGE=flwr/superexec:{re.escape(FLWR)}$", dockerfile, re.M)
    # deployment runs no simulation: the app image installs no Ray (issue #15)
    requirements = (ROOT / "docker" / "requirements" / "app.txt").read_text()
    assert "flwr[simulation]" not in dockerfile and not re.search(r"^ray\b", requirements, re.M)
    # process isolation: the SuperLink and every SuperNode leave app execution to a SuperExec
    for name in ["superlink", *nodes]:
        assert compose.flag_value(BASE["services"][name]["command"], "--isolation") == "process"
    executors = [n for n, s in BASE["services"].items() if s["image"] == compose.APP_IMAGE]
    assert len(executors) == 1 + len(nodes)


def test_benchmark_mounted_read_only_and_results_in_a_volume():
    mounted = {}
    for name, service in TLS["services"].items():
        for volume in service.get("volumes", []):
            target = compose.volume_target(volume)
            mounted.setdefault(target, []).append(name)
            if target != compose.RESULTS:
                assert compose.volume_read_only(volume), f"{name}: {volume} is writable"
            if target == compose.BENCHMARK:  # `docker compose up` refuses to start without it
                assert volume.startswith("${FEDPSG_BENCHMARK:?"), volume
    # data is where apps run: the ServerApp's and every ClientApp's SuperExec
    assert sorted(mounted[compose.BENCHMARK]) == sorted(
        ["serverapp", *(f"clientapp-{i}" for i in range(3))]
    )
    assert mounted[compose.RESULTS] == ["serverapp"]
    assert "results" in BASE["volumes"]
    results = next(v for v in BASE["services"]["serverapp"]["volumes"] if "results" in v)
    assert results == f"results:{compose.RESULTS}" and not compose.volume_read_only(results)


@pytest.mark.parametrize("nodes", [1, 3, 5])
def test_partition_ids_unique_and_in_range(nodes):
    doc = compose.compose_spec(nodes) if nodes != 3 else BASE
    configs = [
        compose.parse_node_config(compose.flag_value(s["command"], "--node-config"))
        for s in supernodes(doc).values()
    ]
    ids = [int(c["partition-id"]) for c in configs]
    assert sorted(ids) == list(range(nodes))
    assert {int(c["num-partitions"]) for c in configs} == {nodes}
    assert {c["benchmark-dir"] for c in configs} == {compose.BENCHMARK}


@pytest.mark.parametrize("doc", [BASE, TLS], ids=["plain", "tls"])
def test_ports_and_addresses_consistent(doc):
    ports = listening(doc)
    assert set(ports) == {"superlink", *supernodes(doc)}
    for name in ports:
        assert compose.flag_value(doc["services"][name]["command"], "--host") == "0.0.0.0"
    published = doc["services"]["superlink"]["ports"]
    assert published == [f"${{FEDPSG_SUPERLINK_PORT:-{ports['superlink']}}}:{ports['superlink']}"]
    for name, service in doc["services"].items():
        for host, port in re.findall(r"\b([a-z][\w-]*):(\d+)\b", " ".join(service["command"])):
            assert ports.get(host) == int(port), f"{name}: {host}:{port} listens nowhere"
            assert host in service.get("depends_on", []) or _waits_for(doc, name, host)
    for i in range(len(supernodes(doc))):
        command = doc["services"][f"clientapp-{i}"]["command"]
        assert compose.flag_value(command, "--runtime-api-address") == (
            f"supernode-{i}:{ports[f'supernode-{i}']}"
        )


def _waits_for(doc, name, target):
    """Whether `name` transitively depends on `target`."""
    deps = doc["services"][name].get("depends_on", [])
    return any(d == target or _waits_for(doc, d, target) for d in deps)


def test_tls_overlay_secures_every_link_and_authenticates_every_node():
    certs = "/app/certs"
    for name, service in TLS["services"].items():
        assert "--insecure" not in service["command"], f"{name} still insecure"
    superlink = TLS["services"]["superlink"]["command"]
    assert "--enable-supernode-auth" in superlink
    assert compose.flag_value(superlink, "--ssl-certfile") == f"{certs}/server.crt"
    register = TLS["services"]["register-supernodes"]
    assert register["entrypoint"] == ["python", "-m", "fedpsg", "deploy", "register"]
    for i, (name, node) in enumerate(supernodes(TLS).items()):
        command = node["command"]
        key = compose.flag_value(command, "--auth-supernode-private-key")
        assert key == f"{certs}/supernode-{i}"
        assert compose.flag_value(command, "--root-certificates") == f"{certs}/ca.crt"
        assert f"{key}.pub" in register["command"]
        assert node["depends_on"]["register-supernodes"]["condition"] == (
            "service_completed_successfully"
        )
        # each node sees its own private keys only (authentication and TLS)
        for private in (key, f"{certs}/supernode-{i}-tls.key"):
            for other, service in TLS["services"].items():
                targets = {compose.volume_target(v) for v in service.get("volumes", [])}
                assert (private in targets) == (other == name), f"{other} mounts {private}"
    # the SuperLink's private key stays with the SuperLink, the CA's with no container
    mounts = {n: {compose.volume_target(v) for v in s.get("volumes", [])}
              for n, s in TLS["services"].items()}  # fmt: skip
    assert [n for n, targets in mounts.items() if f"{certs}/server.key" in targets] == ["superlink"]
    assert not [n for n, targets in mounts.items() if f"{certs}/ca.key" in targets]
    for name, service in TLS["services"].items():
        if service["image"] == compose.APP_IMAGE and name != "register-supernodes":
            assert compose.flag_value(service["command"], "--root-certificates")


@cache
def _help(executable: str) -> str:
    path = Path(sys.executable).parent / executable
    return subprocess.run(
        [str(path), "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout


@pytest.mark.parametrize("doc", [BASE, TLS], ids=["plain", "tls"])
def test_every_flag_exists_in_the_installed_flower_cli(doc):
    for name, service in doc["services"].items():
        if "entrypoint" in service:
            continue
        executable = compose.ENTRYPOINTS[service["image"].rsplit(":", 1)[0]]
        for flag in (a for a in service["command"] if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", _help(executable)), (
                f"{name}: {executable} has no {flag}"
            )


def test_localized_commands_are_the_compose_commands_on_loopback(tmp_path):
    certs = tmp_path / "certs"
    _, plan = plan_federation(tmp_path / "bench", tmp_path / "run", tls=True, certs=certs)
    ports = {s.port for s in plan.services.values() if s.port is not None}
    assert len(ports) == 4  # superlink + 3 supernodes, all distinct
    names = "|".join(TLS["services"])
    for name, service in plan.services.items():
        original = TLS["services"][name]
        assert len(service.argv) == 1 + len(original["command"]) + len(
            original.get("entrypoint", [])[1:]
        )
        text = " ".join(service.argv)
        assert not re.search(rf"\b({names}):\d", text), text
        assert "/app/" not in text and "0.0.0.0" not in text
        for flag in ("--superlink", "--runtime-api-address"):
            value = compose.flag_value(service.argv, flag)
            if value is not None:
                host, port = value.split(":")
                assert host == "127.0.0.1" and int(port) in ports
    node = plan.services["supernode-1"].argv
    assert compose.flag_value(node, "--auth-supernode-private-key") == str(certs / "supernode-1")
    config = compose.parse_node_config(compose.flag_value(node, "--node-config"))
    assert config == {
        "partition-id": "1",
        "num-partitions": "3",
        "benchmark-dir": str((tmp_path / "bench").resolve()),
    }
    assert plan.services["register-supernodes"].one_shot
    assert plan.levels()[0] == ["superlink"]
    assert plan.supernodes() == ["supernode-0", "supernode-1", "supernode-2"]
    run_config = app_run_config(local_paths(tmp_path / "bench", tmp_path / "run"))
    assert run_config["out-dir"] == str((tmp_path / "run" / "results").resolve())


def test_more_nodes_than_the_file_generates_the_same_layout(tmp_path):
    doc, plan = plan_federation(tmp_path / "b", tmp_path / "r", nodes=5, tls=True, certs=tmp_path)
    assert plan.supernodes() == [f"supernode-{i}" for i in range(5)]
    assert doc == compose.merge(compose.compose_spec(5), compose.tls_overlay(5))


def test_merge_follows_compose_rules(tmp_path):
    base = {
        "services": {
            "a": {
                "image": "x:1",
                "command": ["--insecure"],
                "volumes": ["./d:/data:ro", "v:/out"],
                "environment": ["A=1", "B=2"],
                "depends_on": ["b"],
            },
            "b": {"image": "y:1"},
        }
    }
    overlay = {
        "services": {
            "a": {
                "command": ["--tls"],
                "volumes": ["./e:/data:ro", "./c:/certs:ro"],
                "environment": {"B": 3},
                "depends_on": {"c": {"condition": "service_completed_successfully"}},
            },
            "c": {"image": "z:1"},
        }
    }
    (tmp_path / "base.yml").write_text(yaml.safe_dump(base))
    (tmp_path / "over.yml").write_text(yaml.safe_dump(overlay))
    a = compose.load_compose(tmp_path / "base.yml", tmp_path / "over.yml")["services"]["a"]
    assert a["command"] == ["--tls"]
    assert a["volumes"] == ["./e:/data:ro", "v:/out", "./c:/certs:ro"]
    assert a["environment"] == {"A": "1", "B": "3"}
    assert set(a["depends_on"]) == {"b", "c"}


def test_bad_compose_files_are_named(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("services: [1, 2]\n")
    with pytest.raises(compose.ComposeError, match="bad.yml"):
        compose.load_compose(bad)
    bad.write_text(yaml.safe_dump({"services": {"s": {"command": ["x"]}}}))
    with pytest.raises(compose.ComposeError, match="service 's' has no image"):
        compose.load_compose(bad)
    with pytest.raises(compose.ComposeError, match="no local path for volume '/app/results'"):
        compose.localize(BASE, {compose.BENCHMARK: tmp_path}, lambda: 1)
    with pytest.raises(compose.ComposeError, match="unknown service 'nope'"):
        compose.localize(BASE, local_paths(tmp_path, tmp_path), lambda: 1, ["nope"])
