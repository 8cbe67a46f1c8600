"""The federated statistics round: clients' predicate-pair counts summed before round 1 give
exactly the pooled prior the centralized baseline counts; `none` leaves the table at zero."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_synthetic_benchmark
from scene_helpers import NUM_CLASSES, NUM_PREDICATES, random_scene

from fedpsg.app import client_app, server_app
from fedpsg.app.task import load_task, sum_statistics
from fedpsg.psg.centralized import run_centralized
from fedpsg.psg.data import GEOMETRY_DIM, PAIR_GEOMETRY_DIM, collate
from fedpsg.psg.models import ModelSpec, build_model
from fedpsg.psg.task import PAIR_COUNTS, benchmark_from_config, load_scenes, model_spec
from fedpsg.psg.train import evaluate, frequency_prior, log_prior, pair_counts
from fedpsg.run.simulate import simulate, simulate_in_process
from strategies.local_grid import LocalGrid

NUM_CLIENTS = 4


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prior")
    return build_synthetic_benchmark(
        root, 160, 2, with_pixels=False, num_clients=NUM_CLIENTS, alpha=0.3, seed=0
    )


def config(benchmark_dir: Path, **extra) -> dict:
    return {
        "task": "psg",
        "strategy": "fedavg",
        "benchmark-dir": str(benchmark_dir),
        "model": "motifs",
        "mode": "predcls",
        "features": "geometry",
        "num-server-rounds": 1,
        "fraction-train": 0.5,
        "min-train-nodes": 2,
        "local-epochs": 1,
        "lr": 0.05,
        "batch-size": 8,
        "seed": 0,
        **extra,
    }


def pooled(benchmark_dir: Path) -> tuple[list, list]:
    benchmark = benchmark_from_config({"benchmark-dir": str(benchmark_dir)})
    train = [s for c in range(NUM_CLIENTS) for s in load_scenes(benchmark, c, False)]
    return train, load_scenes(benchmark, None, False)


def statistics_round(cfg: dict) -> dict[str, np.ndarray]:
    """The ServerApp's statistics round against the real ClientApp, node i = partition i."""
    from flwr.app import Context, RecordDict

    contexts = {
        i + 1: Context(i + 1, i + 1, {"partition-id": i, "num-partitions": NUM_CLIENTS},
                       RecordDict(), cfg)  # fmt: skip
        for i in range(NUM_CLIENTS)
    }

    def node(context):
        return lambda message: client_app.app(message, context).content

    local = LocalGrid({n: node(c) for n, c in contexts.items()})
    grid = server_app.PartitionGrid(local, {n: n - 1 for n in contexts})
    return server_app.collect_statistics(grid, load_task("psg"), cfg)


def test_the_round_sums_to_the_pooled_counts_exactly(benchmark_dir):
    train, _ = pooled(benchmark_dir)
    benchmark = benchmark_from_config({"benchmark-dir": str(benchmark_dir)})
    spec = model_spec(benchmark, False)
    expected = pair_counts(train, spec.num_classes, spec.num_predicates).numpy()
    summed = statistics_round(config(benchmark_dir, **{"frequency-prior": "federated"}))
    assert set(summed) == {PAIR_COUNTS}
    assert summed[PAIR_COUNTS].dtype == np.float64
    assert np.array_equal(summed[PAIR_COUNTS], expected)  # exactly, not approximately
    assert expected.sum() > 1000 and (expected[..., 1:] > 0).sum() > 10  # real, varied counts
    # what the server serves is the centralized baseline's pooled prior, bit for bit
    model = build_model("motifs", spec)
    load_task("psg").apply_statistics(model, summed, {"frequency-prior": "federated"})
    table = model.frequency_bias.table.weight.reshape(expected.shape)
    assert torch.equal(table, frequency_prior(train, spec.num_classes, spec.num_predicates))


def test_none_sends_nothing_and_leaves_the_table_at_zero(benchmark_dir):
    assert statistics_round(config(benchmark_dir)) == {}  # the default is none: no round
    task = load_task("psg")
    cfg = config(benchmark_dir)
    model = task.build_model(cfg)
    task.apply_statistics(model, {}, cfg)
    assert not model.frequency_bias.table.weight.any()


