"""Multi-process deployment vs Ray simulation: per-round time (ratio) and bytes per round.

    .venv/bin/python -m bench.bench_deploy [--images 96 --nodes 3 --rounds 3]

The same run (benchmark, seed, run config) goes once through the local federation started
from docker-compose.yml (SuperLink, SuperExecs and SuperNodes as processes, process isolation)
and once through `flwr run` on the Ray simulation engine, back to back on this machine.

Per-round time is the ServerApp's own clock (`elapsed-s` in metrics.json, between consecutive
server evaluations), so start-up is reported apart. Bytes per round are Flower's own
serialisation of the messages the strategy sends and receives (every inflatable object of the
train message and of one reply, deflated as Flower pushes it), times the sampled nodes, against
the raw size of the model's tensors; the SuperLink's measured socket I/O over the run
(`/proc/<pid>/io`, HTTP and logging included) is reported beside it as a check.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from rich.console import Console
from rich.table import Table

from benchmark_builder.build import BuildConfig, build_benchmark
from benchmark_builder.synthetic import generate_synthetic_psg
from fedpsg.app.task import load_task
from fedpsg.run.deploy import ROOT, Deployment, app_run_config, local_paths, plan_federation
from fedpsg.run.simulate import simulate

RESULTS = ROOT / "bench" / "results"
RUN = {
    "fraction-train": 1.0,
    "min-train-nodes": 2,
    "local-epochs": 1,
    "lr": 0.1,
    "momentum": 0.9,
    "batch-size": 8,
    "seed": 0,
    "model": "motifs",
}


def round_times(out_dir: Path) -> list[float]:
    """Seconds of each round 1..R by the ServerApp's clock."""
    rounds = json.loads((out_dir / "metrics.json").read_text())["rounds"]
    elapsed = [r["elapsed-s"] for r in rounds]
    return [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]


def message_bytes(content: RecordDict) -> int:
    """Bytes Flower pushes for a message's `content`: every object of its tree (records,
    arrays, array chunks), deflated; the message envelope (metadata) adds well under 1 kB."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def traffic(config: dict, nodes: int) -> dict[str, float]:
    """Model size and the bytes of one round's train messages and replies."""
    model = load_task("psg").build_model(config)
    arrays = ArrayRecord(model.state_dict())
    raw = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    train = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1, "local-epochs": 1})})
    reply = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 10})}
    )
    down, up = message_bytes(train), message_bytes(reply)
    return {
        "model_bytes": raw,
        "train_message_bytes": down,
        "reply_message_bytes": up,
        "fleet_bytes_per_round": nodes * (down + up),
        "fleet_bytes_per_round_over_model": nodes * (down + up) / raw,
    }


def io_bytes(pid: int) -> int:
    """Bytes a process read and wrote through system calls (sockets, files)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def run_deployment(benchmark: Path, work: Path, config: dict, nodes: int) -> dict:
    """The run on the local federation; wall times and the SuperLink's I/O."""
    run_dir = work / "deploy"
    start = time.perf_counter()
    _, plan = plan_federation(benchmark, run_dir, nodes=nodes)
    with Deployment(plan, run_dir) as deployment:
        deployment.start()
        deployment.wait_for_nodes(nodes, timeout=300)
        up = time.perf_counter()
        superlink = deployment.processes["superlink"].pid
        before = io_bytes(superlink)
        code = deployment.run(
            ROOT, app_run_config(local_paths(benchmark, run_dir), config), stream=False
        )
        io = io_bytes(superlink) - before
        ran = time.perf_counter()
    if code != 0:
        raise RuntimeError(f"deployment run failed ({code}); see {run_dir / 'logs'}")
    return {
        "startup_s": up - start,
        "run_s": ran - up,
        "wall_s": time.perf_counter() - start,
        "round_s": round_times(run_dir / "results"),
        "superlink_io_bytes": io,
    }


