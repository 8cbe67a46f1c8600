"""The ServerApp: any registered task under any registered strategy, picked by run config.

Before the first round the server asks every node for its partition id (a QUERY message)
and waits until the whole federation is connected; the Grid it hands the strategy lists
nodes in partition order. With Python's `random` seeded by the run seed, the strategy's
client sampling then picks the same partitions in a Ray simulation and in a multi-process
deployment, whatever node ids the SuperLink assigned.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO
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

from fedpsg.app.config import output_dir, seed_everything, strategy_kwargs
from fedpsg.app.outputs import RunRecorder, write_comparison
from fedpsg.app.task import STATISTICS, Statistics, Task, load_task, sum_statistics
from strategies import server_options, server_strategy

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
    config = dict(context.run_config)
    out_dir = output_dir(config, context.run_id)
    names = [name.strip() for name in str(config["strategy"]).split(",")]
    if len(set(names)) != len(names):
        raise ValueError(f"run config strategy lists an algorithm twice: {config['strategy']!r}")
    task = load_task(str(config["task"]))
    test_data = task.load_test(config)
    partitions = discover_partitions(grid, timeout=float(config.get("connect-timeout", 300)))
    log(INFO, "[fedpsg] %d nodes hold partitions 0..%d", len(partitions), len(partitions) - 1)
    grid = PartitionGrid(grid, partitions)
    statistics = collect_statistics(grid, task, config)
    for name in names:
        run_dir = out_dir / name if len(names) > 1 else out_dir
        run_strategy(grid, task, test_data, {**config, "strategy": name}, run_dir, statistics)
    if len(names) > 1:
        write_comparison(out_dir, names)
    log(INFO, "[fedpsg] outputs written to %s", out_dir)


def run_strategy(
    grid: PartitionGrid,
    task: Task,
    test_data: Any,
    config: dict[str, Any],
    out_dir: Path,
    statistics: dict[str, Any] | None = None,
) -> None:
    """One federated training run of `config["strategy"]`, recorded in `out_dir`, from a
    model set from the statistics round's sum where the task has one."""
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
            log(INFO, "%s", recorder.record(server_round, {}, grid.take_results()))
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        _, metrics = task.evaluate(model, test_data, config)
        log(INFO, "%s", recorder.record(server_round, metrics, grid.take_results()))
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    name = str(config["strategy"])
    kwargs = strategy_kwargs(config, len(grid.partitions), out_dir, server_options(name))
    strategy = server_strategy(name, **kwargs)
    random.seed(seed)  # the strategy samples clients with `random`
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
    recorder.finish(final.to_torch_state_dict())


def collect_statistics(
    grid: PartitionGrid, task: Task, config: dict[str, Any]
) -> dict[str, Any]:
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


def discover_partitions(grid: Grid, timeout: float) -> dict[int, int]:
    """Map node id -> partition id, once every partition's node has connected.

    Each node answers a QUERY with its `partition-id` and `num-partitions` (node config);
    the federation is complete when `num-partitions` distinct partitions answered.
    """
    deadline = time.monotonic() + timeout
    partitions: dict[int, int] = {}
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
    duplicates = len(partitions) - len(set(partitions.values()))
    if duplicates:
        raise RuntimeError(
            f"{duplicates} nodes share a partition id: {sorted(partitions.values())}"
        )
    return partitions


class PartitionGrid(Grid):
    """The run's Grid, listing nodes in partition order and keeping each reply's metrics
    (or error) by partition, for the per-client outputs."""

    def __init__(self, grid: Grid, partitions: dict[int, int]) -> None:
        self.grid = grid
        self.partitions = partitions
        self.results: list[dict[str, Any]] = []

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

    def take_results(self) -> list[dict[str, Any]]:
        """The replies received since the last call, by partition."""
        results, self.results = self.results, []
        return sorted(results, key=lambda r: (r["stage"], r["partition-id"]))