def test_the_federation_starts_from_the_pooled_prior(benchmark_dir, tmp_path):
    """Through the real ServerApp and ClientApp: round 0 (before training) of a `federated`
    run scores exactly as the frequency baseline on the pooled prior (an untrained MOTIFS
    scores as its table), and as the centralized `pooled` run's epoch 0; `none` does not."""
    train, test = pooled(benchmark_dir)
    spec = model_spec(benchmark_from_config({"benchmark-dir": str(benchmark_dir)}), False)
    prior = frequency_prior(train, spec.num_classes, spec.num_predicates)
    baseline = evaluate(build_model("frequency", spec, prior), test)
    rows = {}
    for mode in ("none", "federated"):
        out = tmp_path / mode
        simulate_in_process(config(benchmark_dir, **{"frequency-prior": mode}), NUM_CLIENTS, out)
        rows[mode] = json.loads((out / "metrics.json").read_text())["rounds"][0]["server"]
    for key in ("R@20", "R@50", "mR@50", "mR-present@50"):
        assert rows["federated"][key] == pytest.approx(baseline[key], abs=1e-12), key
    assert rows["federated"]["R@50"] > rows["none"]["R@50"] + 0.05
    cl = run_centralized(config(benchmark_dir, **{"frequency-prior": "pooled"}), epochs=0)
    assert cl.history[0]["R@50"] == pytest.approx(baseline["R@50"], abs=1e-12)
    cl_none = run_centralized(config(benchmark_dir, **{"frequency-prior": "none"}), epochs=0)
    assert not cl_none.model.frequency_bias.table.weight.any()


def test_sum_statistics_is_exact_and_checks_shapes():
    big = np.full((2, 3), 2.0**52)
    total = sum_statistics([{"a": big}, {"a": np.ones((2, 3), dtype=np.float32)}, {}])
    assert np.array_equal(total["a"], np.full((2, 3), 2.0**52 + 1))
    with pytest.raises(ValueError, match="shapes"):
        sum_statistics([{"a": big}, {"a": np.ones(3)}])


def test_bad_prior_modes_are_clear_errors_and_imp_gets_its_table(benchmark_dir):
    task = load_task("psg")
    cfg = config(benchmark_dir, model="imp", **{"frequency-prior": "federated"})
    with pytest.raises(ValueError, match="frequency-prior must be one of"):
        task.statistics([], {**cfg, "frequency-prior": "pooled"})
    with pytest.raises(ValueError, match=r"none.*pooled"):
        run_centralized({**cfg, "frequency-prior": "federated"}, epochs=0)
    # IMP's table is optional: off under none (as in the paper), on when a prior is asked for
    assert task.build_model({**cfg, "frequency-prior": "none"}).frequency_bias is None
    model = task.build_model(cfg)
    summed = statistics_round(cfg)
    task.apply_statistics(model, summed, cfg)
    expected = log_prior(torch.from_numpy(summed[PAIR_COUNTS]))
    assert torch.equal(model.frequency_bias.table.weight.reshape(expected.shape), expected)
    cl = run_centralized({**cfg, "frequency-prior": "pooled"}, epochs=0)
    assert torch.equal(cl.model.frequency_bias.table.weight.reshape(expected.shape), expected)


def test_imp_takes_the_optional_bias():
    """IMP with `use_bias` adds the table to its logits (OpenPSG's IMP head option); without
    it a prior is refused rather than ignored."""
    spec = ModelSpec(NUM_CLASSES, NUM_PREDICATES, GEOMETRY_DIM, PAIR_GEOMETRY_DIM)
    prior = torch.randn(NUM_CLASSES, NUM_CLASSES, NUM_PREDICATES + 1)
    with pytest.raises(ValueError, match="use_bias"):
        build_model("imp", spec, prior)
    assert build_model("imp", spec).frequency_bias is None
    torch.manual_seed(0)
    plain = build_model("imp", spec, use_bias=True)
    torch.manual_seed(0)
    biased = build_model("imp", spec, prior, use_bias=True)
    assert torch.equal(biased.frequency_bias.table.weight.reshape(prior.shape), prior)
    batch = collate([random_scene(np.random.default_rng(0), 5, 3, False)])
    s, o = batch.labels[batch.pairs[:, 0]], batch.labels[batch.pairs[:, 1]]
    delta = biased(batch).predicate_logits - plain(batch).predicate_logits
    assert torch.allclose(delta, prior[s, o], atol=1e-5)


@pytest.mark.slow
def test_the_round_runs_through_a_superlink(benchmark_dir, tmp_path):
    """The `query.statistics` action through a real SuperLink (`flwr run`, Ray): round 0
    scores as the frequency baseline on the pooled prior, as in process."""
    train, test = pooled(benchmark_dir)
    spec = model_spec(benchmark_from_config({"benchmark-dir": str(benchmark_dir)}), False)
    baseline = evaluate(
        build_model("frequency", spec, frequency_prior(train, spec.num_classes,
                                                       spec.num_predicates)), test
    )  # fmt: skip
    cfg = config(benchmark_dir, **{"frequency-prior": "federated"})
    code = simulate(cfg, NUM_CLIENTS, tmp_path / "out", flwr_home=tmp_path / "flwr",
                    stream=False, timeout=600)  # fmt: skip
    assert code == 0, (tmp_path / "out" / "flwr_run.log").read_text()[-2000:]
    row = json.loads((tmp_path / "out" / "metrics.json").read_text())["rounds"][0]["server"]
    assert row["R@50"] == pytest.approx(baseline["R@50"], abs=1e-12)
    assert row["mR@50"] == pytest.approx(baseline["mR@50"], abs=1e-12)
