"""Held-out denoising-loss curves of diffusion runs, finished or cut off.

`bench.exp_diffusion_flatness` evaluates arms only once their training has run all its rounds; a
training stopped by `--deadline` leaves just its run folder (`.<setting><tag>-<training>-run/
metrics.json`, the served model's test loss every `eval-every` rounds: the plain model's where
both server averages are kept, older `-<arm>-run` folders the arm's). This tabulates and plots
those curves so runs can still be compared at the rounds they all reached.

    python -m bench.diffusion_loss_curves RUN_DIR... --out bench/results/diffusion_federated_loss
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run_dir: Path) -> dict[int, float]:
    """Round -> server test loss of one run folder."""
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    return {r["round"]: r["server"]["loss"] for r in rounds if "loss" in r["server"]}


def arm_name(run_dir: Path) -> str:
    """`.federated-fedsam-0.1-run` -> `fedsam-0.1` (`.central_s0-base-run` -> `base`)."""
    return run_dir.name.removeprefix(".").split("-", 1)[1].removesuffix("-run")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output stem (.md, .json, .png)")
    p.add_argument("--every", type=int, default=10, help="table rows every k rounds")
    args = p.parse_args(argv)
    curves = {arm_name(run): curve(run) for run in args.runs}
    reached = min(max(c) for c in curves.values())
    rows = [r for r in sorted(set.intersection(*(set(c) for c in curves.values())))
            if r % args.every == 0 or r == reached]  # fmt: skip
    lines = [
        "| round | " + " | ".join(curves) + " |",
        "| ---: |" + " ---: |" * len(curves),
        *(f"| {r} | " + " | ".join(f"{c[r]:.4f}" for c in curves.values()) + " |" for r in rows),
        "",
        "| last round evaluated | " + " | ".join(str(max(c)) for c in curves.values()) + " |",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(list(c)[1:], list(c.values())[1:], marker=".", label=name)
    ax.set(xlabel="round", ylabel="held-out denoising loss", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
