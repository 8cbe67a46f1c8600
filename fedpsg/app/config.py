"""What the ServerApp and ClientApp decide from the run config, without importing flwr.

Kept apart from the Flower shell so the plain-loop baseline of the overhead benchmark, the
centralized runs and the tests derive seeds, client configs and strategy options exactly as
the apps do.
"""

from __future__ import annotations

import difflib
import math
import random
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpsg.app.task import TASKS, RunConfig
from strategies import ALGORITHMS, server_options

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"  # the app's (and the FAB's)

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
    "server-ema-warmup": "ema_warmup",
    "server-swa-start": "swa_start",
}


#: Named presets: run-config values a preset sets (docs/diffusion.md cites each number).
#: "paper": the flatness paper's (arXiv 2503.11078) ADM base on CIFAR-10, as its code base
#: (forever208/DDPM-IP on openai/guided-diffusion) trains it: AdamW with no weight decay
#: (= Adam), lr 1e-4, torch's default betas and eps, batch 128, dropout 0.3, one optimizer
#: carried through training.
PRESETS: dict[str, dict[str, bool | int | float | str]] = {
    "paper": {
        "optimizer": "adamw",
        "lr": 1e-4,
        "momentum": 0.0,
        "weight-decay": 0.0,
        "adam-beta1": 0.9,
        "adam-beta2": 0.999,
        "adam-eps": 1e-8,
        "optimizer-state": "keep",
        "batch-size": 128,
        "dropout": 0.3,
    },
}
PRESET_TASKS = {"paper": "diffusion"}


