"""The ServerApp: any registered task under any registered strategy, picked by run config.

Before the first round the server asks every node for its partition id (a QUERY message)
and waits until the whole federation is connected; the Grid it hands the strategy names
each node by its partition. The strategy samples clients over partition ids with a generator
seeded by (run seed, round) alone, so a Ray simulation, the in-process engine, a
multi-process deployment and a resumed run pick the same partitions in every round,
whatever node ids were assigned. Each round's sample is recorded in `metrics.json`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedpsg.app.config import (
    RunConfigError,
    app_defaults,
    ignored_keys,
    output_dir,
    seed_everything,
    strategy_kwargs,
    validate_run_config,
)
from fedpsg.app.outputs import RunRecorder, write_comparison
from fedpsg.app.task import STATISTICS, Statistics, Task, load_task, sum_statistics
from strategies import server_options, server_strategy
from strategies.server import CHECKPOINT_NAME, CheckpointError, resumable_round

PARTITION = "partition"  # ConfigRecord key of the QUERY reply

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds of each configured strategy, evaluating the global
    model on the task's test split before the first round, every `eval-every` rounds and
    after the last.

    `strategy` may list several algorithms ("fedavg,scaffold"): they run one after another
    on the same federation (one simulation start-up), each from the same initial model and
    the same client sampling, with outputs in `<out-dir>/<name>/` and a comparison table.
    """
    config = checked_config(context.run_config)
    out_dir = output_dir(config, context.run_id)
    dirs = run_dirs(config, out_dir)
    try:
        check_resume(config, dirs)
    except CheckpointError as exc:
        log(ERROR, "[fedpsg] %s", exc)
        raise
    task = load_task(str(config["task"]))
    partitions = discover_partitions(
        grid, float(config["connect-timeout"]), int(config["min-train-nodes"])
    )
    log(INFO, "[fedpsg] %d nodes hold partitions 0..%d", len(partitions), len(partitions) - 1)
    config["num-partitions"] = len(partitions)  # sizes the default benchmark, as on the nodes
    test_data = task.load_test(config)
    grid = PartitionGrid(grid, partitions)
    statistics = collect_statistics(grid, task, config)
    for name, run_dir in dirs.items():
        run_strategy(grid, task, test_data, {**config, "strategy": name}, run_dir, statistics)
    if len(dirs) > 1:
        write_comparison(out_dir, list(dirs))
    log(INFO, "[fedpsg] outputs written to %s", out_dir)


def checked_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config, validated before anything runs (the in-process engine and a
    deployment's `flwr run` reach the ServerApp without the launcher's check): a bad one
    fails the run with one logged line; keys the strategy ignores get a warning."""
    try:
        defaults = app_defaults()
    except RunConfigError:  # installed from a wheel: no pyproject beside the code, but Flower
        defaults = dict(run_config)  # merged the FAB's defaults, so every key is one of them
    try:
        config = validate_run_config(run_config, defaults)
    except RunConfigError as exc:
        log(ERROR, "[fedpsg] %s", exc)
        raise
    for key in ignored_keys(config, defaults):
        log(WARNING, "[fedpsg] run config %s=%r: strategy %s ignores it", key, config[key],
            config["strategy"])  # fmt: skip
    return config


def run_dirs(config: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Strategy name -> its output folder: `out_dir`, or `out_dir/<name>` for several."""
    names = [name.strip() for name in str(config["strategy"]).split(",")]
    return {name: out_dir / name if len(names) > 1 else out_dir for name in names}


def check_resume(config: Mapping[str, Any], dirs: Mapping[str, Path]) -> None:
    """Before anything runs or is written (also by the launcher, before it starts one): a
    resume from a damaged checkpoint, or from one already at or past `num-server-rounds`,
    raises `strategies.server.CheckpointError`, one line naming the file."""
    if not config.get("resume"):
        return
    for run_dir in dirs.values():
        folder = strategy_kwargs(config, 1, run_dir, {"checkpoint_dir"}).get("checkpoint_dir")
        path = Path(folder) / CHECKPOINT_NAME if folder else None
        if path is not None and path.exists():
            resumable_round(path, int(config["num-server-rounds"]))


