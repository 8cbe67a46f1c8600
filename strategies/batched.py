"""Client-batched local training: a round's K clients, whose models share one shape, train
together on one device as one stack of parameters.

`train_local_stacked` returns, per client, what `strategies.base.train_local` returns for
that client alone (within floating-point tolerance), and leaves each model holding that
client's trained weights. The clients' parameters are stacked along a leading client
dimension; `torch.func.vmap` over `functional_call` runs every client's forward pass with its
own slice, so one kernel serves K clients, and a single backward pass of the summed losses
fills every client's gradient (the clients share no parameters). The algorithm's client half
works on the stack through its `*_stacked` hooks, row by row as its per-client hooks do
(FedProx's proximal term per client, FedSAM's per-client gradient norm with both passes on
the same batch, SCAFFOLD's per-client control variates). On a CUDA device the full-width
forward and backward can be captured once per round as a CUDA graph (`cuda_graph=True`) and
replayed each step, which removes the kernel-launch cost that bounds a small model's step.

Each client keeps its own batch iterable, so its shuffles, noise and timesteps are exactly
those of its per-client run. Clients may hold different numbers of batches and a last batch
of another size: a step groups the clients by batch shape, and a client without a batch sits
the step out (its parameters, optimizer state and the half's state come out unchanged).

The local optimizer is the half's own (`strategies.stacked_optim`): SGD over the stack, or
Adam/AdamW with one step count per client row, so a client that sat steps out keeps its own
bias correction. With `optimizer-state = keep` each client's stored state is loaded into its
row at the start and written back at the end, in the per-client groups, so a client can
alternate between batched and per-client rounds.

Dropout. A model with a dropout layer of p > 0 runs under `vmap(randomness="different")`:
every client row draws its own masks, from the global generator's stream but not in the
order of its per-client run, so with dropout the engine equals `train_local` in distribution,
not sample for sample (FedSAM's two passes still share their masks). Without such a layer vmap
keeps `randomness="error"`, which refuses a loss that draws its own noise inside the model
call: the exact per-client equality holds, and nothing can silently break it. Under a CUDA
graph the masks stay fresh on every replay: the default CUDA generator registers with the
graph and advances its Philox offset at each replay.

Limits: models must have no buffers (no BatchNorm: batch statistics would mix nothing here,
but in-place buffer updates cannot run under vmap); randomness in the forward pass only
through dropout layers (see above); every client uses one algorithm with one set of
hyperparameters; a batch is a tensor or a tuple / NamedTuple of tensors; the loss may only
call the model. Attention runs on PyTorch's math kernel (the fused kernels have no vmap rule).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import ArrayDict, ClientHalf, StackedParams

LossFn = Callable[[Any, Any], torch.Tensor]


class _OneClient:
    """Stands in for the model inside vmap: calls the shared module with one client's
    parameters, optionally cast to a compute dtype (bf16) with fp32 master weights."""

    def __init__(
        self, module: nn.Module, params: dict[str, torch.Tensor], dtype: torch.dtype | None
    ) -> None:
        self.module, self.params, self.dtype = module, params, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        params, dtype = self.params, self.dtype
        if dtype is not None:
            params = {n: p.to(dtype) for n, p in params.items()}
            args = tuple(a.to(dtype) if _is_float(a) else a for a in args)
        return functional_call(self.module, params, args, kwargs)


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _stack_batches(batches: Sequence[Any]) -> Any:
    """K per-client batches as one batch with a leading client dimension."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(batches)
    if isinstance(first, tuple):
        return _rebuild(first, [torch.stack(column) for column in zip(*batches, strict=True)])
    raise TypeError(
        f"batched training needs batches that are tensors or tuples of tensors, "
        f"got {type(first).__name__}"
    )


def _rebuild(like: tuple, fields: list[torch.Tensor]) -> tuple:
    """A tuple (or NamedTuple) of `like`'s type holding `fields`."""
    return type(like)(*fields) if hasattr(like, "_fields") else tuple(fields)


def _shape_key(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape),)
    return tuple(tuple(t.shape) for t in batch)


def _leaves(batch: Any) -> list[torch.Tensor]:
    return [batch] if isinstance(batch, torch.Tensor) else list(batch)


def _hyperparameters(half: ClientHalf) -> tuple:
    public = {k: v for k, v in vars(half).items() if not k.startswith("_") and k != "num_steps"}
    return type(half), tuple(sorted(public.items()))