def apply_preset(
    config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`config` with its `preset`'s values filled in. A key still at its pyproject default
    takes the preset's value; one set to anything else contradicts the preset and raises
    `RunConfigError` naming both."""
    name = str(config.get("preset", "none"))
    if name == "none":
        return dict(config)
    if name not in PRESETS:
        raise RunConfigError(f"run config preset={name!r}: expected none | {' | '.join(PRESETS)}")
    if str(config.get("task")) != PRESET_TASKS[name]:
        raise RunConfigError(
            f"run config preset={name!r} is the {PRESET_TASKS[name]} task's, "
            f"not task={config.get('task')!r}"
        )
    defaults = app_defaults() if defaults is None else defaults
    out = dict(config)
    for key, value in PRESETS[name].items():
        if key in out and out[key] not in (defaults.get(key), value):
            raise RunConfigError(
                f"run config {key}={out[key]!r} contradicts preset={name!r} ({key}={value!r}): "
                "drop one of them"
            )
        out[key] = value
    return out


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
    run_config: RunConfig,
    message_config: Mapping[str, Any],
    partition_id: int,
    num_partitions: int | None = None,
) -> dict[str, Any]:
    """Run config overlaid with what the server sent this round; `seed` becomes the
    (run seed, round, partition) seed, so shuffles differ per round and client; a
    `preset`'s values are filled in.
    `num-partitions` (when given) sizes the default benchmark as on the server."""
    config = {**apply_preset(run_config), **message_config, "partition-id": partition_id}
    if num_partitions is not None:
        config["num-partitions"] = num_partitions
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
    kwargs["ema_warmup"] = bool(kwargs.get("ema_warmup", False))
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


class RunConfigError(ValueError):
    """A run config the app cannot run: one line naming the key and what it allows."""


def app_defaults(pyproject: Path = PYPROJECT) -> dict[str, bool | int | float | str]:
    """The run-config keys and defaults of `[tool.flwr.app.config]` in the app's pyproject
    (the FAB ships it, so the launcher, the ServerApp and the tests read the same table)."""
    try:
        return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise RunConfigError(f"{pyproject}: no [tool.flwr.app.config] table ({exc})") from None


@dataclass(frozen=True)
class Rule:
    """What one key accepts beyond its default's type: a check and how to say it."""

    check: Callable[[Any], bool]
    allowed: str


def _interval(low: float, high: float = math.inf, closed: str = "[]") -> Rule:
    """A finite number in an interval; `closed` says which ends belong to it."""
    left, right = closed

    def check(value: Any) -> bool:
        value = float(value)
        return (
            math.isfinite(value)
            and (value >= low if left == "[" else value > low)
            and (value <= high if right == "]" else value < high)
        )

    if math.isinf(high):
        allowed = f"a finite number {'>=' if left == '[' else '>'} {low:g}"
    else:
        allowed = f"a number in {left}{low:g}, {high:g}{right}"
    return Rule(check, allowed)


def _at_least(low: int) -> Rule:
    return Rule(lambda value: value >= low, f"an integer >= {low}")


def _one_of(*choices: str) -> Rule:
    return Rule(lambda value: value in choices, "one of " + " | ".join(choices))


def _strategies(value: str) -> bool:
    names = [name.strip() for name in value.split(",")]
    return all(name in ALGORITHMS for name in names) and len(set(names)) == len(names)


def _absolute_or_empty(value: str) -> bool:
    return value == "" or Path(value).is_absolute()


# Ranges of the keys that have one; every key's type is its pyproject default's.
RULES: dict[str, Rule] = {
    "task": _one_of(*TASKS),
    "strategy": Rule(
        _strategies, "one of " + " | ".join(ALGORITHMS) + ", or a comma list of distinct ones"
    ),
    "num-server-rounds": _at_least(1),
    "fraction-train": _interval(0, 1, "(]"),
    "min-train-nodes": _at_least(1),
    "fraction-evaluate": _interval(0, 1),
    "eval-every": _at_least(1),
    "local-epochs": _at_least(1),
    "lr": _interval(0, closed="(]"),
    "momentum": _interval(0, 1),
    "weight-decay": _interval(0),
    "optimizer": _one_of("sgd", "adam", "adamw"),
    "adam-beta1": _interval(0, 1, "[)"),
    "adam-beta2": _interval(0, 1, "[)"),
    "adam-eps": _interval(0, closed="(]"),
    "optimizer-state": _one_of("reset", "keep"),
    "preset": _one_of("none", *PRESETS),
    "dropout": _interval(0, 1, "[)"),
    "batch-size": _at_least(1),
    "seed": _at_least(0),
    "benchmark-dir": Rule(_absolute_or_empty, 'an absolute path, or "" for the default'),
    "out-dir": Rule(_absolute_or_empty, 'an absolute path, or "" for ./runs/run-<id>'),
    "connect-timeout": _interval(0, closed="(]"),
    "batch-clients": _one_of("auto", "on", "off"),
    "mode": _one_of("predcls", "sgcls"),
    "features": _one_of("auto", "geometry", "visual"),
    "model-hidden-dim": _at_least(0),
    "proximal-mu": _interval(0),
    "rho": _interval(0),
    "server-lr": _interval(0, closed="(]"),
    "server-ema": _interval(0, 1, "[)"),
    "server-swa-start": _at_least(0),
    "image-size": _at_least(4),
    "diffusion-steps": _at_least(1),
    "dirichlet-alpha": _interval(0, closed="(]"),
    "test-fraction": _interval(0, 1, "()"),
    "eval-fid-samples": _at_least(0),
    "eval-sampling-steps": _at_least(1),
}

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a quoted string"}


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def validate_run_config(
    overrides: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The full run config (`defaults` with `overrides` over them), checked key by key.

    Raises `RunConfigError` with one line for the first unknown key (with the spelling it
    was probably meant to be: `proximal_mu` -> `proximal-mu`), value of the wrong type or
    value out of range. Flower merges `flwr run -c` over the same defaults, so the launcher,
    the in-process engine and the ServerApp all accept exactly the same configs. A
    `preset`'s values are filled in (`apply_preset`).
    """
    defaults = app_defaults() if defaults is None else defaults
    for key in overrides:
        if key not in defaults:
            guess = difflib.get_close_matches(key.replace("_", "-"), list(defaults), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            raise RunConfigError(
                f"run config: unknown key {key!r}{hint} (keys: {', '.join(defaults)})"
            )
    config = {**defaults, **overrides}
    for key, value in config.items():
        default, rule = defaults[key], RULES.get(key)
        if not _type_ok(value, default):
            allowed = rule.allowed if rule else _TYPE_NAMES[type(default)]
            raise RunConfigError(f"run config {key}={value!r}: expected {allowed}")
        if rule is not None and not rule.check(value):
            raise RunConfigError(f"run config {key}={value!r}: expected {rule.allowed}")
    config = apply_preset(config, defaults)
    if config.get("server-ema-warmup") and not config.get("server-ema"):
        raise RunConfigError(
            "run config server-ema-warmup=true: warms up the server EMA; set server-ema > 0"
        )
    if config.get("optimizer", "sgd") != "sgd" and config.get("momentum", 0):
        raise RunConfigError(
            f"run config momentum={config['momentum']!r}: SGD's; optimizer="
            f"{config['optimizer']!r} uses adam-beta1/adam-beta2 (set momentum=0)"
        )
    return config


def ignored_keys(config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Strategy options set away from their default that no strategy of the run reads
    (`proximal-mu` under FedAvg): worth a warning, not an error."""
    defaults = app_defaults() if defaults is None else defaults
    names = [name.strip() for name in str(config["strategy"]).split(",")]
    accepted = set().union(*(server_options(name) for name in names))
    return [
        key
        for key, option in STRATEGY_OPTIONS.items()
        if option not in accepted and config.get(key, defaults.get(key)) != defaults.get(key)
    ]
