"""A diffusion federation on the GPU through the in-process engine: clients one by one (today's
per-client eager path, `batch-clients = "off"`) against the client-batched engine
(`batch-clients = "on"`: one vmapped stack per GPU, its step replayed from a CUDA graph), on
one GPU and, with `--gpus 2`, the round's clients split over two GPUs (one thread each).

Each setting runs the same short federation in this process through
`fedpsg.run.simulate.simulate_in_process` (the real ServerApp and ClientApp): FedAvg, every
client sampled every round, `--local-epochs` local epochs, the server evaluating the global
model only before round 1 and after the last (inside the last round's time). Reported per
setting: wall seconds per round (median over the rounds after the first, which warms up:
CUDA graphs, cuDNN plans, data loading), training images per second over those rounds, peak
GPU memory per GPU, the largest weight difference of the final global model from the
per-client run's (the engines train the same clients from the same seeds), and the number of
error replies (a failed `train_many`, say a CUDA-graph capture broken by the other GPU's
thread, fails its clients instead of the run: a row with errors is no valid timing). Writes
`<out>/<name>.{json,md}` (default `gpu_federation`) with the card's name.

    python -m bench.bench_gpu_federation                       # 1 GPU: off vs on
    python -m bench.bench_gpu_federation --gpus 2              # and on over 2 GPUs
    python -m bench.bench_gpu_federation --unet tiny --image-size 8 --clients 4 --rounds 2 \\
        --device cpu --out /tmp/gpu_federation                  # CPU check of the script

`--gpus 2` uses every visible GPU (device "cuda"): limit them with CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedpsg.app import client_app
from fedpsg.app.config import validate_run_config
from fedpsg.run.simulate import simulate_in_process

RESULTS = Path(__file__).resolve().parent / "results"


def run_config(args: argparse.Namespace, device: str, batch: str) -> dict:
    return {
        "task": "diffusion",
        "strategy": "fedavg",
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "min-train-nodes": args.clients,
        "eval-every": args.rounds,
        "local-epochs": args.local_epochs,
        "lr": 0.02,
        "momentum": 0.9,
        "batch-size": args.batch_size,
        "seed": 0,
        "data": args.data,
        "image-size": args.image_size,
        "unet": args.unet,
        "dirichlet-alpha": args.alpha,
        "device": device,
        "batch-clients": batch,
    }


def settings(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, device, batch-clients) of each run, per-client first (the baseline)."""
    if args.device == "cpu":
        return [("per-client", "cpu", "off"), ("batched", "cpu", "on")]
    runs = [("per-client", "cuda:0", "off"), ("batched", "cuda:0", "on")]
    if args.gpus > 1 and torch.cuda.device_count() >= args.gpus:
        runs.append((f"batched, {torch.cuda.device_count()} GPUs", "cuda", "on"))
    return runs


def measure(args: argparse.Namespace, name: str, device: str, batch: str, out: Path) -> dict:
    """One federation; its round times, throughput, peak memory and final model."""
    config = run_config(args, device, batch)
    devices = client_app.batch_devices(validate_run_config(config))
    gpus = list(range(torch.cuda.device_count())) if device != "cpu" else []
    for gpu in gpus:
        torch.empty(0, device=f"cuda:{gpu}")  # the allocator of a GPU not used yet
        torch.cuda.reset_peak_memory_stats(gpu)
    start = time.perf_counter()
    simulate_in_process(config, args.clients, out)
    wall = time.perf_counter() - start
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    elapsed = [r["elapsed-s"] for r in rounds]
    seconds = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]  # rounds 1..R
    timed = seconds[1:] or seconds  # after the warm-up round
    images = [
        sum(c.get("num-examples", 0) for c in r["clients"] if c["stage"] == "train")
        for r in rounds[1:]
    ]
    errors = [c["error"] for r in rounds for c in r["clients"] if "error" in c]
    return {
        "setting": name,
        "device": device,
        "batch-clients": batch,
        "train_devices": devices or [device],
        "round_s": seconds,
        "median_round_s": statistics.median(timed),
        "images_per_s": sum(images[-len(timed) :]) * args.local_epochs / sum(timed),
        "peak_gib": [torch.cuda.max_memory_allocated(g) / 2**30 for g in gpus],
        "wall_s": wall,
        "client_errors": len(errors),
        "error_reasons": sorted({e[:300] for e in errors}),
        "final_model": torch.load(out / "final_model.pt", map_location="cpu"),
    }


def card(args: argparse.Namespace) -> str:
    if args.device == "cpu":
        return platform.processor() or platform.machine()
    return torch.cuda.get_device_name(0)


def table(rows: list[dict], header: str) -> str:
    base = rows[0]
    lines = [
        header,
        "",
        "| setting | train devices | s / round | images / s | vs per-client | peak GiB per GPU "
        "| max weight diff | client errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        peak = ", ".join(f"{p:.2f}" for p in row["peak_gib"]) or "-"
        lines.append(
            f"| {row['setting']} | {', '.join(row['train_devices'])} | "
            f"{row['median_round_s']:.3f} | {row['images_per_s']:.0f} | "
            f"{base['median_round_s'] / row['median_round_s']:.2f}x | {peak} | "
            f"{row['max_weight_diff']:.1e} | {row['client_errors']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="small", help="tiny | small | base")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="the first one warms up")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data", default="digits", help="run-config data (digits: no download)")
    parser.add_argument("--alpha", type=float, default=100.0, help="Dirichlet alpha of the split")
    parser.add_argument("--device", default="cuda", help="cuda | cpu")
    parser.add_argument("--gpus", type=int, default=1, help="2: also the 2-GPU split")
    parser.add_argument("--name", default="gpu_federation", help="results file stem")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, device, batch in settings(args):
            rows.append(measure(args, name, device, batch, Path(tmp) / f"run{len(rows)}"))
            print(f"{name}: {rows[-1]['median_round_s']:.3f} s/round", flush=True)
    reference = rows[0]["final_model"]
    for row in rows:
        model = row.pop("final_model")
        row["max_weight_diff"] = max(
            float((model[k] - w).abs().max()) for k, w in reference.items()
        )
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    header = (
        f"# Diffusion federation on {card(args)}: per-client vs client-batched\n\n"
        f"`python -m bench.bench_gpu_federation` with {setup}: FedAvg, {args.clients} clients "
        f"all sampled, {args.rounds} rounds (the first a warm-up, not timed; the server "
        f"evaluates before round 1 and in the last round), torch {torch.__version__}."
    )
    text = table(rows, header)
    for row in rows:
        text += "".join(f"\n{row['setting']}: {e}\n" for e in row["error_reasons"])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"card": card(args), "setup": setup, "torch": torch.__version__, "rows": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()
