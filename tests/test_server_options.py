"""Options every strategy shares: EMA and/or SWA, robustness to bad replies, checkpoint/resume,
and the by-name registry."""

import logging
import random

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from strategies_harness import (
    LeastSquaresNode,
    heterogeneous_least_squares,
    initial_arrays,
    make_grid,
)

import strategies
from strategies import client_half, server_strategy
from strategies.local_grid import LocalGrid
from strategies.server import (
    CHECKPOINT_NAME,
    CheckpointError,
    ModelAverage,
    load_checkpoint,
    save_checkpoint,
    to_numpy,
    to_record,
)


def _arrays(w: float, n: int = 0) -> dict:
    return {"w": np.array([w], np.float32), "n": np.array(n, np.int64)}


def test_ema_and_swa_match_hand_worked_cases():
    ema = ModelAverage(ema_decay=0.5)
    ema.begin(_arrays(0.0))
    ema.update(1, _arrays(2.0, 1))  # 0.5 * 0 + 0.5 * 2 = 1
    ema.update(2, _arrays(4.0, 2))  # 0.5 * 1 + 0.5 * 4 = 2.5
    served = ema.serve(_arrays(4.0, 2))
    assert served["w"].item() == 2.5 and served["n"] == 2 and served["w"].dtype == np.float32

    swa = ModelAverage(swa_start=2)
    swa.begin(_arrays(0.0))
    swa.update(1, _arrays(2.0))
    assert swa.serve(_arrays(2.0))["w"].item() == 2.0  # before swa_start: the plain model
    swa.update(2, _arrays(4.0))
    swa.update(3, _arrays(8.0))  # mean(4, 8)
    assert swa.serve(_arrays(8.0))["w"].item() == 6.0


def test_both_averages_are_kept_beside_the_served_plain_model():
    both = ModelAverage(ema_decay=0.5, swa_start=2)
    both.begin(_arrays(0.0))
    both.update(1, _arrays(2.0, 1))  # ema 0.5 * 0 + 0.5 * 2 = 1; swa not started
    models = both.models(_arrays(2.0, 1))
    assert {k: m["w"].item() for k, m in models.items()} == {"plain": 2, "ema": 1, "swa": 2}
    both.update(2, _arrays(4.0, 2))  # ema 0.5 * 1 + 0.5 * 4 = 2.5; swa mean(4) = 4
    both.update(3, _arrays(8.0, 3))  # ema 0.5 * 2.5 + 0.5 * 8 = 5.25; swa mean(4, 8) = 6
    models = both.models(_arrays(8.0, 3))
    assert {k: m["w"].item() for k, m in models.items()} == {"plain": 8, "ema": 5.25, "swa": 6}
    assert all(m["n"] == 3 and m["w"].dtype == np.float32 for m in models.values())
    assert both.serve(_arrays(8.0, 3))["w"].item() == 8.0  # both kept: the plain model
    assert (both.ema_count, both.swa_count) == (3, 2)
    assert set(ModelAverage(ema_decay=0.5).models(_arrays(1.0))) == {"plain", "ema"}


def test_ema_warmup_decays_by_the_update_count():
    warm = ModelAverage(ema_decay=0.9, ema_warmup=True)
    warm.begin(_arrays(0.0))
    warm.update(1, _arrays(11.0))  # d = min(0.9, 2 / 11): 2/11 * 0 + 9/11 * 11 = 9
    assert warm.serve(_arrays(11.0))["w"].item() == pytest.approx(9.0)
    warm.update(2, _arrays(1.0))  # d = min(0.9, 3 / 12) = 0.25: 0.25 * 9 + 0.75 * 1 = 3
    assert warm.serve(_arrays(1.0))["w"].item() == pytest.approx(3.0)
    capped = ModelAverage(ema_decay=0.2, ema_warmup=True)
    capped.begin(_arrays(0.0))
    capped.update(1, _arrays(11.0))  # d = min(0.2, 2 / 11) = 2/11: 9, as above
    capped.update(2, _arrays(1.0))  # d = min(0.2, 0.25) = 0.2: 0.2 * 9 + 0.8 * 1 = 2.6
    assert capped.serve(_arrays(1.0))["w"].item() == pytest.approx(2.6)
    with pytest.raises(ValueError, match="ema_warmup needs an ema_decay"):
        ModelAverage(swa_start=2, ema_warmup=True)


class Recording:
    """Wraps a node and keeps the global weights each train message carried."""

    def __init__(self, node):
        self.node, self.seen = node, []

    def __call__(self, msg):
        if msg.metadata.message_type == "train":
            self.seen.append(to_numpy(msg.content["arrays"])["weight"].copy())
        return self.node(msg)


