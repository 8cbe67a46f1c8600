"""Container images for the compose federation on a host that cannot pull from a registry.

`fedpsg images` (`make images`) builds, with nothing but Debian's packages and a host-side
wheelhouse:

    fedpsg-rootfs:bookworm   debootstrap (minbase, python3, python3-venv), `docker import`ed
    fedpsg-base:bookworm     docker/base.Dockerfile: what flwr/base is (venv, user app 49999)
    flwr/superlink:1.42.0    docker/flower.Dockerfile: Flower alone, one entrypoint per role,
    flwr/supernode:1.42.0      tagged with the official names so docker-compose.yml runs as it
    flwr/superexec:1.42.0      is (an official image already present is used, not rebuilt)
    fedpsg-superexec:0.1.0   docker/Dockerfile, the app image, FROM flwr/superexec

Python packages never come from inside a container (containers have no network here): the
host's pip fills `.cache/wheelhouse` (`pip wheel`, so the host's pip configuration and find-links
apply), and each `docker build` installs from it with `pip --no-index --find-links`, served for
the build's duration on a loopback port (`docker build --network host`), so no wheel is copied
into an image layer. Each image carries a label hashing its inputs (recipe, base image, wheels,
for the app image the project's files); an image whose label matches is not rebuilt, and a
wheelhouse whose requirements did not change is not refilled.

`Dockerd` starts a Docker daemon where none runs (as root) and stops it by pid afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Annotated

import typer

from fedpsg.run import compose

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
CACHE = ROOT / ".cache"
WHEELHOUSE = CACHE / "wheelhouse"
LOGS = CACHE / "images"
LABEL = "fedpsg.inputs"

ROOTFS_IMAGE = "fedpsg-rootfs:bookworm"
BASE_IMAGE = "fedpsg-base:bookworm"
FLOWER_IMAGES = {
    role: f"flwr/{role}:{compose.FLWR_VERSION}" for role in ("superlink", "supernode", "superexec")
}
APP_IMAGE = compose.APP_IMAGE
DEBOOTSTRAP = [
    "debootstrap",
    "--variant=minbase",
    "--include=python3,python3-venv",
    "bookworm",
]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Not needed at run time: package caches and lists, documentation, translations
ROOTFS_PRUNE = [
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
]
APP_SOURCES = ["pyproject.toml", "README.md", "benchmark_builder", "strategies", "fedpsg",
               "diffusion_clients"]  # fmt: skip
REQUIREMENTS = DOCKER / "requirements"

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """A step of the image build that failed; names the step and quotes its log's end."""


# ----------------------------------------------------------------------------- docker daemon


