"""The client-half contract every algorithm implements, and the one local-training loop.

A task's training code never branches on the algorithm: it builds batches and a loss, and
`train_local` calls the client half's hooks. The base class is plain local training, i.e.
FedAvg's client half; FedProx adds a loss term, FedSAM replaces the step, SCAFFOLD corrects
gradients and sends its control variate back. Nothing here imports flwr, so tasks run without
Flower.

The local optimizer is SGD (with momentum and weight decay), Adam or AdamW (`optimizer`), the
same for every algorithm: FedSAM wraps it, FedProx's term and SCAFFOLD's correction reach it
through the gradient. Its state (momentum buffer, Adam's moments and step count) starts afresh
every round unless `keep_optimizer_state`: then it is stored in the client's persistent state
(groups `<optimizer>-<key>`, one array per parameter name) and the next round continues from
it, so one client over many rounds trains exactly like one uninterrupted optimizer. The
client-batched path (`strategies.batched`) reads and writes the same groups, row by row, so a
client may alternate between batched and per-client rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .stacked_optim import stacked_optimizer

ArrayDict = dict[str, np.ndarray]
#: Local optimizers a client half can use (run config `optimizer`).
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
Closure = Callable[[], torch.Tensor]
StackedClosure = Callable[[], torch.Tensor]  # returns the (K,) per-client losses


def config_value(
    config: Mapping[str, bool | int | float | str], key: str, kind: type, algorithm: str
) -> Any:
    """`config[key]` as `kind`, or a clear error naming the algorithm and the missing field."""
    if key not in config:
        raise KeyError(f"{algorithm}: train config has no {key!r} (sent keys: {sorted(config)})")
    value = config[key]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind):
        raise TypeError(f"{algorithm}: train config {key!r} = {value!r}, expected {kind.__name__}")
    return value


def optimizer_options(config: Mapping[str, bool | int | float | str]) -> dict[str, Any]:
    """The local-optimizer keyword options of `ClientHalf` from run-config keys `optimizer`,
    `adam-beta1`, `adam-beta2`, `adam-eps` and `optimizer-state` (defaults where absent)."""
    state = str(config.get("optimizer-state", "reset"))
    if state not in ("reset", "keep"):
        raise ValueError(f"optimizer-state must be 'reset' or 'keep', got {state!r}")
    return {
        "optimizer": str(config.get("optimizer", "sgd")),
        "betas": (float(config.get("adam-beta1", 0.9)), float(config.get("adam-beta2", 0.999))),
        "eps": float(config.get("adam-eps", 1e-8)),
        "keep_optimizer_state": state == "keep",
    }


class ClientHalf:
    """Plain local training (FedAvg's client half), and the hooks other algorithms override.

    Parameters
    ----------
    lr : float
        Local learning rate.
    momentum : float
        SGD momentum (SGD only).
    weight_decay : float
        Weight decay: an L2 term in the gradient for SGD and Adam, decoupled for AdamW.
    optimizer : str
        "sgd", "adam" or "adamw" (torch.optim's).
    betas, eps : tuple[float, float], float
        Adam's moment decays and denominator epsilon (Adam and AdamW only).
    keep_optimizer_state : bool
        Carry the optimizer state from round to round in the client's state (see the module
        docstring); False starts each round with a fresh optimizer.
    """

    name = "fedavg"

    def __init__(
        self,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        optimizer: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        keep_optimizer_state: bool = False,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if optimizer != "sgd" and momentum:
            raise ValueError(f"momentum={momentum} is SGD's; {optimizer} uses betas={betas}")
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.keep_optimizer_state = keep_optimizer_state
        self.num_steps = 0

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, bool | int | float | str],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> ClientHalf:
        """Build this client half from the train ConfigRecord its server half wrote;
        `options` are the local optimizer's (`optimizer_options`)."""
        return cls(lr, momentum=momentum, weight_decay=weight_decay, **options)

    def optimizer_class(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The torch optimizer class and its keyword arguments (SAM wraps the same pair)."""
        if self.optimizer == "sgd":
            options = {"momentum": self.momentum}
            cls: type[torch.optim.Optimizer] = torch.optim.SGD
        else:
            options = {"betas": self.betas, "eps": self.eps}
            cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls, {"lr": self.lr, "weight_decay": self.weight_decay, **options}

    def begin(
        self,
        model: nn.Module,
        incoming: Mapping[str, ArrayDict],
        state: dict[str, ArrayDict],
    ) -> torch.optim.Optimizer:
        """Start a round: `model` holds the global weights; return the local optimizer
        (with last round's state when kept).

        `incoming` holds the extra ArrayRecords the server sent (e.g. SCAFFOLD's `c`),
        `state` is this client's persistent state (kept by the app across rounds).
        """
        self.num_steps = 0
        cls, options = self.optimizer_class()
        optimizer = cls([p for p in model.parameters() if p.requires_grad], **options)
        self.load_optimizer_state(model, optimizer, state)
        return optimizer

    def _state_prefix(self) -> str:
        return f"{self.optimizer}-"

    def save_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, ArrayDict]
    ) -> None:
        """With `keep_optimizer_state`, write the optimizer's per-parameter state into
        `state` as groups `<optimizer>-<key>` keyed by parameter name (SAM: its base's)."""
        if not self.keep_optimizer_state:
            return
        inner = getattr(optimizer, "base_optimizer", optimizer)
        groups: dict[str, ArrayDict] = {}
        for name, p in model.named_parameters():
            for key, value in inner.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key != "old_p":
                    array = value.detach().cpu().numpy()
                    groups.setdefault(self._state_prefix() + key, {})[name] = array
        state.update(groups)

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, ArrayDict]
    ) -> None:
        """With `keep_optimizer_state`, give `optimizer` (SAM: its base) the state that
        `save_optimizer_state` stored; nothing when there is none yet (the first round)."""
        groups = self._stored_optimizer_state(state)
        if not groups:
            return
        inner = getattr(optimizer, "base_optimizer", optimizer)
        packed = inner.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in inner.param_groups for p in g["params"])}
        packed["state"] = {
            index[id(p)]: {key: self._stored_row(groups, key, name, p.shape) for key in groups}
            for name, p in model.named_parameters()
            if id(p) in index
        }
        inner.load_state_dict(packed)

    def _stored_optimizer_state(self, state: Mapping[str, ArrayDict]) -> dict[str, ArrayDict]:
        """The kept optimizer state's groups by state key (`step`, `exp_avg`, ...): empty
        when the state is not kept or there is none yet."""
        if not self.keep_optimizer_state:
            return {}
        prefix = self._state_prefix()
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    def _stored_row(
        self, groups: Mapping[str, ArrayDict], key: str, name: str, shape: torch.Size
    ) -> torch.Tensor:
        """One parameter's stored `key` state, checked against the parameter's `shape`."""
        prefix = self._state_prefix()
        if name not in groups[key]:
            raise ValueError(f"{self.name}: kept optimizer state {prefix}{key} has no {name!r}")
        value = torch.as_tensor(np.array(groups[key][name]))
        if key != "step" and tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{self.name}: kept optimizer state {prefix}{key}[{name!r}] has shape "
                f"{tuple(value.shape)}, the parameter {tuple(shape)}"
            )
        return value

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term added to the task loss (FedProx's proximal term); None for none."""
        return None

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, closure: Closure
    ) -> torch.Tensor:
        """One local optimizer step on one batch; `closure` zeroes grads, runs forward and
        backward on the *same* batch (same noise, same timesteps) each time it is called,
        and returns the loss."""
        loss = closure()
        optimizer.step()
        self.num_steps += 1
        return loss

    def end(self, model: nn.Module, state: dict[str, ArrayDict]) -> dict[str, ArrayDict]:
        """Finish a round: update `state`, return extra ArrayRecords to send to the server."""
        return {}

    # Client-batched training (`strategies.batched`): one half drives K clients whose
    # parameters are stacked along a leading client dimension. Each hook does, per client
    # row, what its per-client twin above does; `StackedParams` names the rows.

    def begin_stacked(
        self,
        stack: StackedParams,
        incoming: Sequence[Mapping[str, ArrayDict]],
        states: Sequence[dict[str, ArrayDict]],
    ) -> torch.optim.Optimizer:
        """`begin` for K clients: `optimizer_class`'s optimizer, one per client row
        (`strategies.stacked_optim`), holding each client's kept state."""
        cls, options = self.optimizer_class()
        optimizer = stacked_optimizer(cls, stack.tensors, **options)
        self.load_optimizer_state_stacked(stack, optimizer, states)
        return optimizer

    def load_optimizer_state_stacked(
        self,
        stack: StackedParams,
        optimizer: torch.optim.Optimizer,
        states: Sequence[Mapping[str, ArrayDict]],
    ) -> None:
        """`load_optimizer_state` row by row: each client's stored state in its row, zeros
        (a fresh optimizer: Adam at step 0, SGD's first momentum step) for a client with none."""
        stored = [self._stored_optimizer_state(s) for s in states]
        keys = dict.fromkeys(key for groups in stored for key in groups)
        for name, p in zip(stack.names, stack.tensors, strict=True):
            entry = optimizer.state[p]
            for key in keys:
                like = entry.get(key, p)
                rows = [
                    self._stored_row(groups, key, name, p.shape[1:]).to(like.dtype)
                    if key in groups
                    else torch.zeros(like.shape[1:], dtype=like.dtype)
                    for groups in stored
                ]
                entry[key] = torch.stack(rows).to(like.device)

    def save_optimizer_state_stacked(
        self,
        stack: StackedParams,
        optimizer: torch.optim.Optimizer,
        states: Sequence[dict[str, ArrayDict]],
        steps: Sequence[int],
    ) -> None:
        """`save_optimizer_state` row by row; a client that took no step keeps what it had,
        as a per-client run without a batch does."""
        if not self.keep_optimizer_state:
            return
        groups: list[dict[str, ArrayDict]] = [{} for _ in states]
        for name, p in zip(stack.names, stack.tensors, strict=True):
            for key, value in optimizer.state.get(p, {}).items():
                host = value.detach().cpu().numpy()
                for k, client in enumerate(groups):
                    client.setdefault(self._state_prefix() + key, {})[name] = np.array(host[k])
        for state, client, taken in zip(states, groups, steps, strict=True):
            if taken:
                state.update(client)

    def loss_term_stacked(self, stack: StackedParams) -> torch.Tensor | None:
        """`loss_term` per client: a (K,) tensor, or None for none."""
        return None

    def step_stacked(
        self, stack: StackedParams, optimizer: torch.optim.Optimizer, closure: StackedClosure
    ) -> torch.Tensor:
        """`step` for K clients; `closure` returns the (K,) losses and fills the stacked
        grads. Rows of clients without a batch this step are restored by the caller."""
        loss = closure()
        optimizer.step()
        return loss

    def stacked_state(self) -> list[torch.Tensor]:
        """Tensors with a leading client dimension, other than parameters and optimizer
        state, that `step_stacked` changes (restored for clients that sat a step out)."""
        return []

    def end_stacked(
        self, stack: StackedParams, states: Sequence[dict[str, ArrayDict]], steps: list[int]
    ) -> list[dict[str, ArrayDict]]:
        """`end` per client (`steps[k]`: client k's local steps); extra arrays to send."""
        return [{} for _ in states]