def test_evaluation_sees_the_ema_while_training_continues_from_the_aggregate():
    data = heterogeneous_least_squares(num_clients=2)
    node = Recording(LeastSquaresNode(data[0]))
    grid = LocalGrid({1: node, 2: LeastSquaresNode(data[1])})
    evaluated = []
    init = initial_arrays()
    result = server_strategy("fedavg", ema_decay=0.5, fraction_evaluate=0.0).start(
        grid,
        to_record(init),
        num_rounds=3,
        evaluate_fn=lambda r, arrays: evaluated.append(to_numpy(arrays)["weight"]),
    )
    sent = node.seen  # x_0, x_1, x_2: what clients trained from
    last = to_numpy(result.arrays)["weight"]
    # the EMA of x_0..x_3 with d = 0.5 is what evaluate_fn and Result hold
    np.testing.assert_allclose(evaluated[1], 0.5 * sent[0] + 0.5 * sent[1], rtol=1e-6)
    np.testing.assert_allclose(evaluated[2], 0.5 * evaluated[1] + 0.5 * sent[2], rtol=1e-6)
    np.testing.assert_array_equal(evaluated[3], last)
    assert not np.allclose(evaluated[2], sent[2])  # clients trained from x, not from the EMA


class Poisoned(LeastSquaresNode):
    def __call__(self, msg):
        reply = super().__call__(msg)
        arrays = to_numpy(reply["arrays"])
        arrays["weight"][0, 0] = np.nan
        reply["arrays"] = to_record(arrays)
        return reply


class Crashing(LeastSquaresNode):
    def __call__(self, msg):
        raise RuntimeError("client out of memory")


class Incomplete(LeastSquaresNode):
    def __call__(self, msg):
        return RecordDict({"metrics": MetricRecord({"loss": 1.0})})  # no arrays, no weight


def test_nan_failing_and_incomplete_clients_are_left_out(caplog):
    data = heterogeneous_least_squares()
    clean_grid, _ = make_grid(data[:2])
    bad = {3: Poisoned(data[2]), 4: Crashing(data[3]), 5: Incomplete(data[3])}
    grid = LocalGrid({**clean_grid.nodes, **bad})
    results = []
    for g in [clean_grid, grid]:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            result = server_strategy("fedavg", fraction_evaluate=1.0).start(
                g, to_record(initial_arrays()), num_rounds=2
            )
        results.append(to_numpy(result.arrays))
        assert "loss" in result.evaluate_metrics_clientapp[2]
    for key, value in results[0].items():
        np.testing.assert_array_equal(results[1][key], value)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("node 3" in w and "NaN/Inf" in w for w in warnings)
    assert any("node 4" in w and "out of memory" in w for w in warnings)
    assert any("aggregate_train" in w and "node 5" in w and "num-examples" in w for w in warnings)
    assert any("aggregate_evaluate" in w and "node 5" in w for w in warnings)


def test_too_few_valid_replies_keep_the_previous_model(caplog):
    data = heterogeneous_least_squares()
    grid = LocalGrid({1: LeastSquaresNode(data[0]), 2: Poisoned(data[1]), 3: Crashing(data[2])})
    init = initial_arrays()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = server_strategy("scaffold", min_train_nodes=2, fraction_evaluate=0.0).start(
            grid, to_record(init), num_rounds=1
        )
    for key, value in init.items():
        np.testing.assert_array_equal(to_numpy(result.arrays)[key], value)
    assert any("keeping the previous global model" in r.getMessage() for r in caplog.records)


BOTH = {"ema_decay": 0.7, "swa_start": 2, "ema_warmup": True}


def _run(name, options, grid, rounds, **extra):
    """`rounds` rounds on `grid`: the Result and the strategy's final models."""
    strategy = server_strategy(
        name, fraction_train=0.6, fraction_evaluate=0.4, seed=7, **options, **extra
    )
    result = strategy.start(
        grid,
        to_record(initial_arrays()),
        num_rounds=rounds,
        evaluate_fn=lambda r, a: MetricRecord({"w0": float(to_numpy(a)["weight"][0, 0])}),
    )
    return result, {k: to_numpy(v) for k, v in strategy.final_models().items()}


