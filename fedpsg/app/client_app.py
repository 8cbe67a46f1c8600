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

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch
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
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedpsg.app.config import WEIGHT, client_config, seed_everything
from fedpsg.app.task import STATISTICS, BatchedTraining, Statistics, Task, load_task
from strategies import client_half
from strategies.base import ArrayDict, ClientHalf, optimizer_options
from strategies.server import STATE_DIR, STATE_ID, to_numpy, to_record
from strategies.state import ClientStateStore

ARRAYS = "arrays"  # the model's ArrayRecord, as Flower's strategies name it
Result = tuple[int, dict[str, float], dict[str, ArrayDict]]  # what `Task.train` returns

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
    client = _prepare(msg, context)
    if isinstance(client, Message):
        return client
    return _finish(client, client.task.train(*client.train_args()))


def batch_devices(run_config: Mapping[str, Any]) -> list[str]:
    """The devices `train_batch` spreads a round's clients over, one `train_many` call
    each, under this run config; empty when the clients train one by one (`train`).

    `batch-clients`: "off" never batches; "on" always does (on a CPU too); "auto" does
    when the task has `train_many` and trains on CUDA. Device "cuda" (or "auto" with a GPU
    visible) means every visible GPU; "cuda:N" that one.
    """
    mode, device = str(run_config["batch-clients"]), str(run_config["device"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    batched = isinstance(_task(str(run_config["task"])), BatchedTraining)
    if mode == "off" or (mode == "auto" and not (batched and device.startswith("cuda"))):
        return []
    count = torch.cuda.device_count() if device == "cuda" else 0
    return [f"cuda:{i}" for i in range(count)] if count else [device]


def train_batch(
    pairs: Sequence[tuple[Message, Context]], devices: Sequence[str] = ("cpu",)
) -> list[Message]:
    """`train` for many (message, context) pairs of one run, one reply each, in order.

    The clients whose task has `train_many` are split evenly over `devices` and train in
    one `train_many` call per device, each in its own thread (torch releases the GIL inside
    CUDA calls); any others train one by one. A client that cannot be prepared gets its
    error reply, as from `train`; when a call raises, each of its clients gets an error
    reply and the rest of the round goes on.
    """
    clients = [_prepare(msg, context) for msg, context in pairs]
    ready = [c for c in clients if isinstance(c, _Client)]
    many = [c for c in ready if isinstance(c.task, BatchedTraining)]
    num = len(devices)
    shares = [many[i * len(many) // num : (i + 1) * len(many) // num] for i in range(num)]
    outcomes: dict[int, Result | Exception] = {}
    # The attention backend is process-wide: `strategies.batched` asks for the math kernel
    # (vmap has no rule for the fused ones) on every step, and concurrent threads would
    # restore each other's earlier choice on exit; held here, it stays put for all of them.
    with sdpa_kernel(SDPBackend.MATH), ThreadPoolExecutor(num) as pool:
        for share, results in zip(shares, pool.map(_train_many, shares, devices), strict=True):
            outcomes.update(zip(map(id, share), results, strict=True))
    for client in ready:
        if id(client) not in outcomes:
            try:
                outcomes[id(client)] = client.task.train(*client.train_args())
            except Exception as exc:  # noqa: BLE001 - one client's failure is its error reply
                outcomes[id(client)] = exc
    return [c if isinstance(c, Message) else _reply(c, outcomes[id(c)]) for c in clients]


@dataclass
class _Client:
    """A train message made ready for the task: what `Task.train` takes, and where the
    reply and the client's state go afterwards."""

    msg: Message
    context: Context
    pid: int
    task: Task
    model: nn.Module
    data: Any
    half: ClientHalf
    config: dict[str, Any]
    incoming: dict[str, ArrayDict]
    state: dict[str, ArrayDict]
    store: ClientStateStore | None

    def train_args(self) -> tuple:
        return self.model, self.data, self.half, self.config, self.incoming, self.state


def _prepare(msg: Message, context: Context) -> _Client | Message:
    """Decode a train message, read the partition and the client's state, build the model
    with the received weights and the algorithm's client half; the error reply when the
    partition or the state cannot be read."""
    pid, num = _partition_of(context)
    config = client_config(context.run_config, msg.content.config_records["config"], pid, num)
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
    try:
        state = (
            {k: to_numpy(r) for k, r in context.state.array_records.items()}
            if store is None
            else store.load(int(config["server-round"]))
        )
    except (ValueError, OSError) as exc:
        return _error_reply(msg, pid, exc)
    return _Client(msg, context, pid, task, model, data, half, config, incoming, state, store)


def _finish(client: _Client, result: Result) -> Message:
    """Keep the client's new state and reply with its weights, metrics and extra arrays."""
    num_examples, metrics, outgoing = result
    if client.store is not None:
        client.store.save(int(client.config["server-round"]), client.state)
    for key, arrays in client.state.items():
        client.context.state[key] = to_record(arrays)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(client.model.state_dict()),
            "metrics": MetricRecord({**_floats(metrics), WEIGHT: int(num_examples)}),
            **{key: to_record(arrays) for key, arrays in outgoing.items()},
        }
    )
    return Message(content, reply_to=client.msg)


def _reply(client: _Client, outcome: Result | Exception) -> Message:
    if isinstance(outcome, Exception):
        return _error_reply(client.msg, client.pid, outcome)
    return _finish(client, outcome)


def _train_many(clients: list[_Client], device: str) -> list[Result | Exception]:
    """One `train_many` call for `clients` on `device` (nothing for none); its exception
    stands for every client's result."""
    if not clients:
        return []
    try:
        columns = zip(*(c.train_args() for c in clients), strict=True)
        return list(clients[0].task.train_many(*columns, device=torch.device(device)))
    except Exception as exc:  # noqa: BLE001 - a failed call fails its clients, not the round
        return [exc] * len(clients)


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
