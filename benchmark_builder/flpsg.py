"""FL-PSG interoperability: a partition as a folder of ``User{i}.json`` files, both ways.

FL-PSG (github.com/Seung-B/FL-PSG, ``data/FL_DATA_SPLIT``) ships each client's images as a
``psg.json``-format file ``User{i}.json`` (``i`` from 0). Export writes one such file per client
and the held-out split as ``test.json`` (same format); import reads them back (``test.json`` is
optional) and builds a benchmark folder with our manifest and indices. Cluster labels are
recomputed with a featurizer, or taken from an existing benchmark, so export-then-import
reproduces the partition exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from benchmark_builder.build import (
    BuildResult,
    StageCallback,
    Timer,
    check_relations,
    featurize_and_cluster,
    write_benchmark,
)
from benchmark_builder.featurizers import build_featurizer
from benchmark_builder.partition import check_seed
from benchmark_builder.psg import PSGDataset, PSGFormatError, load_psg
from benchmark_builder.shards import (
    BenchmarkError,
    atomic_directory,
    check_output,
    open_benchmark,
)

USER_FILE = re.compile(r"^User(\d+)\.json$")
TEST_JSON = "test.json"


def row_to_record(row: dict) -> dict:
    """An OpenPSG image record from a shard row (``iscrowd`` and ``bbox_mode`` written as 0)."""
    segments = row["segments"]
    return {
        "file_name": row["file_name"],
        "height": row["height"],
        "width": row["width"],
        "image_id": row["image_id"],
        "pan_seg_file_name": row["pan_seg_file_name"],
        "segments_info": [
            {
                "id": s["id"],
                "category_id": s["category_id"],
                "iscrowd": 0,
                "isthing": s["isthing"],
                "area": s["area"],
            }
            for s in segments
        ],
        "annotations": [
            {"bbox": s["bbox"], "bbox_mode": 0, "category_id": s["category_id"]} for s in segments
        ],
        "relations": [[r["subject"], r["object"], r["predicate"]] for r in row["relations"]],
    }


def export_flpsg(benchmark_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``User{i}.json`` per client and ``test.json`` into ``out`` (atomically)."""
    benchmark = open_benchmark(benchmark_dir)
    classes = benchmark.manifest["classes"]
    test_rows = benchmark.test_table().to_pylist()
    header = {
        "thing_classes": classes["thing"],
        "stuff_classes": classes["stuff"],
        "predicate_classes": classes["predicates"],
        "test_image_ids": [row["image_id"] for row in test_rows],
    }
    tables = {
        **{f"User{i}.json": benchmark.client_table(i) for i in range(benchmark.num_clients)},
        TEST_JSON: None,
    }
    with atomic_directory(out, overwrite) as tmp:
        for name, table in tables.items():
            rows = test_rows if table is None else table.to_pylist()
            doc = {**header, "data": [row_to_record(row) for row in rows]}
            (tmp / name).write_text(json.dumps(doc, separators=(",", ":")))
    return Path(out)