def run_strategy(
    grid: PartitionGrid,
    task: Task,
    test_data: Any,
    config: dict[str, Any],
    out_dir: Path,
    statistics: dict[str, Any] | None = None,
) -> None:
    """One federated training run of `config["strategy"]`, recorded in `out_dir`, from a
    model set from the statistics round's sum where the task has one. With a server average
    kept, the plain model and every average are written beside the served `final_model.pt`."""
    seed = int(config["seed"])
    seed_everything(seed)
    model = task.build_model(config)
    if isinstance(task, Statistics):
        task.apply_statistics(model, statistics or {}, config)
    recorder = RunRecorder(out_dir, config, resume=bool(config.get("resume", False)))
    log(INFO, "[fedpsg] %s: outputs in %s", config["strategy"], out_dir)

    num_rounds, every = int(config["num-server-rounds"]), int(config.get("eval-every", 1))

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round % every and server_round != num_rounds:
            log(INFO, "%s", recorder.record(server_round, {}, *grid.take_results()))
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        _, metrics = task.evaluate(model, test_data, config)
        log(INFO, "%s", recorder.record(server_round, metrics, *grid.take_results()))
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    name = str(config["strategy"])
    kwargs = strategy_kwargs(config, len(grid.partitions), out_dir, server_options(name))
    strategy = server_strategy(name, **kwargs, seed=seed)  # seeds its client sampling
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=num_rounds,
        train_config=ConfigRecord(
            {"lr": float(config["lr"]), "local-epochs": int(config["local-epochs"])}
        ),
        evaluate_fn=evaluate_fn,
    )
    final = result.arrays if len(result.arrays) else ArrayRecord(model.state_dict())
    models = strategy.final_models()
    named = {n: r.to_torch_state_dict() for n, r in models.items()} if len(models) > 1 else {}
    recorder.finish(final.to_torch_state_dict(), named)


def collect_statistics(grid: PartitionGrid, task: Task, config: dict[str, Any]) -> dict[str, Any]:
    """The statistics round, before round 1: every partition's `task.statistics`, summed
    exactly (`sum_statistics`). Nothing (and no round) for a task without statistics or
    a run config that wants none. A client's error fails the run: a sum without one
    client's part would be a wrong prior."""
    if not isinstance(task, Statistics) or not task.wants_statistics(config):
        return {}
    action = f"{MessageType.QUERY}.{STATISTICS}"
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type=action) for n in grid.get_node_ids()
    ]
    parts = []
    timeout = float(config.get("connect-timeout", 300))
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"statistics round: {reply.error.reason}")
        record = reply.content.array_records.get(STATISTICS, ArrayRecord())
        parts.append({key: array.numpy() for key, array in record.items()})
    grid.take_results()  # not a training round: keep it out of round 0's record
    return sum_statistics(parts)