def _assert_same_models(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, arrays in theirs.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(ours[name][key], value, err_msg=f"{name}/{key}")


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedavg", {"ema_decay": 0.7}),
        ("scaffold", {"swa_start": 2}),
        ("fedsam", {"rho": 0.05}),
        ("fedavg", BOTH),  # the checkpoint holds SWA's first round and EMA's update count
    ],
)
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, name, options):
    data = heterogeneous_least_squares(num_clients=5)
    straight, straight_models = _run(name, options, make_grid(data, epochs=2)[0], 4)

    grid, _ = make_grid(data, epochs=2)  # clients keep their state, as running SuperNodes do
    _run(name, options, grid, 2, checkpoint_dir=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    random.seed(12345)  # what else draws from the global streams changes no sample
    resumed, resumed_models = _run(
        name, options, grid, 4, checkpoint_dir=str(tmp_path), resume=True
    )

    for key, value in to_numpy(straight.arrays).items():
        np.testing.assert_array_equal(to_numpy(resumed.arrays)[key], value)
    _assert_same_models(resumed_models, straight_models)
    assert len(straight_models) == 1 + len({"ema_decay", "swa_start"} & set(options))
    assert resumed.evaluate_metrics_serverapp == straight.evaluate_metrics_serverapp
    assert resumed.train_metrics_clientapp == straight.train_metrics_clientapp


def test_a_checkpoint_from_before_both_averages_could_be_kept_resumes(tmp_path):
    """Runs under way when EMA and SWA were alternatives wrote one "average" buffer."""
    data = heterogeneous_least_squares(num_clients=5)
    options = {"swa_start": 1}
    _, straight = _run("fedavg", options, make_grid(data)[0], 4)
    grid, _ = make_grid(data)
    _run("fedavg", options, grid, 2, checkpoint_dir=str(tmp_path))
    path = tmp_path / CHECKPOINT_NAME
    groups, meta = load_checkpoint(path)
    groups["average"] = groups.pop("swa")
    for key in ("averaging", "averaging-counts"):
        del meta[key]
    save_checkpoint(path, groups, {**meta, "average": [None, 1], "average-count": 2})
    _, resumed = _run("fedavg", options, grid, 4, checkpoint_dir=str(tmp_path), resume=True)
    _assert_same_models(resumed, straight)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    grid, _ = make_grid(heterogeneous_least_squares())
    server_strategy("fedavg", fraction_evaluate=0.0, checkpoint_dir=str(tmp_path)).start(
        grid, to_record(initial_arrays()), num_rounds=1
    )
    with pytest.raises(ValueError, match="algorithm 'fedavg'"):
        server_strategy(
            "fedprox", proximal_mu=0.1, checkpoint_dir=str(tmp_path), resume=True
        ).start(grid, to_record(initial_arrays()), num_rounds=2)
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*server averaging"):
        server_strategy("fedavg", ema_decay=0.9, checkpoint_dir=str(tmp_path), resume=True).start(
            grid, to_record(initial_arrays()), num_rounds=2
        )
    ema = tmp_path / "ema"
    server_strategy("fedavg", ema_decay=0.9, fraction_evaluate=0.0, checkpoint_dir=str(ema)).start(
        grid, to_record(initial_arrays()), num_rounds=1
    )
    with pytest.raises(CheckpointError, match="'ema_warmup': False}, this run"):
        server_strategy(
            "fedavg", ema_decay=0.9, ema_warmup=True, checkpoint_dir=str(ema), resume=True
        ).start(grid, to_record(initial_arrays()), num_rounds=2)
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        server_strategy("fedavg", resume=True)


def test_registry_names_algorithms_and_rejects_unknown_options():
    assert strategies.ALGORITHMS == ("fedavg", "fedprox", "fedsam", "scaffold")
    for name in strategies.ALGORITHMS:
        assert server_strategy(name, ema_decay=0.9).algorithm == name
    with pytest.raises(TypeError, match="fedavg: unknown option.*proximal_mu"):
        server_strategy("fedavg", proximal_mu=0.1)
    with pytest.raises(ValueError, match="unknown algorithm 'fedopt'"):
        server_strategy("fedopt")
    with pytest.raises(KeyError, match="no 'algorithm'"):
        client_half({"lr": 0.1}, lr=0.1)
    with pytest.raises(KeyError, match="fedprox: train config has no 'proximal-mu'"):
        client_half({"algorithm": "fedprox"}, lr=0.1)


def test_array_views_read_what_flower_serialized():
    from flwr.app import Array

    from strategies.server import array_view

    samples = [
        np.array(3, np.int64),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        np.zeros((0, 5), np.float16),
    ]
    for value in samples:
        view = array_view(Array(value))
        assert view.dtype == value.dtype and view.shape == value.shape
        np.testing.assert_array_equal(view, value)
        assert not view.flags.writeable
