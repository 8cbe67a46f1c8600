"""Local optimizers for K clients whose parameters are stacked along a leading client dimension.

SGD (momentum, weight decay) is elementwise, so torch's own SGD over the stacked tensors is K
independent SGDs. Adam is not: torch keeps one step count per tensor, so its bias corrections
1 - beta^t would be shared by the K clients, and a client that sits a step out (fewer batches
than the others) would be corrected with the others' count. `StackedAdam` keeps the count per
client row, a (K,) tensor per parameter, so the batched engine restores a sat-out client's
count with the rest of its row; otherwise it is torch.optim.Adam's step (single-tensor form,
operation for operation), and AdamW's with `decoupled=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def per_client(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (K,) tensor shaped to broadcast over a stacked tensor `like` (K, ...)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class StackedAdam(torch.optim.Optimizer):
    """torch.optim.Adam (L2 weight decay in the gradient) or, with `decoupled`, AdamW for
    each client row of stacked parameters, each row with its own step count.

    The state is created at once (step 0, zero moments: a fresh Adam), so that it exists
    before the first step and the batched engine can restore the rows of clients without a
    batch. Keys and per-row values are torch's (`step`, `exp_avg`, `exp_avg_sq`), so a row is
    interchangeable with a per-client Adam's state.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
            "decoupled": decoupled,
        }  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {
                    "step": torch.zeros(p.shape[0], dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Adam step per client row (parameters without a gradient are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        if decay and group["decoupled"]:
            torch._foreach_mul_(params, 1 - lr * decay)
        elif decay:
            grads = torch._foreach_add(grads, params, alpha=decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        # torch computes the bias corrections in Python floats (double) and rounds them to
        # the parameter's dtype inside each kernel; so do these, per client.
        count = torch.stack(steps).double()

        def rows(values: torch.Tensor) -> list[torch.Tensor]:
            return [per_client(v, p) for v, p in zip(values, params, strict=True)]

        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, rows((1 - beta2**count) ** 0.5))
        torch._foreach_add_(denom, eps)
        update = torch._foreach_mul(exp_avgs, rows(-lr / (1 - beta1**count)))
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, update)


def stacked_optimizer(
    cls: type[torch.optim.Optimizer], params: list[torch.Tensor], **options: Any
) -> torch.optim.Optimizer:
    """The stacked twin of `cls(params, **options)` (a `ClientHalf.optimizer_class` pair):
    one independent optimizer per client row."""
    if cls is torch.optim.SGD:
        return cls(params, **options)
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        return StackedAdam(params, decoupled=cls is torch.optim.AdamW, **options)
    raise ValueError(f"batched client training has no stacked {cls.__name__}")