def discover_partitions(grid: Grid, timeout: float, min_usable: int = 1) -> dict[int, int]:
    """Map node id -> partition id, once every partition's node has connected.

    Each node answers a QUERY with its `partition-id` and `num-partitions` (node config),
    and the reason when its partition does not load; the federation is complete when
    `num-partitions` distinct partitions answered. A node whose data fails is a warning
    (its rounds become error replies, the others train), but when fewer than `min_usable`
    nodes (capped at the federation size) can load theirs - a 10-client benchmark on
    Flower's default 2 nodes fails on every node - the run stops here, before round 1,
    with a node's reason (which names the fix).
    """
    deadline = time.monotonic() + timeout
    partitions: dict[int, int] = {}
    problems: dict[int, str] = {}
    expected: int | None = None
    while expected is None or len(set(partitions.values())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(partitions)} of {expected or '?'} partitions connected "
                f"after {timeout:.0f}s"
            )
        new = [n for n in grid.get_node_ids() if n not in partitions]
        if not new:
            time.sleep(1.0)
            continue
        queries = [
            Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new
        ]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if reply.has_error():
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} has no usable node config: "
                    f"{reply.error.reason}"
                )
            record = reply.content.config_records[PARTITION]
            partitions[reply.metadata.src_node_id] = int(record["partition-id"])
            expected = int(record["num-partitions"])
            if "error" in record:
                problems[reply.metadata.src_node_id] = str(record["error"])
                log(WARNING, "[fedpsg] node %s: %s", reply.metadata.src_node_id, record["error"])
    duplicates = len(partitions) - len(set(partitions.values()))
    if duplicates:
        raise RuntimeError(
            f"{duplicates} nodes share a partition id: {sorted(partitions.values())}"
        )
    usable = len(partitions) - len(problems)
    if problems and usable < min(min_usable, len(partitions)):
        message = (
            f"only {usable} of {len(partitions)} nodes can load their partition: "
            f"{next(iter(problems.values()))}"
        )
        log(ERROR, "[fedpsg] %s", message)
        raise RuntimeError(message)
    return partitions


class PartitionGrid(Grid):
    """The run's Grid, naming nodes by partition (a `strategies.server.ClientIdGrid`, so
    the strategy samples partitions) and keeping each round's sampled partitions and each
    reply's metrics (or error) by partition, for the outputs."""

    def __init__(self, grid: Grid, partitions: dict[int, int]) -> None:
        self.grid = grid
        self.partitions = partitions
        self.results: list[dict[str, Any]] = []
        self.sampled: dict[str, list[int]] = {}

    def set_run(self, run: Any) -> None:
        """Set the run on the wrapped Grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped Grid's run."""
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Create a message on the wrapped Grid."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        """Connected nodes of known partitions, in partition order."""
        connected = set(self.grid.get_node_ids())
        return sorted((n for n in self.partitions if n in connected), key=self.partitions.get)

    def client_ids(self) -> dict[int, int]:
        """Connected node id -> its partition id."""
        return {node: self.partitions[node] for node in self.get_node_ids()}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push on the wrapped Grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull from the wrapped Grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, receive, and remember every reply's metrics or error. Replies come back in
        partition order, whatever order they arrived in, so aggregation sums in a fixed order
        and a replay is bit-identical."""
        messages = list(messages)
        for message in messages:
            stage = message.metadata.message_type.split(".")[0]
            partition_id = self.partitions.get(message.metadata.dst_node_id, -1)
            self.sampled.setdefault(stage, []).append(partition_id)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        # pushing set each message's id; a reply the SuperLink wrote for a lost node comes
        # from the SuperLink, so its partition is that of the node it was sent to
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

        def partition(reply: Message) -> int:
            node = reply.metadata.src_node_id
            if node not in self.partitions:
                node = sent_to.get(reply.metadata.reply_to_message_id, node)
            return self.partitions.get(node, -1)

        replies.sort(key=partition)
        for reply in replies:
            entry = {
                "partition-id": partition(reply),
                "stage": reply.metadata.message_type.split(".")[0],
            }
            if reply.has_error():
                entry["error"] = reply.error.reason
            else:
                for metrics in reply.content.metric_records.values():
                    entry.update({k: v for k, v in metrics.items() if isinstance(v, int | float)})
            self.results.append(entry)
        return replies

    def take_results(self) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
        """Since the last call: the replies by partition, and the partitions sent work per
        stage (train, evaluate), sorted."""
        results, self.results = self.results, []
        sampled, self.sampled = self.sampled, {}
        return (
            sorted(results, key=lambda r: (r["stage"], r["partition-id"])),
            {stage: sorted(ids) for stage, ids in sampled.items()},
        )
