"""Run the Flower app as a Ray simulation with `flwr run`, and stop everything afterwards.

    fedpsg simulate BENCHMARK_DIR --out-dir runs/fedavg --rounds 5 -c strategy=fedprox

Flower's `:local:` connection starts a background SuperLink on fixed ports that outlives the
command. Instead this starts `flower-superlink --simulation` on a free port as a managed
process, points a connection of the project's `FLWR_HOME` at it, runs `flwr run --stream`,
and stops the SuperLink (and the SuperExec and simulation processes under it) by pid when
the run ends, fails or is interrupted. The number of virtual SuperNodes is the benchmark's
`num_clients`.

`--engine in-process` runs the same ServerApp and ClientApp code in this one process, the
messages going through `strategies.local_grid.LocalGrid` instead of a SuperLink and Ray: no
start-up cost and one thread, for experiment grids that run many small federations side by
side (`bench/exp_fl_psg.py`). Same seeds give the same metrics as `flwr run`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tomllib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import tomli_w
import typer

from fedpsg.app.config import (
    RunConfigError,
    ignored_keys,
    parse_run_config,
    validate_run_config,
)
from fedpsg.run.processes import (
    ManagedProcesses,
    flwr_env,
    flwr_run,
    free_port,
    quiet_line,
    wait_for_port,
    write_connection,
)

if TYPE_CHECKING:  # Flower itself is imported only where the in-process engine runs
    from flwr.app import Context

APP_DIR = Path(__file__).resolve().parents[2]


def default_flwr_home() -> Path:
    """`$FLWR_HOME` if set, else the project's `.flwr` folder."""
    return Path(os.environ.get("FLWR_HOME", APP_DIR / ".flwr"))


