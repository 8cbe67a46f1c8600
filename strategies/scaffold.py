"""SCAFFOLD (Karimireddy et al., 2020), option-II control variates as mean local gradients.

Records: the server sends "arrays" (global model x), "config" (with "algorithm" = "scaffold")
and "server-control" (ArrayRecord: the server control variate c, one array per trainable
parameter; empty in the first round, meaning zeros). A client replies with "arrays" (its local
model y_i), "control-delta" (ArrayRecord: c_i+ - c_i) and one MetricRecord with "num-examples".
The client keeps c_i across rounds in its persistent state under "scaffold-control".

Client, per round: K local steps on the corrected gradient g(y) - c_i + c, then c_i+ = the mean
of the K raw gradients g(y). Under plain SGD without weight decay that is exactly option II's
c_i - c + (x - y_i) / (K lr). Under momentum (beta) the displacement x - y_i grows to about
K lr g / (1 - beta), so option II's formula inflates c_i tenfold at beta = 0.9 (SCAFFOLD then
diverged on the FL-PSG grid); the mean gradient stays a gradient estimate.

Server: x <- x + server_lr * mean_w(y_i - x) with the mean
weighted by "num-examples" (server_lr = 1 and c = 0 give FedAvg), and
c <- c + (|S| / N) * mean(c_i+ - c_i), an unweighted mean over the |S| clients whose replies
were usable, N = all connected nodes; so c stays the mean of all N clients' c_i under partial
participation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from .base import ArrayDict, ClientHalf, Closure, StackedClosure, StackedParams
from .server import ServerHalf, to_record, to_views, weighted_mean

SERVER_CONTROL = "server-control"
CONTROL_DELTA = "control-delta"
CLIENT_CONTROL = "scaffold-control"


class Scaffold(ServerHalf):
    """SCAFFOLD's server half: keeps the control variate c and applies a server learning rate.

    Parameters
    ----------
    server_lr : float
        Global step size eta_g on the mean model update.
    **kwargs
        As `strategies.server.ServerHalf`.
    """

    algorithm = "scaffold"
    reply_records = (CONTROL_DELTA,)

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr
        self.control: ArrayDict = {}
        self.num_nodes = 0

    def train_config(self) -> dict[str, bool | int | float | str]:
        """Algorithm name and "server-lr" (informational for clients)."""
        return {**super().train_config(), "server-lr": float(self.server_lr)}

    def state_arrays(self) -> dict[str, ArrayDict]:
        """The server control variate c."""
        return {"control": self.control}

    def load_state_arrays(self, groups: Mapping[str, ArrayDict]) -> None:
        """Restore c."""
        self.control = dict(groups.get("control", {}))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages plus "server-control"; remembers N for partial participation."""
        self.num_nodes = len(list(grid.get_node_ids()))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = to_record(self.control)
        for message in messages:
            message.content[SERVER_CONTROL] = control
        return messages

    def _reply_problem(self, msg: Message) -> str | None:
        """FedAvg's checks, plus: each control delta names a model array of the same shape."""
        problem = super()._reply_problem(msg)
        if problem is not None:
            return problem
        for key, array in msg.content[CONTROL_DELTA].items():
            if key not in self.global_arrays:
                return f"'{CONTROL_DELTA}'['{key}'] is not an array of the model"
            if tuple(array.shape) != self.global_arrays[key].shape:
                return f"'{CONTROL_DELTA}'['{key}'] has shape {tuple(array.shape)}"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """x += server_lr * weighted mean(y_i - x); c += |S|/N * mean(delta c_i)."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        contents = [msg.content for msg in valid]
        if not contents:
            return None, None
        weights = [
            float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents
        ]
        x = self.global_arrays
        mean_y = weighted_mean([to_views(c[self.arrayrecord_key]) for c in contents], weights, x)
        new_x = {
            k: (v + self.server_lr * (mean_y[k].astype(np.float64) - v)).astype(v.dtype)
            if v.dtype.kind == "f"
            else mean_y[k]
            for k, v in x.items()
        }
        # A parameter a client did not train has no control delta from it: it counts as zero.
        deltas = [to_views(c[CONTROL_DELTA]) for c in contents]
        keys = dict.fromkeys([*self.control, *(k for d in deltas for k in d)])
        share = len(contents) / max(self.num_nodes, len(contents))
        mean_delta = weighted_mean(deltas, [1.0] * len(deltas), {k: x[k] for k in keys})
        self.control = {
            k: (self.control[k] + share * d).astype(d.dtype) if k in self.control else share * d
            for k, d in mean_delta.items()
        }
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return to_record(new_x), metrics


class ScaffoldClient(ClientHalf):
    """Local SGD on gradients corrected by c - c_i; returns c_i+ - c_i under "control-delta"."""

    name = "scaffold"

    def begin(
        self, model: nn.Module, incoming: Mapping[str, ArrayDict], state: dict[str, ArrayDict]
    ) -> torch.optim.Optimizer:
        """Read c (incoming) and c_i (state); zeros where absent."""
        server = incoming.get(SERVER_CONTROL, {})
        own = state.get(CLIENT_CONTROL, {})
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def tensor(arrays: ArrayDict, name: str, like: torch.Tensor) -> torch.Tensor:
            if name not in arrays:
                return torch.zeros_like(like)
            return torch.as_tensor(arrays[name]).to(like)

        self._c = {n: tensor(server, n, p) for n, p in self._params}
        self._ci = {n: tensor(own, n, p) for n, p in self._params}
        self._correction = [(p, self._c[n] - self._ci[n]) for n, p in self._params]
        self._grad_sum = {n: torch.zeros_like(p) for n, p in self._params}
        return super().begin(model, incoming, state)

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, closure: Closure
    ) -> torch.Tensor:
        """Optimizer step on g - c_i + c; sums the raw g for c_i+."""
        loss = closure()
        with torch.no_grad():
            for (n, p), (_, correction) in zip(self._params, self._correction, strict=True):
                if p.grad is not None:
                    self._grad_sum[n].add_(p.grad)
                    p.grad.add_(correction)
        optimizer.step()
        self.num_steps += 1
        return loss

    def end(self, model: nn.Module, state: dict[str, ArrayDict]) -> dict[str, ArrayDict]:
        """c_i+ = mean raw gradient over the K steps; keep it in `state`, send c_i+ - c_i."""
        new, delta = {}, {}
        for n, _ in self._params:
            updated = self._grad_sum[n] / self.num_steps if self.num_steps else self._ci[n]
            new[n] = updated.cpu().numpy()
            delta[n] = (updated - self._ci[n]).cpu().numpy()
        state[CLIENT_CONTROL] = new
        return {CONTROL_DELTA: delta}

    def begin_stacked(
        self,
        stack: StackedParams,
        incoming: Sequence[Mapping[str, ArrayDict]],
        states: Sequence[dict[str, ArrayDict]],
    ) -> torch.optim.Optimizer:
        """Stack c (each client's incoming) and the c_i (each client's state)."""
        c = stack.row_stack([i.get(SERVER_CONTROL, {}) for i in incoming])
        self._stacked_ci = stack.row_stack([s.get(CLIENT_CONTROL, {}) for s in states])
        self._stacked_correction = [a - b for a, b in zip(c, self._stacked_ci, strict=True)]
        self._stacked_grad_sum = [torch.zeros_like(p) for p in stack.tensors]
        return super().begin_stacked(stack, incoming, states)

    def step_stacked(
        self, stack: StackedParams, optimizer: torch.optim.Optimizer, closure: StackedClosure
    ) -> torch.Tensor:
        """As `step`, row by row."""
        loss = closure()
        with torch.no_grad():
            grads = [p.grad for p in stack.tensors]
            torch._foreach_add_(self._stacked_grad_sum, grads)
            torch._foreach_add_(grads, self._stacked_correction)
        optimizer.step()
        return loss

    def stacked_state(self) -> list[torch.Tensor]:
        """The running sums of raw gradients."""
        return self._stacked_grad_sum

    def end_stacked(
        self, stack: StackedParams, states: Sequence[dict[str, ArrayDict]], steps: list[int]
    ) -> list[dict[str, ArrayDict]]:
        """As `end` for every client k, over its own `steps[k]`."""
        outgoing = []
        sums, olds = stack.rows(self._stacked_grad_sum), stack.rows(self._stacked_ci)
        for state, grad_sum, old, k in zip(states, sums, olds, steps, strict=True):
            new = {n: (g / k).astype(g.dtype) if k else old[n] for n, g in grad_sum.items()}
            state[CLIENT_CONTROL] = new
            outgoing.append({CONTROL_DELTA: {n: new[n] - old[n] for n in new}})
        return outgoing
