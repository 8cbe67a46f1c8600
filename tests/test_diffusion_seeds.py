"""The seed-spread table of the diffusion experiment reads every replicate's arms right."""

from __future__ import annotations

import json

from bench.diffusion_seeds import main, seed_values


def _row(arm: str, fid: float, eig: float) -> dict:
    return {
        "arm": arm,
        "fid_20": fid,
        "fid_100": fid / 2,
        "fid_20_q8": fid,
        "fid_20_q4": 2 * fid,
        "test_loss": 0.03,
        "test_loss_q4": 0.05,
        "hessian_top_eigenvalue": eig,
        "exposure_20": {"mean_gap": -0.01},
    }


def test_seed_values_merge_a_seeds_files_and_keep_the_arms_every_seed_has(tmp_path):
    runs = [
        {
            "config": {"seed": 0},
            "arms": [_row("base", 80, 74), _row("sam", 140, 5), _row("x", 1, 1)],
        },
        {"config": {"seed": 1}, "arms": [_row("sam", 100, 6)]},
        {"config": {"seed": 1}, "arms": [_row("base", 40, 84)]},  # same seed, another batch
    ]
    values = seed_values(runs)
    assert list(values) == ["base", "sam"]
    assert values["base"]["FID@100"] == [40.0, 20.0]
    assert values["sam"]["lambda_max"] == [5.0, 6.0]
    assert values["base"]["test-loss rise 4-bit"][0] == 0.05 - 0.03

    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(run))
    main([*map(str, paths), "--out", str(tmp_path / "seeds")])
    text = (tmp_path / "seeds.md").read_text()
    assert "seeds 0, 1" in text
    assert "| base | 60.0 (40.0 to 80.0) | 30.0 (20.0 to 40.0) |" in text
    assert (tmp_path / "seeds.png").stat().st_size > 0
    assert (tmp_path / "seeds_fid_eigenvalue.png").stat().st_size > 0
    assert text.startswith("Trained on: unrecorded.")