class StackedParams:
    """K same-shaped models' trainable parameters as leaf tensors with a leading client
    dimension (`tensors[i][k]` is parameter `names[i]` of client k)."""

    def __init__(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        self.names = names
        self.tensors = tensors

    @property
    def num_clients(self) -> int:
        """K."""
        return self.tensors[0].shape[0]

    def row_stack(self, arrays: Sequence[ArrayDict]) -> list[torch.Tensor]:
        """Per-client arrays keyed by parameter name as stacked tensors like `tensors`
        (zeros where a client has no array for a parameter)."""
        out = []
        for name, like in zip(self.names, self.tensors, strict=True):
            rows = [
                torch.as_tensor(a[name]).to(like) if name in a else torch.zeros_like(like[0])
                for a in arrays
            ]
            out.append(torch.stack(rows))
        return out

    def rows(self, tensors: Sequence[torch.Tensor]) -> list[ArrayDict]:
        """Stacked tensors like `tensors` as per-client arrays keyed by parameter name."""
        host = [t.detach().cpu().numpy() for t in tensors]
        return [
            {name: h[k] for name, h in zip(self.names, host, strict=True)}
            for k in range(self.num_clients)
        ]


def client_sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum over all elements of each client's row, over all stacked `tensors`: (K,)."""
    return sum(t.flatten(1).sum(1) for t in tensors)


def train_local(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    half: ClientHalf,
    incoming: Mapping[str, ArrayDict] | None = None,
    state: dict[str, ArrayDict] | None = None,
    epochs: int = 1,
) -> tuple[float, dict[str, ArrayDict]]:
    """Run `epochs` passes over `batches` (an iterable re-iterated each epoch) with `half`.

    Returns the mean training loss and the extra arrays the client half wants to send.
    Any randomness of the loss (diffusion timesteps and noise) must be drawn in the batch,
    not inside `loss_fn`, so that SAM's second pass sees the same draw.
    """
    state = {} if state is None else state
    model.train()
    optimizer = half.begin(model, incoming or {}, state)
    total, count = 0.0, 0
    for _ in range(epochs):
        for batch in batches:

            def closure(batch: Any = batch) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                extra = half.loss_term(model)
                if extra is not None:
                    loss = loss + extra
                loss.backward()
                return loss

            loss = half.step(model, optimizer, closure)
            total += float(loss.detach())
            count += 1
    half.save_optimizer_state(model, optimizer, state)
    outgoing = half.end(model, state)
    return total / max(count, 1), outgoing
