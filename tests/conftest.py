"""Suite-wide settings: Flower and Hugging Face stay offline and inside the project."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("FLWR_HOME", str(ROOT / ".flwr"))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_psg_path() -> Path:
    """The real PSG annotations shared with the project (24,378 images, no pixels)."""
    return SHARED_DATA / "psg_annotations.json.gz"


@pytest.fixture(scope="session")
def synthetic_psg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic PSG dataset (24 images, 64x64, seed 0); its images root is the parent."""
    from benchmark_builder.synthetic import generate_synthetic_psg  # only sessions that use it

    return generate_synthetic_psg(tmp_path_factory.mktemp("synthetic") / "psg", 24, seed=0)
