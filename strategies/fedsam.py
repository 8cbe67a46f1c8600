"""FedSAM (Qu et al., 2022; Caldarola et al., 2022): SAM or ASAM as each client's local optimizer.

Records: as FedAvg, and the train config carries "rho" (float, the SAM radius) and "adaptive"
(bool, ASAM of Kwon et al., 2021). The server aggregates like FedAvg.

The step is pytorch-optimizer's `SAM` (first_step / second_step) wrapped around the client
half's own base optimizer (SGD, Adam or AdamW, as in the paper: the ascent uses the raw
gradient, the descent is the base optimizer's step with the gradient found at w + e(w)), driven
so that the known traps are handled:

- the second pass reuses the batch through the closure (same inputs, same diffusion noise and
  timesteps, drawn in the batch) and, by restoring the RNG state, the same dropout masks;
- normalisation layers keep the running statistics of the first pass only: their buffers are
  restored after the second pass, which covers running means/variances *and*
  `num_batches_tracked` of BatchNorm and InstanceNorm (pytorch-optimizer's
  `disable_running_stats` only zeroes BatchNorm's momentum, so `num_batches_tracked` would
  count every step twice and rho = 0 would not reproduce FedAvg);
- precision: parameters must be fp32 (or fp64) master weights, so the perturbation, its norm
  and the restore are exact fp32 arithmetic; run bf16 compute with `torch.autocast` inside the
  loss. fp16 autocast needs a GradScaler, which `train_local` does not use: use bf16.

With rho = 0 the perturbation is exactly zero and the update equals FedAvg's bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from pytorch_optimizer import SAM
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .base import (
    ArrayDict,
    ClientHalf,
    Closure,
    StackedClosure,
    StackedParams,
    config_value,
)
from .server import ServerHalf
from .stacked_optim import per_client

#: pytorch-optimizer SAM's default `perturb_eps`, added to the gradient norm.
SAM_EPS = 1e-12


class FedSAM(ServerHalf):
    """FedSAM's server half: FedAvg that sends the SAM radius and flavour to the clients.

    Parameters
    ----------
    rho : float
        SAM neighbourhood radius (0 gives FedAvg).
    adaptive : bool
        Use ASAM (perturbation scaled by |w|) instead of SAM.
    **kwargs
        As `strategies.server.ServerHalf`.
    """

    algorithm = "fedsam"

    def __init__(self, *, rho: float = 0.05, adaptive: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.rho = rho
        self.adaptive = adaptive

    def train_config(self) -> dict[str, bool | int | float | str]:
        """Algorithm name, "rho" and "adaptive"."""
        return {**super().train_config(), "rho": float(self.rho), "adaptive": bool(self.adaptive)}


@contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Inside the block, normalisation layers (BatchNorm, InstanceNorm) normalise as in training
    but their running statistics and counters come out unchanged."""
    saved = [
        (buffer, buffer.clone())
        for module in model.modules()
        if isinstance(module, _NormBase)
        for buffer in module.buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _rng_states(params: Iterable[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    on_cuda = any(p.is_cuda for p in params)
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if on_cuda else None)


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class FedSAMClient(ClientHalf):
    """SAM/ASAM local steps: ascend to w + e(w) on the batch, take the SGD step from w with
    the gradient found there."""

    name = "fedsam"

    def __init__(
        self,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        rho: float = 0.05,
        adaptive: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(lr, momentum, weight_decay, **options)
        self.rho = rho
        self.adaptive = adaptive

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, bool | int | float | str],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> FedSAMClient:
        """Read "rho" and "adaptive" from the train config."""
        return cls(
            lr,
            momentum=momentum,
            weight_decay=weight_decay,
            rho=config_value(config, "rho", float, cls.name),
            adaptive=config_value(config, "adaptive", bool, cls.name),
            **options,
        )

    def begin(
        self, model: nn.Module, incoming: Mapping[str, ArrayDict], state: dict[str, ArrayDict]
    ) -> torch.optim.Optimizer:
        """pytorch-optimizer's SAM around this half's base optimizer (with last round's
        state when kept)."""
        self.num_steps = 0
        for name, p in model.named_parameters():
            if p.requires_grad and p.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"fedsam: parameter {name!r} is {p.dtype}; SAM needs fp32 master weights "
                    "(use torch.autocast(dtype=torch.bfloat16) inside the loss for bf16)"
                )
        base, options = self.optimizer_class()
        optimizer = SAM(
            [p for p in model.parameters() if p.requires_grad],
            base,
            perturb_eps=SAM_EPS,
            rho=self.rho,
            adaptive=self.adaptive,
            **options,
        )
        self.load_optimizer_state(model, optimizer, state)
        return optimizer

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, closure: Closure
    ) -> torch.Tensor:
        """Two passes over the same batch; returns the loss at the unperturbed weights."""
        rng = _rng_states(model.parameters())
        loss = closure()
        optimizer.first_step(zero_grad=True)
        _set_rng_states(rng)
        with frozen_norm_statistics(model):
            closure()
        optimizer.second_step(zero_grad=False)
        self.num_steps += 1
        return loss

    def begin_stacked(
        self,
        stack: StackedParams,
        incoming: Sequence[Mapping[str, ArrayDict]],
        states: Sequence[dict[str, ArrayDict]],
    ) -> torch.optim.Optimizer:
        """The base optimizer over the stacked tensors; the SAM step is `step_stacked`'s."""
        for name, p in zip(stack.names, stack.tensors, strict=True):
            if p.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"fedsam: parameter {name!r} is {p.dtype}; SAM needs fp32")
        return super().begin_stacked(stack, incoming, states)

    def step_stacked(
        self, stack: StackedParams, optimizer: torch.optim.Optimizer, closure: StackedClosure
    ) -> torch.Tensor:
        """pytorch-optimizer's SAM step (e = rho g / (||g|| + 1e-12), |w|-scaled for ASAM),
        with each client's gradient norm taken over its own row; as in `step`, the second
        pass replays the first's RNG state, so dropout draws the same masks."""
        params = stack.tensors
        rng = _rng_states(params)
        loss = closure()
        with torch.no_grad():
            grads = [p.grad for p in params]
            weighted = grads
            if self.adaptive:
                weighted = torch._foreach_mul(grads, torch._foreach_abs(params))
            # pytorch-optimizer's arithmetic: per-tensor norms, squared and summed in float32
            norms = torch.stack([w.flatten(1).norm(dim=1) for w in weighted], dim=1)
            scale = self.rho / norms.float().square_().sum(1).sqrt_().add_(SAM_EPS)
            perturb = torch._foreach_mul(grads, [per_client(scale, p) for p in params])
            if self.adaptive:
                torch._foreach_mul_(perturb, torch._foreach_pow(params, 2))
            saved = [p.clone() for p in params]
            torch._foreach_add_(params, perturb)
        _set_rng_states(rng)
        closure()
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        optimizer.step()
        return loss
