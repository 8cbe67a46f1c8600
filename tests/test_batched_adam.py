"""Adam/AdamW, kept optimizer state and dropout in the client-batched path (strategies.batched):
each client gets what its own `train_local` run gives it, although the clients hold different
numbers of batches (so some sit steps out and must keep their own Adam step count), and a
client can alternate between batched and per-client rounds with its optimizer state kept.
Tiny UNets in float64 on digits partitions of 40, 23 and 17 images (batches of 16)."""

import copy

import numpy as np
import pytest
import torch
from test_batched_clients import ALGORITHMS, CONFIG, _scaffold_inputs
from test_batched_clients import clients as clients  # the fixture, reused here

import strategies.base
from diffusion_clients.sampling import make_scheduler
from diffusion_clients.train import DenoisingLoss, NoisyBatches
from fedpsg.app.task import load_task
from strategies import client_half
from strategies.base import train_local
from strategies.batched import train_local_stacked
from strategies.scaffold import CLIENT_CONTROL

LR, BETAS, EPS, DECAY = 2e-3, (0.8, 0.95), 1e-7, 0.05
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
LOSS = DenoisingLoss(make_scheduler(1000))
SAM_ZERO = {"algorithm": "fedsam", "rho": 0.0, "adaptive": False}


@pytest.fixture(scope="module")
def digits(clients):
    """`clients` in float64, so that the per-client and batched runs agree to 1e-6 after
    Adam's per-coordinate normalisation (which turns float32 rounding into full steps)."""
    model, images = clients
    return copy.deepcopy(model).double(), [x.double() for x in images]


def _half(algorithm: str, optimizer: str, **options):
    momentum = 0.9 if optimizer == "sgd" else 0.0
    config = SAM_ZERO if algorithm == "sam-zero" else ALGORITHMS[algorithm]
    return client_half(config, lr=LR, momentum=momentum, weight_decay=DECAY,
                       optimizer=optimizer, betas=BETAS, eps=EPS, **options)  # fmt: skip


def _gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest |difference| between two models' parameters."""
    with torch.no_grad():
        pairs = zip(a.parameters(), b.parameters(), strict=True)
        return max(float((pa - pb).abs().max()) for pa, pb in pairs)


def _batches(images, seed: int = 10, spread: int = 1):
    """Client k's batches, seeded seed + spread * k (spread 0: the same draws for all)."""
    return [NoisyBatches(x, 16, 1000, seed=seed + spread * k) for k, x in enumerate(images)]


def _per_client(models, images, halves, incoming, states, seed=10, spread=1):
    return [
        train_local(m, b, LOSS, h, i, s, epochs=2)
        for m, b, h, i, s in zip(
            models, _batches(images, seed, spread), halves, incoming, states, strict=True
        )
    ]


def _assert_same_weights(many, solo):
    for k, (a, b) in enumerate(zip(many, solo, strict=True)):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, **TOLERANCE, msg=lambda m, at=(k, name): f"{at} {m}")


def _assert_same_clients(start: torch.nn.Module, batched: tuple, separate: tuple) -> None:
    """Batched and per-client runs, each (results, models, states), agree client by client:
    weights, mean loss, outgoing arrays and SCAFFOLD's control variate; every client moved
    away from `start`."""
    (many, many_models, many_states), (solo, solo_models, solo_states) = batched, separate
    _assert_same_weights(many_models, solo_models)
    for k, (m, s) in enumerate(zip(many, solo, strict=True)):
        assert m[0] == pytest.approx(s[0], rel=1e-9), k
        assert m[1].keys() == s[1].keys()
        for key, arrays in s[1].items():
            for name, a in arrays.items():
                np.testing.assert_allclose(m[1][key][name], a, **TOLERANCE)
        assert _gap(many_models[k], start) > 1e-3  # the client really trained
    for s_many, s_solo in zip(many_states, solo_states, strict=True):
        for name, a in s_solo.get(CLIENT_CONTROL, {}).items():
            np.testing.assert_allclose(s_many[CLIENT_CONTROL][name], a, **TOLERANCE)


def _run_both(digits, algorithm, optimizer):
    model, images = digits
    num = len(images)
    incoming, states = (
        _scaffold_inputs(model, num, 1) if algorithm == "scaffold" else ([{}] * num, [{}] * num)
    )
    solo_models, solo_states = [copy.deepcopy(model) for _ in images], copy.deepcopy(states)
    solo = _per_client(solo_models, images, [_half(algorithm, optimizer) for _ in images],
                       incoming, solo_states)  # fmt: skip
    many_models, many_states = [copy.deepcopy(model) for _ in images], copy.deepcopy(states)
    many = train_local_stacked(many_models, _batches(images), LOSS,
                               [_half(algorithm, optimizer) for _ in images], incoming,
                               many_states, epochs=2)  # fmt: skip
    return (solo, solo_models, solo_states), (many, many_models, many_states)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedsam", "scaffold"])
def test_stacked_adam_matches_per_client(digits, algorithm, optimizer):
    """Two epochs of 3, 2 and 2 batches (last batches of 8, 7 and 1): clients 1 and 2 sit
    out every third step, and their Adam must not count it."""
    (solo, solo_models, solo_states), (many, many_models, many_states) = _run_both(
        digits, algorithm, optimizer
    )
    _assert_same_clients(digits[0], (many, many_models, many_states),
                         (solo, solo_models, solo_states))  # fmt: skip


