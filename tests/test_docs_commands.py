"""Every ```bash block of README.md and docs/*.md runs, so the documented commands stay true.

Each block runs in bash, in a fresh sandbox folder per document (blocks of one document run in
order and share it, as a reader's shell would), with the venv's tools first on the PATH and
a sandbox FLWR_HOME. Sizes are cut by fixed rules so the whole file takes minutes:

- `--images N` -> 60, `--clients N` / `--nodes N` -> 3, `--rounds N` / `--epochs N` -> 1
  (`fedpsg simulate` without `--rounds` gets `--rounds 1`);
- `fedpsg simulate` runs with `--engine in-process` (the same ServerApp and ClientApps; the
  Ray path is run by tests/test_first_contact.py, test_ray_cluster.py, test_psg_federation.py);
- placeholders: `/abs/path/benchmark` and `fedpsg simulate ...` -> a small synthetic
  benchmark, `[--tls]` -> dropped, `psg.json.gz` and `../shared/data/psg_annotations.json.gz`
  -> the first 2,000 images of the real annotations, `fl_psg_word_categorized.json` /
  `../shared/data/` -> ../shared/data.

Skipped, each with its reason (SKIP): Docker and compose commands, the suite itself
(`make test`), commands that need a SuperLink the reader runs, and blocks that start with
`# multi-host` (they need several machines). GPU experiments (`python -m bench....`) and,
unless FEDPSG_DOCS_DEPLOY=1, `fedpsg deploy local` commands are dropped from their blocks
(see DROPPED).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_DATA, build_synthetic_benchmark

pytestmark = pytest.mark.slow

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A block whose first command starts with one of these is skipped, for this reason.
SKIP = {
    "make test": "the test suite itself (CI runs it)",
    "make demo": "a Ray run of minutes with fixed sizes; tests/test_first_contact.py runs the "
    "same Flower app through plain `flwr run .`",
    "docker ": "needs a Docker engine (tests/test_docker_compose.py runs the compose federation "
    "in containers)",
    "make images": "builds the compose images: needs a Docker engine",
    "fedpsg certs certs --nodes 3": "a Docker recipe (chown to the Flower images' uid)",
    "export FLWR_HOME": "needs a SuperLink the reader runs (`<connection>`)",
}
# Lines dropped from a block that otherwise runs: GPU experiments of hours (bench/ scripts,
# run on a lent GPU machine), and `fedpsg deploy local` unless FEDPSG_DOCS_DEPLOY=1: each
# starts 7-9 processes and took about 4 minutes for one round on the loaded 2-core machine
# (all three passed that way); tests/test_deploy_local.py and test_deploy_tls.py start the
# same services.
DROPPED = re.compile(
    r"^\s*python -m bench\..*$"
    + ("" if os.environ.get("FEDPSG_DOCS_DEPLOY") == "1" else r"|^fedpsg deploy local .*$"),
    re.M,
)

SIZES = [
    (re.compile(r"--images \d+"), "--images 60"),
    (re.compile(r"--clients \d+"), "--clients 3"),
    (re.compile(r"--nodes \d+"), "--nodes 3"),
    (re.compile(r"--rounds \d+"), "--rounds 1"),
    (re.compile(r"--epochs \d+"), "--epochs 1"),
    (re.compile(r" \[--tls\]"), ""),
    (re.compile(r"\.\./shared/data/psg_annotations\.json\.gz"), "psg.json.gz"),
    (re.compile(r"\.\./shared/data/"), f"{SHARED_DATA}/"),
    (
        re.compile(r"(?<![\w/.-])fl_psg_word_categorized\.json"),
        str(SHARED_DATA / "fl_psg_word_categorized.json"),
    ),
]


def blocks() -> list[tuple[Path, int, str]]:
    """(document, line, block text) of every ```bash block, in document order."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"```bash\n(.*?)```", text, re.S):
            found.append((doc, text[: match.start()].count("\n") + 1, match.group(1)))
    return found


def skip_reason(block: str) -> str | None:
    """Why a block does not run here, or None."""
    if block.startswith("# multi-host"):
        return "needs several hosts (test_ray_cluster.py runs a 2-node Ray cluster on one)"
    if "python -m bench." in block and not re.search(r"^(fedpsg|flwr)", block, re.M):
        return "GPU experiments of hours (bench/ scripts, run on a lent GPU machine)"
    first = next(line for line in block.splitlines() if line and not line.startswith("#"))
    return next((why for start, why in SKIP.items() if first.startswith(start)), None)


def shrink(block: str, benchmark: Path, annotations: Path) -> str:
    """The block with the size rules and placeholders of the module docstring applied."""
    block = DROPPED.sub("", block.replace("\\\n", " "))  # continuation lines joined first
    block = block.replace("/abs/path/benchmark", str(benchmark))
    block = block.replace("fedpsg simulate ...", f"fedpsg simulate {benchmark}")
    for pattern, replacement in SIZES:
        block = pattern.sub(replacement, block)
    block = re.sub(r"(?<![\w/.-])psg\.json\.gz", str(annotations), block)
    return re.sub(r"^fedpsg simulate \S+.*$", _in_process, block, flags=re.M)


def _in_process(match: re.Match) -> str:
    """A `fedpsg simulate` line on the in-process engine, with 1 round unless it says."""
    line = match.group(0)
    extra = " --engine in-process" + ("" if "--rounds" in line else " --rounds 1")
    return re.sub(r"fedpsg simulate \S+", lambda m: m.group(0) + extra, line, count=1)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """The small benchmark that `/abs/path/benchmark` stands for (3 clients, no pixels)."""
    root = tmp_path_factory.mktemp("docs-benchmark")
    return build_synthetic_benchmark(
        root, 60, 0, with_pixels=False, num_clients=3, alpha=1.0, seed=0
    )


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    """What `psg.json.gz` stands for: the first 2,000 images of the real annotations (the
    whole 24k-image file costs a cold embedding of 12k triplet texts per block)."""
    with gzip.open(SHARED_DATA / "psg_annotations.json.gz", "rt") as handle:
        doc = json.load(handle)
    doc["data"] = doc["data"][:2000]
    path = tmp_path_factory.mktemp("annotations") / "psg.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(doc, handle)
    return path


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory) -> dict[Path, Path]:
    """One working folder per document, shared by its blocks."""
    return {doc: tmp_path_factory.mktemp(doc.stem) for doc in DOCS}


@pytest.mark.parametrize(
    ("doc", "line", "block"),
    blocks(),
    ids=[f"{doc.relative_to(ROOT)}:{line}" for doc, line, _ in blocks()],
)
def test_documented_commands_run(doc, line, block, benchmark, annotations, sandboxes):
    reason = skip_reason(block)
    if reason:
        pytest.skip(reason)
    sandbox = sandboxes[doc]
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "FLWR_HOME": str(sandbox / ".flwr"),
        "COLUMNS": "200",
    }
    script = shrink(block, benchmark, annotations)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=sandbox, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"{doc.name}:{line} failed (exit {result.returncode})\n--- script\n{script}\n"
        f"--- stderr\n{result.stderr[-4000:]}\n--- stdout\n{result.stdout[-2000:]}"
    )
