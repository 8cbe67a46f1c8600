"""Diffusion training throughput on one GPU: base step vs SAM step, precision and layout.

Part 1: images/s of one local training step through `train_local` with FedAvg's client half
(plain SGD) and FedSAM's (two passes), for fp32 / bf16 autocast / channels-last, per UNet size;
the SAM/base time ratio is the cost of SAM (floor: 2x). Part 2: K worker processes, each a
simulated client training its own model on the same GPU at once; aggregate images/s against
K = 1 shows how many clients share one GPU before throughput stops growing.

    python -m bench.bench_diffusion_throughput --out bench/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusion_clients.model import build_unet
from diffusion_clients.sampling import make_scheduler
from diffusion_clients.train import DenoisingLoss, NoisyBatches

VARIANTS = {
    "fp32": (False, False),
    "bf16": (True, False),
    "channels-last": (False, True),
    "bf16+channels-last": (True, True),
}


def _setup(unet: str, size: int, batch: int, bf16: bool, channels_last: bool, n: int):
    device = torch.device("cuda")
    model = build_unet(unet, size, 3).to(device)
    images = torch.rand(batch * n, 3, size, size, device=device) * 2 - 1
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    batches = list(NoisyBatches(images, batch, 1000, seed=0))
    return model, batches, DenoisingLoss(make_scheduler(), autocast=bf16)


def step_rate(unet: str, size: int, batch: int, variant: str, algorithm: str, reps: int) -> float:
    """Images per second of `algorithm`'s local step (median of `reps` timed passes)."""
    from strategies import client_half
    from strategies.base import train_local

    model, batches, loss = _setup(unet, size, batch, *VARIANTS[variant], n=20)
    half = client_half({"algorithm": algorithm, "rho": 0.5, "adaptive": False}, lr=0.01)
    train_local(model, batches[:5], loss, half)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_local(model, batches, loss, half)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return len(batches) * batch / sorted(times)[len(times) // 2]


def client_worker(unet: str, size: int, batch: int, start_at: float, seconds: float) -> None:
    """One simulated client: trains until `seconds` after `start_at`, prints images/s."""
    from strategies import client_half
    from strategies.base import train_local

    torch.set_num_threads(1)
    model, batches, loss = _setup(unet, size, batch, False, False, n=5)
    half = client_half({"algorithm": "fedavg"}, lr=0.01)
    train_local(model, batches, loss, half)
    while time.time() < start_at:
        time.sleep(0.01)
    done = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        train_local(model, batches, loss, half)
        done += len(batches) * batch
    torch.cuda.synchronize()
    print(json.dumps({"images_per_s": done / (time.perf_counter() - t0)}))


def clients_per_gpu(unet: str, size: int, batch: int, counts: list[int], seconds: float) -> list:
    rows = []
    for k in counts:
        start_at = time.time() + 20
        cmd = [sys.executable, "-m", "bench.bench_diffusion_throughput", "--client-worker"]
        args = [unet, str(size), str(batch), str(start_at), str(seconds)]
        procs = [
            subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, text=True) for _ in range(k)
        ]
        rates = [
            json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs
        ]
        rows.append({"clients": k, "total_images_per_s": sum(rates), "per_client": min(rates)})
    base = rows[0]["total_images_per_s"]
    for r in rows:
        r["speedup_vs_1"] = r["total_images_per_s"] / base
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unets", default="small,base")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clients", default="1,2,4,8,12")
    p.add_argument("--client-unet", default="small")
    p.add_argument("--client-image-size", type=int, default=16)
    p.add_argument("--client-batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--client-worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client_worker:
        u, s, b, t, sec = args.client_worker
        client_worker(u, int(s), int(b), float(t), float(sec))
        return
    from tqdm import tqdm

    steps = []
    jobs = [(u, v) for u in args.unets.split(",") for v in VARIANTS]
    for unet, variant in tqdm(jobs, desc="step throughput"):
        base = step_rate(unet, args.image_size, args.batch_size, variant, "fedavg", args.reps)
        sam = step_rate(unet, args.image_size, args.batch_size, variant, "fedsam", args.reps)
        steps.append(
            {
                "unet": unet,
                "variant": variant,
                "base_images_per_s": base,
                "sam_images_per_s": sam,
                "sam_time_ratio": base / sam,
            }
        )
    counts = [int(c) for c in args.clients.split(",")]
    shared = clients_per_gpu(
        args.client_unet, args.client_image_size, args.client_batch, counts, args.seconds
    )
    device = torch.cuda.get_device_name(0)
    result = {
        "device": device,
        "config": {k: str(v) for k, v in vars(args).items()},
        "steps": steps,
        "clients_per_gpu": shared,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diffusion_throughput.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Diffusion training throughput ({device})",
        "",
        f"Batch {args.batch_size}, {args.image_size}x{args.image_size} RGB, one step = "
        "`train_local` over 20 batches; SAM = FedSAM client half (two passes).",
        "",
        "| unet | variant | base img/s | SAM img/s | SAM/base time |",
        "| --- |" + " --- |" * 4,
    ]
    for r in steps:
        lines.append(
            f"| {r['unet']} | {r['variant']} | {r['base_images_per_s']:.0f} "
            f"| {r['sam_images_per_s']:.0f} | {r['sam_time_ratio']:.2f}x |"
        )
    lines += [
        "",
        f"Simulated clients sharing the GPU ({args.client_unet} UNet, "
        f"{args.client_image_size}px, batch {args.client_batch}, one process each):",
        "",
        "| clients | total img/s | slowest client img/s | vs 1 client |",
        "| --- |" + " --- |" * 3,
    ]
    for r in shared:
        lines.append(
            f"| {r['clients']} | {r['total_images_per_s']:.0f} | {r['per_client']:.0f} "
            f"| {r['speedup_vs_1']:.2f}x |"
        )
    (args.out / "diffusion_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
