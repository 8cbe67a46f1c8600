"""What flat minima buy a (federated) diffusion model: the issue-5 experiment.

Arms (same data, model, optimizer and image budget): baseline SGD, +EMA, +SWA, +SAM at several
radii rho, +SAM+EMA; each centralized (one client holding all training images, one round = one
epoch) and federated (clients from a Dirichlet split over labels, `--local-epochs` per round,
FedAvg aggregation). Arms are trained by runs of the Flower app itself (`task = "diffusion"`):
its ServerApp and ClientApps in one process through `fedpsg.run.simulate.simulate_in_process`
(Flower's Message API over a LocalGrid, no Ray or network), so the strategies' real client
halves, aggregation and server-side EMA/SWA train them. Server averages never feed back into
training, so arms that differ only in the average they evaluate share one training per
(algorithm, rho): it keeps both averages beside the plain model (`server-ema` and
`server-swa-start` set) and each arm evaluates its final model (`final_model_plain|ema|swa.pt`).
The paper set trains 3 times (fedavg; fedsam 0.1; fedsam 0.5) for its 6 arms.

Per arm: FID at 20 and 100 DDPM steps against the held-out images and against the training
images, beside two real-vs-real floors (train vs held-out at the held-out N; two disjoint
halves of all images); FID, test-loss rise and ratio after 8/6/4-bit weight quantization;
symmetric filter-normalised sharpness; the largest and smallest Hessian eigenvalue (Lanczos)
over all parameters and over weights only; the exposure-bias curve; a sample grid. Trainings
(each followed by its arms' evaluations) run as parallel worker processes, spread over the GPUs
listed in `--gpus` (round robin).

`--preset paper` runs the paper's setting (fedpsg.app.config.PRESETS["paper"]: AdamW, lr 1e-4,
batch 128, dropout 0.3, one optimizer carried through training) on 32x32 digits with the arms
base / +EMA / +SWA / +SAM 0.1 / +SAM 0.5 / +SAM 0.1+EMA, resumable; EMA is ADM's 0.9999 per
step, applied per round as 0.9999 ** (steps per round), with TensorFlow's warmup
min(d, (1 + n) / (10 + n)) at the n-th round (`--ema-warmup`, on by default there): without it a
run of a few thousand steps keeps most of the EMA's weight on the random initial model.

    python -m bench.exp_diffusion_flatness --setting central --out bench/results
    python -m bench.exp_diffusion_flatness --preset paper --setting central --rounds 400 \
        --seed 0 --tag _paper_seed0 --gpus 0,1
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

from diffusion_clients.data import load_digits_set, train_test_split
from diffusion_clients.exposure import exposure_bias
from diffusion_clients.fid import FIDScorer, split_halves_fid
from diffusion_clients.flatness import PARAMETER_SETS, hessian_eigenvalues, sharpness
from diffusion_clients.model import build_unet
from diffusion_clients.quantization import quantize_weights
from diffusion_clients.sampling import make_scheduler, sample
from diffusion_clients.train import DenoisingLoss, NoisyBatch, NoisyBatches, mean_loss
from fedpsg.app.config import PRESETS

ARMS: dict[str, dict] = {
    "base": {"algorithm": "fedavg"},
    "ema": {"algorithm": "fedavg", "average": "ema"},
    "swa": {"algorithm": "fedavg", "average": "swa"},
    "sam-0.05": {"algorithm": "fedsam", "rho": 0.05},
    "sam-0.1": {"algorithm": "fedsam", "rho": 0.1},
    "sam-0.2": {"algorithm": "fedsam", "rho": 0.2},
    "sam-0.5": {"algorithm": "fedsam", "rho": 0.5},
    "sam-0.1+ema": {"algorithm": "fedsam", "rho": 0.1, "average": "ema"},
}
#: The `--preset paper` arm set: >= 2 radii, SAM+EMA (issue 19). The paper's radii could not be
#: confirmed from its text (docs/diffusion.md): 0.1 and 0.5 bracket this platform's SGD range.
PAPER_ARMS = ("base", "ema", "swa", "sam-0.1", "sam-0.5", "sam-0.1+ema")
#: ADM's EMA rate per optimizer step (guided-diffusion's `ema_rate` default).
PAPER_EMA_PER_STEP = 0.9999
TEST_FRACTION = 0.2
SIGMAS = (0.005, 0.01, 0.02, 0.05)
BITS = (8, 6, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=["central", "federated"], default="central")
    p.add_argument(
        "--preset",
        choices=["none", "paper"],
        default="none",
        help="paper: the paper's optimizer, lr, batch, dropout, EMA and arms at 32x32 (the "
        "options below override its values where given), resumable",
    )
    p.add_argument("--arms", default=None, help="comma-separated arm names")
    p.add_argument("--rounds", type=int, default=60, help="rounds (= epochs over the data)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha over labels")
    p.add_argument("--unet", default="small")
    p.add_argument("--image-size", type=int, default=None, help="16 (paper preset: 32)")
    p.add_argument("--batch-size", type=int, default=None, help="centralized batch size (128)")
    p.add_argument("--client-batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=None)
    p.add_argument("--lr", type=float, default=None, help="0.03 (paper preset: 1e-4)")
    p.add_argument("--momentum", type=float, default=None, help="SGD: 0.9")
    p.add_argument("--dropout", type=float, default=None, help="0 (paper preset: 0.3)")
    p.add_argument("--local-epochs", type=int, default=5, help="federated: epochs per round")
    p.add_argument(
        "--ema-decay", type=float, default=None, help="per round (0.9; paper: from 0.9999/step)"
    )
    p.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="server EMA decay min(d, (1 + n) / (10 + n)) at round n (default: on with --preset "
        "paper, off otherwise)",
    )
    p.add_argument("--swa-start", type=float, default=0.75, help="fraction of rounds")
    p.add_argument("--diffusion-steps", type=int, default=1000)
    p.add_argument("--fid-samples", type=int, default=1000)
    p.add_argument("--fid-reference", type=int, default=0, help="reference images (0 = all)")
    p.add_argument("--hessian-batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=8, help="worker processes at once")
    p.add_argument(
        "--batch-clients",
        choices=["auto", "on", "off"],
        default="auto",
        help="the app's batch-clients: auto trains a round's clients as one CUDA-graphed stack "
        "on a GPU (fp32, a graph captured per round); off, each client eagerly",
    )
    p.add_argument("--gpus", default="0", help="comma-separated CUDA device ids to spread over")
    p.add_argument("--deadline", type=float, default=0, help="stop unfinished arms after s")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument(
        "--resumable",
        action="store_true",
        help="checkpoint every round in the training's run folder and continue from it when "
        "run again (a training stopped by --deadline keeps its rounds, an evaluated arm its row)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return resolve(p.parse_args(argv))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset from the preset (or the SGD defaults of issue 5)."""
    paper = args.preset == "paper"
    preset = PRESETS["paper"] if paper else {}
    defaults = {
        "arms": ",".join(PAPER_ARMS if paper else ARMS),
        "image_size": 32 if paper else 16,
        "batch_size": int(preset.get("batch-size", 128)),
        "optimizer": str(preset.get("optimizer", "sgd")),
        "lr": float(preset.get("lr", 0.03)),
        "momentum": float(preset.get("momentum", 0.9)),
        "dropout": float(preset.get("dropout", 0.0)),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.optimizer_state = str(preset.get("optimizer-state", "reset"))
    if args.ema_decay is None:
        args.ema_decay = PAPER_EMA_PER_STEP ** steps_per_round(args) if paper else 0.9
    if args.ema_warmup is None:
        args.ema_warmup = paper
    args.resumable = args.resumable or paper
    return args


def steps_per_round(args: argparse.Namespace) -> int:
    """Optimizer steps of the served model per round: centralized, one epoch of the training
    images; federated, an average client's `local-epochs` epochs."""
    num_train = round(1797 * (1 - TEST_FRACTION))
    if args.setting == "central":
        return -(-num_train // args.batch_size)
    per_client = num_train / args.clients
    return args.local_epochs * max(1, round(per_client / args.client_batch_size))


def training_of(name: str) -> str:
    """The training arm `name` is evaluated from, named by its (algorithm, rho): server averages
    never feed back into training, so arms that differ only in the average share it."""
    arm = ARMS[name]
    return arm["algorithm"] + (f"-{arm['rho']:g}" if "rho" in arm else "")


def model_file(name: str) -> str:
    """The final model of its training that arm `name` evaluates."""
    return f"final_model_{ARMS[name].get('average', 'plain')}.pt"


def trainings(names: list[str]) -> dict[str, list[str]]:
    """Training -> the arms of `names` evaluated from it, both in `names` order."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(training_of(name), []).append(name)
    return out


def run_dir(args: argparse.Namespace, training: str) -> Path:
    """The training's run folder (checkpoints, metrics, final models, its arms' sample grids),
    one per setting and tag."""
    return args.out / f".{args.setting}{args.tag}-{training}-run"


def samples_path(args: argparse.Namespace, name: str) -> Path:
    """Where arm `name`'s sample grid is kept once its row is in the results."""
    return run_dir(args, training_of(name)) / f"samples-{name}.npy"


def trained(folder: Path, rounds: int, names: list[str]) -> bool:
    """The training already ended at `rounds` with the final models of arms `names`: a call that
    stopped between training and evaluation leaves only the evaluations to do."""
    metrics = folder / "metrics.json"
    return (
        all((folder / model_file(name)).exists() for name in names)
        and metrics.exists()
        and json.loads(metrics.read_text())["rounds"][-1]["round"] == rounds
    )


def train(args: argparse.Namespace, names: list[str], device: torch.device, out: Path) -> dict:
    """Run the Flower app once for the training of arms `names` (unless `trained`), keeping both
    server averages beside the plain model; returns its history. The test-loss curve is the
    served model's: the plain one, as both averages are kept (SWA's with `--ema-decay 0`)."""
    from fedpsg.run.simulate import simulate_in_process

    arm = ARMS[names[0]]
    central = args.setting == "central"
    clients = 1 if central else args.clients
    config = {
        "task": "diffusion",
        "strategy": arm["algorithm"],
        "rho": arm.get("rho", 0.0),
        "adaptive": False,
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "min-train-nodes": clients,
        "local-epochs": 1 if central else args.local_epochs,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "momentum": args.momentum if args.optimizer == "sgd" else 0.0,
        "optimizer-state": args.optimizer_state,
        "dropout": args.dropout,
        "batch-size": args.batch_size if central else args.client_batch_size,
        "seed": args.seed,
        "device": device.type,
        "batch-clients": args.batch_clients,
        "data": "digits",
        "image-size": args.image_size,
        "unet": args.unet,
        "diffusion-steps": args.diffusion_steps,
        "dirichlet-alpha": args.alpha,
        "test-fraction": TEST_FRACTION,
        "server-ema": args.ema_decay,
        "server-ema-warmup": args.ema_warmup,
        "server-swa-start": round(args.rounds * args.swa_start) + 1,
        "eval-every": max(1, args.rounds // 20),
        "checkpoint": args.resumable,
        "resume": args.resumable,
    }
    if not trained(out, args.rounds, names):
        simulate_in_process(config, clients, out)
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    seen = sum(c.get("num-examples", 0) for r in rounds for c in r["clients"])
    return {
        "train_images": seen * config["local-epochs"],
        "train_seconds": rounds[-1]["elapsed-s"],  # over every call that trained it
        "train_loss_curve": [r["train"].get("train_loss") for r in rounds[1:]],
        "test_loss_curve": {r["round"]: r["server"]["loss"] for r in rounds if r["server"]},
        "test_loss_curve_model": "plain" if args.ema_decay else "swa",
    }


def evaluate_arm(args: argparse.Namespace, model, train, test, device) -> dict:
    """Every flatness and robustness measure of DESIGN.md section 3 on an arm's model."""
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
    limit = args.fid_reference or None
    references = {"test": FIDScorer(test.images[:limit], device)}
    references["train"] = FIDScorer(train.images[:limit], device)
    held_out_n = len(test.images[:limit])
    out: dict = {
        "test_loss": mean_loss(model, loss, fixed),
        "fid_floor": {
            "train_vs_test": references["test"](train.images[:held_out_n]),
            "halves": split_halves_fid(
                torch.cat([train.images, test.images])[: 2 * limit if limit else None], device
            ),
            "n_test": held_out_n,
            "n_samples": args.fid_samples,
        },
    }
    n = args.fid_samples
    grid = None
    for steps in (20, 100):
        fake = torch.nan_to_num(sample(model, scheduler, n, steps, seed=args.seed))
        out[f"fid_{steps}"] = references["test"](fake)
        out[f"fid_{steps}_train"] = references["train"](fake)
        grid = fake[:64]
    for bits in BITS:
        q = quantize_weights(model, bits)
        out[f"test_loss_q{bits}"] = mean_loss(q, loss, fixed)
        out[f"test_loss_ratio_q{bits}"] = out[f"test_loss_q{bits}"] / out["test_loss"]
        fake = torch.nan_to_num(sample(q, scheduler, n, 20, seed=args.seed))
        out[f"fid_20_q{bits}"] = references["test"](fake)
    for steps in (20, 100):
        eb = exposure_bias(model, scheduler, test.images, steps, seed=args.seed)
        out[f"exposure_{steps}"] = eb.as_dict()
    out["sharpness"] = sharpness(
        model, lambda m: torch.tensor(mean_loss(m, loss, fixed)), SIGMAS, num_directions=8
    )
    out["hessian"] = {
        which: hessian_eigenvalues(model, lambda m: loss(m, hbatch), parameters=which).as_dict()
        for which in PARAMETER_SETS
    }
    out["hessian_top_eigenvalue"] = out["hessian"]["all"]["largest"]
    return out, ((grid + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()


def evaluation_path(args: argparse.Namespace, name: str) -> Path:
    """Where a worker leaves arm `name`'s row (.json) and sample grid (.npy) for the main call."""
    return run_dir(args, training_of(name)) / f"evaluation-{name}"


def pending(args: argparse.Namespace) -> dict[str, list[str]]:
    """Training -> its arms this call evaluates: all, or with --resumable those whose rows an
    earlier call did not keep."""
    done = evaluated_arms(result_stem(args), args) if args.resumable else {}
    return trainings([name for name in args.arms.split(",") if name not in done])


def worker(args: argparse.Namespace) -> None:
    """Train `args.worker` once, then evaluate each of its pending arms from its final model."""
    torch.set_num_threads(1)
    names = pending(args)[args.worker]
    folder = run_dir(args, args.worker)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set, test = train_test_split(load_digits_set(args.image_size), TEST_FRACTION, args.seed)
    info = train(args, names, device, folder)
    for name in names:
        model = build_unet(args.unet, args.image_size, 1, seed=args.seed).to(device).eval()
        model.load_state_dict(torch.load(folder / model_file(name), map_location=device))
        start = time.perf_counter()
        metrics, grid = evaluate_arm(args, model, train_set, test, device)
        seconds = time.perf_counter() - start
        row = {"arm": name, "training": args.worker, **ARMS[name], **info, **metrics}
        tmp = evaluation_path(args, name)
        np.save(f"{tmp}.npy", grid)
        Path(f"{tmp}.json.part").write_text(json.dumps({**row, "eval_seconds": seconds}))
        Path(f"{tmp}.json.part").replace(f"{tmp}.json")  # whole, or not there


def _table(rows: list[dict]) -> str:
    head = (
        "| arm | FID@20 | FID@100 | FID@100 vs train | FID@20 8-bit | FID@20 4-bit | test loss "
        "| d loss 4-bit | loss ratio 4-bit | sharpness s=0.02 | lambda_max | lambda_min "
        "| lambda_max weights | exposure gap@20 mean / largest |"
    )
    lines = [head, "|" + " --- |" * 14]
    for r in rows:
        h = r["hessian"]
        e = r["exposure_20"]
        lines.append(
            f"| {r['arm']} | {r['fid_20']:.2f} | {r['fid_100']:.2f} | {r['fid_100_train']:.2f} "
            f"| {r['fid_20_q8']:.2f} | {r['fid_20_q4']:.2f} | {r['test_loss']:.4f} "
            f"| {r['test_loss_q4'] - r['test_loss']:+.4f} | {r['test_loss_ratio_q4']:.3f} "
            f"| {r['sharpness']['0.02']:.4f} | {h['all']['largest']:.2f} "
            f"| {h['all']['smallest']:.2f} | {h['weights']['largest']:.2f} "
            f"| {e['mean_gap']:+.4f} / {e['largest_gap']:+.4f} |"
        )
    if rows:
        f = rows[0]["fid_floor"]
        lines += [
            "",
            f"FID against the {f['n_test']} held-out images ({f['n_samples']} samples); "
            f"real-vs-real floor: training vs held-out images at N={f['n_test']}: "
            f"{f['train_vs_test']:.2f}; two disjoint halves of all images: {f['halves']:.2f}.",
        ]
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


def evaluated_arms(stem: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Arms of an earlier call's results at this stem, trained for the same rounds: a resumed
    experiment keeps their rows (and the sample grids kept in their trainings' run folders)
    instead of evaluating them again."""
    path = stem.with_suffix(".json")
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if previous["config"]["rounds"] != args.rounds:
        return {}
    return {row["arm"]: row for row in previous["arms"] if samples_path(args, row["arm"]).exists()}


def result_stem(args: argparse.Namespace) -> Path:
    """The results' path without suffix (.json, .md, _curves.png, _samples.png)."""
    return args.out / f"diffusion_flatness_{args.setting}{args.tag}"


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
    stem = result_stem(args)
    done = evaluated_arms(stem, args) if args.resumable else {}
    todo = pending(args)
    for name in (name for arms in todo.values() for name in arms):  # an earlier call's leftovers
        for suffix in (".json", ".npy"):
            Path(f"{evaluation_path(args, name)}{suffix}").unlink(missing_ok=True)
    base_cmd = [sys.executable, "-m", "bench.exp_diffusion_flatness", *(argv or sys.argv[1:])]
    order, queue, running = list(trainings(names)), list(todo), {}
    gpus = args.gpus.split(",")
    start = time.perf_counter()
    with tqdm(total=len(names), initial=len(done), desc=f"{args.setting} arms") as bar:
        while queue or running:
            while queue and len(running) < args.parallel:
                training = queue.pop(0)
                gpu = gpus[order.index(training) % len(gpus)]
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                running[training] = subprocess.Popen([*base_cmd, "--worker", training], env=env)
            time.sleep(1)
            if args.deadline and time.perf_counter() - start > args.deadline:
                bar.update(sum(len(todo[training]) for training in queue))
                queue = []
                for proc in running.values():
                    proc.kill()
            for training, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[training]
                    bar.update(len(todo[training]))
    rows, grids, failed = [], [], []
    for name in names:
        if name in done:
            rows.append(done[name])
            grids.append(np.load(samples_path(args, name)))
            continue
        tmp = evaluation_path(args, name)
        if not Path(f"{tmp}.json").exists():  # its training failed or ran out of time
            failed.append(name)
            continue
        rows.append(json.loads(Path(f"{tmp}.json").read_text()))
        grids.append(np.load(f"{tmp}.npy"))
        Path(f"{tmp}.json").unlink()
        Path(f"{tmp}.npy").replace(samples_path(args, name))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.pop("worker")
    result = {
        "device": device,
        "wall_seconds": time.perf_counter() - start,
        "data": "scikit-learn digits (1797 real 8x8 images, upsampled), 80/20 stratified split",
        "ema_decay_per_round": args.ema_decay,
        "ema_warmup": args.ema_warmup,
        "trainings": trainings(names),
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
