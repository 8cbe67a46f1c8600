"""The PSG task: relation models on a benchmark folder, behind the `fedpsg.app.task.Task` surface.

Run-config keys read here (kebab-case, as Flower's): `benchmark-dir` (absolute path),
`model` ("motifs"), `mode` ("predcls" | "sgcls"), `features` ("auto" | "geometry" | "visual";
auto = visual features when the benchmark has pixels), `batch-size`, `local-epochs`, `seed`,
optional `server-round` (varies the shuffle per round), `device`, `frequency-prior`, and model
hyper-parameters as `model-<name>` (e.g. `model-hidden-dim = 64` becomes `hidden_dim=64`).

`frequency-prior` says where a model's (subject, object) frequency table starts:
- `none`: at zero (uniform); the federation learns it by SGD like any other weight, which is
  FL-PSG's setting (its released configs switch the bias off);
- `federated`: at the smoothed log-frequency of the summed client counts. Before round 1 the
  ServerApp asks every client for `statistics` (its [C, C, P + 1] predicate-pair counts), sums
  them and hands the sum to `apply_statistics`: exactly the table the centralized baseline
  counts on the pooled data (`pooled` there).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmark_builder.shards import Benchmark, BenchmarkError, open_benchmark
from fedpsg.psg.data import (
    GEOMETRY_DIM,
    PAIR_GEOMETRY_DIM,
    Scene,
    SceneError,
    VisualFeaturizer,
    scenes_from_rows,
)
from fedpsg.psg.default_benchmark import default_benchmark
from fedpsg.psg.models import ModelSpec, build_model
from fedpsg.psg.models.base import with_frequency_table
from fedpsg.psg.train import evaluate, log_prior, pair_counts, train
from strategies.base import ArrayDict, ClientHalf

RunConfig = Mapping[str, bool | int | float | str]  # as the Flower app passes it

FEATURES = ("auto", "geometry", "visual")
FREQUENCY_PRIORS = ("none", "federated")
PAIR_COUNTS = "pair-counts"  # the statistics round's array
_MODEL_PREFIX = "model-"


def prior_mode(config: RunConfig, allowed: tuple[str, ...] = FREQUENCY_PRIORS) -> str:
    """`config["frequency-prior"]` (default `none`), checked against `allowed`."""
    mode = str(config.get("frequency-prior", "none"))
    if mode not in allowed:
        raise ValueError(f"frequency-prior must be one of {list(allowed)}, got {mode!r}")
    return mode


def benchmark_from_config(config: RunConfig) -> Benchmark:
    """Open `config["benchmark-dir"]` (shards are verified when read, not all up front).
    An empty one means the embedded default, sized to the federation's `num-partitions`
    (node config, or what the ServerApp counted)."""
    if "benchmark-dir" not in config:
        raise ValueError("run config has no 'benchmark-dir' (absolute path of a benchmark folder)")
    if config["benchmark-dir"] == "" and "num-partitions" in config:
        return open_benchmark(default_benchmark(int(config["num-partitions"])), verify=False)
    root = Path(str(config["benchmark-dir"]))
    if not root.is_absolute():
        raise ValueError(f"benchmark-dir must be an absolute path, got {str(root)!r}")
    return open_benchmark(root, verify=False)


def uses_visual(benchmark: Benchmark, config: RunConfig) -> bool:
    """Whether segments get visual features: asked for, or `auto` and the benchmark has pixels."""
    features = str(config.get("features", "auto"))
    if features not in FEATURES:
        raise ValueError(f"features must be one of {list(FEATURES)}, got {features!r}")
    has_pixels = bool(benchmark.manifest.get("source", {}).get("has_pixels", False))
    if features == "visual" and not has_pixels:
        raise ValueError(f"{benchmark.root}: features='visual' but the benchmark has no pixels")
    return features == "visual" or (features == "auto" and has_pixels)


def model_spec(benchmark: Benchmark, visual: bool) -> ModelSpec:
    """The shapes a model needs for this benchmark (identical on every client)."""
    return ModelSpec(
        num_classes=len(benchmark.classes),
        num_predicates=len(benchmark.predicate_classes),
        geometry_dim=GEOMETRY_DIM,
        pair_geometry_dim=PAIR_GEOMETRY_DIM,
        visual_dim=VisualFeaturizer.dim if visual else 0,
    )


def model_hparams(config: RunConfig) -> dict[str, Any]:
    """`model-hidden-dim = 64` -> {"hidden_dim": 64}; a 0 leaves the model's own default."""
    return {
        key[len(_MODEL_PREFIX) :].replace("-", "_"): value
        for key, value in config.items()
        if key.startswith(_MODEL_PREFIX) and value != 0
    }


_CACHE_SIZE = 128
_scene_cache: OrderedDict[tuple[str, str, bool], list[Scene]] = OrderedDict()