def run_simulation(benchmark: Path, work: Path, config: dict, nodes: int) -> dict:
    """The same run on the Ray simulation engine."""
    start = time.perf_counter()
    code = simulate(
        {**config, "benchmark-dir": str(benchmark)},
        nodes,
        work / "simulation",
        flwr_home=work / "sim-home",
        stream=False,
    )
    if code != 0:
        raise RuntimeError(f"simulation failed ({code}); see {work / 'simulation'}")
    return {"wall_s": time.perf_counter() - start, "round_s": round_times(work / "simulation")}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(
    images: Annotated[int, typer.Option(help="Synthetic images in the benchmark.")] = 96,
    nodes: Annotated[int, typer.Option(help="SuperNodes = clients.")] = 3,
    rounds: Annotated[int, typer.Option(help="num-server-rounds.")] = 3,
    out: Annotated[Path, typer.Option(help="Results file (.json; .md beside it).")] = RESULTS
    / "deploy.json",
) -> None:
    """Time the deployment against the simulation and size the per-round traffic."""
    console = Console()
    config = {**RUN, "num-server-rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="fedpsg-deploy-bench-") as tmp:
        work = Path(tmp)
        with console.status("building the benchmark"):
            psg = generate_synthetic_psg(work / "synthetic", images, seed=0)
            build = BuildConfig(
                num_clients=nodes, partition="iid", alpha=None, num_clusters=3, seed=0
            )
            build_benchmark(psg, work / "bench", build, images_root=psg.parent)
        benchmark = work / "bench"
        sizes = traffic({**config, "benchmark-dir": str(benchmark)}, nodes)
        load = os.getloadavg()[0]
        with console.status(f"local federation: {nodes} SuperNodes, {rounds} rounds"):
            deploy = run_deployment(benchmark, work, config, nodes)
        with console.status(f"Ray simulation: {nodes} clients, {rounds} rounds"):
            sim = run_simulation(benchmark, work, config, nodes)
    later = deploy["round_s"][1:] or deploy["round_s"]
    later_sim = sim["round_s"][1:] or sim["round_s"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}",
        "setup": {"images": images, "nodes": nodes, "rounds": rounds, "run_config": config},
        "deployment": deploy,
        "simulation": sim,
        "round_s_ratio": _mean(deploy["round_s"]) / _mean(sim["round_s"]),
        "later_round_s_ratio": _mean(later) / _mean(later_sim),
        "wall_s_ratio": deploy["wall_s"] / sim["wall_s"],
        **sizes,
        "superlink_io_bytes_per_round": deploy["superlink_io_bytes"] / rounds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"Deployment vs simulation ({result['machine']})")
    for column in ("quantity", "deployment", "simulation", "ratio"):
        table.add_column(column, justify="right" if column != "quantity" else "left")
    rows = [
        ("mean s / round", _mean(deploy["round_s"]), _mean(sim["round_s"])),
        ("mean s / round after round 1", _mean(later), _mean(later_sim)),
        ("wall s (start to stop)", deploy["wall_s"], sim["wall_s"]),
    ]
    lines = ["| quantity | deployment | simulation | ratio |", "| --- | ---: | ---: | ---: |"]
    for name, a, b in rows:
        table.add_row(name, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x")
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    lines.append(f"| deployment start-up s | {deploy['startup_s']:.1f} | | |")
    table.add_row("deployment start-up s", f"{deploy['startup_s']:.1f}", "", "")
    for name, value in (
        ("model (raw tensor bytes)", sizes["model_bytes"]),
        ("train message bytes (per node)", sizes["train_message_bytes"]),
        ("reply message bytes (per node)", sizes["reply_message_bytes"]),
        ("Fleet API bytes per round", sizes["fleet_bytes_per_round"]),
        ("SuperLink socket+log I/O per round", result["superlink_io_bytes_per_round"]),
    ):
        ratio = value / sizes["model_bytes"]
        table.add_row(name, f"{value:,.0f}", "", f"{ratio:.2f}x model")
        lines.append(f"| {name} | {value:,.0f} | | {ratio:.2f}x model |")
    console.print(table)
    md = [f"# Deployment vs simulation\n\n{result['machine']}; {images} synthetic images, "
          f"{nodes} nodes, {rounds} rounds, MOTIFS PredCls.\n", *lines]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    typer.run(main)
