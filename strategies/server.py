"""What every fedpsg server half shares, on top of Flower's FedAvg.

- **Robust aggregation.** A training reply that is an error, lacks the records the algorithm
  expects, or carries NaN/Inf is left out and logged; the round aggregates if at least
  `min_train_nodes` valid replies remain, else it keeps the previous global model.
- **Server-side EMA and/or SWA** of the global model. Training always continues from the plain
  aggregate x. With one average kept, it is what client-side and server-side evaluation see
  and what `Result.arrays` holds (as in the EMA/SWA literature, where the average is never
  trained); with both kept, the plain aggregate is served and both averages are kept beside
  it. `ServerHalf.final_models` names every final model (plain, ema, swa).
- **Seeded client sampling.** Which clients train (and evaluate) in round r is drawn from a
  generator of its own, seeded by (seed, r, purpose): nothing else that draws random numbers,
  no engine and no node-id order can change it, and a resumed run samples as an uninterrupted
  one. Clients are ordered by the stable ids a `ClientIdGrid` names (the ServerApp's partition
  ids), else by node id.
- **Checkpoint and resume.** After each round the global arrays, round number, algorithm state
  (e.g. SCAFFOLD's c), EMA/SWA buffers and counts, the metric history and the server's RNG
  states are written atomically to `<checkpoint_dir>/checkpoint.npz`; `resume=True` continues
  after the saved round.
  What clients keep between rounds (SCAFFOLD's c_i) goes to per-client state files: each train
  ConfigRecord names the folder (`state-dir`) and the run (`state-id`), see `strategies.state`.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from .base import ArrayDict

CHECKPOINT_NAME = "checkpoint.npz"
CHECKPOINT_VERSION = 1
CLIENT_STATE_DIR = "clients"  # under the checkpoint folder: the clients' state files
# Train ConfigRecord keys naming where clients keep their state (see `strategies.state`)
STATE_DIR, STATE_ID = "state-dir", "state-id"
# SeedSequence words of the sampling generators: [seed, round, SAMPLING, purpose]. The fourth
# word is non-zero, so no 3-word seed (fedpsg's (seed, round, partition) client seeds) collides.
SAMPLING = 0x73616D70  # "samp"
PURPOSES = {MessageType.TRAIN: 1, MessageType.EVALUATE: 2}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or cannot be resumed from; the message names the file."""


def to_numpy(record: ArrayRecord) -> ArrayDict:
    """An ArrayRecord as a dict of NumPy arrays (same keys, dtypes and shapes)."""
    return {key: array.numpy() for key, array in record.items()}


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of an Array's serialized .npy bytes, without the copy that
    `Array.numpy()` makes (aggregation reads every reply once, so copies dominate its cost)."""
    if array.stype != SType.NUMPY:
        return array.numpy()
    stream = io.BytesIO(array.data)
    reader = _NPY_HEADERS.get(np.lib.format.read_magic(stream))
    if reader is None:
        return array.numpy()
    shape, fortran_order, dtype = reader(stream)
    flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def to_views(record: ArrayRecord) -> ArrayDict:
    """An ArrayRecord as read-only NumPy views (see `array_view`)."""
    return {key: array_view(array) for key, array in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A dict of NumPy arrays as an ArrayRecord."""
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in arrays.items()})


def weighted_mean(
    arrays: list[Mapping[str, np.ndarray]], weights: list[float], like: ArrayDict
) -> ArrayDict:
    """Weighted mean over the keys of `like` (a missing key counts as zeros), accumulated in
    float64 and cast back to `like`'s dtypes (integers rounded)."""
    total = float(sum(weights))
    out: ArrayDict = {}
    for key, ref in like.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for item, weight in zip(arrays, weights, strict=True):
            if key in item:
                acc += (weight / total) * item[key]
        out[key] = (
            acc.astype(ref.dtype) if ref.dtype.kind == "f" else np.rint(acc).astype(ref.dtype)
        )
    return out


