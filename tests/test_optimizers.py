"""Adam and AdamW as every algorithm's local optimizer, against a hand-written NumPy Adam:
FedAvg, FedProx's proximal gradient, SCAFFOLD's correction, SAM wrapping Adam; the optimizer
state reset or kept across rounds (through the on-disk client state store); the run config's
`optimizer` keys and the `paper` preset. The batched path's Adam: tests/test_batched_adam.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedpsg.app.config import PRESETS, RunConfigError, app_defaults, validate_run_config
from strategies import client_half, train_local
from strategies.base import ClientHalf, optimizer_options
from strategies.fedprox import FedProxClient
from strategies.fedsam import FedSAMClient
from strategies.scaffold import CLIENT_CONTROL, CONTROL_DELTA, SERVER_CONTROL, ScaffoldClient
from strategies.state import ClientStateStore

LR, BETAS, EPS = 0.05, (0.8, 0.95), 1e-6


def _data(seed: int = 0, num: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 3, generator=gen, dtype=torch.float64),
            torch.randn(8, 1, generator=gen, dtype=torch.float64),
        )
        for _ in range(num)
    ]


def _model() -> nn.Linear:
    model = nn.Linear(3, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64))
        model.bias.fill_(0.3)
    return model


def _mse(model: nn.Module, batch) -> torch.Tensor:
    return torch.mean((model(batch[0]) - batch[1]) ** 2)


def _weights(model: nn.Linear) -> np.ndarray:
    return np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])


def _grad(w: np.ndarray, batch) -> np.ndarray:
    """Gradient of mean((X w[:3] + w[3] - y)^2), by hand."""
    x, y = batch[0].numpy(), batch[1].numpy().ravel()
    r = x @ w[:3] + w[3] - y
    return np.concatenate([2 * x.T @ r / len(r), [2 * r.mean()]])


class HandAdam:
    """Kingma & Ba's Adam (L2 in the gradient) or Loshchilov & Hutter's AdamW (decoupled
    decay), written out in NumPy."""

    def __init__(self, decoupled: bool, weight_decay: float = 0.0) -> None:
        self.decoupled, self.wd = decoupled, weight_decay
        self.m = self.v = 0.0
        self.t = 0

    def step(self, w: np.ndarray, g: np.ndarray) -> np.ndarray:
        self.t += 1
        if self.decoupled:
            w = w * (1 - LR * self.wd)
        else:
            g = g + self.wd * w
        b1, b2 = BETAS
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        return w - LR * m_hat / (np.sqrt(v_hat) + EPS)


def _half(cls=ClientHalf, optimizer: str = "adam", **kwargs) -> ClientHalf:
    return cls(LR, optimizer=optimizer, betas=BETAS, eps=EPS, **kwargs)


@pytest.mark.parametrize(("optimizer", "wd"), [("adam", 0.0), ("adam", 0.1), ("adamw", 0.1)])
def test_fedavg_adam_matches_hand_adam(optimizer, wd):
    data = _data()
    model = _model()
    train_local(model, data, _mse, _half(optimizer=optimizer, weight_decay=wd), epochs=2)
    w, adam = _weights(_model()), HandAdam(optimizer == "adamw", wd)
    for batch in data + data:
        w = adam.step(w, _grad(w, batch))
    np.testing.assert_allclose(_weights(model), w, rtol=1e-10, atol=1e-12)


def test_fedprox_adam_sees_the_proximal_gradient():
    data, mu = _data(), 0.5
    model = _model()
    train_local(model, data, _mse, _half(FedProxClient, mu=mu), epochs=2)
    w0 = _weights(_model())
    w, adam = w0.copy(), HandAdam(False)
    for batch in data + data:
        w = adam.step(w, _grad(w, batch) + mu * (w - w0))
    np.testing.assert_allclose(_weights(model), w, rtol=1e-10, atol=1e-12)


def test_scaffold_adam_steps_on_corrected_gradients_and_keeps_mean_raw_gradient():
    data = _data()
    c = {"weight": np.array([[0.1, -0.2, 0.3]]), "bias": np.array([0.05])}
    ci = {"weight": np.array([[-0.1, 0.0, 0.2]]), "bias": np.array([-0.05])}
    state = {CLIENT_CONTROL: ci}
    model = _model()
    _, outgoing = train_local(
        model, data, _mse, _half(ScaffoldClient), incoming={SERVER_CONTROL: c}, state=state
    )
    flat = lambda d: np.concatenate([d["weight"].ravel(), d["bias"]])  # noqa: E731
    correction = flat(c) - flat(ci)
    w, adam, raw = _weights(_model()), HandAdam(False), []
    for batch in data:
        g = _grad(w, batch)
        raw.append(g)
        w = adam.step(w, g + correction)
    np.testing.assert_allclose(_weights(model), w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flat(state[CLIENT_CONTROL]), np.mean(raw, axis=0), rtol=1e-10)
    np.testing.assert_allclose(
        flat(outgoing[CONTROL_DELTA]), np.mean(raw, axis=0) - flat(ci), rtol=1e-10
    )


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_sam_wraps_adam(optimizer):
    """Ascent e = rho g / ||g|| with the raw gradient, then the base Adam step from w with
    the gradient found at w + e."""
    data, rho, wd = _data(), 0.2, 0.05
    model = _model()
    half = _half(FedSAMClient, optimizer=optimizer, rho=rho, weight_decay=wd)
    train_local(model, data, _mse, half)
    base = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    assert type(half.begin(_model(), {}, {}).base_optimizer) is base
    w, adam = _weights(_model()), HandAdam(optimizer == "adamw", wd)
    for batch in data:
        g = _grad(w, batch)
        w = adam.step(w, _grad(w + rho * g / (np.linalg.norm(g) + 1e-12), batch))
    # pytorch-optimizer accumulates the gradient norm in fp32: rho / ||g|| to ~1e-7
    np.testing.assert_allclose(_weights(model), w, rtol=1e-6, atol=1e-9)


def test_sam_rho_zero_with_adam_and_dropout_is_adam_bitwise():
    """The second pass reuses the first's dropout masks, so rho = 0 changes nothing."""

    def run(half: ClientHalf) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        model.double()
        torch.manual_seed(1)
        train_local(model, _data(), _mse, half, epochs=2)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(_half()), run(_half(FedSAMClient, rho=0.0)))


