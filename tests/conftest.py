"""Suite-wide settings: Flower and Hugging Face stay offline and inside the project."""

import os
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr"))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# a plain `flwr run` starts its own Ray instance, never one another test worker's cluster joined
os.environ.setdefault("RAY_ADDRESS", "local")
# One intra-op thread in every process the suite starts (torch reads this at import), as Ray gives
# a 1-CPU actor: two workers on two cores already fill them, and extra OpenMP threads only
# spin. Measured while both cores were busy: the docs' diffusion commands took 377 CPU-seconds
# (400 s) with torch's default threads, 49 (76 s) with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


_early_images: list = []  # the controller's (Dockerd, build thread), once started


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Under xdist, start building the compose images as soon as a worker has collected the
    Docker tests, on the controller, which is otherwise idle: the build (minutes of
    debootstrap and pip, much of it waiting on the network and the disk) then overlaps the
    other tests instead of stalling a worker. The tests' `engine` fixture waits for it (builds
    take turns) and finds the images current; on failure it builds again and reports why."""
    if _early_images or not any("test_docker_compose.py::" in test for test in ids):
        return
    from fedpsg.run.images import Dockerd, ImageBuildError, build_images

    _early_images.append(None)
    if Dockerd.why_not() is not None:
        return
    dockerd = Dockerd()
    try:
        dockerd.__enter__()
    except ImageBuildError:
        return

    def build() -> None:
        try:
            build_images()
        except Exception:  # noqa: BLE001 (the fixture builds again and reports the cause)
            return

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    _early_images[0] = (dockerd, thread)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the daemon the controller started for the early build, by pid."""
    if _early_images and _early_images[0] is not None:
        dockerd, thread = _early_images[0]
        thread.join(timeout=600)
        dockerd.stop()


@pytest.fixture(scope="session")
def real_psg_path() -> Path:
    """The real PSG annotations shared with the project (24,378 images, no pixels)."""
    return SHARED_DATA / "psg_annotations.json.gz"


@pytest.fixture(scope="session")
def synthetic_psg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic PSG dataset (24 images, 64x64, seed 0); its images root is the parent."""
    from benchmark_builder.synthetic import generate_synthetic_psg  # only sessions that use it

    return generate_synthetic_psg(tmp_path_factory.mktemp("synthetic") / "psg", 24, seed=0)


def build_synthetic_benchmark(
    root: Path, num_images: int, data_seed: int, with_pixels: bool = True, **build
) -> Path:
    """Generate a synthetic PSG dataset under `root` and build a benchmark of it (`root/bench`);
    `build` holds `BuildConfig` fields."""
    from benchmark_builder.build import BuildConfig, build_benchmark
    from benchmark_builder.synthetic import generate_synthetic_psg

    psg = generate_synthetic_psg(root / "synthetic", num_images, seed=data_seed)
    images_root = psg.parent if with_pixels else None
    build_benchmark(psg, root / "bench", BuildConfig(**build), images_root)
    return root / "bench"
