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
of another size. When the loss has `per_sample(model, batch) -> (B,)` (the per-sample losses
whose mean is the loss) and the step's batches differ only in their number of samples, the
step stays one full-width vmap (on the CUDA graph, when there is one): every batch is padded to
one size by repeating a sample, and client k's loss is the sum of its per-sample losses
weighted 1 for its n_k real samples and 0 for padding, divided by n_k, so padding adds neither
loss nor gradient. Otherwise (no `per_sample`, or batches that differ beyond their size) the
step runs one vmap per batch shape. A client without a batch sits the step out: its
parameters, optimizer state and the half's state come out unchanged.

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
from functools import cache, partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import ArrayDict, ClientHalf, StackedParams

LossFn = Callable[[Any, Any], torch.Tensor]
# a step's share: its clients (None: all), their stacked batch, their sample weights or None
_Part = tuple[torch.Tensor | None, Any, torch.Tensor | None]


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


def _leaves(batch: Any) -> list[torch.Tensor]:
    """A batch's tensors (the batch itself, or its fields)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, tuple):
        return list(batch)
    raise TypeError(
        f"batched training needs batches that are tensors or tuples of tensors, "
        f"got {type(batch).__name__}"
    )


def _as_batch(like: Any, leaves: list[torch.Tensor]) -> Any:
    """`leaves` as a batch of `like`'s kind (a tensor, tuple or NamedTuple)."""
    if isinstance(like, torch.Tensor):
        return leaves[0]
    return type(like)(*leaves) if hasattr(like, "_fields") else tuple(leaves)


def _shape_key(batch: Any) -> tuple:
    return tuple(tuple(t.shape) for t in _leaves(batch))


def _stack_batches(batches: Sequence[Any]) -> Any:
    """K per-client batches as one batch with a leading client dimension."""
    columns = zip(*map(_leaves, batches), strict=True)
    return _as_batch(batches[0], [torch.stack(column) for column in columns])


def _sample_counts(batches: Sequence[Any]) -> list[int] | None:
    """Each batch's number of samples, when the batches differ at most in it (the leading
    dimension of every leaf), so that padding makes them one shape; else None."""
    kinds, counts = set(), []
    for batch in batches:
        leaves = _leaves(batch)
        heads = {tuple(t.shape[:1]) for t in leaves}
        if len(heads) != 1 or heads == {()}:
            return None
        kinds.add((type(batch), tuple((t.shape[1:], t.dtype) for t in leaves)))
        counts.append(len(leaves[0]))
    return counts if len(kinds) == 1 else None


def _padded(step: Sequence[Any], clients: Sequence[int], width: int, dtype: torch.dtype) -> tuple:
    """The batches of `clients` stacked, each padded to `width` samples by repeating a real
    sample (a client without a batch: all padding), and their (len(clients), width) weights:
    1 for a real sample, 0 for padding."""
    real = [step[k] for k in clients if step[k] is not None]
    counts = [0 if step[k] is None else len(_leaves(step[k])[0]) for k in clients]
    rows, start = [], 0
    for n in counts:
        rows += [*range(start, start + n), *[0] * (width - n)]
        start += n
    device = _leaves(real[0])[0].device
    index = torch.tensor(rows, device=device)
    weights = torch.arange(width) < torch.tensor(counts).unsqueeze(1)
    leaves = [
        torch.cat(column).index_select(0, index).unflatten(0, (len(clients), width))
        for column in zip(*map(_leaves, real), strict=True)
    ]
    return _as_batch(real[0], leaves), weights.to(device=device, dtype=dtype)


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
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The (len(index),) losses of the clients `index` (all when None) on `batch`; with
        `weights` (one row per client), each client's loss is the weighted sum of
        `loss_fn.per_sample` over its real (weight 1) samples, divided by their number."""
        params = self.all
        if index is not None:
            params = {n: p.index_select(0, index) for n, p in params.items()}

        def one(p: dict[str, torch.Tensor], b: Any, w: torch.Tensor | None = None) -> torch.Tensor:
            model = _OneClient(self.module, p, dtype)
            if w is None:
                return loss_fn(model, b)
            per_sample = loss_fn.per_sample(model, b)  # type: ignore[attr-defined]
            w = w.to(per_sample.dtype)
            return (per_sample * w).sum() / w.sum().clamp(min=1)

        inputs = (params, batch) if weights is None else (params, batch, weights)
        with sdpa_kernel(SDPBackend.MATH):
            return vmap(one, randomness=self.randomness)(*inputs)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each client's row into its own model."""
        for k, model in enumerate(self.models):
            for name, p in model.named_parameters():
                p.copy_(self.all[name][k])


