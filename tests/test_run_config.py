"""Run config is checked once, before anything runs, by one validator (pyproject defaults +
`fedpsg.app.config.RULES`): in the launcher (exit 2, nothing started), in the in-process
engine and in the ServerApp (the run fails with one line naming the key and its range)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from fedpsg.app import server_app
from fedpsg.app.config import (
    RULES,
    RunConfigError,
    app_defaults,
    ignored_keys,
    strategy_kwargs,
    validate_run_config,
)
from fedpsg.run.cli import app
from fedpsg.run.simulate import simulate_in_process
from strategies import server_options

BAD = [
    ({"proximal_mu": 0.5}, "unknown key 'proximal_mu'; did you mean 'proximal-mu'?"),
    ({"local_epochs": 2}, "unknown key 'local_epochs'; did you mean 'local-epochs'?"),
    ({"lr": "abc"}, "lr='abc': expected a finite number > 0"),
    ({"lr": math.nan}, "lr=nan: expected a finite number > 0"),
    ({"lr": 0}, "lr=0: expected a finite number > 0"),
    ({"batch-size": 0}, "batch-size=0: expected an integer >= 1"),
    ({"batch-size": 2.5}, "batch-size=2.5: expected an integer >= 1"),
    ({"eval-every": 0}, "eval-every=0: expected an integer >= 1"),
    ({"num-server-rounds": 0}, "num-server-rounds=0: expected an integer >= 1"),
    ({"local-epochs": 0}, "local-epochs=0: expected an integer >= 1"),
    ({"rho": -0.1}, "rho=-0.1: expected a finite number >= 0"),
    ({"server-ema": 1.0}, "server-ema=1.0: expected a number in [0, 1)"),
    ({"server-ema": -0.5}, "server-ema=-0.5: expected a number in [0, 1)"),
    ({"server-ema-warmup": 1}, "server-ema-warmup=1: expected true or false"),
    ({"server-ema-warmup": True}, "server-ema-warmup=true: warms up the server EMA; set"),
    ({"fraction-train": 0.0}, "fraction-train=0.0: expected a number in (0, 1]"),
    ({"adaptive": 1}, "adaptive=1: expected true or false"),
    ({"strategy": "fedavg,fedavg"}, "strategy='fedavg,fedavg': expected one of fedavg"),
    ({"strategy": "fedadam"}, "strategy='fedadam': expected one of fedavg"),
    ({"benchmark-dir": "data/syn"}, "benchmark-dir='data/syn': expected an absolute path"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_a_bad_value_is_one_line_naming_key_and_range(overrides, message):
    with pytest.raises(RunConfigError) as caught:
        validate_run_config(overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_defaults_and_sane_overrides_pass():
    config = validate_run_config({"lr": 1, "server-ema": 0.99, "strategy": "fedavg,scaffold"})
    assert config["lr"] == 1 and config["batch-size"] == app_defaults()["batch-size"]


def test_server_averaging_keys_reach_the_strategy(tmp_path: Path):
    def kwargs(**overrides):
        config = validate_run_config(overrides)
        return strategy_kwargs(config, 2, tmp_path, server_options("fedavg"))

    both = kwargs(**{"server-ema": 0.9, "server-ema-warmup": True, "server-swa-start": 3})
    assert (both["ema_decay"], both["ema_warmup"], both["swa_start"]) == (0.9, True, 3)
    none = kwargs()
    assert (none["ema_decay"], none["ema_warmup"], none["swa_start"]) == (None, False, None)


def test_every_rule_names_a_pyproject_key():
    assert set(RULES) <= set(app_defaults())


def test_keys_the_strategy_ignores_are_named():
    assert ignored_keys(validate_run_config({"proximal-mu": 0.5})) == ["proximal-mu"]
    assert ignored_keys(validate_run_config({"proximal-mu": 0.5, "strategy": "fedprox"})) == []
    assert ignored_keys(validate_run_config({"rho": 0.1, "strategy": "fedavg,fedsam"})) == []
    assert ignored_keys(validate_run_config({"server-lr": 0.5, "strategy": "fedsam"})) == [
        "server-lr"
    ]


@pytest.mark.parametrize(
    ("arg", "named"),
    [("proximal_mu=0.5", "proximal-mu"), ("lr=abc", "lr=abc"), ("batch-size=0", "batch-size")],
)
def test_launcher_refuses_before_starting_anything(tmp_path: Path, arg, named):
    """Exit 2 (usage), one line, no traceback; the missing benchmark is never even read."""
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "none"), "-c", arg])
    assert result.exit_code == 2
    assert named in result.output and "Traceback" not in result.output
    assert not (tmp_path / "none").exists() and not Path("runs/sim/superlink.log").exists()


def test_launcher_warns_about_an_ignored_key_and_exits_1_on_missing_data(tmp_path: Path):
    result = CliRunner().invoke(
        app, ["simulate", str(tmp_path), "--strategy", "fedavg", "-c", "proximal-mu=0.5"]
    )
    assert "run config proximal-mu=0.5: strategy fedavg ignores it" in result.output
    assert result.exit_code == 1 and "no benchmark manifest" in result.output


def test_in_process_engine_refuses_before_writing(tmp_path: Path):
    with pytest.raises(RunConfigError, match="batch-size=0"):
        simulate_in_process({"batch-size": 0}, 2, tmp_path / "run")
    assert not (tmp_path / "run").exists()


class UnusableGrid:
    """A Grid that fails any use: the ServerApp must stop before touching the federation."""

    def __getattr__(self, name):
        raise AssertionError(f"the ServerApp used the grid ({name}) despite a bad config")


def test_server_app_fails_before_round_1(tmp_path: Path):
    """What a deployment's or plain `flwr run -c eval-every=0` reaches (Flower checks only
    that the key exists)."""
    config = {**app_defaults(), "eval-every": 0, "out-dir": str(tmp_path)}
    with pytest.raises(RunConfigError, match=r"eval-every=0: expected an integer >= 1"):
        server_app.main(UnusableGrid(), Context(1, 0, {}, RecordDict(), config))
    assert list(tmp_path.iterdir()) == []


def test_deploy_refuses_before_making_certificates_or_starting(tmp_path: Path):
    result = CliRunner().invoke(
        app,
        ["deploy", "local", "--benchmark", str(tmp_path), "--tls", "--run-dir",
         str(tmp_path / "run"), "-c", "server-ema=1.5"],
    )  # fmt: skip
    assert result.exit_code == 2 and "server-ema=1.5" in result.output
    assert not (tmp_path / "run").exists()  # no certificates, no logs, no processes


def test_server_app_checks_ranges_where_no_pyproject_ships_with_the_code(monkeypatch):
    """A wheel install (the compose app image) has no pyproject beside the package; Flower
    has merged the FAB's defaults into the run config, so the ranges are still checked."""
    defaults = app_defaults()

    def no_pyproject():
        raise RunConfigError("site-packages/pyproject.toml: no [tool.flwr.app.config] table")

    monkeypatch.setattr(server_app, "app_defaults", no_pyproject)
    assert server_app.checked_config(defaults) == defaults
    with pytest.raises(RunConfigError, match="local-epochs=0"):
        server_app.checked_config({**defaults, "local-epochs": 0})