def test_one_shared_step_count_would_be_wrong(digits, monkeypatch):
    """The case above really needs the per-client count: with one count per tensor (torch's
    Adam over the stack) client 0, which never sits out, still matches; 1 and 2 do not."""

    def shared_count(cls, params, **options):
        optimizer = stacked_optimizer(cls, params, **options)
        for state in optimizer.state.values():
            state["step"] = torch.zeros((), dtype=torch.float32)
        return optimizer

    stacked_optimizer = strategies.base.stacked_optimizer
    monkeypatch.setattr(strategies.base, "stacked_optimizer", shared_count)
    (_, solo_models, _), (_, many_models, _) = _run_both(digits, "fedavg", "adam")
    _assert_same_weights(many_models[:1], solo_models[:1])
    for k in (1, 2):
        assert _gap(many_models[k], solo_models[k]) > 1e-4, k


def _two_rounds(digits, algorithm, optimizer, modes, keep=True):
    """Round 1 trains clients 0 and 1, round 2 all three (client 2 without any state yet),
    each round batched or per client as `modes` says; returns the models and states."""
    model, images = digits
    models, states = [copy.deepcopy(model) for _ in images], [{} for _ in images]
    for r, (mode, ks) in enumerate(zip(modes, ([0, 1], [0, 1, 2]), strict=True)):
        picked = [models[k] for k in ks], [images[k] for k in ks], [states[k] for k in ks]
        halves = [_half(algorithm, optimizer, keep_optimizer_state=keep) for _ in ks]
        incoming = [{} for _ in ks]
        if mode == "batched":
            train_local_stacked(picked[0], _batches(picked[1], 10 * r), LOSS, halves, incoming,
                                picked[2], epochs=2)  # fmt: skip
        else:
            _per_client(picked[0], picked[1], halves, incoming, picked[2], 10 * r)
    return models, states


@pytest.mark.parametrize("algorithm,optimizer", [("fedsam", "adamw"), ("fedavg", "sgd")])
def test_kept_optimizer_state_across_rounds_and_paths(digits, algorithm, optimizer):
    """optimizer-state = keep: two batched rounds, or a batched and a per-client round in
    either order, give the weights and stored state of two per-client rounds."""
    solo_models, solo_states = _two_rounds(digits, algorithm, optimizer, ("solo", "solo"))
    for modes in (("batched", "batched"), ("batched", "solo"), ("solo", "batched")):
        models, states = _two_rounds(digits, algorithm, optimizer, modes)
        _assert_same_weights(models, solo_models)
        for k, (state, solo) in enumerate(zip(states, solo_states, strict=True)):
            assert state.keys() == solo.keys(), (modes, k)
            for group, arrays in solo.items():
                assert arrays.keys() == state[group].keys()
                for name, a in arrays.items():
                    b = state[group][name]
                    assert (b.shape, b.dtype) == (a.shape, a.dtype), (modes, k, group, name)
                    np.testing.assert_allclose(b, a, **TOLERANCE)
    prefix = f"{optimizer}-"
    groups = ("step", "exp_avg", "exp_avg_sq") if optimizer != "sgd" else ("momentum_buffer",)
    assert set(solo_states[0]) == {prefix + g for g in groups}
    if optimizer != "sgd":  # each client's own count: 3, 2 and 2 batches a pass, two passes
        steps = [{float(v) for v in s[prefix + "step"].values()} for s in states]
        assert steps == [{12.0}, {8.0}, {4.0}]
    reset, _ = _two_rounds(digits, algorithm, optimizer, ("batched", "batched"), keep=False)
    assert _gap(reset[0], solo_models[0]) > 1e-5  # the kept state changed round 2


def test_dropout_runs_batched_with_each_clients_own_masks(clients):
    """Dropout p > 0 (the paper preset's 0.3) runs under vmap with a mask per client: three
    clients on the same batches end apart, finite. FedSAM's two passes share their masks
    (rho = 0 is FedAvg bit for bit). Dropout p = 0 keeps clients identical and equal to
    their per-client runs."""
    _, images = clients
    task = load_task("diffusion")

    def run(p: float, algorithm: str = "fedavg", batched: bool = True):
        model = task.build_model({**CONFIG, "dropout": p}).double()
        models = [copy.deepcopy(model) for _ in range(3)]
        same = [images[0].double()] * 3
        incoming, states = [{}] * 3, [{}] * 3
        halves = [_half(algorithm, "adamw") for _ in models]
        torch.manual_seed(0)
        if batched:
            train_local_stacked(models, _batches(same, 0, 0), LOSS, halves, epochs=2)
        else:
            _per_client(models, same, halves, incoming, states, 0, 0)
        return models

    dropped = run(0.3)
    for m in dropped:
        assert all(torch.isfinite(p).all() for p in m.parameters())
    assert min(_gap(dropped[0], dropped[1]), _gap(dropped[1], dropped[2])) > 1e-4
    sam = run(0.3, "sam-zero")
    assert all(_gap(a, b) == 0.0 for a, b in zip(sam, dropped, strict=True))
    plain = run(0.0)
    assert _gap(plain[0], plain[1]) < 1e-12 and _gap(plain[0], plain[2]) < 1e-12
    assert _gap(plain[0], dropped[0]) > 1e-4
    _assert_same_weights(plain, run(0.0, batched=False))
