"""Ragged steps in the client-batched path (strategies.batched): when clients' batches differ
only in their number of samples, or some clients have none, a loss with `per_sample` runs the
step as one padded full-width vmap (padding weighted out); a loss without it, or batches whose
trailing shapes differ, run one vmap per shape group. Either way each client gets what its own
`train_local` run gives it. Float64 tiny UNets on digits partitions of 45, 32, 23 and 9 images
(batches of 16, 16, 13 / 16, 16 / 16, 7 / 9): the first step is already ragged, client 3
sits out two steps of three, client 0 alone trains the third."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_batched_adam import LOSS, _assert_same_clients, _half
from test_batched_clients import CONFIG, _scaffold_inputs

from diffusion_clients.train import NoisyBatch, NoisyBatches
from fedpsg.app.task import load_task
from strategies.base import train_local
from strategies.batched import train_local_stacked

SIZES = (45, 32, 23, 9)
STEPS = 2 * 3  # two epochs of three lockstep steps
SHAPE_GROUPS = 2 * (2 + 2 + 1)  # per epoch: {16, 9}, {16, 7} (client 3 out), {13}


class MeanLoss:
    """`LOSS` without `per_sample`, counting its calls (one per vmap: vmap traces once)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, model, batch):
        self.calls["mean"] += 1
        return LOSS(model, batch)


class PerSampleLoss(MeanLoss):
    """`LOSS` with `per_sample`, counting both kinds of call."""

    def per_sample(self, model, batch):
        self.calls["per_sample"] += 1
        return LOSS.per_sample(model, batch)


@pytest.fixture(scope="module")
def ragged():
    """A float64 tiny UNet and four digits partitions of SIZES images."""
    task = load_task("diffusion")
    part = task.load_partition(CONFIG, 1, 4).images.images.double()
    starts = np.cumsum((0, *SIZES))
    images = [part[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    assert [len(x) for x in images] == list(SIZES)
    return task.build_model(CONFIG).double(), images


def _compare(ragged, algorithm, optimizer, loss, images=None, device="cpu", **options):
    """Train every client alone and all together (with `loss`); assert they agree."""
    model, default = ragged
    images = default if images is None else images
    model = copy.deepcopy(model).to(device)
    images = [x.to(device) for x in images]
    num = len(images)
    incoming, states = (
        _scaffold_inputs(model, num, 1) if algorithm == "scaffold" else ([{}] * num, [{}] * num)
    )

    def batches():
        return [NoisyBatches(x, 16, 1000, seed=20 + k) for k, x in enumerate(images)]

    solo_models, solo_states = [copy.deepcopy(model) for _ in images], copy.deepcopy(states)
    solo = [
        train_local(m, b, LOSS, _half(algorithm, optimizer), i, s, epochs=2)
        for m, b, i, s in zip(solo_models, batches(), incoming, solo_states, strict=True)
    ]
    many_models, many_states = [copy.deepcopy(model) for _ in images], copy.deepcopy(states)
    halves = [_half(algorithm, optimizer) for _ in images]
    many = train_local_stacked(many_models, batches(), loss, halves, incoming, many_states,
                               epochs=2, **options)  # fmt: skip
    _assert_same_clients(model, (many, many_models, many_states),
                         (solo, solo_models, solo_states))  # fmt: skip


def _passes(algorithm: str) -> int:
    """Loss evaluations per step: FedSAM's ascent and descent passes."""
    return 2 if algorithm == "fedsam" else 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedsam", "scaffold"])
def test_padded_steps_match_per_client(ragged, algorithm, optimizer):
    """A per-sample loss: one vmapped loss call per step, however many shapes it holds."""
    loss = PerSampleLoss()
    _compare(ragged, algorithm, optimizer, loss)
    assert loss.calls == {"per_sample": STEPS * _passes(algorithm)}


@pytest.mark.parametrize("algorithm,optimizer", [("fedsam", "adam"), ("fedprox", "sgd")])
def test_loss_without_per_sample_runs_grouped(ragged, algorithm, optimizer):
    """A loss without `per_sample` still runs one vmap per shape group, and still matches."""
    loss = MeanLoss()
    _compare(ragged, algorithm, optimizer, loss)
    assert loss.calls == {"mean": SHAPE_GROUPS * _passes(algorithm)}


def test_other_trailing_shapes_run_grouped(ragged):
    """Batches that differ beyond their number of samples (8x8 and 16x16 images) cannot be
    padded into one: a per-sample loss then takes the grouped path too, on those steps."""
    _, images = ragged
    mixed = [images[0], images[1], F.interpolate(images[2], scale_factor=2.0)]
    loss = PerSampleLoss()
    _compare(ragged, "fedavg", "adam", loss, images=mixed)
    # per epoch: two groups (8x8, 16x16) in steps 1 and 2; client 0's 13 alone in step 3
    assert loss.calls == {"mean": 2 * (2 + 2), "per_sample": 2 * 1}


def test_padding_is_weighted_out(ragged):
    """A client's weighted loss sees only its real samples: filling its padding with other
    images, or none, gives the same per-client losses as its own short batch."""
    model, images = ragged
    loss = PerSampleLoss()
    g = torch.Generator().manual_seed(0)

    def batch(x):
        return NoisyBatch(x, torch.randn(x.shape, generator=g, dtype=x.dtype),
                          torch.randint(0, 1000, (len(x),), generator=g))  # fmt: skip

    short, full = batch(images[3]), batch(images[0][:16])
    models = [copy.deepcopy(model) for _ in range(2)]
    halves = [_half("fedavg", "sgd") for _ in models]
    means = train_local_stacked(models, [[full], [short]], loss, halves)
    with torch.no_grad():
        expected = [float(LOSS(model, full)), float(LOSS(model, short))]
    assert [m for m, _ in means] == pytest.approx(expected, rel=1e-12)
    assert loss.calls == {"per_sample": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_ragged_steps(ragged):
    """With `cuda_graph` every step, ragged or not, replays the one captured graph (the loss
    is called at warm-up and capture only) and matches the per-client runs."""
    loss = PerSampleLoss()
    _compare(ragged, "scaffold", "adam", loss, device="cuda", cuda_graph=True)
    assert loss.calls == {"per_sample": 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_rounds_return_their_memory(ragged):
    """A graphed round leaves no memory in a CUDA-graph pool behind: before, each round
    stranded its graph's private pool, and a GPU federation ran out of memory after a few."""
    model, images = ragged
    for seed in range(3):
        models = [copy.deepcopy(model).cuda() for _ in images]
        batches = [NoisyBatches(x.cuda(), 16, 1000, seed=seed + k) for k, x in enumerate(images)]
        halves = [_half("fedavg", "sgd") for _ in images]
        train_local_stacked(models, batches, LOSS, halves, cuda_graph=True)
        pools = {tuple(s["segment_pool_id"]) for s in torch.cuda.memory_snapshot()}
        assert pools <= {(0, 0)}, f"round {seed}: segments left in graph pools {pools}"