class _StackedModel:
    """The K models as stacked parameters and a parameter-free module to run them through."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        first = models[0]
        for name, _ in first.named_buffers():
            raise ValueError(
                f"batched training needs buffer-free models; {type(first).__name__} has "
                f"buffer {name!r} (train these clients one by one)"
            )
        shapes = [(n, p.shape) for n, p in first.named_parameters()]
        for k, model in enumerate(models[1:], 1):
            if [(n, p.shape) for n, p in model.named_parameters()] != shapes:
                raise ValueError(f"batched training: model {k} differs in shape from model 0")
        names = [n for n, _ in shapes]
        owned = [dict(m.named_parameters()) for m in models]
        self.all = {}
        for name in names:
            stacked = torch.stack([o[name].detach() for o in owned]).clone()
            self.all[name] = stacked.requires_grad_(owned[0][name].requires_grad)
        trainable = [n for n in names if self.all[n].requires_grad]
        self.stack = StackedParams(trainable, [self.all[n] for n in trainable])
        self.models = models
        self.module = copy.deepcopy(first).to("meta").train()
        dropout = any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in self.module.modules()
        )
        self.randomness = "different" if dropout else "error"

    def losses(
        self,
        loss_fn: LossFn,
        batch: Any,
        index: torch.Tensor | None,
        dtype: torch.dtype | None,
    ) -> torch.Tensor:
        """The (len(index),) losses of the clients `index` (all when None) on `batch`."""
        params = self.all
        if index is not None:
            params = {n: p.index_select(0, index) for n, p in params.items()}

        def one(p: dict[str, torch.Tensor], b: Any) -> torch.Tensor:
            return loss_fn(_OneClient(self.module, p, dtype), b)

        with sdpa_kernel(SDPBackend.MATH):
            return vmap(one, randomness=self.randomness)(params, batch)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each client's row into its own model."""
        for k, model in enumerate(self.models):
            for name, p in model.named_parameters():
                p.copy_(self.all[name][k])