class ModelAverage:
    """Exponential (EMA) and stochastic-weight (SWA) averages of the global model, per round.

    EMA starts at the initial model and after each aggregate x does ema = d * ema + (1 - d) * x.
    With `ema_warmup` the n-th update (n = 1, 2, ...) uses min(d, (1 + n) / (10 + n)), the
    `num_updates` form of TensorFlow's ExponentialMovingAverage: a run far shorter than
    1 / (1 - d) updates otherwise keeps most of the EMA's weight on the initial model.
    SWA is the running mean of the aggregates of rounds >= `swa_start`. Integer buffers
    (BatchNorm's `num_batches_tracked`) follow x. BatchNorm running statistics are averaged
    like weights (no recalibration pass).

    Which model is served (evaluated every round, returned as `Result.arrays`): with one average
    kept, that average (SWA: the plain model until it starts), as in the EMA/SWA literature;
    with both kept, the plain aggregate, both averages beside it (`models`), so one training
    run yields the plain, EMA and SWA models of the same trajectory.
    """

    def __init__(
        self, ema_decay: float | None = None, swa_start: int | None = None, ema_warmup: bool = False
    ) -> None:
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        if swa_start is not None and swa_start < 1:
            raise ValueError(f"swa_start must be a round number >= 1, got {swa_start}")
        if ema_warmup and ema_decay is None:
            raise ValueError("ema_warmup needs an ema_decay")
        self.ema_decay = ema_decay
        self.swa_start = swa_start
        self.ema_warmup = bool(ema_warmup)
        self.ema: ArrayDict | None = None
        self.swa: ArrayDict | None = None
        self.ema_count = 0
        self.swa_count = 0

    def config(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint."""
        return {
            "ema_decay": self.ema_decay,
            "swa_start": self.swa_start,
            "ema_warmup": self.ema_warmup,
        }

    def begin(self, initial: ArrayDict) -> None:
        """Start from the initial global model (EMA's starting point)."""
        ema = self.ema_decay is not None
        self.ema = {k: v.copy() for k, v in initial.items()} if ema else None
        self.swa = None
        self.ema_count = self.swa_count = 0

    def update(self, server_round: int, arrays: ArrayDict) -> None:
        """Fold the aggregate of `server_round` into the averages."""
        if self.ema_decay is not None:
            if self.ema is None:
                raise RuntimeError("ModelAverage.begin() must run before update()")
            n = self.ema_count + 1
            d = min(self.ema_decay, (1 + n) / (10 + n)) if self.ema_warmup else self.ema_decay
            self.ema = self._blend(self.ema, arrays, d, 1.0 - d)
            self.ema_count = n
        if self.swa_start is not None and server_round >= self.swa_start:
            n = self.swa_count
            previous = arrays if self.swa is None else self.swa
            self.swa = self._blend(previous, arrays, n / (n + 1), 1 / (n + 1))
            self.swa_count = n + 1

    def models(self, arrays: ArrayDict) -> dict[str, ArrayDict]:
        """The models by name: "plain" (`arrays`, the aggregate), and "ema" and "swa" where
        kept (SWA is the plain model until it starts)."""
        out = {"plain": arrays}
        if self.ema_decay is not None:
            out["ema"] = self._with_buffers(self.ema, arrays)
        if self.swa_start is not None:
            out["swa"] = self._with_buffers(self.swa, arrays)
        return out

    def serve(self, arrays: ArrayDict) -> ArrayDict:
        """The model to evaluate and return: the one average kept, else `arrays`."""
        averages = [model for name, model in self.models(arrays).items() if name != "plain"]
        return averages[0] if len(averages) == 1 else arrays

    @staticmethod
    def _with_buffers(average: ArrayDict | None, arrays: ArrayDict) -> ArrayDict:
        if average is None:
            return arrays
        return {k: (average[k] if v.dtype.kind == "f" else v) for k, v in arrays.items()}

    @staticmethod
    def _blend(old: ArrayDict, new: ArrayDict, a: float, b: float) -> ArrayDict:
        return {
            k: (a * old[k] + b * v).astype(v.dtype) if v.dtype.kind == "f" else v.copy()
            for k, v in new.items()
        }


def save_checkpoint(path: Path, groups: Mapping[str, ArrayDict], meta: dict[str, Any]) -> None:
    """Write array groups and JSON metadata to `path` atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for group, arrays in groups.items():
        names[group] = list(arrays)
        for i, value in enumerate(arrays.values()):
            payload[f"{group}:{i}"] = np.asarray(value)
    header = {"version": CHECKPOINT_VERSION, "names": names, **meta}
    payload["meta"] = np.array(json.dumps(header))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, ArrayDict], dict[str, Any]]:
    """Read what `save_checkpoint` wrote: (array groups, metadata)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            groups = {
                group: {name: data[f"{group}:{i}"] for i, name in enumerate(names)}
                for group, names in meta.pop("names").items()
            }
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = f"{type(err).__name__}: {err}".replace("\n", " ")
        raise CheckpointError(
            f"{path}: not a readable fedpsg checkpoint (damaged or truncated? {reason})"
        ) from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, expected 1")
    return groups, meta


def resumable_round(path: Path, num_rounds: int) -> int:
    """The round the checkpoint at `path` holds, checked to lie below `num_rounds`, the
    resumed run's target (CheckpointError otherwise: there would be nothing to do)."""
    _, meta = load_checkpoint(path)
    return _below_target(path, int(meta["round"]), num_rounds)


def _below_target(path: Path, done: int, num_rounds: int) -> int:
    if done >= num_rounds:
        raise CheckpointError(
            f"{path}: checkpoint is at round {done}, the resumed run's target is round "
            f"{num_rounds}: nothing to do (set num-server-rounds above {done})"
        )
    return done


@runtime_checkable
class ClientIdGrid(Protocol):
    """A Grid that names each connected node by a stable client id (e.g. its data partition).

    Sampling orders clients by these ids, so the sample is the same whichever node ids a
    SuperLink or simulation engine assigned, and in whatever order it lists them."""

    def client_ids(self) -> dict[int, int]:
        """Connected node id -> its client id."""


def sampling_rng(seed: int, server_round: int, purpose: str) -> np.random.Generator:
    """The generator of one round's sample for `purpose` (a MessageType): a function of these
    three only."""
    words = [seed, server_round, SAMPLING, PURPOSES[purpose]]
    return np.random.default_rng(np.random.SeedSequence(words))


def sample_clients(
    client_ids: Mapping[int, int], size: int, seed: int, server_round: int, purpose: str
) -> list[int]:
    """`size` of the nodes in `client_ids` (node id -> client id), drawn without replacement
    over the sorted client ids; returned in client-id order."""
    order = sorted(client_ids, key=client_ids.__getitem__)
    picked = sampling_rng(seed, server_round, purpose).choice(len(order), size, replace=False)
    return [order[i] for i in sorted(picked)]


def _averages(
    groups: Mapping[str, ArrayDict], meta: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, int], dict[str, ArrayDict]]:
    """A checkpoint's averaging settings, update counts and buffers ("ema", "swa"). A checkpoint
    written while EMA and SWA were alternatives (one "average" buffer) still resumes: runs
    under way across the change keep their rounds."""
    if "averaging" in meta:
        buffers = {name: groups[name] for name in ("ema", "swa") if name in groups}
        return dict(meta["averaging"]), dict(meta["averaging-counts"]), buffers
    ema_decay, swa_start = meta["average"]
    name = "ema" if ema_decay is not None else "swa"
    buffers = {name: groups["average"]} if "average" in groups else {}
    config = {"ema_decay": ema_decay, "swa_start": swa_start, "ema_warmup": False}
    return config, {name: int(meta["average-count"])}, buffers


def _metrics_to_json(history: dict[int, MetricRecord]) -> dict[str, dict[str, Any]]:
    return {str(r): dict(record) for r, record in history.items()}


def _metrics_from_json(history: dict[str, dict[str, Any]]) -> dict[int, MetricRecord]:
    return {int(r): MetricRecord(values) for r, values in history.items()}


def _rng_state() -> tuple[ArrayDict, dict[str, Any]]:
    """Server-side RNG states: Python's, NumPy's and torch's global generators (for whatever
    else the ServerApp draws; client sampling has generators of its own)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    arrays = {
        "python": np.asarray(internal, dtype=np.uint64),
        "numpy": keys,
        "torch": torch.get_rng_state().numpy(),
    }
    meta = {"python": [version, gauss], "numpy": [int(pos), int(has_gauss), float(cached)]}
    return arrays, meta


def _set_rng_state(arrays: ArrayDict, meta: dict[str, Any]) -> None:
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(x) for x in arrays["python"]), gauss))
    pos, has_gauss, cached = meta["numpy"]
    np.random.set_state(("MT19937", arrays["numpy"], pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(arrays["torch"].copy()))


class ServerHalf(FedAvg):
    """Flower's FedAvg with robust aggregation, EMA/SWA and checkpoint/resume.

    The base of every fedpsg server half. Subclasses set `algorithm` (written into each train
    ConfigRecord under "algorithm", so `strategies.client_half` builds the matching client half),
    add their hyperparameters through `train_config`, and name in `reply_records` the extra
    ArrayRecords a reply must carry.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
    weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn,
    evaluate_metrics_aggr_fn
        As in Flower's FedAvg.
    ema_decay : float | None
        Keep an EMA of the global model with this decay.
    swa_start : int | None
        Keep an SWA running mean of the global models from this round on. With one of EMA and
        SWA set, that average is served; with both, the plain aggregate (`ModelAverage`).
    ema_warmup : bool
        The n-th EMA update uses the decay min(ema_decay, (1 + n) / (10 + n)) (`ModelAverage`).
    checkpoint_dir : str | None
        Folder for `checkpoint.npz`, rewritten atomically after every round, and for the
        clients' state files (`clients/`).
    resume : bool
        Continue from the checkpoint in `checkpoint_dir` if one exists.
    seed : int
        Seed of client sampling: round r's train (evaluate) sample depends on (seed, r) alone.
    """

    algorithm = "fedavg"
    reply_records: tuple[str, ...] = ()

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        ema_decay: float | None = None,
        swa_start: int | None = None,
        ema_warmup: bool = False,
        checkpoint_dir: str | None = None,
        resume: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        self.model_average = ModelAverage(ema_decay, swa_start, ema_warmup)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.resume = resume
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds client sampling), got {seed}")
        self.seed = int(seed)
        self.state_id = ""  # names this run's client state files; set by `start`
        self.global_arrays: ArrayDict = {}
        self.plain_arrays: ArrayDict = {}  # the aggregate after the last round `start` ran

    # --- what subclasses extend -------------------------------------------------------------

    def train_config(self) -> dict[str, bool | int | float | str]:
        """Entries this algorithm writes into every train ConfigRecord."""
        return {"algorithm": self.algorithm}

    def state_arrays(self) -> dict[str, ArrayDict]:
        """Algorithm state to checkpoint (e.g. SCAFFOLD's c), as named array groups."""
        return {}

    def load_state_arrays(self, groups: Mapping[str, ArrayDict]) -> None:
        """Restore what `state_arrays` returned."""

    # --- Strategy API -----------------------------------------------------------------------

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> %s: %s", type(self).__name__, self.train_config())
        log(INFO, "\t├──> Server average: %s", self.model_average.config())
        log(INFO, "\t├──> Checkpoint: %s (resume=%s)", self.checkpoint_dir, self.resume)
        super().summary()

    def sample(self, grid: Grid, server_round: int, purpose: str) -> list[int]:
        """The nodes that train (purpose MessageType.TRAIN) or evaluate in `server_round`:
        as many as Flower's FedAvg samples, drawn by `sample_clients` over the grid's client
        ids (node ids for a plain Grid). Waits, as Flower does, for enough nodes."""
        train = purpose == MessageType.TRAIN
        fraction = self.fraction_train if train else self.fraction_evaluate
        minimum = self.min_train_nodes if train else self.min_evaluate_nodes
        size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        while len(nodes := list(grid.get_node_ids())) < max(self.min_available_nodes, size):
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                len(nodes), max(self.min_available_nodes, size))  # fmt: skip
            time.sleep(1)
        ids = grid.client_ids() if isinstance(grid, ClientIdGrid) else {n: n for n in nodes}
        ids = {node: ids[node] for node in nodes}
        sampled = sample_clients(ids, size, self.seed, server_round, purpose)
        log(INFO, "configure_%s: sampled %d nodes (out of %d)",
            "train" if train else "evaluate", len(sampled), len(nodes))  # fmt: skip
        return sampled

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        purpose: str,
    ) -> list[Message]:
        """FedAvg's messages to the nodes of `sample`."""
        fraction = self.fraction_train if purpose == MessageType.TRAIN else self.fraction_evaluate
        if fraction == 0.0:
            return []
        nodes = self.sample(grid, server_round, purpose)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, nodes, purpose))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training on the seeded sample; the config names the
        algorithm and, with checkpoints, where clients keep their state."""
        self.global_arrays = to_numpy(arrays)
        for key, value in self.train_config().items():
            config[key] = value
        if self.checkpoint_dir is not None and self.state_id:
            config[STATE_DIR] = str(self.checkpoint_dir.resolve() / CLIENT_STATE_DIR)
            config[STATE_ID] = self.state_id
        return self._messages(server_round, arrays, config, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure federated evaluation on the seeded evaluate sample."""
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """Split replies into usable ones and left-out ones, logging why each was left out.

        Fewer usable train replies than `min_train_nodes` leave none usable (the round keeps
        the previous global model).
        """
        stage = "aggregate_train" if is_train else "aggregate_evaluate"
        valid: list[Message] = []
        rejected: list[Message] = []
        for msg in replies:
            problem = self._reply_problem(msg) if is_train else self._metrics_problem(msg)
            if problem is None:
                valid.append(msg)
            else:
                rejected.append(msg)
                log(
                    WARNING,
                    "%s: left out reply from node %d: %s",
                    stage,
                    msg.metadata.src_node_id,
                    problem,
                )
        log(INFO, "%s: %d usable replies, %d left out", stage, len(valid), len(rejected))
        if is_train and len(valid) < max(self.min_train_nodes, 1):
            log(
                WARNING,
                "aggregate_train: %d usable replies < min_train_nodes=%d; "
                "keeping the previous global model",
                len(valid),
                self.min_train_nodes,
            )
            return [], rejected + valid
        return valid, rejected

    def _metrics_problem(self, msg: Message) -> str | None:
        """Why a reply's metrics cannot be aggregated (evaluate and train), or None."""
        if msg.has_error():
            return f"error reply ({msg.error.reason})"
        records = msg.content.metric_records
        if len(records) != 1:
            return f"{len(records)} MetricRecords, expected exactly one"
        weight = next(iter(records.values())).get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
            return f"MetricRecord['{self.weighted_by_key}'] = {weight!r}, expected a number > 0"
        return None

    def _reply_problem(self, msg: Message) -> str | None:
        """Why a train reply cannot be aggregated, or None if it can."""
        problem = self._metrics_problem(msg)
        if problem is not None:
            return problem
        content = msg.content
        expected = {self.arrayrecord_key, *self.reply_records}
        if set(content.array_records) != expected:
            return f"ArrayRecords {sorted(content.array_records)}, expected {sorted(expected)}"
        model = content[self.arrayrecord_key]
        if set(model) != set(self.global_arrays):
            return f"'{self.arrayrecord_key}' keys differ from the global model's"
        for key, array in model.items():
            if tuple(array.shape) != self.global_arrays[key].shape:
                return f"'{self.arrayrecord_key}'['{key}'] has shape {tuple(array.shape)}"
        for name in expected:
            for key, array in content[name].items():
                if not np.isfinite(array_view(array)).all():
                    return f"NaN/Inf in '{name}'['{key}']"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted FedAvg over the usable replies, keeping each array's dtype."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            for key, array in arrays.items():
                dtype = self.global_arrays[key].dtype
                if np.dtype(array.dtype) != dtype:
                    value = array.numpy()
                    value = value if dtype.kind == "f" else np.rint(value)
                    arrays[key] = Array(np.asarray(value.astype(dtype), order="C"))
        return arrays, metrics

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's `Strategy.start` loop, plus EMA/SWA serving, checkpoints and resume.

        Training continues from the aggregate x; evaluation (client- and server-side) and
        `Result.arrays` use the served model (`ModelAverage.serve`: the average when exactly
        one is kept, else x); `final_models` then names every final model.
        """
        log(INFO, "Starting %s strategy:", type(self).__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config

        path = None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_NAME
        if self.resume and path is not None and path.exists():
            arrays, done, result = self._restore(path, to_numpy(initial_arrays), num_rounds)
            log(INFO, "Resuming from %s after round %d", path, done)
        else:
            arrays, done, result = to_numpy(initial_arrays), 0, Result()
            if self.checkpoint_dir is not None:  # a fresh run: no earlier run's client state
                shutil.rmtree(self.checkpoint_dir / CLIENT_STATE_DIR, ignore_errors=True)
                self.state_id = uuid.uuid4().hex
            self.model_average.begin(arrays)
            if evaluate_fn:
                res = evaluate_fn(0, initial_arrays)
                log(INFO, "Initial global evaluation results: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[0] = res
        result.arrays = to_record(self.model_average.serve(arrays))
        self.plain_arrays = arrays

        t_start = time.time()
        for current_round in range(done + 1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(current_round, to_record(arrays), train_config, grid),
                timeout=timeout,
            )
            agg_arrays, agg_train_metrics = self.aggregate_train(current_round, replies)
            if agg_arrays is not None:
                arrays = to_numpy(agg_arrays)
                self.model_average.update(current_round, arrays)
            self.plain_arrays = arrays
            served = to_record(self.model_average.serve(arrays))
            result.arrays = served
            if agg_train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
                result.train_metrics_clientapp[current_round] = agg_train_metrics

            replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, served, evaluate_config, grid),
                timeout=timeout,
            )
            agg_evaluate_metrics = self.aggregate_evaluate(current_round, replies)
            if agg_evaluate_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics

            if evaluate_fn:
                log(INFO, "Global evaluation")
                res = evaluate_fn(current_round, served)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
            if path is not None:
                self._save(path, current_round, arrays, result)

        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result

    def final_models(self) -> dict[str, ArrayRecord]:
        """After `start`: the plain aggregate and every kept average, by name ("plain", "ema",
        "swa"; SWA is the plain model until it starts)."""
        models = self.model_average.models(self.plain_arrays)
        return {name: to_record(arrays) for name, arrays in models.items()}

    # --- checkpoints ------------------------------------------------------------------------

    def _save(self, path: Path, server_round: int, arrays: ArrayDict, result: Result) -> None:
        rng_arrays, rng_meta = _rng_state()
        average = self.model_average
        groups = {"global": arrays, "rng": rng_arrays}
        if average.ema is not None:
            groups["ema"] = average.ema
        if average.swa is not None:
            groups["swa"] = average.swa
        for name, group in self.state_arrays().items():
            groups[f"state-{name}"] = group
        meta = {
            "algorithm": self.algorithm,
            "round": server_round,
            "state-id": self.state_id,
            "averaging": average.config(),
            "averaging-counts": {"ema": average.ema_count, "swa": average.swa_count},
            "rng": rng_meta,
            "train_metrics_clientapp": _metrics_to_json(result.train_metrics_clientapp),
            "evaluate_metrics_clientapp": _metrics_to_json(result.evaluate_metrics_clientapp),
            "evaluate_metrics_serverapp": _metrics_to_json(result.evaluate_metrics_serverapp),
        }
        save_checkpoint(path, groups, meta)

    def _restore(
        self, path: Path, initial: ArrayDict, num_rounds: int
    ) -> tuple[ArrayDict, int, Result]:
        groups, meta = load_checkpoint(path)
        if meta["algorithm"] != self.algorithm:
            raise CheckpointError(
                f"{path}: checkpoint of algorithm {meta['algorithm']!r}, this run is "
                f"{self.algorithm!r}"
            )
        _below_target(path, int(meta["round"]), num_rounds)
        arrays = groups["global"]
        for key, value in initial.items():
            if key not in arrays or arrays[key].shape != value.shape:
                raise CheckpointError(
                    f"{path}: array '{key}' missing or shaped differently from the initial model"
                )
        config, counts, buffers = _averages(groups, meta)
        average = self.model_average
        if config != average.config():
            raise CheckpointError(
                f"{path}: checkpoint has server averaging {config}, this run {average.config()}"
            )
        self.state_id = str(meta.get("state-id", ""))
        average.ema, average.swa = buffers.get("ema"), buffers.get("swa")
        average.ema_count, average.swa_count = counts.get("ema", 0), counts.get("swa", 0)
        self.load_state_arrays(
            {k.removeprefix("state-"): v for k, v in groups.items() if k.startswith("state-")}
        )
        _set_rng_state(groups["rng"], meta["rng"])
        result = Result(
            train_metrics_clientapp=_metrics_from_json(meta["train_metrics_clientapp"]),
            evaluate_metrics_clientapp=_metrics_from_json(meta["evaluate_metrics_clientapp"]),
            evaluate_metrics_serverapp=_metrics_from_json(meta["evaluate_metrics_serverapp"]),
        )
        return arrays, int(meta["round"]), result
