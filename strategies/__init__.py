"""Federated algorithms, each a server half (a Flower Strategy) and a client half (local training).

Pick one by name: `server_strategy(name, **options)` on the ServerApp, and on the ClientApp
`client_half(msg.content["config"], lr=...)`, which reads the "algorithm" its server half wrote.
Algorithm modules import flwr and torch, so they load only when asked for.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from .base import ClientHalf, train_local

__all__ = [
    "ALGORITHMS",
    "ClientHalf",
    "client_half",
    "server_options",
    "server_strategy",
    "train_local",
]

# name -> (module, server half, client half)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "fedavg": ("strategies.fedavg", "FedAvg", "FedAvgClient"),
    "fedprox": ("strategies.fedprox", "FedProx", "FedProxClient"),
    "fedsam": ("strategies.fedsam", "FedSAM", "FedSAMClient"),
    "scaffold": ("strategies.scaffold", "Scaffold", "ScaffoldClient"),
}
ALGORITHMS: tuple[str, ...] = tuple(_REGISTRY)


def _load(name: str, part: int) -> Any:
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    module, *classes = _REGISTRY[name]
    return getattr(import_module(module), classes[part])


def __getattr__(name: str) -> Any:
    """`ClientHalf` and `train_local` load torch only when first used."""
    if name in ("ClientHalf", "train_local"):
        return getattr(import_module("strategies.base"), name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")


def _options(cls: type) -> set[str]:
    """Keyword arguments `cls(...)` accepts, following `**kwargs` up the class hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {
            p.name
            for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def server_options(name: str) -> set[str]:
    """The keyword options `server_strategy(name, ...)` accepts."""
    return _options(_load(name, 0))


def server_strategy(name: str, **kwargs: Any) -> Strategy:
    """The server half of algorithm `name`, configured by keyword options.

    Options: Flower FedAvg's (fraction_train, fraction_evaluate, min_train_nodes,
    min_evaluate_nodes, min_available_nodes, ...), the algorithm's hyperparameters
    (fedprox: proximal_mu; fedsam: rho, adaptive; scaffold: server_lr) and, for every
    algorithm, ema_decay, swa_start, checkpoint_dir and resume.
    """
    accepted = server_options(name)
    unknown = set(kwargs) - accepted
    if unknown:
        raise TypeError(
            f"{name}: unknown option(s) {', '.join(sorted(unknown))}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    return _load(name, 0)(**kwargs)


def client_half(
    config: Mapping[str, bool | int | float | str],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    **options: Any,
) -> ClientHalf:
    """The client half matching the train ConfigRecord a server half sent; `options` choose
    the local optimizer (`strategies.base.optimizer_options`)."""
    if "algorithm" not in config:
        raise KeyError(
            "train config has no 'algorithm': build the server half with "
            f"strategies.server_strategy (sent keys: {sorted(config)})"
        )
    cls = _load(str(config["algorithm"]), 1)
    return cls.from_config(config, lr, momentum=momentum, weight_decay=weight_decay, **options)
