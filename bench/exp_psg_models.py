"""Experiment: the five relation models on the real PSG annotations, trained centrally.

Frequency baseline, IMP, MOTIFS, VCTree and GPS-Net in PredCls on labels + box geometry (the
annotations carry no pixels), all with one small fixed budget: the same seeded train/test
split of the 24,378 annotated images (the official PSG test images ship without annotations),
the same epochs, SGD settings, batch size and seed. The frequency baseline is the predicate
prior counted on the training split, untrained; every model with a frequency table (all but
IMP) starts it from that prior. Reports R@20/50/100 and mR@20/50/100 (graph-constrained),
each model's R@50 and mR@50 as a ratio to the frequency baseline of the same run, and
parameter counts beside FL-PSG's (their heads run on 4096-d visual features; ours on labels
and geometry).

Models train in parallel worker processes (one thread each, `--jobs`), forked after the data
is featurised once.

Run: `python -m bench.exp_psg_models` (defaults: 8,000 train / 2,000 test images, 3 epochs;
about 8 CPU-minutes, 25 minutes on a busy 2-core machine). Writes
bench/results/psg_models.json and psg_models.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmark_builder.psg import load_psg
from benchmark_builder.shards import image_row
from fedpsg.psg.data import GEOMETRY_DIM, PAIR_GEOMETRY_DIM, Scene, scenes_from_rows
from fedpsg.psg.models import ModelSpec, build_model
from fedpsg.psg.models.base import FrequencyBias
from fedpsg.psg.train import evaluate, frequency_prior, train
from strategies.base import ClientHalf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "psg_annotations.json.gz"
RESULTS = ROOT / "bench" / "results"
MODELS = ("frequency", "imp", "motifs", "vctree", "gpsnet")
FLPSG_PARAMS_M = {"imp": 32, "motifs": 63, "vctree": 59, "gpsnet": 37}
METRICS = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100")

# Filled once in the parent before the workers fork, so scenes are never pickled.
_DATA: dict[str, Any] = {}


def split(num_images: int, num_train: int, num_test: int, seed: int) -> tuple[list, list]:
    """Disjoint seeded train and test index lists."""
    if num_train + num_test > num_images:
        raise ValueError(f"{num_train} + {num_test} images requested, {num_images} available")
    order = np.random.default_rng(seed).permutation(num_images)
    return order[num_test : num_test + num_train].tolist(), order[:num_test].tolist()


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train `name` (not the frequency baseline) and evaluate it after every epoch."""
    torch.set_num_threads(1)
    spec, prior = _DATA["spec"], _DATA["prior"]
    train_scenes: list[Scene] = _DATA["train"]
    test_scenes: list[Scene] = _DATA["test"]
    torch.manual_seed(args.seed)
    model = build_model(name, spec)
    if model.frequency_bias is not None:  # IMP has none (as in the paper)
        model.set_prior(prior)
    params = sum(p.numel() for p in model.parameters())
    table = sum(
        p.numel() for m in model.modules() if isinstance(m, FrequencyBias) for p in m.parameters()
    )
    half = ClientHalf(args.lr, momentum=args.momentum)
    epochs = 0 if name == "frequency" else args.epochs
    history, wall, cpu = [], 0.0, 0.0
    for epoch in range(epochs + 1):
        if epoch:
            start, start_cpu = time.perf_counter(), time.process_time()
            train(model, train_scenes, half, epochs=1, batch_size=args.batch_size,
                  seed=args.seed * 1000 + epoch)  # fmt: skip
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
        history.append({"epoch": epoch, **evaluate(model, test_scenes, batch_size=64)})
    return {
        "model": name,
        "params": params,
        "params_without_frequency_table": params - table,
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "final": history[-1],
        "history": history,
    }


def markdown(results: dict[str, Any]) -> str:
    """The results table (percent) with ratios to the frequency baseline and parameter counts."""
    rows = {r["model"]: r for r in results["models"]}
    base = rows["frequency"]["final"]
    cfg = results["config"]
    lines = [
        f"Real PSG annotations, PredCls, labels + geometry; {cfg['train_images']} train / "
        f"{cfg['test_images']} test images (seeded split {cfg['seed']}), {cfg['epochs']} epochs, "
        f"SGD lr {cfg['lr']} momentum {cfg['momentum']}, batch {cfg['batch_size']}; "
        f"{results['machine']}.",
        "",
        "| model | " + " | ".join(METRICS) + " | R@50 / freq | mR@50 / freq "
        "| params (ours, M) | without freq. table (M) | FL-PSG (M) | train CPU s |",
        "|---" * (len(METRICS) + 7) + "|",
    ]
    for name in (m for m in MODELS if m in rows):
        row = rows[name]
        final = row["final"]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * final[k]:.2f}" for k in METRICS)
            + f" | {final['R@50'] / base['R@50']:.3f} | {final['mR@50'] / base['mR@50']:.3f}"
            + f" | {row['params'] / 1e6:.2f} | {row['params_without_frequency_table'] / 1e6:.2f}"
            + f" | {FLPSG_PARAMS_M.get(name, '-')} | {row['train_cpu_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", type=Path, default=RESULTS / "psg_models")
    args = parser.parse_args()
    if "frequency" not in args.models:
        parser.error("the frequency baseline is the reference of every ratio; keep it")

    torch.set_num_threads(1)
    start = time.perf_counter()
    dataset = load_psg(args.data, check_images=False)
    train_idx, test_idx = split(len(dataset.images), args.train_images, args.test_images,
                                args.seed)  # fmt: skip
    rows = (image_row(dataset.images[i], 0, None) for i in train_idx + test_idx)
    scenes = scenes_from_rows(tqdm(rows, total=len(train_idx) + len(test_idx), desc="featurise"))
    spec = ModelSpec(len(dataset.classes), len(dataset.predicate_classes), GEOMETRY_DIM,
                     PAIR_GEOMETRY_DIM)  # fmt: skip
    _DATA.update(
        spec=spec,
        train=scenes[: len(train_idx)],
        test=scenes[len(train_idx) :],
        prior=frequency_prior(scenes[: len(train_idx)], spec.num_classes, spec.num_predicates),
    )
    prepare_s = time.perf_counter() - start

    results = []
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [pool.submit(run_model, name, args) for name in args.models]
        for future in tqdm(as_completed(futures), total=len(futures), desc="models"):
            results.append(future.result())
    results.sort(key=lambda r: MODELS.index(r["model"]))
    args.models = [r["model"] for r in results]

    out = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"train_images": len(train_idx), "test_images": len(test_idx), "mode": "predcls"},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(shared), torch {torch.__version__}, 1 thread per model, {args.jobs} models at once",
        "prepare_wall_s": prepare_s,
        "total_wall_s": time.perf_counter() - start,
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    table = markdown(out)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
