"""Client-batched local training (strategies.batched) returns, per client, what the per-client
`train_local` returns: same losses, weights, outgoing arrays and state, for all four
algorithms, on tiny UNets and digits partitions of different sizes (ragged last batches,
clients that sit steps out)."""

import copy

import numpy as np
import pytest
import torch

from diffusion_clients.sampling import make_scheduler
from diffusion_clients.train import DenoisingLoss, NoisyBatches
from fedpsg.app.task import load_task
from strategies import client_half
from strategies.base import train_local
from strategies.batched import train_local_stacked
from strategies.scaffold import CLIENT_CONTROL, CONTROL_DELTA, SERVER_CONTROL

CONFIG = {"unet": "tiny", "image-size": 8, "batch-size": 16, "seed": 0, "device": "cpu"}
ALGORITHMS = {
    "fedavg": {"algorithm": "fedavg"},
    "fedprox": {"algorithm": "fedprox", "proximal-mu": 0.5},
    "fedsam": {"algorithm": "fedsam", "rho": 0.2, "adaptive": False},
    "asam": {"algorithm": "fedsam", "rho": 0.5, "adaptive": True},
    "scaffold": {"algorithm": "scaffold"},
}
TOLERANCE = {"rtol": 2e-4, "atol": 2e-5}


@pytest.fixture(scope="module")
def clients():
    """Three digits partitions of 40, 23 and 17 images (batches of 16: 3, 2 and 2 steps,
    last batches of 8, 7 and 1), and a global tiny UNet."""
    task = load_task("diffusion")
    part = task.load_partition(CONFIG, 0, 4).images.images
    sizes = (40, 23, 17)
    starts = np.cumsum((0, *sizes))
    images = [part[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    assert [len(x) for x in images] == list(sizes)
    return task.build_model(CONFIG), images


def _scaffold_inputs(model, num, seed):
    """A server control c and per-client c_i (client 0 has none yet: zeros)."""
    g = torch.Generator().manual_seed(seed)

    def arrays(scale):
        return {
            n: (torch.randn(p.shape, generator=g) * scale).numpy()
            for n, p in model.named_parameters()
        }

    incoming = {SERVER_CONTROL: arrays(0.01)}
    states = [{}] + [{CLIENT_CONTROL: arrays(0.01)} for _ in range(num - 1)]
    return [incoming] * num, states


@pytest.mark.parametrize(
    "name,per_stack", [*((n, None) for n in sorted(ALGORITHMS)), ("scaffold", 2), ("fedsam", 1)]
)
def test_stacked_matches_per_client(clients, name, per_stack):
    """One stack of all clients, or stacks of `per_stack` clients taking turns."""
    model, images = clients
    config = ALGORITHMS[name]
    loss_fn = DenoisingLoss(make_scheduler(1000))
    num = len(images)
    incoming, states = (
        _scaffold_inputs(model, num, 1) if name == "scaffold" else ([{}] * num, [{}] * num)
    )

    def halves():
        return [client_half(config, lr=0.05, momentum=0.9, weight_decay=1e-3) for _ in images]

    def batches():
        return [NoisyBatches(x, 16, 1000, seed=10 + k) for k, x in enumerate(images)]

    solo_models = [copy.deepcopy(model) for _ in images]
    solo_states = copy.deepcopy(states)
    solo = [
        train_local(m, b, loss_fn, h, i, s, epochs=2)
        for m, b, h, i, s in zip(
            solo_models, batches(), halves(), incoming, solo_states, strict=True
        )
    ]
    many_models = [copy.deepcopy(model) for _ in images]
    many_states = copy.deepcopy(states)
    many = train_local_stacked(
        many_models,
        batches(),
        loss_fn,
        halves(),
        incoming,
        many_states,
        epochs=2,
        clients_per_stack=per_stack,
    )

    for k in range(num):
        assert many[k][0] == pytest.approx(solo[k][0], rel=1e-5)
        moved = 0.0
        for (name_, a), b, g in zip(
            solo_models[k].named_parameters(),
            many_models[k].parameters(),
            model.parameters(),
            strict=True,
        ):
            torch.testing.assert_close(b, a, **TOLERANCE, msg=f"client {k} {name_}")
            moved = max(moved, float((a - g).abs().max()))
        assert moved > 1e-3  # the clients really trained
        assert many[k][1].keys() == solo[k][1].keys()
        for key, arrays in solo[k][1].items():
            for n, a in arrays.items():
                np.testing.assert_allclose(many[k][1][key][n], a, **TOLERANCE)
    if name == "scaffold":
        for s_many, s_solo in zip(many_states, solo_states, strict=True):
            for n, a in s_solo[CLIENT_CONTROL].items():
                np.testing.assert_allclose(s_many[CLIENT_CONTROL][n], a, **TOLERANCE)
        assert any(np.abs(a).max() > 0 for a in many[0][1][CONTROL_DELTA].values())


def test_task_train_many_matches_train(clients):
    """DiffusionTask.train_many gives each client what DiffusionTask.train gives it,
    including the per-client round counter that seeds the next round's draws."""
    task = load_task("diffusion")
    model, _ = clients
    parts = [task.load_partition(CONFIG, pid, 8) for pid in (0, 3, 5)]
    configs = [{**CONFIG, "seed": 7 + pid} for pid in range(3)]
    half = {"algorithm": "fedprox", "proximal-mu": 0.1}
    solo, solo_models, solo_states = [], [], [{}, {}, {}]
    for part, config, state in zip(parts, configs, solo_states, strict=True):
        m = copy.deepcopy(model)
        solo.append(task.train(m, part, client_half(half, lr=0.05), config, {}, state))
        solo_models.append(m)
    many_models = [copy.deepcopy(model) for _ in parts]
    many_states = [{}, {}, {}]
    halves = [client_half(half, lr=0.05) for _ in parts]
    many = task.train_many(many_models, parts, halves, configs, [{}] * 3, many_states)
    for (n1, m1, _), (n2, m2, _) in zip(many, solo, strict=True):
        assert n1 == n2 and m1["train_loss"] == pytest.approx(m2["train_loss"], rel=1e-5)
    for a, b in zip(many_models, solo_models, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, **TOLERANCE)
    assert [s["diffusion"]["rounds"][0] for s in many_states] == [1, 1, 1]


def test_stacked_refuses_mixed_settings_and_buffers(clients):
    model, images = clients
    loss_fn = DenoisingLoss(make_scheduler(1000))
    batches = [NoisyBatches(x, 16, 1000, seed=0) for x in images[:2]]
    halves = [client_half({"algorithm": "fedavg"}, lr=lr) for lr in (0.1, 0.2)]
    with pytest.raises(ValueError, match="one algorithm and setting"):
        train_local_stacked([model, copy.deepcopy(model)], batches, loss_fn, halves)
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    same = [client_half({"algorithm": "fedavg"}, lr=0.1) for _ in range(2)]
    with pytest.raises(ValueError, match="buffer-free models.*'1.running_mean'"):
        train_local_stacked([bn, copy.deepcopy(bn)], batches, loss_fn, same)