def load_scenes(benchmark: Benchmark, partition_id: int | None, visual: bool) -> list[Scene]:
    """Featurised scenes of client `partition_id` (None = the test split), checksum verified.

    Featurisation is cached per process, keyed by the shard's manifest checksum (a rebuilt
    benchmark is never served stale), since Flower builds a fresh client each round.
    """
    if partition_id is None:
        table, entry = benchmark.test_table(verify=True), benchmark.manifest["test"]
    else:
        table = benchmark.client_table(partition_id, verify=True)
        entry = benchmark.manifest["clients"][partition_id]
    path = benchmark.root / entry["file"]
    key = (str(path), entry["sha256"], visual)
    if key not in _scene_cache:
        try:
            scenes = scenes_from_rows(table.to_pylist(), VisualFeaturizer() if visual else None)
        except SceneError as error:
            raise BenchmarkError(f"{path}: {error}") from error
        _scene_cache[key] = scenes
        while len(_scene_cache) > _CACHE_SIZE:
            _scene_cache.popitem(last=False)
    return _scene_cache[key]


def _device(config: RunConfig) -> torch.device:
    return torch.device(str(config.get("device", "cpu")))


class PSGTask:
    """Scene-graph relation models (PredCls / SGCls) on a federated PSG benchmark."""

    def build_model(self, config: RunConfig) -> nn.Module:
        """A fresh relation model, seeded by `config["seed"]`; its frequency table starts at
        zero (`apply_statistics` sets it), and IMP gets one when the prior is `federated`."""
        benchmark = benchmark_from_config(config)
        spec = model_spec(benchmark, uses_visual(benchmark, config))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.get("seed", 0)))
            name, hparams = str(config.get("model", "motifs")), model_hparams(config)
            if prior_mode(config) == "federated":
                hparams = with_frequency_table(name, hparams)
            model = build_model(name, spec, **hparams)
        return model.to(_device(config))

    def load_partition(self, config: RunConfig, partition_id: int, num_partitions: int) -> Any:
        """This client's scenes; a clear `BenchmarkError` for a missing or tampered shard."""
        benchmark = benchmark_from_config(config)
        if num_partitions != benchmark.num_clients:
            raise BenchmarkError(
                f"{benchmark.root / 'manifest.json'}: the benchmark has {benchmark.num_clients}"
                f" clients but the federation has {num_partitions} partitions; run it on"
                f' {benchmark.num_clients} nodes (flwr run --federation-config'
                f' "num-supernodes={benchmark.num_clients}", or options.num-supernodes ='
                f" {benchmark.num_clients} in the connection of $FLWR_HOME/config.toml)"
            )
        return load_scenes(benchmark, int(partition_id), uses_visual(benchmark, config))

    def load_test(self, config: RunConfig) -> Any:
        """The benchmark's held-out test scenes."""
        benchmark = benchmark_from_config(config)
        return load_scenes(benchmark, None, uses_visual(benchmark, config))

    def train(
        self,
        model: nn.Module,
        data: Any,
        half: ClientHalf,
        config: RunConfig,
        incoming: Mapping[str, ArrayDict],
        state: dict[str, ArrayDict],
    ) -> tuple[int, dict[str, float], dict[str, ArrayDict]]:
        """Local epochs over the client's scenes with `half`; the shuffle depends on the seed
        and the server round."""
        seed = int(config.get("seed", 0)) * 100_003 + int(config.get("server-round", 0))
        loss, extra = train(
            model,
            data,
            half,
            mode=str(config.get("mode", "predcls")),
            epochs=int(config.get("local-epochs", 1)),
            batch_size=int(config.get("batch-size", 16)),
            seed=seed,
            incoming=incoming,
            state=state,
            device=_device(config),
        )
        return len(data), {"train_loss": loss}, extra

    def evaluate(
        self, model: nn.Module, data: Any, config: RunConfig
    ) -> tuple[int, dict[str, float]]:
        """R@20/50/100, mR@20/50/100 and the relation loss on `data`."""
        metrics = evaluate(
            model,
            data,
            mode=str(config.get("mode", "predcls")),
            batch_size=int(config.get("batch-size", 16)),
            device=_device(config),
        )
        return len(data), metrics

    def wants_statistics(self, config: RunConfig) -> bool:
        """The statistics round runs for `frequency-prior = federated` only."""
        return prior_mode(config) == "federated"

    def statistics(self, data: Any, config: RunConfig) -> dict[str, np.ndarray]:
        """This client's predicate counts per class pair, when `frequency-prior = federated`
        (nothing otherwise): the summand of the statistics round."""
        if prior_mode(config) == "none":
            return {}
        benchmark = benchmark_from_config(config)
        counts = pair_counts(data, len(benchmark.classes), len(benchmark.predicate_classes))
        return {PAIR_COUNTS: counts.numpy()}

    def apply_statistics(
        self, model: nn.Module, statistics: Mapping[str, np.ndarray], config: RunConfig
    ) -> None:
        """Start the frequency table at the prior of the summed counts."""
        if prior_mode(config) == "none":
            return
        try:
            model.set_prior(log_prior(torch.from_numpy(statistics[PAIR_COUNTS])))
        except KeyError:
            raise ValueError("frequency-prior='federated' but no client sent counts") from None
        except ValueError as exc:
            raise ValueError(f"frequency-prior='federated': {exc}") from None