def docker(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """`docker ARGS`, output captured as text."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, **kwargs)


def daemon_running() -> bool:
    """Whether a Docker daemon answers on the default socket."""
    if shutil.which("docker") is None:
        return False
    return docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30).returncode == 0


class Dockerd:
    """A Docker daemon for the duration of a `with` block: the one already running, or one
    started here (root only) and stopped here, by pid. `why_not` says why there can be none."""

    def __init__(self, log: Path = LOGS / "dockerd.log", timeout: float = 60.0) -> None:
        self.log, self.timeout = Path(log), timeout
        self.process: subprocess.Popen | None = None

    @staticmethod
    def why_not() -> str | None:
        """None if a daemon runs or can be started here, else the reason it cannot."""
        if daemon_running():
            return None
        for tool in ("docker", "dockerd"):
            if shutil.which(tool) is None:
                return f"no {tool} on PATH (apt-get install docker.io)"
        if os.geteuid() != 0:
            return "no Docker daemon running, and starting one needs root"
        return None

    def __enter__(self) -> Dockerd:
        if daemon_running():
            return self
        reason = self.why_not()
        if reason is not None:
            raise ImageBuildError(f"docker: {reason}")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.timeout
        while not daemon_running():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ImageBuildError(f"dockerd did not come up:\n{_tail(self.log)}")
            time.sleep(0.5)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the daemon started here (SIGTERM, then SIGKILL after 30 s); containers it
        ran are stopped by it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ----------------------------------------------------------------------------- inputs


def _digest(*parts: str | bytes) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part.encode() if isinstance(part, str) else part)
        sha.update(b"\0")
    return sha.hexdigest()[:16]


def _files_digest(paths: Sequence[Path]) -> str:
    """Digest of file names and contents under `paths` (byte-code and caches left out)."""
    parts: list[str | bytes] = []
    for path in paths:
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts and ".egg-info" not in str(file):
                parts += [str(file.relative_to(ROOT)), file.read_bytes()]
    return _digest(*parts)


def image_inputs(image: str) -> str | None:
    """The inputs label of a local image, '' if it has none, None if there is no such image."""
    result = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}',
                    image, check=False)  # fmt: skip
    if result.returncode != 0:
        return None
    return result.stdout.strip().replace("<no value>", "")


def image_id(image: str) -> str:
    """The id of a local image."""
    return docker("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


def image_size(image: str) -> int:
    """Bytes of a local image, its base layers included (what `docker images` shows)."""
    return int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


# ----------------------------------------------------------------------------- wheelhouse


def requirement_lines(*files: Path) -> list[str]:
    """The requirement lines of pip requirement files (comments dropped)."""
    lines = []
    for file in files:
        for line in file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def fill_wheelhouse(
    name: str, requirements: Sequence[str], wheelhouse: Path = WHEELHOUSE, log: Path = LOGS
) -> bool:
    """Wheels for `requirements` and everything they need into `wheelhouse` (`pip wheel` with
    the host's pip configuration). Skipped when the set `name` was filled with the same
    requirements before. False if pip cannot find them (the log names why)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    stamp = wheelhouse / f".{name}.inputs"
    key = _digest(sys.version, *requirements)
    if stamp.exists() and stamp.read_text() == key:
        return True
    log.mkdir(parents=True, exist_ok=True)
    with open(log / f"wheelhouse-{name}.log", "w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check",
             "--wheel-dir", str(wheelhouse), *requirements],
            stdout=out, stderr=subprocess.STDOUT, check=False,
        ).returncode  # fmt: skip
    if code == 0:
        stamp.write_text(key)
    return code == 0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        """No request log: the build log has pip's."""


@contextlib.contextmanager
def serve_wheelhouse(wheelhouse: Path = WHEELHOUSE) -> Iterator[str]:
    """`wheelhouse` over HTTP on loopback while the block runs; yields the URL. The port is
    derived from the wheelhouse's contents, so the URL - a build argument, hence part of
    Docker's layer cache key - stays the same while the wheels do and an app image rebuilt
    for a code change reuses its dependency layer (a free port when that one is taken)."""
    handler = functools.partial(_QuietHandler, directory=str(wheelhouse))
    listing = sorted(p.name for p in wheelhouse.iterdir())
    port = 20000 + int(_digest(*listing), 16) % 20000
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Built:
    """One image after `build_images`: its tag, size, and whether this call built it."""

    image: str
    size: int
    built: bool


def _run_logged(argv: Sequence[str], log: Path, step: str, **kwargs) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False,
                              **kwargs).returncode  # fmt: skip
    if code != 0:
        raise ImageBuildError(f"{step} failed (exit {code}); log {log}:\n{_tail(log)}")