class _GraphedStep:
    """A CUDA graph of one full-width forward and backward (all K clients, one batch shape):
    the batch is copied into static buffers, the graph replays, the gradients land in the
    same tensors every time."""

    def __init__(self, run: Callable[[Any], torch.Tensor], params: list[torch.Tensor], batch: Any):
        self.params = params
        leaves = [t.clone() for t in _leaves(batch)]
        self.static = leaves[0] if isinstance(batch, torch.Tensor) else _rebuild(batch, leaves)
        # torch.cuda.graph() would synchronize, collect garbage and empty the cache for
        # every capture; with a graph per client that dominates a round, so capture by hand.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._clear()
            run(self.static)  # warm-up: cuDNN plans, lazily moved constants
            self._clear()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread (the other GPU's stack) may capture at the same time
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.loss = run(self.static)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        self.grads = [p.grad for p in params]

    def fits(self, batch: Any) -> bool:
        """Whether `batch` has the captured shapes."""
        return _shape_key(batch) == _shape_key(self.static)

    def _clear(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, batch: Any) -> torch.Tensor:
        torch._foreach_copy_(_leaves(self.static), _leaves(batch))
        self.graph.replay()
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        return self.loss


def train_local_stacked(
    models: Sequence[nn.Module],
    batches: Sequence[Iterable[Any]],
    loss_fn: LossFn,
    halves: Sequence[ClientHalf],
    incoming: Sequence[Mapping[str, ArrayDict]] | None = None,
    states: Sequence[dict[str, ArrayDict]] | None = None,
    epochs: int = 1,
    *,
    compute_dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
    clients_per_stack: int | None = None,
    streams: int = 1,
) -> list[tuple[float, dict[str, ArrayDict]]]:
    """`train_local` for K clients at once; returns each client's (mean loss, outgoing).

    `models[k]` (all on one device, same shapes) trains on `batches[k]` with `halves[k]`
    (all one algorithm with one set of hyperparameters), `incoming[k]` and `states[k]`;
    each model ends holding its client's weights. `compute_dtype=torch.bfloat16` runs the
    forward and backward passes in bf16 on fp32 master weights; `cuda_graph` replays the
    full-width step from a CUDA graph (CUDA devices only). `clients_per_stack` splits the
    clients into stacks of that many (default: one stack), which advance step by step in
    turn, spread over `streams` CUDA streams so that their kernels overlap.
    """
    num = len(models)
    if not num or not len(batches) == len(halves) == num:
        raise ValueError("batched training needs one batch iterable and one half per model")
    if len({_hyperparameters(h) for h in halves}) > 1:
        raise ValueError("batched training needs every client on one algorithm and setting")
    device = next(models[0].parameters()).device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs the models on a CUDA device, not {device}")
    incoming = [{} for _ in models] if incoming is None else list(incoming)
    states = [{} for _ in models] if states is None else list(states)
    size = clients_per_stack or num
    chunks = [slice(a, min(a + size, num)) for a in range(0, num, size)]
    runs = [
        _train_stack(
            models[c],
            batches[c],
            loss_fn,
            copy.copy(halves[c.start]),
            incoming[c],
            states[c],
            epochs,
            compute_dtype,
            cuda_graph,
        )  # fmt: skip
        for c in chunks
    ]
    lanes: list[Any] = [None]
    if device.type == "cuda" and streams > 1:
        lanes = [torch.cuda.Stream(device) for _ in range(min(streams, len(chunks)))]
        for lane in lanes:
            lane.wait_stream(torch.cuda.current_stream(device))
    results: list[list[tuple[float, dict[str, ArrayDict]]]] = [[] for _ in chunks]
    pending = list(range(len(chunks)))
    while pending:
        for i in list(pending):
            lane = lanes[i % len(lanes)]
            with torch.cuda.stream(lane) if lane is not None else nullcontext():
                try:
                    next(runs[i])
                except StopIteration as done:
                    results[i] = done.value
                    pending.remove(i)
    for lane in lanes:
        if lane is not None:
            torch.cuda.current_stream(device).wait_stream(lane)
    return [r for chunk in results for r in chunk]


def _train_stack(
    models: Sequence[nn.Module],
    batches: Sequence[Iterable[Any]],
    loss_fn: LossFn,
    half: ClientHalf,
    incoming: Sequence[Mapping[str, ArrayDict]],
    states: Sequence[dict[str, ArrayDict]],
    epochs: int,
    compute_dtype: torch.dtype | None,
    cuda_graph: bool,
) -> Generator[None, None, list[tuple[float, dict[str, ArrayDict]]]]:
    """One stack's local training, yielding after every step; returns its clients'
    (mean loss, outgoing)."""
    num = len(models)
    stacked = _StackedModel(models)
    stack = stacked.stack
    device = stack.tensors[0].device
    optimizer = half.begin_stacked(stack, incoming, states)
    everyone = torch.ones(num, dtype=torch.bool, device=device)
    total = torch.zeros(num, dtype=torch.float64, device=device)  # as train_local's float sum
    steps = [0] * num
    graphed: _GraphedStep | None = None

    def full_width(batch: Any) -> torch.Tensor:
        for p in stack.tensors:
            p.grad = None
        loss = stacked.losses(loss_fn, batch, None, compute_dtype)
        extra = half.loss_term_stacked(stack)
        if extra is not None:
            loss = loss + extra
        loss.sum().backward()
        return loss.detach()

    for _ in range(epochs):
        for step in _lockstep([iter(b) for b in batches]):
            active = [k for k, b in enumerate(step) if b is not None]
            groups: dict[tuple, list[int]] = {}
            for k in active:
                groups.setdefault(_shape_key(step[k]), []).append(k)
            if len(active) == num and len(groups) == 1:
                batch = _stack_batches(step)
                if cuda_graph and graphed is None:
                    graphed = _GraphedStep(full_width, stack.tensors, batch)
                # the graph holds the first batch shape; another (a last batch) runs eagerly
                run = graphed if graphed is not None and graphed.fits(batch) else full_width
                loss = half.step_stacked(stack, optimizer, lambda b=batch, r=run: r(b))
                mask = everyone
            else:
                mask = torch.zeros(num, dtype=torch.bool, device=device)
                mask[active] = True
                loss = _masked_step(stacked, half, optimizer, loss_fn, step, groups, mask,
                                    compute_dtype)  # fmt: skip
            total += torch.where(mask, loss, 0.0)
            for k in active:
                steps[k] += 1
            yield
    stacked.write_back()
    half.save_optimizer_state_stacked(stack, optimizer, states, steps)
    outgoing = half.end_stacked(stack, states, steps)
    means = (total.cpu() / torch.tensor([max(s, 1) for s in steps])).tolist()
    return list(zip(means, outgoing, strict=True))


def _lockstep(iterators: list[Iterator[Any]]) -> Iterator[list[Any]]:
    """Step by step, each client's next batch (None once its iterable is exhausted)."""
    done = [False] * len(iterators)
    while True:
        step = []
        for k, it in enumerate(iterators):
            batch = None if done[k] else next(it, None)
            done[k] = batch is None
            step.append(batch)
        if all(done):
            return
        yield step


def _masked_step(
    stacked: _StackedModel,
    half: ClientHalf,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    step: list[Any],
    groups: dict[tuple, list[int]],
    mask: torch.Tensor,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """A step in which some clients have no batch or batches differ in shape: one vmap per
    shape group, and the rows of clients without a batch restored afterwards."""
    stack = stacked.stack
    device = stack.tensors[0].device
    index = {key: torch.tensor(ks, device=device) for key, ks in groups.items()}

    def closure() -> torch.Tensor:
        for p in stack.tensors:
            p.grad = None
        loss: torch.Tensor | None = None
        for key, ks in groups.items():
            part = stacked.losses(loss_fn, _stack_batches([step[k] for k in ks]), index[key], dtype)
            if loss is None:
                loss = part.new_zeros(stack.num_clients)  # in the loss's dtype
            loss = loss.index_add(0, index[key], part)
        extra = half.loss_term_stacked(stack)
        if extra is not None:
            loss = loss + extra
        loss.sum().backward()
        return loss.detach()

    def kept() -> list[torch.Tensor]:
        state = [t for s in optimizer.state.values() for t in s.values()]
        tensors = [*stack.tensors, *state, *half.stacked_state()]
        return [
            t for t in tensors if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == len(mask)
        ]

    before = {id(t): (t, t.detach().clone()) for t in kept()}
    loss = half.step_stacked(stack, optimizer, closure)
    with torch.no_grad():
        for t, old in before.values():
            t.copy_(torch.where(mask.view(-1, *([1] * (t.ndim - 1))), t, old))
    return loss
