"""TLS and SuperNode authentication, started from docker-compose.yml + docker/compose.tls.yml:
a registered SuperNode joins; one with an unknown key, or on a plain connection, is refused."""

import subprocess
import time

import pytest
from cryptography import x509

from fedpsg.run import compose
from fedpsg.run.certs import make_certificates, server_names, write_node_key
from fedpsg.run.deploy import Deployment, plan_federation
from fedpsg.run.processes import free_port

pytestmark = pytest.mark.slow


def test_certificates_name_every_service_and_loopback(tmp_path):
    certs = make_certificates(tmp_path, 2, extra_names=["node.example.org"])
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    # one certificate per TLS endpoint: no node needs the SuperLink's private key
    for stem, service in [("server", "superlink"), ("supernode-1-tls", "supernode-1")]:
        cert = x509.load_pem_x509_certificate((certs / f"{stem}.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
        names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        assert set(server_names(service)) | {"node.example.org"} == names
        cert.verify_directly_issued_by(ca)
        assert (certs / f"{stem}.key").stat().st_mode & 0o077 == 0
    assert (certs / "supernode-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (certs / "supernode-1").stat().st_mode & 0o077 == 0


def _variant(argv, replace, port):
    """A SuperNode command from the compose file with some flags changed, on its own port,
    giving up after a few seconds instead of retrying forever."""
    args = list(argv)
    for flag, value in replace.items():
        i = args.index(flag)
        args[i : i + 2] = [] if value is None else [flag, value]
    args[args.index("--port") + 1] = str(port)
    return [*args, "--max-retries", "1", "--max-wait-time", "5"]


def test_only_registered_nodes_join_over_tls(tmp_path):
    certs = make_certificates(tmp_path / "certs", 1)
    write_node_key(tmp_path / "intruder", comment="intruder")
    _, plan = plan_federation(
        tmp_path / "benchmark", tmp_path / "run", nodes=1, tls=True, certs=certs
    )
    with Deployment(plan, tmp_path / "run", root_certificates=certs / "ca.crt") as deployment:
        deployment.start(["supernode-0"])  # with the SuperLink and the key registration
        online = deployment.wait_for_nodes(1, timeout=90)
        assert len(online) == 1

        argv = plan.services["supernode-0"].argv
        env = deployment.env("supernode-0")
        intruder = _variant(
            argv, {"--auth-supernode-private-key": str(tmp_path / "intruder")}, free_port()
        )
        plain = _variant(
            argv,
            {"--root-certificates": None, "--auth-supernode-private-key": None},
            free_port(),
        )
        plain.insert(1, "--insecure")
        refused = {}
        for name, cmd in {"intruder": intruder, "plain": plain}.items():
            start = time.monotonic()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
            refused[name] = (proc.returncode, proc.stdout + proc.stderr)
            assert time.monotonic() - start < 60, f"{name} hung"
        superlink_log = (deployment.logs / "superlink.log").read_text()

        assert refused["intruder"][0] != 0
        assert "Failed to activate SuperNode" in refused["intruder"][1]
        assert "No SuperNode found with the given public key" in superlink_log
        assert refused["plain"][0] != 0
        assert "Connection attempt failed" in refused["plain"][1]
        # the federation still has exactly the registered node
        assert [n["node-id"] for n in deployment.wait_for_nodes(1)] == [
            n["node-id"] for n in online
        ]
        assert len([n for n in deployment.nodes() if n["status"] == "online"]) == 1

        # registering again (a restarted compose stack) is not an error
        again = subprocess.run(
            plan.services["register-supernodes"].argv,
            env=deployment.env("register-supernodes"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert "registered 1 SuperNode keys (0 new)" in again.stdout


def test_compose_overlay_requires_tls_flags_locally(tmp_path):
    """Without certificates the TLS plan cannot be built: nothing insecure starts by accident."""
    with pytest.raises(compose.ComposeError, match="no local path for volume '/app/certs"):
        plan_federation(tmp_path / "benchmark", tmp_path / "run", tls=True, certs=None)