def build_rootfs(force: bool = False, mirror: str = DEBIAN_MIRROR) -> bool:
    """`fedpsg-rootfs:bookworm` from debootstrap; False if an image of the same recipe exists."""
    key = _digest(*DEBOOTSTRAP, *ROOTFS_PRUNE)
    if not force and image_inputs(ROOTFS_IMAGE) == key:
        return False
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise ImageBuildError("the base root file system needs root and debootstrap "
                              "(apt-get install debootstrap)")  # fmt: skip
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        _run_logged([*DEBOOTSTRAP, str(root), mirror], LOGS / "debootstrap.log", "debootstrap")
        for relative in ROOTFS_PRUNE:
            for entry in (root / relative).glob("*"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            _run_logged(["docker", "import", "--change", f"LABEL {LABEL}={key}",
                         "--change", 'CMD ["python3"]', "-", ROOTFS_IMAGE],
                        LOGS / "rootfs-import.log", "docker import", stdin=tar.stdout)  # fmt: skip
        finally:
            tar.stdout.close()
            tar.wait()
    return True


def docker_build(
    image: str,
    dockerfile: Path,
    context: Path,
    key: str,
    build_args: dict[str, str],
    target: str | None = None,
) -> None:
    """`docker build` of one image, labelled with its inputs `key`; the build's RUN steps
    share the host's network (for the loopback wheel server)."""
    argv = ["docker", "build", "--network", "host", "--file", str(dockerfile),
            "--label", f"{LABEL}={key}", "--tag", image]  # fmt: skip
    for name, value in build_args.items():
        argv += ["--build-arg", f"{name}={value}"]
    if target is not None:
        argv += ["--target", target]
    safe = image.replace("/", "_").replace(":", "_")
    _run_logged([*argv, str(context)], LOGS / f"build-{safe}.log", f"docker build {image}")


@contextlib.contextmanager
def _one_builder_at_a_time() -> Iterator[None]:
    """An exclusive lock on this checkout's image cache: a second build waits for the first,
    then finds its images current instead of building them again."""
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def build_images(force: bool = False, progress: Progress | None = None) -> list[Built]:
    """Build (or keep, when their inputs are unchanged) every image the compose federation
    needs; needs a running Docker daemon (see `Dockerd`). Returns them with their sizes.
    Builds of one checkout take turns."""
    with _one_builder_at_a_time():
        return _build_images(force, progress or (lambda message: None))


def _build_images(force: bool, say: Progress) -> list[Built]:
    built: dict[str, bool] = {}
    say(f"{ROOTFS_IMAGE}: debootstrap")
    built[ROOTFS_IMAGE] = build_rootfs(force)

    base_key = _digest((DOCKER / "base.Dockerfile").read_text(), image_id(ROOTFS_IMAGE))
    built[BASE_IMAGE] = force or image_inputs(BASE_IMAGE) != base_key
    if built[BASE_IMAGE]:
        say(f"{BASE_IMAGE}: docker/base.Dockerfile")
        docker_build(BASE_IMAGE, DOCKER / "base.Dockerfile", DOCKER, base_key,
                     {"ROOTFS": ROOTFS_IMAGE})  # fmt: skip

    flower = [f"flwr=={compose.FLWR_VERSION}"]
    app = requirement_lines(REQUIREMENTS / "app.txt")
    optional = requirement_lines(REQUIREMENTS / "app-optional.txt")
    say("wheelhouse: pip wheel")
    if not (fill_wheelhouse("flower", flower) and fill_wheelhouse("app", [*flower, *app])):
        raise ImageBuildError(f"pip could not fill the wheelhouse; see {LOGS}/wheelhouse-*.log")
    with_optional = fill_wheelhouse("app-optional", [*flower, *app, *optional])
    if not with_optional:
        say(f"no wheels for {', '.join(optional)}: the app image is built without them")
    requirements = "-r docker/requirements/app.txt" + (
        " -r docker/requirements/app-optional.txt" if with_optional else ""
    )

    with serve_wheelhouse() as url:
        offline = f"--no-index --find-links {url}"
        for role, image in FLOWER_IMAGES.items():
            key = _digest(
                (DOCKER / "flower.Dockerfile").read_text(),
                image_id(BASE_IMAGE),
                role,
                compose.FLWR_VERSION,
                (WHEELHOUSE / ".flower.inputs").read_text(),
            )
            current = image_inputs(image)  # "": an official image, pulled; kept as it is
            built[image] = current != "" and (force or current != key)
            if built[image]:
                say(f"{image}: docker/flower.Dockerfile --target {role}")
                docker_build(image, DOCKER / "flower.Dockerfile", DOCKER, key,
                             {"BASE_IMAGE": BASE_IMAGE, "FLWR_VERSION": compose.FLWR_VERSION,
                              "PIP_INDEX": offline}, target=role)  # fmt: skip
        app_key = _digest(
            (DOCKER / "Dockerfile").read_text(),
            image_id(FLOWER_IMAGES["superexec"]),
            requirements,
            _files_digest([REQUIREMENTS, *(ROOT / name for name in APP_SOURCES)]),
        )
        built[APP_IMAGE] = force or image_inputs(APP_IMAGE) != app_key
        if built[APP_IMAGE]:
            say(f"{APP_IMAGE}: docker/Dockerfile")
            docker_build(APP_IMAGE, DOCKER / "Dockerfile", ROOT, app_key,
                         {"BASE_IMAGE": FLOWER_IMAGES["superexec"], "PIP_INDEX": offline,
                          "REQUIREMENTS": requirements})  # fmt: skip
    # the images these replaced, untagged now (their layers still used stay)
    docker("image", "prune", "--force", "--filter", f"label={LABEL}")
    return [Built(image, image_size(image), was_built) for image, was_built in built.items()]


def _tail(path: Path, lines: int = 25) -> str:
    if not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def main(
    force: Annotated[
        bool, typer.Option(help="Rebuild every image and refill the wheelhouse.")
    ] = False,
) -> None:
    """Build the compose federation's images without a registry (debootstrap + wheelhouse)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    if force:
        shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    try:
        with Dockerd(), console.status("building images") as status:
            images = build_images(force, progress=lambda m: status.update(m))
    except ImageBuildError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(1) from None
    table = Table("image", "size", "this run")
    for image in images:
        table.add_row(
            image.image, f"{image.size / 1e6:,.0f} MB", "built" if image.built else "kept"
        )
    Console().print(table)
