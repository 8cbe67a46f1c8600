"""The FL-PSG grid's bookkeeping across calls: job time of resumed federations, merged rows."""

from __future__ import annotations

import json
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
