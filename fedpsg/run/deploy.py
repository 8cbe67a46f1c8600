"""A Flower deployment on this machine: the docker-compose federation as loopback processes.

`fedpsg deploy local --benchmark DIR --nodes 3 --rounds 2` reads docker-compose.yml
(plus docker/compose.tls.yml with `--tls`), starts exactly its services - SuperLink, the
ServerApp's SuperExec, and per node a SuperNode with its ClientApp's SuperExec - as processes on
127.0.0.1 with free ports, runs the app with `flwr run <app> <connection> --stream`, and stops
every process it started, by pid, also on failure or Ctrl-C. Everything lands in one run folder:

    <run-dir>/logs/<service>.log   one log per process (`flwr-run.log`: the streamed run)
    <run-dir>/results/             the ServerApp's outputs (the compose `results` volume)
    <run-dir>/deployment.json      commands, ports, pids, exit codes, nodes, run status
    <run-dir>/certs/               with --tls and no --certs: the CA, server cert, node keys
    <run-dir>/flwr-home/<service>  each process's FLWR_HOME (each container has its own)

Each process gets its own FLWR_HOME, as each container has its own file system. Nothing here
imports flwr: Flower runs as its users type it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import typer
from rich.console import Console

from fedpsg.app.config import parse_run_config, validate_run_config
from fedpsg.run import compose
from fedpsg.run.certs import make_certificates
from fedpsg.run.processes import (
    ManagedProcesses,
    flwr_env,
    flwr_run,
    free_port,
    signals_held,
    wait_for_port,
    write_connection,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
TLS_OVERLAY = ROOT / "docker" / "compose.tls.yml"
CONNECTION = "fedpsg-deploy"
# The run config a compose deployment is run with; paths are the containers' mounts
COMPOSE_RUN_CONFIG = {"benchmark-dir": compose.BENCHMARK, "out-dir": compose.RESULTS}


class DeploymentError(RuntimeError):
    """A service that did not start or a one-shot service that failed; names the service
    and quotes the end of its log."""


def local_paths(benchmark: Path, run_dir: Path, certs: Path | None = None) -> dict[str, Path]:
    """Container path -> host path for a local deployment of the compose file."""
    paths = {compose.BENCHMARK: Path(benchmark), compose.RESULTS: Path(run_dir) / "results"}
    if certs is not None:
        paths[compose.CERTS] = Path(certs)
    return paths


def plan_federation(
    benchmark: Path,
    run_dir: Path,
    *,
    nodes: int | None = None,
    tls: bool = False,
    certs: Path | None = None,
    compose_file: Path = COMPOSE_FILE,
    tls_overlay: Path = TLS_OVERLAY,
    services: Sequence[str] | None = None,
) -> tuple[dict[str, Any], compose.LocalPlan]:
    """The compose document (from `compose_file`, or generated for `nodes` SuperNodes when
    they differ from the file's) and its services as loopback processes."""
    doc = compose.load_compose(compose_file, *([tls_overlay] if tls else []))
    if nodes is not None and nodes != len(_supernodes(doc)):
        doc = compose.compose_spec(nodes)
        if tls:
            doc = compose.merge(doc, compose.tls_overlay(nodes))
    plan = compose.localize(doc, local_paths(benchmark, run_dir, certs), free_port, services)
    return doc, plan


def _supernodes(doc: Mapping[str, Any]) -> list[str]:
    return [
        name
        for name, s in doc["services"].items()
        if str(s.get("image", "")).startswith("flwr/supernode:")
    ]


class Deployment:
    """Runs a `LocalPlan`: starts its services in dependency order, one log each, and stops
    all of them by pid on exit, on error or on Ctrl-C (`fedpsg.run.processes.ManagedProcesses`, one
    per service, stopped concurrently as `docker compose down` does).

    Parameters
    ----------
    plan : compose.LocalPlan
        The services, from `compose.localize`.
    run_dir : Path
        Where logs, Flower homes and `deployment.json` go.
    root_certificates : Path, optional
        CA certificate for `flwr` to reach a TLS SuperLink; None for an insecure one.
    """

    def __init__(
        self, plan: compose.LocalPlan, run_dir: Path, root_certificates: Path | None = None
    ) -> None:
        self.plan = plan
        self.run_dir = Path(run_dir).resolve()
        self.logs = self.run_dir / "logs"
        self.cli_home = self.run_dir / "flwr-home" / "cli"
        self.processes: dict[str, subprocess.Popen] = {}
        self.exit_codes: dict[str, int] = {}
        self._managers: dict[str, ManagedProcesses] = {}
        self._guard = ManagedProcesses()  # turns SIGTERM into an exit that unwinds `with`
        self.logs.mkdir(parents=True, exist_ok=True)
        write_connection(
            self.cli_home,
            CONNECTION,
            plan.superlink,
            insecure=root_certificates is None,
            root_certificates=root_certificates,
        )

    def __enter__(self) -> Deployment:
        self._guard.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self._guard.__exit__(exc_type, exc, tb)
            self.write_manifest()

    def stop(self) -> None:
        """Stop every started process and what it started, all services at once; record
        how each ended (a negative code: stopped by that signal)."""
        stoppers = [threading.Thread(target=m.stop) for m in self._managers.values()]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for name, proc in self.processes.items():
            self.exit_codes.setdefault(name, proc.returncode)

    def env(self, name: str) -> dict[str, str]:
        """The environment of service `name`: Flower's offline settings, its own FLWR_HOME, and
        this checkout importable (the app image has it installed)."""
        env = {**flwr_env(self.run_dir / "flwr-home" / name), **self.plan.services[name].env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def start(self, names: Sequence[str] | None = None, timeout: float = 120.0) -> None:
        """Start `names` (default: every service) and what they depend on, level by level of
        the dependency graph: a level starts together, and its listening services accept
        connections and its one-shot services exit 0 before the next level starts."""
        wanted = set(self.plan.order(names))
        for level in self.plan.levels():
            started = []
            for name in level:
                if name in wanted and name not in self.processes:
                    manager = self._managers.setdefault(name, ManagedProcesses())
                    argv, env = self.plan.services[name].argv, self.env(name)
                    with signals_held():  # a started service is always in `processes`
                        self.processes[name] = manager.start(argv, env, self.logs / f"{name}.log")
                    started.append(name)
            for name in started:
                self._await(name, timeout)

    def _await(self, name: str, timeout: float) -> None:
        """Wait until `name` listens (or, one-shot, has exited 0)."""
        service, proc, log = (
            self.plan.services[name],
            self.processes[name],
            self.logs / f"{name}.log",
        )
        try:
            if service.one_shot:
                self.exit_codes[name] = code = proc.wait(timeout=timeout)
                if code != 0:
                    raise RuntimeError(f"exited with code {code}")
            elif service.port is not None:
                wait_for_port(service.port, proc, timeout)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
            raise DeploymentError(f"service {name!r}: {exc}\n{tail(log)}") from exc

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop one service (as `docker compose stop`/`kill` would) and return its exit code."""
        proc = self.processes[name]
        proc.send_signal(sig)
        self.exit_codes[name] = proc.wait(timeout=timeout)
        return self.exit_codes[name]

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's SuperNodes (`flwr supernode list --format json`)."""
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        return json.loads(out[out.find("{") :]).get("nodes", []) if "{" in out else []

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Block until `count` SuperNodes are online; fail early if a process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = [n for n in self.nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return online
            if dead := self.dead():
                raise DeploymentError(f"{', '.join(dead)} exited before the federation was up")
            time.sleep(0.5)
        raise DeploymentError(f"fewer than {count} SuperNodes online after {timeout:.0f}s")

    def dead(self) -> list[str]:
        """Long-running services that have exited."""
        return [
            name
            for name, proc in self.processes.items()
            if not self.plan.services[name].one_shot
            and proc.poll() is not None
            and name not in self.exit_codes
        ]

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, bool | int | float | str],
        timeout: float | None = None,
        stream: bool = True,
    ) -> int:
        """`flwr run <app_dir> <connection> --stream`; 0 when the run completed."""
        code = flwr_run(
            app_dir,
            CONNECTION,
            run_config,
            self.cli_home,
            stream=stream,
            timeout=timeout,
            log_file=self.logs / "flwr-run.log",
        )
        self.exit_codes["flwr-run"] = code
        return code

    def flwr(self, *args: str, timeout: float = 60.0) -> str:
        """stdout of a `flwr` CLI command against this deployment's SuperLink."""
        proc = subprocess.run(
            ["flwr", *args],
            env=flwr_env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return proc.stdout

    def write_manifest(self) -> Path:
        """`deployment.json`: what ran, where it listened, how it ended."""
        record = {
            "superlink": self.plan.superlink,
            "services": {
                name: {
                    "argv": service.argv,
                    "port": service.port,
                    "pid": self.processes[name].pid if name in self.processes else None,
                    "exit-code": self.exit_codes.get(name),
                    "log": str(self.logs / f"{name}.log"),
                }
                for name, service in self.plan.services.items()
            },
            "flwr-run-exit-code": self.exit_codes.get("flwr-run"),
        }
        path = self.run_dir / "deployment.json"
        path.write_text(json.dumps(record, indent=2))
        return path


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' if there is none)."""
    if not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def app_run_config(
    paths: Mapping[str, Path], overrides: Mapping[str, bool | int | float | str] = ()
) -> dict[str, bool | int | float | str]:
    """The compose run config with container paths mapped to host paths, plus `overrides`."""
    config: dict[str, bool | int | float | str] = {
        key: compose.map_path(value, paths) or value for key, value in COMPOSE_RUN_CONFIG.items()
    }
    return {**config, **dict(overrides)}


def register_supernodes(
    superlink: str, public_keys: Sequence[Path], root_certificates: Path, wait: float = 120.0
) -> list[str]:
    """Register SuperNode public keys with a SuperLink that has `--enable-supernode-auth`
    (`flwr supernode register`); a key registered before counts as registered. Returns the
    node ids. Waits up to `wait` seconds for the SuperLink to accept connections."""
    host, port = superlink.rsplit(":", 1)
    deadline = time.monotonic() + wait
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperLink {superlink} unreachable: {exc}") from exc
            time.sleep(0.5)
    node_ids = []
    with tempfile.TemporaryDirectory() as home:
        write_connection(
            Path(home), "superlink", superlink, insecure=False, root_certificates=root_certificates
        )
        for key in public_keys:
            proc = subprocess.run(
                ["flwr", "supernode", "register", str(key), "superlink", "--format", "json"],
                env=flwr_env(Path(home)),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            out = proc.stdout[proc.stdout.find("{") :] if "{" in proc.stdout else "{}"
            reply = json.loads(out)
            if reply.get("success"):
                node_ids.append(str(reply["node-id"]))
            elif "already in use" not in json.dumps(reply):
                raise DeploymentError(
                    f"registering {key} failed: {reply or proc.stdout + proc.stderr}"
                )
    return node_ids


cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


@cli.command()
def local(
    benchmark: Annotated[Path, typer.Option(help="Benchmark folder (manifest.json, shards).")],
    nodes: Annotated[int, typer.Option(min=1, help="Number of SuperNodes.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="num-server-rounds.")] = 3,
    run_dir: Annotated[
        Path | None, typer.Option(help="Output folder (default runs/deploy-<time>).")
    ] = None,
    tls: Annotated[bool, typer.Option(help="TLS and SuperNode authentication.")] = False,
    certs: Annotated[
        Path | None, typer.Option(help="Certificates from fedpsg.run.certs (default: made).")
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--run-config", "-c", help="Run config as `flwr run -c` reads it."),
    ] = None,
    compose_file: Annotated[Path, typer.Option("--compose")] = COMPOSE_FILE,
    timeout: Annotated[float, typer.Option(help="Seconds before the run is stopped.")] = 3600,
) -> None:
    """Run the app on a SuperLink and NODES SuperNodes started from the compose file."""
    if not benchmark.is_dir():
        raise typer.BadParameter(f"{benchmark} is not a folder", param_hint="--benchmark")
    try:  # before any certificate, folder or process: the ServerApp's own check
        overrides = {"num-server-rounds": rounds, **parse_run_config(config)}
        validate_run_config(overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="-c") from None
    run_dir = (run_dir or ROOT / "runs" / f"deploy-{datetime.now(UTC):%Y%m%d-%H%M%S}").resolve()
    if tls and certs is None:
        certs = make_certificates(run_dir / "certs", nodes)
    _, plan = plan_federation(
        benchmark.resolve(), run_dir, nodes=nodes, tls=tls, certs=certs, compose_file=compose_file
    )
    run_config = app_run_config(local_paths(benchmark.resolve(), run_dir, certs), overrides)
    ca = certs / "ca.crt" if tls and certs is not None else None
    console = Console(stderr=True)
    try:
        with Deployment(plan, run_dir, root_certificates=ca) as deployment:
            console.print(f"{len(plan.services)} services; logs in {deployment.logs}")
            with console.status(f"starting {', '.join(plan.services)}"):
                deployment.start()
            with console.status(f"waiting for {nodes} SuperNodes"):
                deployment.wait_for_nodes(nodes)
            code = deployment.run(ROOT, run_config, timeout=timeout)
    except DeploymentError as exc:
        console.print(f"[red]deployment failed:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    typer.echo(f"run {'completed' if code == 0 else f'failed ({code})'}; outputs in {run_dir}")
    summary = run_dir / "results" / "summary.md"
    if summary.exists():
        typer.echo(summary.read_text())
    raise typer.Exit(0 if code == 0 else 1)


@cli.command()
def register(
    keys: Annotated[list[Path], typer.Argument(help="SuperNode public keys (OpenSSH).")],
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port.")],
    root_certificates: Annotated[Path, typer.Option(help="CA certificate of the SuperLink.")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for the SuperLink.")] = 120,
) -> None:
    """Register SuperNode public keys with a SuperLink running --enable-supernode-auth."""
    try:
        ids = register_supernodes(superlink, keys, root_certificates, wait)
    except DeploymentError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"registered {len(keys)} SuperNode keys ({len(ids)} new)")


@cli.command("compose")
def write_compose(
    nodes: Annotated[int, typer.Option(min=1, help="Number of SuperNodes.")] = 3,
    out: Annotated[Path, typer.Option(help="Repository root to write into.")] = ROOT,
) -> None:
    """Write docker-compose.yml and docker/compose.tls.yml for NODES SuperNodes."""
    for relative, text in compose.compose_files(nodes).items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        typer.echo(f"wrote {path}")
