"""Tampered benchmark folders: ``inspect`` and every loader refuse them, naming file and field.

Each case edits a copy of one real build (synthetic PSG with pixels, 3 clients): a manifest claim,
a shard (with its sha256 updated to match, so only the content checks can catch it) or the set
of files. ``inspect`` must exit 1 with one stderr line naming the file and the field; a
federation client's read (``open_benchmark(verify=False).client_table(i)``) must refuse a
manifest whose class lists do not fit the shards instead of failing deep in training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from builder_helpers import cache_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from benchmark_builder.build import BuildConfig, build_benchmark
from benchmark_builder.cli import app
from benchmark_builder.shards import BenchmarkError, open_benchmark

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, synthetic_psg: Path) -> Path:
    tmp = tmp_path_factory.mktemp("tamper")
    config = BuildConfig(
        num_clients=3, alpha=0.5, num_clusters=3, featurizer_options={"cache_dir": cache_dir(tmp)}
    )
    build_benchmark(synthetic_psg, tmp / "bench", config, images_root=synthetic_psg.parent)
    return tmp / "bench"


def _manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def tamper(root: Path) -> None:
        manifest = json.loads((root / "manifest.json").read_text())
        edit(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2))

    return tamper


def _set(*path_and_value) -> Callable[[Path], None]:
    *path, value = path_and_value

    def edit(manifest: dict) -> None:
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return _manifest(edit)


def _swap_clients(manifest: dict) -> None:
    clients = manifest["clients"]
    clients[0], clients[1] = clients[1], clients[0]


def _move_one(histogram: list[int]) -> list[int]:
    source = next(i for i, v in enumerate(histogram) if v)
    histogram = list(histogram)
    histogram[source] -= 1
    histogram[(source + 1) % len(histogram)] += 1
    return histogram


def _rewrite_shard(file: str, change: Callable[[Path], None]) -> Callable[[Path], None]:
    """Change a shard's bytes and update its sha256 in the manifest to match."""

    def tamper(root: Path) -> None:
        path = root / file
        change(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest = json.loads((root / "manifest.json").read_text())
        for entry in [*manifest["clients"], manifest["test"]]:
            if entry["file"] == file:
                entry["sha256"] = digest
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2))

    return tamper


def _flip_page_data(path: Path) -> None:
    """Flip a byte inside the compressed data of the ``relations.predicate`` pages."""
    chunk = pq.ParquetFile(path).metadata.row_group(0)
    column = next(
        chunk.column(i)
        for i in range(chunk.num_columns)
        if chunk.column(i).path_in_schema.endswith("predicate")
    )
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + column.total_compressed_size - 3] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _extra_shard(root: Path) -> None:
    shutil.copy(
        root / "clients" / "client_00000.parquet", root / "clients" / "client_00003.parquet"
    )


def _duplicate_key(root: Path) -> None:
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(
        text.replace('"num_clients": 3', '"num_clients": 3, "num_clients": 2')
    )


def _overwrite_shard(root: Path) -> None:
    (root / "clients" / "client_00002.parquet").write_bytes(b"PAR1")


def _remove_shard(root: Path) -> None:
    (root / "clients" / "client_00000.parquet").unlink()


