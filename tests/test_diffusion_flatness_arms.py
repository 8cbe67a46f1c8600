"""`bench.exp_diffusion_flatness` trains each (algorithm, rho) once and evaluates every arm of
that training from the final model the arm names (plain, EMA or SWA)."""

from bench.exp_diffusion_flatness import (
    ARMS,
    PAPER_ARMS,
    model_file,
    parse_args,
    run_dir,
    trainings,
)


def test_the_paper_arms_need_three_trainings():
    assert trainings(list(PAPER_ARMS)) == {
        "fedavg": ["base", "ema", "swa"],
        "fedsam-0.1": ["sam-0.1", "sam-0.1+ema"],
        "fedsam-0.5": ["sam-0.5"],
    }
    assert {name: model_file(name) for name in PAPER_ARMS} == {
        "base": "final_model_plain.pt",
        "ema": "final_model_ema.pt",
        "swa": "final_model_swa.pt",
        "sam-0.1": "final_model_plain.pt",
        "sam-0.5": "final_model_plain.pt",
        "sam-0.1+ema": "final_model_ema.pt",
    }
    settings = {(arm["algorithm"], arm.get("rho")) for arm in ARMS.values()}
    assert len(trainings(list(ARMS))) == len(settings)  # one training per (algorithm, rho)


def test_the_paper_preset_warms_the_ema_up_and_run_folders_are_per_training(tmp_path):
    paper = parse_args(["--preset", "paper", "--tag", "_s0", "--out", str(tmp_path)])
    assert paper.ema_warmup and paper.arms == ",".join(PAPER_ARMS)
    assert run_dir(paper, "fedsam-0.1") == tmp_path / ".central_s0-fedsam-0.1-run"
    assert not parse_args(["--preset", "paper", "--no-ema-warmup"]).ema_warmup
    assert not parse_args([]).ema_warmup  # the SGD setting's EMA keeps its meaning
    assert parse_args(["--ema-warmup"]).ema_warmup
