"""The ClientApp: local training and evaluation of the configured task, one partition per node.

A node's partition comes from its node config (`partition-id`, `num-partitions`: set by the
simulation engine, or `--node-config` in a deployment); where its data lives may too
(`benchmark-dir` there overrides the run config's: each node knows its own mounts, the
researcher who starts the run does not). Data that cannot be read becomes an
error reply naming the partition and the problem; the server logs it and the round goes on
with the other clients. Extra ArrayRecords of the train message (e.g. SCAFFOLD's control
variate) reach the algorithm's client half, the arrays it returns travel back under their
keys, and its state lives in `context.state` across rounds; with checkpoints on, also in
round-versioned state files (`strategies.state`), so a resumed run trains from the same
state: under the server's checkpoint folder, or under the node's own `state-dir` (node
config) where the node keeps its files.
"""

from __future__ import annotations

from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedpsg.app.config import WEIGHT, client_config, seed_everything
from fedpsg.app.task import STATISTICS, Statistics, Task, load_task
from strategies import client_half
from strategies.base import optimizer_options
from strategies.server import STATE_DIR, STATE_ID, to_numpy, to_record
from strategies.state import ClientStateStore

ARRAYS = "arrays"  # the model's ArrayRecord, as Flower's strategies name it

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds, and whether it loads (`error`:
    why not), so the server can stop a run that cannot train before round 1."""
    pid, num = _partition_of(context)
    record = ConfigRecord({"partition-id": pid, "num-partitions": num})
    try:
        _partition(str(context.run_config["task"]), _data_config(context), pid, num)
    except (ValueError, OSError) as exc:
        record["error"] = f"partition {pid}: {type(exc).__name__}: {exc}"
    return Message(RecordDict({"partition": record}), reply_to=msg)


@app.query(STATISTICS)
def statistics(msg: Message, context: Context) -> Message:
    """This node's part of the statistics round: `task.statistics` on its partition."""
    pid, num = _partition_of(context)
    config = dict(_data_config(context))
    try:
        data = _partition(str(config["task"]), _data_config(context), pid, num)
        task = _task(str(config["task"]))
        if not isinstance(task, Statistics):
            raise ValueError(f"task {config['task']!r} has no statistics")
        arrays = task.statistics(data, config)
    except (ValueError, OSError) as exc:
        return _error_reply(msg, pid, exc)
    return Message(RecordDict({STATISTICS: to_record(arrays)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's partition with the strategy's
    client half; reply with the new weights, metrics and the half's extra arrays."""
    pid, num = _partition_of(context)
    config = client_config(
        context.run_config, msg.content.config_records["config"], pid, num
    )
    try:
        data = _partition(str(config["task"]), _data_config(context), pid, num)
    except (ValueError, OSError) as exc:
        return _error_reply(msg, pid, exc)
    seed_everything(config["seed"])
    task = _task(str(config["task"]))
    model = task.build_model(config)
    model.load_state_dict(msg.content.array_records[ARRAYS].to_torch_state_dict())
    half = client_half(
        msg.content.config_records["config"],
        lr=float(config["lr"]),
        momentum=float(config.get("momentum", 0.0)),
        weight_decay=float(config.get("weight-decay", 0.0)),
        **optimizer_options(config),
    )
    incoming = {k: to_numpy(r) for k, r in msg.content.array_records.items() if k != ARRAYS}
    store = _state_store(msg.content.config_records["config"], context, pid)
    server_round = int(config["server-round"])
    try:
        state = (
            {k: to_numpy(r) for k, r in context.state.array_records.items()}
            if store is None
            else store.load(server_round)
        )
    except (ValueError, OSError) as exc:
        return _error_reply(msg, pid, exc)
    num_examples, metrics, outgoing = task.train(model, data, half, config, incoming, state)
    if store is not None:
        store.save(server_round, state)
    for key, arrays in state.items():
        context.state[key] = to_record(arrays)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({**_floats(metrics), WEIGHT: int(num_examples)}),
            **{key: to_record(arrays) for key, arrays in outgoing.items()},
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's partition."""
    pid, num = _partition_of(context)
    config = client_config(
        context.run_config, msg.content.config_records["config"], pid, num
    )
    try:
        data = _partition(str(config["task"]), _data_config(context), pid, num)
    except (ValueError, OSError) as exc:
        return _error_reply(msg, pid, exc)
    task = _task(str(config["task"]))
    model = task.build_model(config)
    model.load_state_dict(msg.content.array_records[ARRAYS].to_torch_state_dict())
    num_examples, metrics = task.evaluate(model, data, config)
    record = MetricRecord({**_floats(metrics), WEIGHT: int(num_examples)})
    return Message(RecordDict({"metrics": record}), reply_to=msg)


def _state_store(
    config: ConfigRecord, context: Context, partition_id: int
) -> ClientStateStore | None:
    """This run's state files, when the server checkpoints (it then names the run); in the
    node's own `state-dir` if its node config has one, else where the server said."""
    if STATE_ID not in config:
        return None
    root = context.node_config.get(STATE_DIR, config[STATE_DIR])
    return ClientStateStore(Path(str(root)) / str(config[STATE_ID]), partition_id)


def _partition_of(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise KeyError(
            f"node config lacks {exc}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None


@cache
def _task(name: str) -> Task:
    return load_task(name)


@lru_cache(maxsize=256)
def _partition(task: str, run_config: tuple, pid: int, num: int) -> Any:
    """A partition, read once per process (Ray reuses its actors across rounds)."""
    return _task(task).load_partition(dict(run_config), pid, num)


def _data_config(context: Context) -> tuple:
    """The run config with the node's own settings over it, hashable for the cache."""
    return tuple(sorted({**context.run_config, **context.node_config}.items()))


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()}


def _error_reply(msg: Message, pid: int, exc: Exception) -> Message:
    reason = f"partition {pid}: {type(exc).__name__}: {exc}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
