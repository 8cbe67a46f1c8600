"""Diffusion training throughput on one GPU: base step vs SAM step, precision and layout,
and many clients per GPU through the client-batched engine (`strategies.batched`).

Part `steps`: images/s of one local training step through `train_local` with FedAvg's client
half (plain SGD) and FedSAM's (two passes), for fp32 / bf16 autocast / channels-last, per UNet
size; the SAM/base time ratio is the cost of SAM (floor: 2x). Part `processes`: K worker
processes, each a simulated client training its own model on the same GPU at once. Part
`batched`: today's per-client eager step (`train_local`, one client) side by side with
`train_local_stacked` training K clients at once (vmap, bf16 compute on fp32 weights, with and
without a CUDA graph), K = 1, 4, 16, 64: aggregate images/s, MFU (fwd+bwd FLOPs from
`torch.utils.flop_counter` against 790 TFLOP/s dense bf16), peak GPU memory per client and
the largest K that fits; plus a GPU check that the batched path matches per-client training.
With `--gpus N` it adds the same K clients split over N GPUs, one process per GPU.

    python -m bench.bench_diffusion_throughput --out bench/results
    python -m bench.bench_diffusion_throughput --parts batched --gpus 2 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
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


PEAK_BF16 = 790e12  # H200 dense bf16 FLOP/s, the MFU denominator
#: BENCH_DEVICE=cpu dry-runs the batched part's code on tiny sizes (no graphs, no memory stats)
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))
MODES = {  # name -> (compute dtype, CUDA graph, clients per stack (None: all), CUDA streams)
    "vmap bf16 eager": (torch.bfloat16, False, None, 1),
    "one stack + graph": (torch.bfloat16, True, None, 1),
    "graph per client (1 stream)": (torch.bfloat16, True, 1, 1),
    "graph per client (4 streams)": (torch.bfloat16, True, 1, 4),
    "stacks of 4 (4 streams)": (torch.bfloat16, True, 4, 4),
}
BEST = "one stack + graph"  # the mode the engine (`train_many`) runs


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0


def flops_per_image(unet: str, size: int) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_unet(unet, size, 3)
    x, t = torch.randn(2, 3, size, size), torch.randint(0, 1000, (2,))
    with FlopCounterMode(display=False) as counter:
        model(x, t).sample.sum().backward()
    return counter.get_total_flops() / 2


def _clients(unet: str, size: int, batch: int, k: int, steps: int, seed: int = 0):
    from strategies.base import ClientHalf

    device = DEVICE
    models = [build_unet(unet, size, 3, seed=seed + i).to(device) for i in range(k)]
    images = [torch.rand(batch * steps, 3, size, size, device=device) * 2 - 1 for _ in range(k)]
    halves = [ClientHalf(0.01, momentum=0.9) for _ in range(k)]
    return models, images, halves


def per_client_rate(unet: str, size: int, batch: int, bf16: bool, steps: int = 20) -> float:
    """Today's path: one client's `train_local` round, eager (images/s, median of 3)."""
    from strategies.base import train_local

    (model,), (images,), (half,) = _clients(unet, size, batch, 1, steps)
    loss = DenoisingLoss(make_scheduler(), autocast=bf16)
    batches = NoisyBatches(images, batch, 1000, seed=0)
    train_local(model, batches, loss, half)
    times = []
    for _ in range(3):
        _sync()
        start = time.perf_counter()
        train_local(model, batches, loss, half)
        _sync()
        times.append(time.perf_counter() - start)
    return steps * batch / sorted(times)[1]


def stacked_rate(
    unet: str, size: int, batch: int, k: int, mode: str, steps: tuple[int, int]
) -> dict:
    """K clients through `train_local_stacked`: images/s of a whole round of `steps[1]` steps
    (CUDA graph capture included), the steady per-step rate from two round lengths, and the
    peak GPU memory per client."""
    from strategies.batched import train_local_stacked

    dtype, graph, per_stack, streams = MODES[mode]
    graph = graph and DEVICE.type == "cuda"
    short, long = steps
    models, images, halves = _clients(unet, size, batch, k, long)
    loss = DenoisingLoss(make_scheduler())

    def round_time(n: int) -> float:
        batches = [NoisyBatches(x[: n * batch], batch, 1000, seed=i) for i, x in enumerate(images)]
        _sync()
        start = time.perf_counter()
        train_local_stacked(
            models,
            batches,
            loss,
            halves,
            compute_dtype=dtype,
            cuda_graph=graph,
            clients_per_stack=per_stack,
            streams=streams,
        )
        _sync()
        return time.perf_counter() - start

    round_time(2)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_short, t_long = round_time(short), round_time(long)
    peak = _peak_bytes()
    return {
        "round_images_per_s": k * batch * long / t_long,
        "steady_images_per_s": k * batch * (long - short) / max(t_long - t_short, 1e-9),
        "peak_gib_per_client": peak / k / 2**30,
    }


def gpu_equivalence(steps: int = 3) -> dict:
    """Max |difference| between batched (CUDA graph, fp32) and per-client training of three
    tiny-UNet clients with ragged data on this GPU (FedAvg's half, momentum 0.9)."""
    import copy

    from strategies.base import ClientHalf, train_local
    from strategies.batched import train_local_stacked

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = DEVICE
    model = build_unet("tiny", 16, 3).to(device)
    images = [torch.rand(n, 3, 16, 16, device=device) * 2 - 1 for n in (96, 80, 70)]
    loss = DenoisingLoss(make_scheduler())

    def batches():
        return [NoisyBatches(x, 32, 1000, seed=i) for i, x in enumerate(images)]

    solo = [copy.deepcopy(model) for _ in images]
    solo_loss = [
        train_local(m, b, loss, ClientHalf(0.05, momentum=0.9), epochs=steps)[0]
        for m, b in zip(solo, batches(), strict=True)
    ]
    many = [copy.deepcopy(model) for _ in images]
    halves = [ClientHalf(0.05, momentum=0.9) for _ in images]
    graph = DEVICE.type == "cuda"
    out = train_local_stacked(
        many,
        batches(),
        loss,
        halves,
        epochs=steps,
        cuda_graph=graph,
        clients_per_stack=1,
        streams=2,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return {
        "max_abs_param_diff": max(
            float((a - b).detach().abs().max())
            for m1, m2 in zip(solo, many, strict=True)
            for a, b in zip(m1.parameters(), m2.parameters(), strict=True)
        ),
        "max_abs_loss_diff": max(abs(a - b[0]) for a, b in zip(solo_loss, out, strict=True)),
    }


def batched_part(args: argparse.Namespace) -> dict:
    """Per-client eager vs batched K clients per GPU, for each UNet size."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    size, batch, steps = args.image_size, args.batch_size, (args.short_steps, args.long_steps)
    result = {"equivalence": gpu_equivalence(), "unets": {}}
    total = torch.cuda.get_device_properties(0).total_memory if DEVICE.type == "cuda" else 0
    per_unet = dict(u.split(":") for u in args.unet_clients.split(",")) if args.unet_clients else {}
    for unet in args.unets.split(","):
        fpi = flops_per_image(unet, size)
        row: dict = {"gflop_per_image": fpi / 1e9, "per_client": {}, "stacked": []}
        for precision in ("fp32", "bf16"):
            rate = per_client_rate(unet, size, batch, precision == "bf16")
            row["per_client"][precision] = {"images_per_s": rate, "mfu": rate * fpi / PEAK_BF16}
        for mode in args.modes.split(","):
            per_client = 0.0
            for k in [int(c) for c in per_unet.get(unet, args.stacked_clients).split("/")]:
                entry = {"mode": mode, "clients": k}
                if total and per_client * k > 0.85 * total:
                    entry["error"] = f"skipped: about {per_client * k / 2**30:.0f} GiB needed"
                else:
                    try:
                        entry.update(stacked_rate(unet, size, batch, k, mode, steps))
                        entry["mfu"] = entry["steady_images_per_s"] * fpi / PEAK_BF16
                        per_client = entry["peak_gib_per_client"] * 2**30
                    except torch.OutOfMemoryError:
                        entry["error"] = "out of memory"
                row["stacked"].append(entry)
                print(json.dumps({"unet": unet, **entry}), flush=True)
                torch.cuda.empty_cache()
                if "error" in entry:
                    break
        result["unets"][unet] = row
    return result


def largest_k(result: dict, args: argparse.Namespace) -> None:
    """Try, per UNet, the K that the measured peak memory per client says fills 80% of the
    card (BEST mode, a 2-step round); last, since a failed CUDA graph capture can leave the
    context unusable."""
    total = torch.cuda.get_device_properties(0).total_memory
    for unet, row in result["unets"].items():
        fits = [e for e in row["stacked"] if e["mode"] == BEST and "error" not in e]
        if not fits:
            continue
        k = min(int(0.8 * total / (fits[-1]["peak_gib_per_client"] * 2**30)), args.max_clients)
        try:
            stacked_rate(unet, args.image_size, args.batch_size, k, BEST, (1, 2))
            row["largest_k_tried"] = {"clients": k, "fits": True}
        except Exception as exc:  # noqa: BLE001 - recorded: OOM or a capture that failed
            row["largest_k_tried"] = {"clients": k, "fits": False, "error": repr(exc)[:200]}
        print(json.dumps({"unet": unet, **row["largest_k_tried"]}), flush=True)
        torch.cuda.empty_cache()


def stacked_worker(unet: str, size: int, batch: int, k: int, seconds: float, mode: str) -> None:
    """One GPU's share of the clients: prints "ready" after a first round, waits for a line
    on stdin, then runs batched rounds for `seconds` and prints images/s."""
    from strategies.batched import train_local_stacked

    torch.backends.cudnn.benchmark = True
    models, images, halves = _clients(unet, size, batch, k, 8)
    loss = DenoisingLoss(make_scheduler())
    dtype, graph, per_stack, streams = MODES[mode]
    graph = graph and DEVICE.type == "cuda"

    def one_round() -> None:
        batches = [NoisyBatches(x, batch, 1000, seed=i) for i, x in enumerate(images)]
        train_local_stacked(
            models,
            batches,
            loss,
            halves,
            compute_dtype=dtype,
            cuda_graph=graph,
            clients_per_stack=per_stack,
            streams=streams,
        )

    one_round()
    _sync()
    print("ready", flush=True)
    sys.stdin.readline()
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        one_round()
        done += k * len(images[0])
    _sync()
    print(json.dumps({"images_per_s": done / (time.perf_counter() - t0)}), flush=True)


def multi_gpu(
    unet: str, size: int, batch: int, k: int, gpus: int, seconds: float, mode: str
) -> dict:
    """The same K clients on one GPU, then split over `gpus` GPUs (one process each, started
    together once every process has warmed up)."""

    def launch(n: int) -> list[float]:
        cmd = [sys.executable, "-m", "bench.bench_diffusion_throughput", "--stacked-worker"]
        args = [unet, str(size), str(batch), str(k // n), str(seconds), mode]
        procs = [
            subprocess.Popen(
                [*cmd, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": str(g)},
            )
            for g in range(n)
        ]
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker failed (exit {proc.wait()})")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [
            json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs
        ]

    one = launch(1)
    split = launch(gpus)
    return {
        "unet": unet,
        "clients": k,
        "gpus": gpus,
        "mode": mode,
        "one_gpu_images_per_s": one[0],
        "per_gpu_images_per_s": split,
        "total_images_per_s": sum(split),
        "scaling": sum(split) / one[0],
    }


def batched_table(result: dict, args: argparse.Namespace) -> list[str]:
    """The batched part as markdown."""
    device = result["device"]
    lines = [
        f"## Many clients per GPU ({device})",
        "",
        f"{args.image_size}x{args.image_size} RGB, batch {args.batch_size} per client, SGD "
        "momentum 0.9. Per-client = today's `train_local` step, eager, one client. Batched = "
        "`train_local_stacked` (vmap over the clients, bf16 compute on fp32 weights, math "
        f"attention). Round = one call of {args.long_steps} steps incl. graph capture; steady "
        f"= the per-step rate from rounds of {args.short_steps} and {args.long_steps} steps. "
        "MFU: fwd+bwd FLOPs (torch.utils.flop_counter) / 790 TFLOP/s dense bf16.",
        "",
        "| unet | path | clients | round img/s | steady img/s | MFU | vs per-client fp32 "
        "| peak GiB/client |",
        "| --- |" + " --- |" * 7,
    ]
    for unet, row in result.get("unets", {}).items():
        base = row["per_client"]["fp32"]["images_per_s"]
        for precision, r in row["per_client"].items():
            lines.append(
                f"| {unet} | per-client eager {precision} | 1 | {r['images_per_s']:,.0f} "
                f"| {r['images_per_s']:,.0f} | {100 * r['mfu']:.2f}% "
                f"| {r['images_per_s'] / base:.2f}x | |"
            )
        for e in row["stacked"]:
            if "error" in e:
                lines.append(f"| {unet} | {e['mode']} | {e['clients']} | {e['error']} | | | | |")
                continue
            lines.append(
                f"| {unet} | {e['mode']} | {e['clients']} | {e['round_images_per_s']:,.0f} "
                f"| {e['steady_images_per_s']:,.0f} | {100 * e['mfu']:.2f}% "
                f"| {e['steady_images_per_s'] / base:.2f}x | {e['peak_gib_per_client']:.2f} |"
            )
        if "largest_k_tried" in row:
            t = row["largest_k_tried"]
            verdict = "fits" if t["fits"] else f"fails ({t.get('error', '')})"
            lines.append(f"\n{unet}: {t['clients']} clients ({BEST}): {verdict}.\n")
    if "equivalence" in result:
        eq = result["equivalence"]
        lines += [
            "",
            "GPU check, batched (CUDA graph, fp32) vs per-client `train_local`, three tiny-UNet "
            "clients of 96/80/70 images, 3 epochs: max |param diff| "
            f"{eq['max_abs_param_diff']:.2e}, max |loss diff| {eq['max_abs_loss_diff']:.2e}.",
        ]
    for m in result.get("multi_gpu", []):
        lines += [
            "",
            f"{m['clients']} {m['unet']}-UNet clients: one GPU {m['one_gpu_images_per_s']:,.0f} "
            f"img/s; split over {m['gpus']} GPUs (one process each) "
            f"{m['total_images_per_s']:,.0f} img/s = {m['scaling']:.2f}x.",
        ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="steps,processes,batched")
    p.add_argument("--unets", default="small,base")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clients", default="1,2,4,8,12")
    p.add_argument("--client-unet", default="small")
    p.add_argument("--client-image-size", type=int, default=16)
    p.add_argument("--client-batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--stacked-clients", default="1/4/16/64", help="K values, '/'-separated")
    p.add_argument("--unet-clients", default="", help="per UNet K values: 'base:1/4/16,...'")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--gpu-mode", default=BEST, help="mode of the multi-GPU run")
    p.add_argument("--short-steps", type=int, default=3)
    p.add_argument("--long-steps", type=int, default=8)
    p.add_argument("--max-clients", type=int, default=512)
    p.add_argument("--gpus", type=int, default=1, help="> 1: also split K clients over GPUs")
    p.add_argument("--gpu-clients", default="small:64,base:16", help="K of the multi-GPU run")
    p.add_argument("--name", default="diffusion_batched", help="file name of the batched part")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--client-worker", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--stacked-worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client_worker:
        u, s, b, t, sec = args.client_worker
        client_worker(u, int(s), int(b), float(t), float(sec))
        return
    if args.stacked_worker:
        u, s, b, k, sec, mode = args.stacked_worker
        stacked_worker(u, int(s), int(b), int(k), float(sec), mode)
        return
    parts = args.parts.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu (dry run)"
    if "batched" in parts or args.gpus > 1:
        result = {"device": device, "torch": torch.__version__}
        result["config"] = {k: str(v) for k, v in vars(args).items()}
        if "batched" in parts:
            result.update(batched_part(args))
            (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        if args.gpus > 1:
            result["device"] = f"{args.gpus}x {device}"
            ks = dict(u.split(":") for u in args.gpu_clients.split(","))
            result["multi_gpu"] = [
                multi_gpu(
                    u,
                    args.image_size,
                    args.batch_size,
                    int(ks[u]),
                    args.gpus,
                    args.seconds,
                    args.gpu_mode,
                )  # fmt: skip
                for u in args.unets.split(",")
                if u in ks
            ]
        if "batched" in parts and DEVICE.type == "cuda":
            largest_k(result, args)  # last: a failed capture can leave the context unusable
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        lines = batched_table(result, args)
        (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    if "steps" in parts or "processes" in parts:
        legacy(args, parts, device)


def legacy(args: argparse.Namespace, parts: list[str], device: str) -> None:
    """Parts `steps` and `processes` (one client's step; one process per client)."""
    from tqdm import tqdm

    steps = []
    jobs = [(u, v) for u in args.unets.split(",") for v in VARIANTS] if "steps" in parts else []
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
    shared = []
    if "processes" in parts:
        shared = clients_per_gpu(
            args.client_unet, args.client_image_size, args.client_batch, counts, args.seconds
        )
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
