"""Benchmark of the builder: the full build on the real PSG annotations, cold and warm cache.

1. The full pipeline (validate, embed, cluster, partition, export) on the real 24,378-image
   annotations (151,086 relations; 10 clients, Dirichlet alpha 1, k = 5, embedding featurizer),
   once with an empty embedding cache (cold: the model loads and embeds every unique text) and
   once with the cache it filled (warm). Each build runs in its own process, so the peak memory
   (``ru_maxrss``) and the model load belong to that build alone.
2. The embedding strategy against naive ones, in one process with the model loaded once:
   naive = one text per forward pass for every relation; batched = every relation in batches of
   256 (sentence-transformers sorts a batch by length); ours = each distinct text once, batched.
   Each is timed on (part of) a seeded sample of relations and extrapolated by its per-text time
   to the texts the full file needs that way (151,086 relations vs 12,247 distinct texts).

Run: `python -m bench.bench_builder` (about 2-5 minutes on 2 CPU cores). Writes
bench/results/builder.json and builder.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_PSG = ROOT.parent / "shared" / "data" / "psg_annotations.json.gz"
RESULTS = ROOT / "bench" / "results"


def child_build(cache: str, out: str) -> dict:
    """One full build in this process; wall and CPU seconds per stage and peak RSS."""
    from benchmark_builder.build import BuildConfig, build_benchmark

    config = BuildConfig(
        num_clients=10, partition="dirichlet", alpha=1.0, num_clusters=5, seed=0,
        featurizer_options={"cache_dir": cache},
    )  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    result = build_benchmark(REAL_PSG, out, config)
    return {
        "stages_s": result.timings,
        "stages_cpu_s": result.cpu_timings,
        "total_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "num_images": result.manifest["source"]["num_images"],
        "cluster_jsd": result.manifest["heterogeneity"]["cluster_jsd"],
    }


def child_embedding(sample: int, seed: int, cache: str, naive_sample: int = 150) -> dict:
    """Naive vs batched vs deduplicated+batched embedding of a seeded relation sample."""
    import numpy as np

    from benchmark_builder.featurizers import EmbeddingFeaturizer, dataset_triplets
    from benchmark_builder.psg import load_psg

    texts = [t for image in dataset_triplets(load_psg(REAL_PSG)) for t in image]
    rng = np.random.default_rng(seed)
    picked = [texts[i] for i in rng.choice(len(texts), size=sample, replace=False)]
    encoder = EmbeddingFeaturizer(cache_dir=cache)._load()
    encoder.encode(picked[:64], batch_size=64)  # warm-up: first-call costs out of the timings
    unique = list(dict.fromkeys(picked))
    methods = {  # name: (texts embedded, how, how many texts the full file needs this way)
        "naive: 1 text per pass, every relation": (
            picked[:naive_sample],
            lambda ts: [encoder.encode([t]) for t in ts],
            len(texts),
        ),
        "batched 256, every relation": (
            picked,
            lambda ts: encoder.encode(ts, batch_size=256),
            len(texts),
        ),
        "ours: unique texts, batched 256": (
            unique,
            lambda ts: encoder.encode(ts, batch_size=256),
            len(set(texts)),
        ),
    }
    rows = []
    for name, (batch, embed, full_count) in methods.items():
        start = time.perf_counter()
        embed(batch)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "method": name,
                "texts": len(batch),
                "sample_s": seconds,
                "full_file_s": seconds / len(batch) * full_count,
            }  # fmt: skip
        )
    ours = rows[-1]["full_file_s"]
    for row in rows:
        row["slower_than_ours"] = row["full_file_s"] / ours
    return {
        "sample_relations": sample,
        "sample_unique_texts": len(unique),
        "full_relations": len(texts),
        "full_unique_texts": len(set(texts)),
        "rows": rows,
    }


def spawn(*args: str) -> dict:
    """Run this script as a child (fresh process: own model load, own peak memory)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the platform's machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.machine()


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']};"
        f" load average {machine['load_before']} before, {machine['load_after']} after"
        " (other jobs shared the cores: CPU seconds are the steadier measure).",
        "",
        "### Full build on the real annotations (24,378 images, 151,086 relations)",
        "",
        "Wall seconds per stage, CPU seconds (all threads) in brackets.",
        "",
        "| run | load | featurize | cluster | partition | export | total wall s | total CPU s"
        " | wall s per 10k images | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("cold", "warm"):
        r = results[name]
        stages = " | ".join(
            f"{r['stages_s'][s]:.2f} ({r['stages_cpu_s'][s]:.2f})"
            for s in ("load", "featurize", "cluster", "partition", "export")
        )
        per10k = r["total_s"] / r["num_images"] * 10_000
        lines.append(
            f"| {name} | {stages} | {r['total_s']:.2f} | {r['cpu_s']:.2f} | {per10k:.2f}"
            f" | {r['peak_rss_mib']:.0f} |"
        )
    emb = results["embedding"]
    lines += [
        "",
        f"### Embedding strategy: full file ({emb['full_relations']} relations,"
        f" {emb['full_unique_texts']} distinct texts), from per-text times on a seeded sample"
        f" of {emb['sample_relations']} relations ({emb['sample_unique_texts']} distinct)",
        "",
        "| method | texts timed | sample s | full file s (extrapolated) | vs ours |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in emb["rows"]:
        lines.append(
            f"| {row['method']} | {row['texts']} | {row['sample_s']:.2f}"
            f" | {row['full_file_s']:.1f} | {row['slower_than_ours']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["build", "embedding"])
    parser.add_argument("--cache")
    parser.add_argument("--out")
    parser.add_argument("--sample", type=int, default=1000)
    args = parser.parse_args()
    if args.child == "build":
        print(json.dumps(child_build(args.cache, args.out)))
        return
    if args.child == "embedding":
        print(json.dumps(child_embedding(args.sample, 0, args.cache)))
        return

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        cold = spawn("--child", "build", "--cache", cache, "--out", f"{tmp}/cold")
        warm = spawn("--child", "build", "--cache", cache, "--out", f"{tmp}/warm")
        embedding = spawn("--child", "embedding", "--cache", cache, "--sample", str(args.sample))
    results = {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": round(load_before, 1),
            "load_after": round(os.getloadavg()[0], 1),
        },
        "cold": cold,
        "warm": warm,
        "embedding": embedding,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "builder.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (RESULTS / "builder.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
