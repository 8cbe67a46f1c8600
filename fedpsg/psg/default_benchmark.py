"""The embedded default benchmark: what a run with `benchmark-dir = ""` trains on.

Plain `flwr run .` must work on a fresh clone, on whatever federation the connection gives
(Flower's default local one has 2 SuperNodes). So the PSG task builds, on first use, a small
synthetic benchmark with exactly as many clients as the federation has partitions, and
caches it under `$FEDPSG_CACHE_DIR` (default `~/.cache/fedpsg`, shared with the embedding
cache). The ServerApp and every ClientApp may ask at the same moment: one builds under a file
lock while the others wait, and the builder renames a finished folder into place, so nobody
ever reads half a benchmark.
"""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

from benchmark_builder.featurizers import default_cache_dir

IMAGES_PER_CLIENT = 40
MIN_IMAGES = 100
VERSION = 1  # bump when the recipe below changes, so caches are not served stale


def default_benchmark(num_clients: int, cache_dir: Path | None = None) -> Path:
    """The cached synthetic benchmark for `num_clients` clients (built if missing):
    `max(100, 40 * clients)` synthetic scenes from seed 0, Dirichlet(0.5) over 5 semantic
    clusters, 10% test split; labels and geometry only (no pixels), so a first run costs
    seconds, not minutes of visual featurization."""
    if num_clients < 1:
        raise ValueError(f"the default benchmark needs at least 1 client, got {num_clients}")
    root = Path(cache_dir or default_cache_dir())
    out = root / f"default-benchmark-v{VERSION}-{num_clients}-clients"
    if (out / "manifest.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (out / "manifest.json").exists():
            # imported here: the builder pulls in scikit-learn and flwr-datasets (2.5 s), which
            # every ClientApp process (one per message in a deployment) would pay for nothing
            from benchmark_builder.build import BuildConfig, build_benchmark
            from benchmark_builder.synthetic import generate_synthetic_psg

            with tempfile.TemporaryDirectory(dir=root, prefix=".synthetic-") as tmp:
                images = max(MIN_IMAGES, IMAGES_PER_CLIENT * num_clients)
                psg = generate_synthetic_psg(Path(tmp) / "psg", images, seed=0)
                config = BuildConfig(num_clients=num_clients, alpha=0.5, seed=0)
                build_benchmark(psg, out, config)
    return out
