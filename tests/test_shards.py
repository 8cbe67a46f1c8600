"""Benchmark folder: exact cover, lossless round trip, checksums, determinism, plain readers."""

import json
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest
from builder_helpers import cache_dir

from benchmark_builder.build import BuildConfig, build_benchmark
from benchmark_builder.psg import PSGFormatError, load_psg
from benchmark_builder.shards import BenchmarkError, open_benchmark

CONFIG = dict(num_clients=3, partition="dirichlet", alpha=0.5, num_clusters=3, seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, synthetic_psg: Path) -> Path:
    """A benchmark built from the synthetic dataset with pixels."""
    tmp = tmp_path_factory.mktemp("shards")
    config = BuildConfig(**CONFIG, featurizer_options={"cache_dir": cache_dir(tmp)})
    build_benchmark(synthetic_psg, tmp / "bench", config, images_root=synthetic_psg.parent)
    return tmp / "bench"


def all_rows(root: Path) -> list[dict]:
    benchmark = open_benchmark(root)
    tables = [benchmark.client_table(i) for i in range(benchmark.num_clients)]
    return [row for t in [*tables, benchmark.test_table()] for row in t.to_pylist()]


def test_every_image_in_exactly_one_shard(built: Path, synthetic_psg: Path) -> None:
    source = load_psg(synthetic_psg)
    ids = [row["image_id"] for row in all_rows(built)]
    assert sorted(ids) == sorted(r["image_id"] for r in source.images)
    assert len(ids) == len(set(ids))
    manifest = json.loads((built / "manifest.json").read_text())
    assert sum(c["num_images"] for c in manifest["clients"]) + manifest["test"]["num_images"] == 24
    for key in ("cluster_jsd", "predicate_jsd"):
        assert 0 <= manifest["heterogeneity"][key] <= 1
    assert manifest["partition"]["method"] == "dirichlet"
    assert manifest["partition"]["alpha"] == 0.5 and manifest["partition"]["seed"] == 0
    assert manifest["source"]["sha256"] == source.sha256
    assert manifest["classes"]["predicates"] == source.predicate_classes
    assert {"file", "num_images", "sha256", "cluster_histogram"} <= set(manifest["clients"][0])
    assert (built / "plots" / "clients_x_clusters.png").stat().st_size > 1000


def test_round_trip_preserves_relations_segments_and_pixels(
    built: Path, synthetic_psg: Path
) -> None:
    source = {r["image_id"]: r for r in load_psg(synthetic_psg).images}
    root = synthetic_psg.parent
    for row in all_rows(built):
        record = source[row["image_id"]]
        assert [[r["subject"], r["object"], r["predicate"]] for r in row["relations"]] == record[
            "relations"
        ]
        assert [s["category_id"] for s in row["segments"]] == [
            s["category_id"] for s in record["segments_info"]
        ]
        assert [s["bbox"] for s in row["segments"]] == [a["bbox"] for a in record["annotations"]]
        assert [s["id"] for s in row["segments"]] == [s["id"] for s in record["segments_info"]]
        assert row["image"] == (root / record["file_name"]).read_bytes()
        assert row["pan_seg"] == (root / record["pan_seg_file_name"]).read_bytes()
        assert (row["height"], row["width"]) == (record["height"], record["width"])


def test_tampered_shard_is_refused(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shard = copy / "clients" / "client_00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BenchmarkError, match="client_00001.parquet"):
        open_benchmark(copy)
    unverified = open_benchmark(copy, verify=False)
    with pytest.raises(BenchmarkError, match="client_00001.parquet"):
        unverified.client_table(1)
    unverified.client_table(0)  # the untouched shards still read
    (copy / "test.parquet").unlink()
    with pytest.raises(BenchmarkError, match="test.parquet"):
        unverified.test_table()
    with pytest.raises(BenchmarkError, match="manifest"):
        open_benchmark(tmp_path / "nowhere")


def test_same_seed_gives_byte_identical_shards(
    built: Path, synthetic_psg: Path, tmp_path: Path
) -> None:
    config = BuildConfig(**CONFIG, featurizer_options={"cache_dir": cache_dir(tmp_path)})
    build_benchmark(synthetic_psg, tmp_path / "again", config, images_root=synthetic_psg.parent)
    files = sorted(p.relative_to(built) for p in built.rglob("*.parquet"))
    assert len(files) == 4
    for name in [*files, Path("manifest.json")]:
        assert (built / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_shards_load_with_pyarrow_pandas_and_datasets(built: Path) -> None:
    shard = built / "clients" / "client_00000.parquet"
    table = pq.read_table(shard)
    frame = pd.read_parquet(shard)
    assert len(frame) == table.num_rows > 0
    assert list(frame.columns) == table.column_names
    assert isinstance(frame["image"][0]["bytes"], bytes)  # datasets.Image()'s {bytes, path}
    hf = datasets.load_dataset("parquet", data_files={"train": str(shard)}, split="train")
    assert len(hf) == table.num_rows
    manifest = json.loads((built / "manifest.json").read_text())
    assert isinstance(hf.features["image"], datasets.Image)
    assert isinstance(hf.features["pan_seg"], datasets.Image)
    labels = hf.features["cluster"]
    assert isinstance(labels, datasets.ClassLabel)
    assert labels.names == [
        f"{c['id']}: {c['top_triplets'][0]['text']}" for c in manifest["clustering"]["clusters"]
    ]
    first = hf[0]
    assert first["image_id"] == frame["image_id"][0]
    assert first["image"].size == (first["width"], first["height"])  # a decoded PIL image
    assert first["pan_seg"].mode == "RGB"
    assert labels.int2str(first["cluster"]).startswith(f"{frame['cluster'][0]}: ")
    assert first["relations"][0].keys() == {"subject", "object", "predicate"}
    assert len(first["segments"][0]["bbox"]) == 4
    # the project's readers get the plain row layout: encoded bytes, as on the source files
    plain = open_benchmark(built).client_table(0)
    assert plain.schema.field("image").type == "binary"
    assert plain["image"][0].as_py() == frame["image"][0]["bytes"]


def test_diffusion_reader_takes_builder_shards(built: Path) -> None:
    """diffusion_clients reads shards itself (no builder import): the Image layout reaches it."""
    from diffusion_clients.data import load_parquet_set

    shard = built / "clients" / "client_00000.parquet"
    images = load_parquet_set(shard, 16, 3)
    assert len(images) == pq.read_metadata(shard).num_rows
    assert images.images.shape[1:] == (3, 16, 16)


def test_failed_build_leaves_nothing(tmp_path: Path, synthetic_psg: Path) -> None:
    broken = tmp_path / "psg.json"
    doc = json.loads(synthetic_psg.read_text())
    doc["data"][3]["relations"][0][2] = 99  # predicate id out of range
    broken.write_text(json.dumps(doc))
    config = BuildConfig(**CONFIG, featurizer_options={"cache_dir": cache_dir(tmp_path)})
    with pytest.raises(PSGFormatError, match="predicate"):
        build_benchmark(broken, tmp_path / "out", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedding-cache", "psg.json"]
    with pytest.raises(BenchmarkError, match="already exists"):
        build_benchmark(synthetic_psg, tmp_path, config)
