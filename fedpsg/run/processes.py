"""Drive Flower's command-line tools from Python, and stop everything they start.

Nothing here imports flwr: the simulation script, the deployment scripts and the tests run
Flower exactly as a user types it (`flower-superlink`, `flwr run`), in a project-owned
`FLWR_HOME`, and stop every process they started by its id - never by name, since other
Flower processes may share the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import tomli_w

_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BIN = Path(sys.executable).parent


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """`os.environ` for a Flower process: own home, offline, no telemetry, no `uv sync`."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(Path(flwr_home).resolve()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        PATH=os.pathsep.join([str(_BIN), env.get("PATH", "")]),
    )
    return env


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    *,
    insecure: bool = True,
    root_certificates: Path | None = None,
    options: Mapping | None = None,
) -> None:
    """Add or replace the SuperLink connection `name` in `$FLWR_HOME/config.toml`.

    Flower 1.42 keeps connections there as `[superlink.<name>]` tables (`address`,
    `insecure`, `root-certificates`, `options.*`); the first one written becomes the default.
    The file is replaced atomically, so a concurrent `flwr` never reads half of it.
    """
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", name)
    entry: dict[str, Any] = {"address": address, "insecure": insecure}
    if root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    if options:
        entry["options"] = dict(options)
    superlink[name] = entry
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(config))
    tmp.replace(path)


def format_run_config(
    run_config: Mapping[str, bool | int | float | str], option: str = "--run-config"
) -> list[str]:
    """`flwr run` arguments, one `option key=value` per pair, values as TOML scalars."""
    args = []
    for key, value in run_config.items():
        if isinstance(value, str) and ('"' in value or "\n" in value):
            raise ValueError(f"run config {key}={value!r}: quotes and newlines are not allowed")
        args += [option, f"{key}={tomli_w.dumps({'v': value})[4:].strip()}"]
    return args


def flwr_run(
    app_dir: Path,
    connection: str,
    run_config: Mapping,
    flwr_home: Path,
    *,
    stream: bool = True,
    timeout: float | None = None,
    log_file: Path | None = None,
    federation_config: Mapping | None = None,
    show: Callable[[str], bool] | None = None,
) -> int:
    """`flwr run <app_dir> <connection> --stream`, and wait until the run has finished.

    The run's log goes to stdout when `stream` (only the lines `show` keeps, when given),
    and whole to `log_file` when given.
    `federation_config` overrides the simulation settings for this run (`num-supernodes`,
    `client-resources-num-cpus`, ...; Flower's `--federation-config`). Returns 0 only
    when the SuperLink reports the run `finished:completed` (`flwr run` itself exits 0 even
    when the ServerApp failed); 124 when `timeout` seconds passed (the run is then stopped
    with `flwr stop`); otherwise non-zero.
    """
    env = flwr_env(flwr_home)
    cmd = ["flwr", "run", str(app_dir), connection, *format_run_config(run_config), "--stream"]
    if federation_config:
        cmd += format_run_config(federation_config, option="--federation-config")
    deadline = None if timeout is None else time.monotonic() + timeout
    run_id: str | None = None
    sink = open(log_file, "a") if log_file is not None else None  # noqa: SIM115
    try:
        with ManagedProcesses() as procs:
            proc = procs.start(cmd, env, capture=True)
            timer = None if timeout is None else threading.Timer(timeout, procs.stop)
            if timer is not None:
                timer.start()
            try:
                for line in proc.stdout:  # type: ignore[union-attr]
                    run_id = run_id or _match_run_id(line)
                    if stream and (show is None or show(line)):
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    if sink is not None:
                        sink.write(line)
                        sink.flush()
                code = proc.wait()
                proc.stdout.close()  # type: ignore[union-attr]
            except BaseException:
                if run_id is not None:
                    _flwr(["stop", run_id, connection], env)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
    finally:
        if sink is not None:
            sink.close()
    if deadline is not None and time.monotonic() >= deadline:
        if run_id is not None:
            _flwr(["stop", run_id, connection], env)
        return 124
    if code != 0:
        return code
    if run_id is None:
        return 1
    return 0 if run_status(run_id, connection, flwr_home) == "finished:completed" else 1