@pytest.mark.parametrize("cls", [ClientHalf, FedSAMClient])
def test_optimizer_state_kept_across_rounds_equals_one_run(cls, tmp_path):
    """Kept (through the on-disk state store): two rounds of one client = one optimizer over
    both rounds' batches. Reset: each round starts a fresh Adam (bias correction restarts)."""
    first, second = _data(1), _data(2)
    options = {"rho": 0.1} if cls is FedSAMClient else {}

    one_run = _model()
    train_local(one_run, first + second, _mse, _half(cls, **options))

    store = ClientStateStore(tmp_path, client_id=3)
    kept = _model()
    for server_round, batches in enumerate([first, second], start=1):
        state = store.load(server_round)
        train_local(kept, batches, _mse, _half(cls, keep_optimizer_state=True, **options),
                    state=state)  # fmt: skip
        store.save(server_round, state)
    assert set(store.load(3)) == {"adam-step", "adam-exp_avg", "adam-exp_avg_sq"}
    np.testing.assert_allclose(_weights(kept), _weights(one_run), rtol=1e-12)

    reset, state = _model(), {}
    for batches in (first, second):
        train_local(reset, batches, _mse, _half(cls, **options), state=state)
    assert state == {}
    fresh = _model()
    train_local(fresh, first, _mse, _half(cls, **options))
    train_local(fresh, second, _mse, _half(cls, **options))
    np.testing.assert_allclose(_weights(reset), _weights(fresh), rtol=1e-12)
    assert np.abs(_weights(reset) - _weights(one_run)).max() > 1e-3


def test_kept_state_of_another_shape_is_one_clear_error():
    state: dict = {}
    train_local(_model(), _data(), _mse, _half(keep_optimizer_state=True), state=state)
    state["adam-exp_avg"]["weight"] = np.zeros((1, 4))
    with pytest.raises(ValueError, match=r"adam-exp_avg\['weight'\] has shape \(1, 4\)"):
        train_local(_model(), _data(), _mse, _half(keep_optimizer_state=True), state=state)


def test_client_half_reads_the_run_config_optimizer():
    config = {"optimizer": "adamw", "adam-beta1": 0.8, "adam-beta2": 0.95, "adam-eps": 1e-6,
              "optimizer-state": "keep"}  # fmt: skip
    for algorithm in ("fedavg", "fedprox", "fedsam", "scaffold"):
        sent = {"algorithm": algorithm, "proximal-mu": 0.1, "rho": 0.1, "adaptive": False}
        half = client_half(sent, lr=LR, weight_decay=0.01, **optimizer_options(config))
        optimizer = half.begin(_model(), {}, {})
        inner = getattr(optimizer, "base_optimizer", optimizer)
        assert type(inner) is torch.optim.AdamW, algorithm
        group = inner.param_groups[0]
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.01)
        assert half.keep_optimizer_state
    with pytest.raises(ValueError, match="momentum=0.9 is SGD's"):
        ClientHalf(LR, momentum=0.9, optimizer="adam")
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam, adamw"):
        ClientHalf(LR, optimizer="lion")


def test_run_config_optimizer_keys_and_paper_preset():
    config = validate_run_config({"task": "diffusion", "preset": "paper", "seed": 2})
    assert {k: config[k] for k in PRESETS["paper"]} == PRESETS["paper"]
    assert config["seed"] == 2
    # a key left at its default takes the preset's value; the same value is no conflict
    assert validate_run_config({"task": "diffusion", "preset": "paper", "lr": 1e-4})["lr"] == 1e-4
    with pytest.raises(RunConfigError, match=r"lr=0.05 contradicts preset='paper' \(lr=0.0001\)"):
        validate_run_config({"task": "diffusion", "preset": "paper", "lr": 0.05})
    with pytest.raises(RunConfigError, match="preset='paper' is the diffusion task's"):
        validate_run_config({"task": "psg", "preset": "paper"})
    with pytest.raises(RunConfigError, match="momentum=0.9: SGD's"):
        validate_run_config({"optimizer": "adam", "momentum": 0.9})
    with pytest.raises(RunConfigError, match="optimizer='lion': expected one of sgd"):
        validate_run_config({"optimizer": "lion"})
    assert app_defaults()["optimizer"] == "sgd"