class _GraphedStep:
    """A CUDA graph of one full-width forward and backward (all K clients, one shape of its
    inputs: the batch, and with a per-sample loss the weights): the inputs are copied into
    static buffers, the graph replays, the gradients land in the same tensors every time."""

    def __init__(self, run: Callable[..., torch.Tensor], params: list[torch.Tensor], *inputs: Any):
        self.params = params
        self.static = [_as_batch(x, [t.clone() for t in _leaves(x)]) for x in inputs]
        # torch.cuda.graph() would synchronize, collect garbage and empty the cache for
        # every capture; with a graph per client that dominates a round, so capture by hand.
        side = _stream(params[0].device.index, 0)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._clear()
            run(*self.static)  # warm-up: cuDNN plans, lazily moved constants
            self._clear()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread (the other GPU's stack) may capture at the same time
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.loss = run(*self.static)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        self.grads = [p.grad for p in params]

    def fits(self, *inputs: Any) -> bool:
        """Whether `inputs` have the captured shapes."""
        return list(map(_shape_key, inputs)) == list(map(_shape_key, self.static))

    def _clear(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, *inputs: Any) -> torch.Tensor:
        static = [t for x in self.static for t in _leaves(x)]
        torch._foreach_copy_(static, [t for x in inputs for t in _leaves(x)])
        self.graph.replay()
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        return self.loss


@cache
def _stream(device: int, index: int) -> torch.cuda.Stream:
    """The process's side stream `index` on a GPU (0: graph capture; 1..: lanes), made once:
    the caching allocator keeps freed blocks (and cuBLAS a workspace) per stream, so a new
    stream every round would strand them."""
    return torch.cuda.Stream(device)


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
        lanes = [_stream(device.index, 1 + i) for i in range(min(streams, len(chunks)))]
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
    if cuda_graph:
        # The round's graphs are gone with `runs`; their private memory pools are returned to
        # the driver only by emptying the cache, else every round strands a pool's worth.
        del runs
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
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
    device, float_dtype = stack.tensors[0].device, stack.tensors[0].dtype
    optimizer = half.begin_stacked(stack, incoming, states)
    everyone = list(range(num))
    total = torch.zeros(num, dtype=torch.float64, device=device)  # as train_local's float sum
    steps = [0] * num
    padding = hasattr(loss_fn, "per_sample")
    graphed: _GraphedStep | None = None
    graph_width = 0

    def objective(parts: list[_Part]) -> torch.Tensor:
        """The (K,) losses of `parts`, plus the half's loss term, with gradients filled."""
        for p in stack.tensors:
            p.grad = None
        losses = []
        for index, batch, weights in parts:
            part = stacked.losses(loss_fn, batch, index, compute_dtype, weights)
            if index is not None:
                part = part.new_zeros(num).index_add(0, index, part)  # in the loss's dtype
            losses.append(part)
        loss = sum(losses[1:], losses[0])
        extra = half.loss_term_stacked(stack)
        if extra is not None:
            loss = loss + extra
        loss.sum().backward()
        return loss.detach()

    def full_width(batch: Any, weights: torch.Tensor | None = None) -> torch.Tensor:
        return objective([(None, batch, weights)])

    def padded_step(step: list[Any], active: list[int], width: int) -> Callable[[], torch.Tensor]:
        """Batches that differ at most in their number of samples, as one step: padded to
        the captured graph's width when they fit it, else eagerly over the active clients."""
        nonlocal graphed, graph_width
        if cuda_graph and graphed is None:
            inputs = _padded(step, everyone, width, float_dtype)
            graphed, graph_width = _GraphedStep(full_width, stack.tensors, *inputs), width
        if graphed is not None and width <= graph_width:
            inputs = _padded(step, everyone, graph_width, float_dtype)
            if graphed.fits(*inputs):
                return partial(graphed, *inputs)
        index = None if len(active) == num else torch.tensor(active, device=device)
        return partial(objective, [(index, *_padded(step, active, width, float_dtype))])

    def uniform_step(step: list[Any]) -> Callable[[], torch.Tensor]:
        """Every client with a batch of one shape, unpadded (a loss without `per_sample`)."""
        nonlocal graphed
        batch = _stack_batches(step)
        if cuda_graph and graphed is None:
            graphed = _GraphedStep(full_width, stack.tensors, batch)
        # the graph holds the first batch shape; another (a last batch) runs eagerly
        run = graphed if graphed is not None and graphed.fits(batch) else full_width
        return partial(run, batch)

    def grouped_step(step: list[Any], active: list[int]) -> Callable[[], torch.Tensor]:
        """Batches of several shapes that padding cannot join: one vmap per shape."""
        groups: dict[tuple, list[int]] = {}
        for k in active:
            groups.setdefault(_shape_key(step[k]), []).append(k)
        return partial(objective, [
            (torch.tensor(ks, device=device), _stack_batches([step[k] for k in ks]), None)
            for ks in groups.values()
        ])  # fmt: skip

    for _ in range(epochs):
        for step in _lockstep([iter(b) for b in batches]):
            active = [k for k, b in enumerate(step) if b is not None]
            counts = _sample_counts([step[k] for k in active]) if padding else None
            if counts is not None:
                closure = padded_step(step, active, max(counts))
            elif len(active) == num and len({_shape_key(b) for b in step}) == 1:
                closure = uniform_step(step)
            else:
                closure = grouped_step(step, active)
            mask = None
            if len(active) < num:
                mask = torch.zeros(num, dtype=torch.bool, device=device)
                mask[active] = True
            loss = _step_keeping(stack, half, optimizer, closure, mask)
            total += loss if mask is None else torch.where(mask, loss, 0.0)
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


def _step_keeping(
    stack: StackedParams,
    half: ClientHalf,
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], torch.Tensor],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """`half.step_stacked` on `closure`, after which the rows of clients outside `mask` (no
    batch this step; None: every client has one) are restored: parameters, optimizer state,
    the half's stacked state."""
    if mask is None:
        return half.step_stacked(stack, optimizer, closure)
    state = [t for s in optimizer.state.values() for t in s.values()]
    tensors = [*stack.tensors, *state, *half.stacked_state()]
    num = stack.num_clients
    kept = [t for t in tensors if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == num]
    before = {id(t): (t, t.detach().clone()) for t in kept}
    loss = half.step_stacked(stack, optimizer, closure)
    with torch.no_grad():
        for t, old in before.values():
            t.copy_(torch.where(mask.view(-1, *([1] * (t.ndim - 1))), t, old))
    return loss
