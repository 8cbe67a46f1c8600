"""The package boundaries of ../shared/DESIGN.md, checked on the source's imports, and the CLI."""

import ast
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from fedpsg.app.config import parse_run_config
from fedpsg.run.cli import app

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules (or dotted prefixes) it must never import
FORBIDDEN = {
    "benchmark_builder": ("flwr", "fedpsg", "strategies", "diffusion_clients"),
    "strategies": ("fedpsg", "diffusion_clients", "benchmark_builder"),
    "fedpsg/psg": ("flwr", "fedpsg.app", "fedpsg.run", "diffusion_clients"),
    "diffusion_clients": ("flwr", "fedpsg", "benchmark_builder"),
    "fedpsg/app": ("fedpsg.run", "fedpsg.psg", "diffusion_clients"),
}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_boundaries(package):
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in sorted(imports(path))
        for prefix in FORBIDDEN[package]
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert bad == []


def test_fedpsg_top_level_is_three_rooms():
    entries = {p.name for p in (ROOT / "fedpsg").iterdir() if p.name != "__pycache__"}
    assert entries == {"__init__.py", "__main__.py", "app", "psg", "run"}


def test_run_config_grammar_is_flowers():
    args = ["lr=0.05 local-epochs=2", "model='vctree' adaptive=true"]
    assert parse_run_config(args) == parse_config_args(args)
    assert parse_run_config(args) == {
        "lr": 0.05, "local-epochs": 2, "model": "vctree", "adaptive": True
    }  # fmt: skip
    with pytest.raises(ValueError, match="model=vctree"):
        parse_run_config(["model=vctree"])  # flwr run rejects a bare string too


def test_cli_lists_its_commands_and_refuses_bad_config_with_one_line(tmp_path):
    runner = CliRunner()
    listing = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0
    for command in ("simulate", "deploy", "centralized", "certs"):
        assert command in listing.output
    bad = runner.invoke(app, ["simulate", str(tmp_path), "-c", "model=vctree"])
    assert bad.exit_code == 2 and "model=vctree" in bad.output
    assert "Traceback" not in bad.output