def quiet_line(line: str) -> bool:
    """Whether a line of Flower's log belongs in the quiet view: the app's own `[fedpsg]`
    lines (one per round, warnings, errors) and Flower's ERROR lines; not Flower's per-round
    echo, its final dump, nor Ray's and Flower's deprecation warnings."""
    text = _ANSI.sub("", line)
    return "[fedpsg]" in text or text.lstrip().startswith("ERROR")


def run_status(run_id: str | int, connection: str, flwr_home: Path) -> str:
    """The SuperLink's status of a run, e.g. `finished:completed` or `finished:failed`."""
    out = _flwr(
        ["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_env(flwr_home)
    )
    start = out.find("{")
    if start < 0:
        return "unknown"
    runs = json.loads(out[start:]).get("runs", [])
    return runs[0]["status"] if runs else "unknown"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Block until something listens on 127.0.0.1:`port`; fail early if `process` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def _match_run_id(line: str) -> str | None:
    match = _RUN_ID.search(line)
    return match.group(1) if match else None


def _flwr(args: Sequence[str], env: Mapping[str, str]) -> str:
    proc = subprocess.run(
        ["flwr", *args], env=dict(env), capture_output=True, text=True, timeout=60, check=False
    )
    return proc.stdout


class ManagedProcesses:
    """Processes started for one job, all stopped on exit - normal, on error or on Ctrl-C.

    Each process starts in its own session; stopping sends SIGTERM to its process group and
    to every descendant (Flower's SuperLink detaches its SuperExec, which starts the
    simulation), waits, then SIGKILLs what is left. Inside the `with` block SIGTERM to this
    process also unwinds it, so the children never outlive their parent.
    """

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.processes: list[subprocess.Popen] = []
        self._logs: list[IO] = []
        self._previous_handler: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> ManagedProcesses:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_exit)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)

    def start(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        *,
        capture: bool = False,
    ) -> subprocess.Popen:
        """Start `cmd`; its output goes to `log_file` (appended), to a pipe if `capture`,
        else to this process's stdout."""
        stdout: Any = None
        with signals_held():
            if log_file is not None:
                Path(log_file).parent.mkdir(parents=True, exist_ok=True)
                stdout = open(log_file, "a")  # noqa: SIM115
                self._logs.append(stdout)
            elif capture:
                stdout = subprocess.PIPE
            proc = subprocess.Popen(
                list(cmd),
                env=None if env is None else dict(env),
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout is not None else None,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
            self.processes.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every started process (latest first) with its descendants."""
        with self._lock:
            for proc in reversed(self.processes):
                _stop_tree(proc, self.grace)
            self.processes.clear()
            for log in self._logs:
                log.close()
            self._logs.clear()


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class _Held:
    """A handler that only notes the signal, for `signals_held`."""

    def __init__(self) -> None:
        self.caught: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.caught.append(signum)


@contextlib.contextmanager
def signals_held(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then act on them as before.

    Starting a process and recording its pid is one step: an interrupt between the two would
    leave a process that nobody stops. Nested blocks hold until the outermost ends; off the
    main thread (where Python cannot set handlers) the block holds nothing.
    """
    if threading.current_thread() is not threading.main_thread() or isinstance(
        signal.getsignal(signums[0]), _Held
    ):
        yield
        return
    held = _Held()
    previous = {signum: signal.signal(signum, held) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held.caught):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def _stop_tree(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM `proc`'s group and descendants, wait `grace` s, then SIGKILL the rest."""
    tree = _descendants(proc.pid)
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
    for pid in tree:
        _signal(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + grace
    while (alive := [pid for pid in tree if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def stop_detached(pid: int, grace: float = 10.0) -> None:
    """Stop, by pid, a process that is not our child and everything under it: the SuperLink
    that `flwr run` detaches for a `:local:` connection (it outlives the command)."""
    tree = [pid, *_descendants(pid)]
    for member in tree:
        _signal(member, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (alive := [p for p in tree if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for member in alive:
        _signal(member, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """All live descendants of `pid`, from /proc (Linux); empty where /proc is absent."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
