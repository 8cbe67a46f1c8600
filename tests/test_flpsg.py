"""FL-PSG interop: export to User{i}.json and import back gives the same partition."""

import json
from pathlib import Path

import pytest
from builder_helpers import cache_dir

from benchmark_builder.build import BuildConfig, build_benchmark
from benchmark_builder.flpsg import export_flpsg, import_flpsg, read_flpsg
from benchmark_builder.psg import PSGFormatError, load_psg
from benchmark_builder.shards import open_benchmark


def client_ids(root: Path) -> list[list[str]]:
    benchmark = open_benchmark(root)
    return [
        benchmark.client_table(i).column("image_id").to_pylist()
        for i in range(benchmark.num_clients)
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, synthetic_psg: Path) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("flpsg")
    config = BuildConfig(
        num_clients=4,
        partition="shard",
        alpha=None,
        num_clusters=3,
        featurizer_options={"cache_dir": cache_dir(tmp)},
    )
    build_benchmark(synthetic_psg, tmp / "bench", config)
    export_flpsg(tmp / "bench", tmp / "flpsg")
    return tmp / "bench", tmp / "flpsg"


def test_export_writes_valid_psg_files_per_client(exported: tuple[Path, Path]) -> None:
    bench, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "User0.json",
        "User1.json",
        "User2.json",
        "User3.json",
        "test.json",
    ]
    for i, ids in enumerate(client_ids(bench)):
        dataset = load_psg(folder / f"User{i}.json")  # the full validator accepts it
        assert [r["image_id"] for r in dataset.images] == ids
    test = load_psg(folder / "test.json")
    assert test.test_image_ids == [r["image_id"] for r in test.images]


def test_export_then_import_gives_the_same_partition(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    bench, folder = exported
    options = {"cache_dir": cache_dir(tmp_path)}
    import_flpsg(folder, tmp_path / "same", featurizer_options=options, clusters_from=bench)
    original, again = open_benchmark(bench).manifest, open_benchmark(tmp_path / "same").manifest
    assert client_ids(tmp_path / "same") == client_ids(bench)
    assert [c["sha256"] for c in again["clients"]] == [c["sha256"] for c in original["clients"]]
    assert again["test"]["sha256"] == original["test"]["sha256"]
    assert again["heterogeneity"] == original["heterogeneity"]
    assert again["partition"]["method"] == "flpsg-import"

    reclustered = import_flpsg(
        folder, tmp_path / "new", featurizer_options=options, num_clusters=2
    ).manifest
    assert client_ids(tmp_path / "new") == client_ids(bench)  # same partition, new clusters
    assert reclustered["clustering"]["num_clusters"] == 2


def test_bad_folders_are_named(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = exported
    gap = tmp_path / "gap"
    gap.mkdir()
    (gap / "User0.json").write_bytes((folder / "User0.json").read_bytes())
    (gap / "User2.json").write_bytes((folder / "User2.json").read_bytes())
    with pytest.raises(PSGFormatError, match="no gaps"):
        read_flpsg(gap)

    twice = tmp_path / "twice"
    twice.mkdir()
    doc = json.loads((folder / "User0.json").read_text())
    for i in range(2):
        (twice / f"User{i}.json").write_text(json.dumps(doc))
    with pytest.raises(PSGFormatError, match="User1.json.*one file only"):
        read_flpsg(twice)