def num_clients(benchmark_dir: Path) -> int:
    """`num_clients` from a benchmark folder's manifest."""
    manifest = Path(benchmark_dir) / "manifest.json"
    try:
        return int(json.loads(manifest.read_text())["num_clients"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{manifest}: no benchmark manifest (build one first)") from None
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{manifest}: field num_clients: expected an integer ({exc})") from None


def simulate(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    out_dir: Path,
    *,
    flwr_home: Path | None = None,
    cpus_per_client: int = 1,
    stream: bool = True,
    timeout: float | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
) -> int:
    """Run one simulation of the app with `num_supernodes` virtual SuperNodes.

    Outputs go to `out_dir` (set as run config `out-dir`), with the SuperLink's log and the
    full run log (`flwr_run.log`); the terminal gets the app's one line per round and errors
    only, unless `verbose`. `ray_address` (else `$RAY_ADDRESS`) puts the ClientApps on an
    existing Ray cluster (`ray start --head` / `--address`); without either, a fresh local one
    (Ray's own default would join the last cluster started on this machine).
    Returns `flwr_run`'s exit code (0 = the run completed).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(flwr_home or default_flwr_home()).resolve()
    config = {**run_config, "out-dir": str(out_dir)}
    port = free_port()
    connection = f"fedpsg-sim-{port}"
    federation = {
        "num-supernodes": num_supernodes,
        "client-resources-num-cpus": cpus_per_client,
        "client-resources-num-gpus": 0.0,
    }
    superlink = [
        "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
        "--port", str(port), "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    env = flwr_env(flwr_home)
    # Flower's Ray backend calls ray.init(), which joins $RAY_ADDRESS ("local": start one)
    env["RAY_ADDRESS"] = ray_address or env.get("RAY_ADDRESS") or "local"
    with ManagedProcesses() as procs, _connection(flwr_home, connection, port):
        proc = procs.start(superlink, env, out_dir / "superlink.log")
        wait_for_port(port, proc)
        return flwr_run(
            APP_DIR,
            connection,
            config,
            flwr_home,
            stream=stream,
            timeout=timeout,
            log_file=out_dir / "flwr_run.log",
            federation_config=federation,
            show=None if verbose else quiet_line,
        )


def simulate_in_process(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    out_dir: Path,
    node_configs: Mapping[int, Mapping[str, Any]] | None = None,
) -> dict[int, Context]:
    """Run the app's ServerApp and ClientApps in this process through a `LocalGrid`.

    As `flwr run` does, `run_config` overrides the defaults of the app's pyproject.toml.
    Node `i + 1` holds partition `i`; `node_configs[i]` adds to its node config (as a
    SuperNode's `--node-config`, e.g. its own `benchmark-dir`). A ClientApp's error reaches
    the strategy as an error reply, as it does in a real federation (the strategy leaves that
    client out). With `batch-clients` on (or "auto" on CUDA) a round's train messages go to
    the ClientApp's `train_batch` together: one `train_many` call per device, over every
    visible GPU when `device` is "cuda". Returns the nodes' contexts, whose `state` the
    ClientApp kept across rounds.
    Flower is imported here, not at module level: the Ray path only drives the `flwr` CLI.
    """
    from flwr.app import Context, Message, RecordDict

    from fedpsg.app import client_app, server_app
    from strategies.local_grid import LocalGrid

    overrides = {**run_config, "out-dir": str(Path(out_dir).resolve())}
    config = validate_run_config(overrides)
    contexts = {}
    for i in range(num_supernodes):
        node_config = {"partition-id": i, "num-partitions": num_supernodes}
        node_config.update((node_configs or {}).get(i, {}))
        contexts[i + 1] = Context(i + 1, i + 1, node_config, RecordDict(), config)

    def content(reply: Message, context: Context) -> RecordDict | RuntimeError:
        if reply.has_error():
            pid = context.node_config["partition-id"]
            return RuntimeError(f"partition {pid}: {reply.error.reason}")
        return reply.content

    def node(context: Context):
        def handle(message: Message) -> RecordDict:
            reply = content(client_app.app(message, context), context)
            if isinstance(reply, RuntimeError):
                raise reply
            return reply

        return handle

    def train_round(messages: list[Message]) -> list[RecordDict | RuntimeError]:
        pairs = [(m, contexts[m.metadata.dst_node_id]) for m in messages]
        replies = client_app.train_batch(pairs, devices)
        return [content(r, c) for r, (_, c) in zip(replies, pairs, strict=True)]

    devices = client_app.batch_devices(config)
    nodes = {node_id: node(context) for node_id, context in contexts.items()}
    grid = LocalGrid(nodes, batch=train_round if devices else None)
    server_app.main(grid, Context(0, 0, {}, RecordDict(), config))
    return contexts


@contextlib.contextmanager
def _connection(flwr_home: Path, name: str, port: int) -> Iterator[None]:
    """A connection in `$FLWR_HOME/config.toml` for the lifetime of one simulation.

    Writers lock the file, so simulations started side by side keep each other's entries."""
    with _locked(flwr_home):
        write_connection(flwr_home, name, f"127.0.0.1:{port}", insecure=True)
    try:
        yield
    finally:
        with _locked(flwr_home):
            path = flwr_home / "config.toml"
            config = tomllib.loads(path.read_text())
            superlink = config.get("superlink", {})
            superlink.pop(name, None)
            if superlink.get("default") == name:
                superlink.pop("default")
            path.write_text(tomli_w.dumps(config))


@contextlib.contextmanager
def _locked(flwr_home: Path) -> Iterator[None]:
    flwr_home.mkdir(parents=True, exist_ok=True)
    with open(flwr_home / ".config.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(
    benchmark_dir: Annotated[Path, typer.Argument(help="Benchmark folder (manifest.json).")],
    out_dir: Annotated[Path, typer.Option(help="Where the run's outputs go.")] = Path("runs/sim"),
    rounds: Annotated[int, typer.Option(help="num-server-rounds")] = 3,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox, fedsam, scaffold")] = "fedavg",
    model: Annotated[str, typer.Option(help="Relation model of the PSG task.")] = "motifs",
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            "-c",
            help="Run config as `flwr run -c` reads it: 'lr=0.05 model=\"vctree\"'.",
        ),
    ] = None,
    cpus_per_client: Annotated[int, typer.Option(help="Ray CPUs per ClientApp.")] = 1,
    engine: Annotated[
        str, typer.Option(help="'ray' (flwr run) or 'in-process' (LocalGrid, no Ray).")
    ] = "ray",
    ray_address: Annotated[
        str | None,
        typer.Option(envvar="RAY_ADDRESS", help="Join this Ray cluster (ray start --head)."),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's full log.")] = False,
    flwr_home: Annotated[Path | None, typer.Option(help="FLWR_HOME (default: .flwr).")] = None,
) -> None:
    """Simulate a federation over BENCHMARK_DIR's clients and print the final table.

    Exit codes: 0 the run completed, 1 it failed (bad data, a failed ServerApp),
    2 bad usage (an unknown run-config key, a wrong type, a value out of range).
    """
    if engine not in ("ray", "in-process"):
        raise typer.BadParameter(
            f"{engine!r}: expected 'ray' or 'in-process'", param_hint="--engine"
        )
    benchmark_dir = benchmark_dir.resolve()
    run_config = {
        "benchmark-dir": str(benchmark_dir),
        "num-server-rounds": rounds,
        "strategy": strategy,
        "model": model,
    }
    try:
        run_config.update(parse_run_config(config))
        checked = validate_run_config(run_config)
    except ValueError as exc:  # RunConfigError included: the same check the ServerApp makes
        raise typer.BadParameter(str(exc), param_hint="-c") from None
    for key in ignored_keys(checked):
        typer.secho(f"warning: run config {key}={checked[key]!r}: strategy {strategy} ignores it",
                    err=True, fg=typer.colors.YELLOW)  # fmt: skip
    try:
        supernodes = num_clients(benchmark_dir)
        if checked["resume"]:  # a resume with nothing to resume fails before anything starts
            from fedpsg.app.server_app import check_resume, run_dirs

            check_resume(checked, run_dirs(checked, out_dir.resolve()))
    except (OSError, ValueError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    if engine == "in-process":
        code = _run_in_process(run_config, supernodes, out_dir, verbose)
    else:
        code = simulate(
            run_config, supernodes, out_dir, flwr_home=flwr_home,
            cpus_per_client=cpus_per_client, ray_address=ray_address, verbose=verbose,
        )  # fmt: skip
    summary = out_dir.resolve() / "summary.md"
    if code == 0 and summary.exists():
        typer.echo("\n" + summary.read_text())
        typer.echo(f"plots: {out_dir.resolve() / 'plots'}")
    if code != 0:
        typer.secho(f"simulation failed; full log in {out_dir}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


def _run_in_process(
    run_config: Mapping[str, Any], supernodes: int, out_dir: Path, verbose: bool
) -> int:
    """`simulate_in_process` for the CLI: Flower's log cut to the app's lines unless
    `verbose`; a failed ServerApp is one error line and exit code 1."""
    from flwr.common.logger import FLOWER_LOGGER

    quiet = logging.Filter()
    quiet.filter = lambda record: quiet_line(f"{record.levelname} {record.getMessage()}")
    if not verbose:
        for handler in FLOWER_LOGGER.handlers:
            handler.addFilter(quiet)
    try:
        simulate_in_process(run_config, supernodes, out_dir)
    except (RunConfigError, ValueError, OSError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return 1
    finally:
        for handler in FLOWER_LOGGER.handlers:
            handler.removeFilter(quiet)
    return 0
