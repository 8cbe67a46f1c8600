"""The client-batched engine inside the in-process federation: with `batch-clients = "on"` a
round's train messages reach the ClientApp's `train_batch` together and the diffusion task
trains them in one `train_many` call per device; the federation ends where the per-client
path (`batch-clients = "off"`) ends, client by client and round by round, for every
algorithm. Tiny UNet, 8x8 digits, 3 clients of different sizes, 2 rounds."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import torch

from diffusion_clients.task import DiffusionTask
from fedpsg.app import client_app
from fedpsg.app.config import RunConfigError, validate_run_config
from fedpsg.run.simulate import simulate_in_process

CLIENTS = 3
RUN = {
    "task": "diffusion",
    "num-server-rounds": 2,
    "min-train-nodes": 2,
    "data": "digits",
    "image-size": 8,
    "unet": "tiny",
    "diffusion-steps": 100,
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.5,
    "dirichlet-alpha": 1.0,
    "test-fraction": 0.5,
    "device": "cpu",
}
STRATEGIES = {
    "fedavg": {},
    "fedprox": {"proximal-mu": 0.5},
    "fedsam": {"rho": 0.05},
    "scaffold": {},
}


@pytest.fixture
def calls(monkeypatch):
    """How often the diffusion task's `train` and `train_many` ran (and on which devices)."""
    counts: Counter = Counter()
    train, train_many = DiffusionTask.train, DiffusionTask.train_many

    def counted_train(self, *args, **kwargs):
        counts["train"] += 1
        return train(self, *args, **kwargs)

    def counted_train_many(self, *args, device=None, **kwargs):
        counts["train_many"] += 1
        counts[f"on {device}"] += 1
        return train_many(self, *args, device=device, **kwargs)

    monkeypatch.setattr(DiffusionTask, "train", counted_train)
    monkeypatch.setattr(DiffusionTask, "train_many", counted_train_many)
    return counts


def federation(out, strategy, batch, node_configs=None):
    """Run it; the final global model and, per round, each partition's train reply."""
    config = {**RUN, "strategy": strategy, **STRATEGIES[strategy], "batch-clients": batch}
    simulate_in_process(config, CLIENTS, out, node_configs=node_configs)
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    replies = [
        {c["partition-id"]: c for c in r["clients"] if c["stage"] == "train"} for r in rounds
    ]
    return torch.load(out / "final_model.pt"), replies[1:]


@pytest.fixture(scope="module")
def per_client(tmp_path_factory):
    """The per-client path's federation of each algorithm, run once."""
    runs = {}

    def run(strategy):
        if strategy not in runs:
            runs[strategy] = federation(tmp_path_factory.mktemp(strategy), strategy, "off")
        return runs[strategy]

    return run


def assert_same_federation(batched, reference):
    model, rounds = batched
    ref_model, ref_rounds = reference
    assert model.keys() == ref_model.keys()
    for name, weights in ref_model.items():
        torch.testing.assert_close(model[name], weights, rtol=0, atol=1e-5, msg=name)
    assert len(rounds) == len(ref_rounds) == RUN["num-server-rounds"]
    for replies, ref_replies in zip(rounds, ref_rounds, strict=True):
        assert replies.keys() == ref_replies.keys() == set(range(CLIENTS))
        for pid, reply in replies.items():
            assert reply["num-examples"] == ref_replies[pid]["num-examples"]
            assert reply["train_loss"] == pytest.approx(ref_replies[pid]["train_loss"], abs=1e-5)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_batched_federation_equals_per_client(tmp_path, strategy, per_client, calls):
    reference = per_client(strategy)
    calls.clear()
    batched = federation(tmp_path, strategy, "on")
    assert calls["train_many"] == RUN["num-server-rounds"] and calls["train"] == 0
    assert_same_federation(batched, reference)
    initial = DiffusionTask().build_model({**RUN, "seed": 0}).state_dict()
    moved = max(float((reference[0][n] - w).abs().max()) for n, w in initial.items())
    assert moved > 1e-3  # the model really trained: 1e-5 is a tight tolerance
    sizes = {r["num-examples"] for r in reference[1][0].values()}
    assert len(sizes) == CLIENTS  # clients of different sizes: ragged steps inside the stack


def test_clients_split_over_two_devices_in_threads(tmp_path, monkeypatch, per_client, calls):
    """What device "cuda" does on a 2-GPU machine, with two CPU "devices": one
    `train_many` call per device and round, each in its own thread; same federation."""
    reference = per_client("fedavg")
    monkeypatch.setattr(client_app, "batch_devices", lambda config: ["cpu", "cpu"])
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = federation(tmp_path, "fedavg", "on")
    assert calls["train_many"] == 2 * RUN["num-server-rounds"] and calls["train"] == 0
    assert_same_federation(batched, reference)
    # the threads keep the math attention kernel (no vmap fallback to a per-client loop)
    assert not [w for w in caught if "batching rule" in str(w.message)]


def test_unreadable_partition_is_an_error_reply_and_the_others_train(tmp_path, calls):
    _, rounds = federation(
        tmp_path, "fedavg", "on", node_configs={1: {"data": f"folder:{tmp_path / 'none'}"}}
    )
    assert calls["train_many"] == RUN["num-server-rounds"] and calls["train"] == 0
    for replies in rounds:
        assert "FileNotFoundError" in replies[1]["error"] and "partition 1" in replies[1]["error"]
        assert [replies[pid]["train_loss"] > 0 for pid in (0, 2)] == [True, True]


def test_a_failing_train_many_fails_its_clients_not_the_run(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(DiffusionTask, "train_many", broken)
    _, rounds = federation(tmp_path, "fedavg", "on")
    for replies in rounds:
        assert all("RuntimeError: out of memory" in r["error"] for r in replies.values())
    assert (tmp_path / "final_model.pt").exists()


def test_auto_batches_only_on_cuda(monkeypatch):
    def devices(**overrides):
        return client_app.batch_devices(validate_run_config({**RUN, **overrides}))

    assert devices() == []  # "auto" is the default
    assert devices(**{"batch-clients": "on"}) == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices(device="cuda") == ["cuda:0", "cuda:1"]
    assert devices(device="auto") == ["cuda:0", "cuda:1"]
    assert devices(device="cuda:1") == ["cuda:1"]
    assert devices(device="cuda", **{"batch-clients": "off"}) == []
    assert devices(device="cuda", task="psg") == []  # the PSG task has no train_many


def test_auto_on_cpu_trains_client_by_client(tmp_path, calls):
    simulate_in_process({**RUN, "strategy": "fedavg", "num-server-rounds": 1}, CLIENTS, tmp_path)
    assert calls["train_many"] == 0 and calls["train"] == CLIENTS


def test_a_bad_batch_clients_value_is_one_line_naming_the_key():
    with pytest.raises(RunConfigError) as caught:
        validate_run_config({"batch-clients": "yes"})
    assert str(caught.value) == "run config batch-clients='yes': expected one of auto | on | off"
