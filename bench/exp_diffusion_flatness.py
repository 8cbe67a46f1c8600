"""What flat minima buy a (federated) diffusion model: the issue-5 experiment.

Arms (same data, model, optimizer and image budget): baseline SGD, +EMA, +SWA, +SAM at several
radii rho, +SAM+EMA; each centralized (one client holding all training images, one round = one
epoch) and federated (clients from a Dirichlet split over labels, one round = one local epoch
per client, FedAvg aggregation). Training goes through the real client halves
(`strategies.client_half`) and `train_local`; aggregation and EMA/SWA use the server module's
`weighted_mean` and `ModelAverage`, in one process (no Ray, no Flower messages).

Per arm: FID at 20 and 100 DDPM steps, FID and test-loss change after 8/6/4-bit weight
quantization, sharpness under filter-normalised perturbations, the largest Hessian eigenvalue,
the exposure-bias gap, a sample grid. Arms run as parallel worker processes on one GPU.

    python -m bench.exp_diffusion_flatness --setting central --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_clients.data import dirichlet_partition, load_digits_set, train_test_split
from diffusion_clients.exposure import exposure_bias
from diffusion_clients.fid import FIDScorer
from diffusion_clients.flatness import hessian_top_eigenvalue, sharpness
from diffusion_clients.model import build_unet
from diffusion_clients.quantization import quantize_weights
from diffusion_clients.sampling import make_scheduler, sample
from diffusion_clients.train import DenoisingLoss, NoisyBatch, NoisyBatches, mean_loss

ARMS: dict[str, dict] = {
    "base": {"algorithm": "fedavg"},
    "ema": {"algorithm": "fedavg", "average": "ema"},
    "swa": {"algorithm": "fedavg", "average": "swa"},
    "sam-0.05": {"algorithm": "fedsam", "rho": 0.05},
    "sam-0.2": {"algorithm": "fedsam", "rho": 0.2},
    "sam-0.5": {"algorithm": "fedsam", "rho": 0.5},
    "sam-1.0": {"algorithm": "fedsam", "rho": 1.0},
    "sam-0.5+ema": {"algorithm": "fedsam", "rho": 0.5, "average": "ema"},
}
SIGMAS = (0.005, 0.01, 0.02, 0.05)
BITS = (8, 6, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=["central", "federated"], default="central")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    p.add_argument("--rounds", type=int, default=60, help="rounds (= epochs over the data)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha over labels")
    p.add_argument("--unet", default="small")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128, help="centralized batch size")
    p.add_argument("--client-batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--ema-decay", type=float, default=0.99, help="per round")
    p.add_argument("--diffusion-steps", type=int, default=1000)
    p.add_argument("--fid-samples", type=int, default=1000)
    p.add_argument("--fid-reference", type=int, default=0, help="reference images (0 = all)")
    p.add_argument("--hessian-batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=8, help="worker processes sharing the GPU")
    p.add_argument("--deadline", type=float, default=0, help="stop unfinished arms after s")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _load(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def train_arm(args: argparse.Namespace, arm: dict, train, device: torch.device):
    """Rounds of local training through the client halves, FedAvg aggregation, EMA/SWA."""
    from strategies import client_half
    from strategies.base import train_local
    from strategies.server import ModelAverage, weighted_mean

    if args.setting == "central":
        parts, batch_size = [np.arange(len(train))], args.batch_size
    else:
        parts = dirichlet_partition(train.labels, args.clients, args.alpha, args.seed)
        batch_size = args.client_batch_size
    images = [train.images[torch.as_tensor(p)].to(device) for p in parts]
    model = build_unet(args.unet, args.image_size, 1, seed=args.seed).to(device)
    loss = DenoisingLoss(make_scheduler(args.diffusion_steps))
    average = ModelAverage(
        ema_decay=args.ema_decay if arm.get("average") == "ema" else None,
        swa_start=args.rounds // 2 + 1 if arm.get("average") == "swa" else None,
    )
    config = {"algorithm": arm["algorithm"], "rho": arm.get("rho", 0.0), "adaptive": False}
    global_arrays = _state(model)
    average.begin(global_arrays)
    steps, losses = 0, []
    for rnd in range(1, args.rounds + 1):
        replies, weights, round_loss = [], [], 0.0
        for cid, x in enumerate(images):
            _load(model, global_arrays)
            half = client_half(config, lr=args.lr, momentum=args.momentum)
            batches = NoisyBatches(x, batch_size, args.diffusion_steps, _seed(args.seed, rnd, cid))
            value, _ = train_local(model, batches, loss, half)
            steps += half.num_steps
            replies.append(_state(model))
            weights.append(len(x))
            round_loss += value * len(x)
        global_arrays = weighted_mean(replies, weights, like=global_arrays)
        average.update(rnd, global_arrays)
        losses.append(round_loss / sum(weights))
    _load(model, average.serve(global_arrays))
    return model, {"train_steps": steps, "train_loss_curve": losses[:: max(1, len(losses) // 50)]}


def evaluate_arm(args: argparse.Namespace, model, train, test, device) -> dict:
    """Every flatness and robustness measure of DESIGN.md section 3 on the served model."""
    scheduler = make_scheduler(args.diffusion_steps)
    loss = DenoisingLoss(scheduler)
    fixed = list(
        NoisyBatches(test.images.repeat(4, 1, 1, 1).to(device), 720, args.diffusion_steps, 7)
    )
    g = torch.Generator().manual_seed(11)
    hx = train.images[torch.randperm(len(train), generator=g)[: args.hessian_batch]].to(device)
    hbatch = NoisyBatch(
        hx,
        torch.randn(hx.shape, generator=g).to(device),
        torch.randint(0, args.diffusion_steps, (len(hx),), generator=g).to(device),
    )
    fid = FIDScorer(train.images[: args.fid_reference or None], device)
    out: dict = {"test_loss": mean_loss(model, loss, fixed)}
    n = args.fid_samples
    grid = None
    for steps in (20, 100):
        fake = torch.nan_to_num(sample(model, scheduler, n, steps, seed=args.seed))
        out[f"fid_{steps}"] = fid(fake)
        grid = fake[:64]
    for bits in BITS:
        q = quantize_weights(model, bits)
        out[f"test_loss_q{bits}"] = mean_loss(q, loss, fixed)
        out[f"fid_20_q{bits}"] = fid(torch.nan_to_num(sample(q, scheduler, n, 20, seed=args.seed)))
    for steps in (20, 100):
        eb = exposure_bias(model, scheduler, test.images, steps, seed=args.seed)
        out[f"exposure_{steps}"] = eb.as_dict()
    out["sharpness"] = sharpness(
        model, lambda m: torch.tensor(mean_loss(m, loss, fixed)), SIGMAS, num_directions=8
    )
    out["hessian_top_eigenvalue"] = hessian_top_eigenvalue(
        model, lambda m: loss(m, hbatch), num_iters=30
    )
    return out, ((grid + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    name = args.worker
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, test = train_test_split(load_digits_set(args.image_size), 0.2, args.seed)
    start = time.perf_counter()
    model, info = train_arm(args, ARMS[name], train, device)
    info["train_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics, grid = evaluate_arm(args, model, train, test, device)
    info["eval_seconds"] = time.perf_counter() - start
    tmp = args.out / f".{args.setting}-{name}"
    np.save(f"{tmp}.npy", grid)
    Path(f"{tmp}.json").write_text(json.dumps({"arm": name, **ARMS[name], **info, **metrics}))


def _table(rows: list[dict]) -> str:
    head = (
        "| arm | FID@20 | FID@100 | FID@20 8-bit | FID@20 4-bit | test loss | d loss 4-bit "
        "| sharpness s=0.02 | lambda_max | exposure gap@20 | exposure gap@100 |"
    )
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['fid_20']:.2f} | {r['fid_100']:.2f} | {r['fid_20_q8']:.2f} "
            f"| {r['fid_20_q4']:.2f} | {r['test_loss']:.4f} "
            f"| {r['test_loss_q4'] - r['test_loss']:+.4f} | {r['sharpness']['0.02']:.4f} "
            f"| {r['hessian_top_eigenvalue']:.1f} | {r['exposure_20']['mean_gap']:+.4f} "
            f"| {r['exposure_100']['mean_gap']:+.4f} |"
        )
    return "\n".join(lines)


def _plots(rows: list[dict], grids: list[np.ndarray], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        s = r["sharpness"]
        axes[0].plot([float(k) for k in s], list(s.values()), marker="o", label=r["arm"])
        e = r["exposure_20"]
        axes[1].plot(e["timesteps"], e["gap"], marker=".", label=r["arm"])
    axes[0].set(xscale="log", xlabel="sigma (relative)", ylabel="test-loss increase")
    axes[1].set(xlabel="timestep (20-step DDPM)", ylabel="noise-norm gap (sampled/real - 1)")
    axes[1].invert_xaxis()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "_curves.png"), dpi=120)
    plt.close(fig)
    tiles = []
    for g in grids:
        g = g[:16, 0]
        tiles.append(np.concatenate(list(g), axis=1))
    fig, axes = plt.subplots(len(tiles), 1, figsize=(8, 0.7 * len(tiles) + 0.3))
    for ax, tile, r in zip(np.atleast_1d(axes), tiles, rows, strict=True):
        ax.imshow(tile, cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
        ax.set_title(r["arm"], fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "_samples.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    from tqdm import tqdm

    names = args.arms.split(",")
    unknown = set(names) - set(ARMS)
    if unknown:
        sys.exit(f"unknown arm(s) {sorted(unknown)}; choose from {list(ARMS)}")
    base_cmd = [sys.executable, "-m", "bench.exp_diffusion_flatness", *(argv or sys.argv[1:])]
    pending, running, failed = list(names), {}, []
    start = time.perf_counter()
    with tqdm(total=len(names), desc=f"{args.setting} arms") as bar:
        while pending or running:
            while pending and len(running) < args.parallel:
                name = pending.pop(0)
                running[name] = subprocess.Popen([*base_cmd, "--worker", name], env=os.environ)
            time.sleep(1)
            if args.deadline and time.perf_counter() - start > args.deadline:
                failed += pending
                bar.update(len(pending))
                pending = []
                for proc in running.values():
                    proc.kill()
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    if proc.returncode:
                        failed.append(name)
                    bar.update()
    rows, grids = [], []
    for name in names:
        tmp = args.out / f".{args.setting}-{name}"
        if name in failed:
            continue
        rows.append(json.loads(Path(f"{tmp}.json").read_text()))
        grids.append(np.load(f"{tmp}.npy"))
        Path(f"{tmp}.json").unlink()
        Path(f"{tmp}.npy").unlink()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    stem = args.out / f"diffusion_flatness_{args.setting}"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.pop("worker")
    result = {
        "device": device,
        "wall_seconds": time.perf_counter() - start,
        "data": "scikit-learn digits (1797 real 8x8 images, upsampled), 80/20 stratified split",
        "config": config,
        "failed": failed,
        "arms": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = _table(rows)
    stem.with_suffix(".md").write_text(
        f"# Diffusion flatness, {args.setting} ({device})\n\n{table}\n"
    )
    if rows:
        _plots(rows, grids, stem)
    print(table)
    if failed:
        sys.exit(f"failed arms: {failed}")


if __name__ == "__main__":
    main()