# tampering -> (file named, field named)
TAMPERINGS = {
    "client num_images 999": (
        _set("clients", 1, "num_images", 999),
        "manifest.json",
        "clients[1].num_images",
    ),
    "client num_relations -5": (
        _set("clients", 0, "num_relations", -5),
        "manifest.json",
        "clients[0].num_relations",
    ),
    "client num_relations off by one": (
        _set("clients", 2, "num_relations", lambda v: v + 1),
        "manifest.json",
        "clients[2].num_relations",
    ),
    "test size 0": (_set("test", "num_images", 0), "manifest.json", "test.num_images"),
    "test size off by one": (
        _set("test", "num_images", lambda v: v + 1),
        "manifest.json",
        "test.num_images",
    ),
    "cluster_jsd 7.0": (
        _set("heterogeneity", "cluster_jsd", 7.0),
        "manifest.json",
        "heterogeneity.cluster_jsd",
    ),
    "cluster_jsd plausible but wrong": (
        _set("heterogeneity", "cluster_jsd", lambda v: v / 2),
        "manifest.json",
        "heterogeneity.cluster_jsd",
    ),
    "predicate_jsd edited": (
        _set("heterogeneity", "predicate_jsd", lambda v: min(1, v + 0.1)),
        "manifest.json",
        "heterogeneity.predicate_jsd",
    ),
    "client index edited": (
        _set("clients", 1, "heterogeneity", "cluster_jsd", lambda v: v / 2),
        "manifest.json",
        "clients[1].heterogeneity.cluster_jsd",
    ),
    "cluster histogram edited": (
        _set("clients", 2, "cluster_histogram", _move_one),
        "manifest.json",
        "clients[2].cluster_histogram",
    ),
    "test histogram edited": (
        _set("test", "cluster_histogram", _move_one),
        "manifest.json",
        "test.cluster_histogram",
    ),
    "predicate histogram edited": (
        _set("clients", 0, "predicate_histogram", _move_one),
        "manifest.json",
        "clients[0].predicate_histogram",
    ),
    "client entries swapped": (_manifest(_swap_clients), "manifest.json", "clients[0]"),
    "predicate list cut short": (
        _set("classes", "predicates", lambda v: v[:-1]),
        "manifest.json",
        "classes.predicates",
    ),
    "thing list cut short": (
        _set("classes", "thing", lambda v: v[:-1]),
        "manifest.json",
        "classes.thing",
    ),
    "stuff list cut short": (
        _set("classes", "stuff", lambda v: v[:-1]),
        "manifest.json",
        "classes.stuff",
    ),
    "class renamed": (_set("classes", "thing", 0, "astronaut"), "manifest.json", "classes.thing"),
    "has_pixels flipped": (
        _set("source", "has_pixels", False),
        "manifest.json",
        "source.has_pixels",
    ),
    "source size edited": (
        _set("source", "num_images", lambda v: v + 3),
        "manifest.json",
        "source.num_images",
    ),
    "cluster size edited": (
        _set("clustering", "clusters", 0, "num_images", lambda v: v + 1),
        "manifest.json",
        "clustering.clusters[0].num_images",
    ),
    "cluster description edited": (
        _set("clustering", "clusters", 1, "description", "cats only"),
        "manifest.json",
        "clustering.clusters[1].description",
    ),
    "num_clients edited": (_set("num_clients", 2), "manifest.json", "clients"),
    "sha256 not a digest": (
        _set("clients", 0, "sha256", "abc"),
        "manifest.json",
        "clients[0].sha256",
    ),
    "duplicate manifest key": (_duplicate_key, "manifest.json", "num_clients"),
    "extra unlisted shard": (_extra_shard, "client_00003.parquet", "<file>"),
    "corrupt shard, sha256 updated": (
        _rewrite_shard("clients/client_00001.parquet", _flip_page_data),
        "client_00001.parquet",
        "<parquet>",
    ),
    "truncated shard, sha256 updated": (
        _rewrite_shard("test.parquet", _truncate),
        "test.parquet",
        "<parquet>",
    ),
    "shard bytes changed, sha256 kept": (_overwrite_shard, "client_00002.parquet", "sha256"),
    "shard missing": (_remove_shard, "client_00000.parquet", "missing"),
}


@pytest.mark.parametrize("case", TAMPERINGS)
def test_inspect_refuses_each_tampering(built: Path, tmp_path: Path, case: str) -> None:
    tamper, file, field = TAMPERINGS[case]
    copy = tmp_path / "bench"
    shutil.copytree(built, copy)
    tamper(copy)
    result = runner.invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert file in lines[0] and field in lines[0], lines[0]
    assert "verified" not in result.stdout


def test_untouched_copy_is_verified(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bench"
    shutil.copytree(built, copy)
    result = runner.invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 0 and "all 4 shards verified" in result.stdout


@pytest.mark.parametrize("key", ["predicates", "thing", "stuff"])
def test_a_client_read_refuses_class_lists_that_do_not_fit(
    built: Path, tmp_path: Path, key: str
) -> None:
    """What a federation client does: open without the full check, then read its own shard."""
    copy = tmp_path / "bench"
    shutil.copytree(built, copy)
    _set("classes", key, lambda v: v[:-1])(copy)
    with pytest.raises(BenchmarkError) as refusal:  # at open (histogram lengths) or at the read
        open_benchmark(copy, verify=False).client_table(0)
    assert "manifest.json: field " in str(refusal.value)
    assert f"classes.{key}" in str(refusal.value)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_byte_flip_with_a_matching_sha256_is_refused_or_harmless(
    built: Path, tmp_path: Path, position: float, mask: int
) -> None:
    """Page checksums, the footer and the content checks leave no silent corruption."""
    original = built / "clients" / "client_00000.parquet"
    expected = pq.read_table(original)
    copy = tmp_path / "bench"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(built, copy)

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[int(position * len(data))] ^= mask
        path.write_bytes(bytes(data))

    _rewrite_shard("clients/client_00000.parquet", flip)(copy)
    try:
        benchmark = open_benchmark(copy)
    except BenchmarkError as error:
        assert "client_00000.parquet" in str(error) and "\n" not in str(error)
        return
    table = pq.read_table(copy / "clients" / "client_00000.parquet")
    assert table.equals(expected)  # a flip in unused footer bytes (e.g. statistics) only
    assert benchmark.client_table(0).num_rows == expected.num_rows