def read_flpsg(
    folder: str | Path, images_root: str | Path | None = None
) -> tuple[PSGDataset, list[np.ndarray], np.ndarray]:
    """Validate and merge an FL-PSG folder: (dataset, client image indices, test image indices).

    Every file must be a valid ``psg.json`` with the same class and predicate lists, and an image
    may appear in one file only; the first violation raises ``PSGFormatError`` naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PSGFormatError(folder, None, "<folder>", "a folder of User{i}.json files")
    users = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := USER_FILE.match(p.name)))
    if [i for i, _ in users] != list(range(len(users))) or not users:
        raise PSGFormatError(folder, None, "<folder>", "User0.json ... User{n-1}.json with no gaps")
    files = [p for _, p in users] + ([folder / TEST_JSON] if (folder / TEST_JSON).is_file() else [])
    parsed = [load_psg(path, images_root) for path in files]
    first, images, owner = parsed[0], [], {}
    for path, part in zip(files, parsed, strict=True):
        for key in ("thing_classes", "stuff_classes", "predicate_classes"):
            if getattr(part, key) != getattr(first, key):
                raise PSGFormatError(path, None, key, f"the same list as {files[0].name}")
        for record in part.images:
            if record["image_id"] in owner:
                raise PSGFormatError(
                    path,
                    record["image_id"],
                    "image_id",
                    f"an image in one file only, also in {owner[record['image_id']]}",
                )
            owner[record["image_id"]] = path.name
        images.extend(part.images)
    bounds = np.cumsum([0] + [len(p.images) for p in parsed])
    groups = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(parsed))]
    has_test = len(files) > len(users)
    digest = hashlib.sha256(
        "".join(f"{p.name}:{d.sha256}\n" for p, d in zip(files, parsed, strict=True)).encode()
    )
    dataset = PSGDataset(
        thing_classes=first.thing_classes,
        stuff_classes=first.stuff_classes,
        predicate_classes=first.predicate_classes,
        images=images,
        test_image_ids=parsed[-1].test_image_ids if has_test else [],
        source=folder,
        sha256=digest.hexdigest(),
        images_root=first.images_root,
    )
    test = groups[-1] if has_test else np.zeros(0, dtype=np.int64)
    return dataset, groups[: len(users)], test


def benchmark_labels(benchmark_dir: str | Path) -> tuple[dict[str, int], int]:
    """``image_id -> cluster`` of every image of an existing benchmark, and its cluster count."""
    benchmark = open_benchmark(benchmark_dir)
    tables = [benchmark.client_table(i) for i in range(benchmark.num_clients)]
    labels: dict[str, int] = {}
    for table in [*tables, benchmark.test_table()]:
        labels.update(
            zip(
                table.column("image_id").to_pylist(),
                table.column("cluster").to_pylist(),
                strict=True,
            )
        )
    return labels, benchmark.manifest["clustering"]["num_clusters"]


def import_flpsg(
    folder: str | Path,
    out: str | Path,
    featurizer: str = "embedding",
    featurizer_options: dict | None = None,
    num_clusters: int = 5,
    seed: int = 0,
    clusters_from: str | Path | None = None,
    images_root: str | Path | None = None,
    overwrite: bool = False,
    on_stage: StageCallback | None = None,
) -> BuildResult:
    """Build a benchmark folder whose clients are exactly the folder's ``User{i}.json`` files.

    Clusters come from KMeans (``num_clusters``) on ``featurizer`` vectors, or from the benchmark
    at ``clusters_from`` (every image must be in it; its cluster count is used). The folder
    must hold ``test.json``: a benchmark without a held-out split gives the server nothing to
    evaluate.
    """
    check_seed(seed)
    check_output(Path(out), overwrite)
    timer = Timer(on_stage)
    with timer.stage("load"):
        dataset, parts, test = read_flpsg(folder, images_root)
        if len(test) == 0:
            raise PSGFormatError(
                Path(folder) / TEST_JSON, None, "<file>",
                "a test.json with the held-out images (a benchmark needs a test split)",
            )  # fmt: skip
        check_relations(dataset)
        model = build_featurizer(featurizer, **(featurizer_options or {}))
        labels = None
        if clusters_from is not None:
            known, num_clusters = benchmark_labels(clusters_from)
            missing = [r["image_id"] for r in dataset.images if r["image_id"] not in known]
            if missing:
                raise BenchmarkError(
                    f"{clusters_from}: has no cluster for image {missing[0]}"
                    f" ({len(missing)} images of {folder} missing)"
                )
            labels = np.array([known[r["image_id"]] for r in dataset.images], dtype=np.int64)
    semantics = featurize_and_cluster(dataset, model, num_clusters, seed, timer, labels)
    partition = {
        "method": "flpsg-import",
        "alpha": None,
        "num_clients": len(parts),
        "min_size": min(len(p) for p in parts),
        "seed": seed,
        "test_fraction": len(test) / len(dataset.images),
        "source_folder": str(folder),
    }
    with timer.stage("export"), atomic_directory(out, overwrite) as tmp:
        manifest = write_benchmark(tmp, dataset, semantics, parts, test, partition)
    return timer.result(manifest)
