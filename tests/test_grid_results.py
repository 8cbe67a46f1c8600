"""The FL-PSG grid's bookkeeping across calls: job time of resumed federations, merged rows."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from bench.exp_fl_psg import job_seconds, main

METRICS = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100", "mR-present@50")


def row(job: str, recall: float, elapsed: list[float]) -> dict:
    partition, model, method, prior, seed = job.split("/")
    return {
        "job": job, "partition": partition, "model": model, "method": method, "prior": prior,
        "seed": int(seed), "cluster_jsd": 0.1, "predicate_jsd": 0.01,
        **dict.fromkeys(METRICS, recall), "curve": [], "elapsed_s": elapsed,
        "wall_s": elapsed[-1], "machine": "test",
    }  # fmt: skip


def test_a_resumed_federation_counts_every_call() -> None:
    # stopped after round 2 at 30 s, resumed: the next call's times restart from zero
    resumed = row("iid/motifs/fedavg/federated/0", 0.5, [1.0, 20.0, 30.0, 5.0, 12.0])
    assert job_seconds(resumed) == 42.0
    assert job_seconds(row("iid/motifs/fedavg/federated/1", 0.5, [1.0, 20.0, 30.0])) == 30.0


def test_merge_adds_missing_rows_and_keeps_existing(tmp_path: Path) -> None:
    results, other = tmp_path / "results", tmp_path / "other.json"
    results.mkdir()
    mine = [row(f"iid/motifs/fedavg/federated/{s}", 0.5, [10.0]) for s in (0, 1)]
    (results / "grid.json").write_text(json.dumps({"rows": mine}))
    theirs = [row("iid/motifs/fedavg/federated/1", 0.9, [10.0]),
              row("iid/motifs/fedavg/federated/2", 0.6, [10.0])]  # fmt: skip
    other.write_text(json.dumps({"rows": theirs}))
    main(["--results", str(results), "--name", "grid", "--merge", str(other)])
    merged = json.loads((results / "grid.json").read_text())
    assert sorted(r["job"] for r in merged["rows"]) == [f"iid/motifs/fedavg/federated/{s}"
                                                        for s in (0, 1, 2)]  # fmt: skip
    assert {r["job"]: r["R@50"] for r in merged["rows"]}["iid/motifs/fedavg/federated/1"] == 0.5
    (cell,) = merged["cells"]
    assert cell["seeds"] == [0, 1, 2]
    assert abs(cell["R@50"]["mean"] - (0.5 + 0.5 + 0.6) / 3) < 1e-12
    assert "| iid |" in (results / "grid.md").read_text()


def test_unfinished_runs_pack_into_what_a_call_brings_back(tmp_path: Path, capsys) -> None:
    """At most `--pack-files` tars of `--pack-mib`, the furthest-advanced federations first;
    the rest are named, not packed."""
    from bench.exp_fl_psg import job_dir, pack_unfinished, parse_args

    args = parse_args(["--out", str(tmp_path / "out"), "--results", str(tmp_path / "res"),
                       "--pack-mib", "1", "--pack-files", "2"])  # fmt: skip
    names = [f"iid/vctree/fedavg/federated/{s}" for s in range(3)]
    for seed, done in enumerate((10, 30, 20)):  # rounds done: seed 1 furthest, then 2, then 0
        root = job_dir(args, names[seed])
        (root / "checkpoints").mkdir(parents=True)
        (root / "checkpoints" / "checkpoint.npz").write_bytes(b"x" * 700_000)
        (root / "metrics.json").write_text(json.dumps({"rounds": [{}] * done}))
    packs = pack_unfinished(args, names)
    assert [p.name for p in packs] == ["unfinished-0.tar", "unfinished-1.tar"]
    packed = []
    for pack in packs:
        with tarfile.open(pack) as tar:  # runs/iid/vctree/fedavg/federated/<seed>/...
            packed.append(sorted({member.split("/")[5] for member in tar.getnames()}))
    assert packed == [["1"], ["2"]]
    assert "not packed (over 2 x 1.0 MiB): iid/vctree/fedavg/federated/0" in capsys.readouterr().out


def test_the_partition_table_orders_by_index_and_names_partial_cells() -> None:
    """The README's table: partitions by their cluster JSD, a cell with fewer seeds than the
    grid's names them, a missing one is "-", the CL row (the prior's CL counterpart) last."""
    from bench.exp_fl_psg import by_partition, cells

    def at(job: str, recall: float, jsd: float) -> dict:
        return {**row(job, recall, [1.0]), "cluster_jsd": jsd}

    rows = [at(f"shard/motifs/fedavg/none/{s}", 0.5, 0.5) for s in (0, 1, 2)]
    rows += [at(f"iid/motifs/fedavg/none/{s}", 0.6, 0.01) for s in (0, 1, 2)]
    rows += [at("iid/vctree/fedavg/none/0", 0.7, 0.01), at("pooled/motifs/CL/none/0", 0.8, 0)]
    rows += [at("iid/motifs/fedavg/federated/0", 0.1, 0.01)]  # the other prior: not here
    header, _, iid, shard, cl = by_partition(cells(rows), "none")
    assert header.split(" | ")[-2:] == ["motifs", "vctree |"]
    assert iid.startswith("| iid | 0.010 |") and shard.startswith("| shard | 0.500 |")
    assert "| 60.0 [60.0, 60.0] / 60.0 [60.0, 60.0] | 70.0 [70.0, 70.0] / 70.0 [70.0, 70.0] " \
           "(seeds 0) |" in iid  # fmt: skip
    assert shard.endswith("| 50.0 [50.0, 50.0] / 50.0 [50.0, 50.0] | - |")
    assert cl.startswith("| CL, prior none | | | 80.0")
    assert by_partition(cells(rows), "federated")[-1].startswith("| CL, prior pooled | | | - |")


def test_the_strategy_table_pairs_each_seed_with_its_fedavg_run() -> None:
    """Tier 3 against FedAvg: the difference is taken seed by seed, marked only where every
    seed agrees in sign; a method that has not run is "-"."""
    from bench.exp_fl_psg import by_method

    def at(job: str, recall: float) -> dict:
        return row(job, recall, [1.0])

    rows = [at(f"iid/motifs/fedavg/federated/{s}", r) for s, r in enumerate((0.50, 0.60, 0.55))]
    rows += [at(f"iid/motifs/fedprox/federated/{s}", r) for s, r in enumerate((0.51, 0.62, 0.58))]
    rows += [at(f"iid/motifs/fedsam/federated/{s}", r) for s, r in enumerate((0.49, 0.61, 0.55))]
    rows += [at("iid/motifs/fedprox/none/0", 0.9)]  # another prior: not compared
    header, _, line = by_method(rows)
    assert header == "| model | partition | fedavg | fedprox | fedsam | scaffold |"
    fedavg, fedprox, fedsam, scaffold = line.split(" | ")[2:]
    assert fedavg == "55.0 / 55.0"
    # +1, +2, +3 points: all positive -> marked
    assert fedprox == "57.0 / 57.0 (+2.00 [+1.00, +3.00]+ / +2.00 [+1.00, +3.00]+)"
    # -1, +1, 0: no reading
    assert fedsam == "55.0 / 55.0 (+0.00 [-1.00, +1.00] / +0.00 [-1.00, +1.00])"
    assert scaffold == "- |"
    rows += [at("iid/motifs/scaffold/federated/1", 0.62)]  # one seed so far: named
    assert by_method(rows)[2].endswith("| 62.0 / 62.0 (seeds 1) (+2.00 [+2.00, +2.00]+ / "
                                       "+2.00 [+2.00, +2.00]+) |")  # fmt: skip
    assert by_method([at("iid/motifs/fedavg/federated/0", 0.5)]) == []
