"""FedProx (Li et al., 2020): local loss plus the proximal term mu/2 ||w - w_global||^2.

Records: as FedAvg, and the train config carries "proximal-mu" (float). The server aggregates
like FedAvg; only the client's objective changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log
from torch import nn

from .base import ArrayDict, ClientHalf, StackedParams, client_sum, config_value
from .server import ServerHalf


class FedProx(ServerHalf):
    """FedProx's server half: FedAvg that sends "proximal-mu" to the clients.

    Parameters
    ----------
    proximal_mu : float
        Weight mu of the proximal term; 0 makes FedProx identical to FedAvg.
    **kwargs
        As `strategies.server.ServerHalf`.
    """

    algorithm = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        if proximal_mu == 0:
            log(WARNING, "FedProx with proximal_mu=0.0 is FedAvg")
        self.proximal_mu = proximal_mu

    def train_config(self) -> dict[str, bool | int | float | str]:
        """Algorithm name and "proximal-mu"."""
        return {**super().train_config(), "proximal-mu": float(self.proximal_mu)}


class FedProxClient(ClientHalf):
    """Local training on loss + mu/2 ||w - w_global||^2 over the trainable parameters."""

    name = "fedprox"

    def __init__(
        self,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        mu: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(lr, momentum, weight_decay, **options)
        self.mu = mu
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, bool | int | float | str],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> FedProxClient:
        """Read "proximal-mu" from the train config."""
        mu = config_value(config, "proximal-mu", float, cls.name)
        return cls(lr, momentum=momentum, weight_decay=weight_decay, mu=mu, **options)

    def begin(
        self, model: nn.Module, incoming: Mapping[str, ArrayDict], state: dict[str, ArrayDict]
    ) -> torch.optim.Optimizer:
        """Remember the global weights the proximal term pulls towards."""
        self._anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
        return super().begin(model, incoming, state)

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        """mu/2 * sum ||w - w_global||^2."""
        return 0.5 * self.mu * sum((p - g).pow(2).sum() for p, g in self._anchor)

    def begin_stacked(
        self,
        stack: StackedParams,
        incoming: Sequence[Mapping[str, ArrayDict]],
        states: Sequence[dict[str, ArrayDict]],
    ) -> torch.optim.Optimizer:
        """Remember every client's global weights."""
        self._stacked_anchor = [p.detach().clone() for p in stack.tensors]
        return super().begin_stacked(stack, incoming, states)

    def loss_term_stacked(self, stack: StackedParams) -> torch.Tensor:
        """mu/2 * sum ||w_k - w_global||^2 for each client k: (K,)."""
        gaps = (p - g for p, g in zip(stack.tensors, self._stacked_anchor, strict=True))
        return 0.5 * self.mu * client_sum(d.pow(2) for d in gaps)
