"""What the ServerApp and ClientApp decide from the run config, without importing flwr.

Kept apart from the Flower shell so the plain-loop baseline of the overhead benchmark, the
centralized runs and the tests derive seeds, client configs and strategy options exactly as
the apps do.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpsg.app.task import RunConfig

WEIGHT = "num-examples"  # the metric replies are weighted by, as Flower's FedAvg names it

# run-config key -> keyword of `strategies.server_strategy`
STRATEGY_OPTIONS = {
    "fraction-train": "fraction_train",
    "min-train-nodes": "min_train_nodes",
    "fraction-evaluate": "fraction_evaluate",
    "proximal-mu": "proximal_mu",
    "rho": "rho",
    "adaptive": "adaptive",
    "server-lr": "server_lr",
    "server-ema": "ema_decay",
    "server-swa-start": "swa_start",
}


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's work in one round: a function of nothing else, so a run
    replays identically whichever process or node runs the client."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def client_config(
    run_config: RunConfig, message_config: Mapping[str, Any], partition_id: int
) -> dict[str, Any]:
    """Run config overlaid with what the server sent this round; `seed` becomes the
    (run seed, round, partition) seed, so shuffles differ per round and client."""
    config = {**run_config, **message_config, "partition-id": partition_id}
    config["seed"] = round_seed(
        int(run_config["seed"]), int(config.get("server-round", 0)), partition_id
    )
    return config


def strategy_kwargs(
    config: RunConfig, num_nodes: int, out_dir: Path, accepted: Collection[str]
) -> dict[str, Any]:
    """Keyword arguments of `strategies.server_strategy` for this run, limited to the
    `accepted` options of the chosen algorithm (FedProx's mu means nothing to SCAFFOLD).

    The ServerApp waits for every partition before round 1 (`discover_partitions`), so the
    sampled clients depend only on the seed, never on who connected first. Later rounds
    need only `min_train_nodes` connected (`min_available_nodes`), so a node lost mid-run
    does not stall the federation. A server EMA decay or SWA start of 0 means none.
    """
    kwargs = {arg: config[key] for key, arg in STRATEGY_OPTIONS.items() if key in config}
    kwargs["min_train_nodes"] = min(int(kwargs.get("min_train_nodes", 1)), num_nodes)
    kwargs["min_evaluate_nodes"] = 1 if float(kwargs.get("fraction_evaluate", 0.0)) > 0 else 0
    kwargs["min_available_nodes"] = kwargs["min_train_nodes"]
    kwargs["ema_decay"] = float(kwargs.get("ema_decay", 0.0)) or None
    kwargs["swa_start"] = int(kwargs.get("swa_start", 0)) or None
    kwargs["checkpoint_dir"] = str(out_dir / "checkpoints") if config.get("checkpoint") else None
    kwargs["resume"] = bool(config.get("resume", False))
    return {k: v for k, v in kwargs.items() if k in accepted}


def output_dir(config: RunConfig, run_id: int) -> Path:
    """`out-dir` from the run config (absolute), or `./runs/run-<id>` when unset."""
    value = str(config.get("out-dir", ""))
    if not value:
        return Path.cwd() / "runs" / f"run-{run_id}"
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f"run config out-dir must be an absolute path, got {value!r}")
    return path


def parse_run_config(pairs: list[str] | None) -> dict[str, bool | int | float | str]:
    """`-c` arguments read exactly as `flwr run --run-config` reads them (Flower's own parser):
    space-separated `key=value` pairs with TOML values, strings quoted (`model='vctree'`), or
    one `.toml` file. Raises ValueError naming the offending argument."""
    from click import ClickException
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(pairs or None)
    except (ClickException, ValueError, OSError) as exc:
        message = exc.message if isinstance(exc, ClickException) else str(exc)
        raise ValueError(f"run config {' '.join(pairs or [])!r}: {message}") from None
