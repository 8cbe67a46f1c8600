"""The federated benchmark folder (DESIGN.md 2.3): Parquet shards, manifest, checking reader.

```
<out>/manifest.json
<out>/clients/client_00000.parquet ...
<out>/test.parquet
```

One Parquet row per image (``ROW_SCHEMA``). Writes are deterministic - fixed compression, no
timestamps, rows in partition order - so the same build gives byte-identical shards. Every data
page carries a CRC, and the schema metadata carries the benchmark's class lists (``fedpsg`` key)
and Hugging Face features (``huggingface`` key: ``Image()`` for ``image`` / ``pan_seg``, whose
columns therefore use the ``{bytes, path}`` layout of ``datasets.Image``, and ``ClassLabel`` for
``cluster``). :class:`Benchmark` hands tables back in the plain row layout of DESIGN.md 2.3
(``image`` / ``pan_seg`` as encoded bytes).

A folder is built in a temporary sibling and renamed into place (``atomic_directory``), so a
failed build leaves nothing behind. Readers trust nothing in the manifest: ``open_benchmark``
checks its structure and the set of shard files, every verified shard read checks the sha256,
the page checksums, the schema and metadata, every id against the class lists, and the
manifest's sizes and histograms against the rows; ``Benchmark.verify`` (``inspect``) also
recomputes the heterogeneity indices and cluster descriptions from all shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from benchmark_builder.psg import name_problem, read_image_bytes

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CLIENTS_DIR = "clients"
TEST_FILE = "test.parquet"
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3

SEGMENT_TYPE = pa.struct(
    [
        ("id", pa.int64()),
        ("category_id", pa.int32()),
        ("isthing", pa.int8()),
        ("bbox", pa.list_(pa.float64())),
        ("area", pa.int64()),
    ]
)
RELATION_TYPE = pa.struct(
    [("subject", pa.int32()), ("object", pa.int32()), ("predicate", pa.int32())]
)
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image()
ROW_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("file_name", pa.string()),
        ("pan_seg_file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),
        ("pan_seg", pa.binary()),
        ("segments", pa.list_(SEGMENT_TYPE)),
        ("relations", pa.list_(RELATION_TYPE)),
        ("cluster", pa.int64()),
    ]
)  # the rows readers get (DESIGN.md 2.3)
PIXEL_COLUMNS = ("image", "pan_seg")
SHARD_SCHEMA = pa.schema(
    [pa.field(f.name, IMAGE_TYPE) if f.name in PIXEL_COLUMNS else f for f in ROW_SCHEMA]
)  # the columns on disk
HASH_LENGTH = 64


def _leaf_paths(name: str, kind: pa.DataType) -> list[str]:
    """Parquet column paths of an Arrow field (``segments.list.element.id``, ...)."""
    if pa.types.is_struct(kind):
        return [p for child in kind for p in _leaf_paths(f"{name}.{child.name}", child.type)]
    if pa.types.is_list(kind):
        return _leaf_paths(f"{name}.list.element", kind.value_type)
    return [name]


# Encoded pixels are unique blobs: no dictionary, and no min/max statistics (which would copy
# whole images into page headers and the footer, outside any checksum).
DATA_COLUMNS = [
    p
    for f in SHARD_SCHEMA
    for p in _leaf_paths(f.name, f.type)
    if p not in {f"{c}.bytes" for c in PIXEL_COLUMNS}
]


class BenchmarkError(ValueError):
    """A benchmark folder is missing, malformed or tampered with; the message names the file."""


def _mismatch(file: Path, field: str, expected: str, got: object) -> BenchmarkError:
    """The one-line error for a field that is not what it should be."""
    text = str(got).replace("\n", " ")
    return BenchmarkError(f"{file}: field {field}: expected {expected}, got {text[:200]}")


def client_file(partition_id: int) -> str:
    """Relative path of a client's shard."""
    return f"{CLIENTS_DIR}/client_{partition_id:05d}.parquet"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_row(record: dict, cluster: int, images_root: Path | None) -> dict:
    """One row (``ROW_SCHEMA``) from a validated OpenPSG record; pixels read from ``images_root``.

    File names are resolved inside ``images_root`` (``psg.read_image_bytes``), never outside it.
    """
    annotations = record["annotations"]
    pixels = images_root is not None
    return {
        "image_id": str(record["image_id"]),
        "file_name": record["file_name"],
        "pan_seg_file_name": record.get("pan_seg_file_name"),
        "height": record["height"],
        "width": record["width"],
        "image": read_image_bytes(images_root, record, "file_name") if pixels else None,
        "pan_seg": read_image_bytes(images_root, record, "pan_seg_file_name") if pixels else None,
        "segments": [
            {
                "id": s["id"],
                "category_id": s["category_id"],
                "isthing": int(s["isthing"]),
                "bbox": annotations[j]["bbox"],
                "area": s["area"],
            }
            for j, s in enumerate(record["segments_info"])
        ],
        "relations": [
            {"subject": s, "object": o, "predicate": p} for s, o, p in record["relations"]
        ],
        "cluster": int(cluster),
    }


def cluster_names(clusters: Sequence[dict]) -> list[str]:
    """``ClassLabel`` names of the clusters: ``"<id>: <most frequent triplet>"`` (unique)."""
    names = []
    for cluster in clusters:
        top = cluster["top_triplets"][0]["text"] if cluster["top_triplets"] else "no relations"
        names.append(f"{cluster['id']}: {top}")
    return names


def shard_metadata(classes: dict, clusters: Sequence[dict]) -> dict[bytes, bytes]:
    """Parquet schema metadata of every shard of a benchmark (see the module docstring)."""
    import datasets  # heavy; only writers need it

    features = datasets.Features.from_arrow_schema(SHARD_SCHEMA)
    for column in PIXEL_COLUMNS:
        features[column] = datasets.Image()
    features["cluster"] = datasets.ClassLabel(names=cluster_names(clusters))
    own = {"format_version": FORMAT_VERSION, "classes": classes, "num_clusters": len(clusters)}
    return {
        b"huggingface": json.dumps({"info": {"features": features.to_dict()}}).encode(),
        b"fedpsg": json.dumps(own).encode(),
    }


def write_shard(
    path: Path,
    images: Sequence[dict],
    clusters: Sequence[int],
    images_root: Path | None,
    metadata: dict[bytes, bytes],
) -> str:
    """Write one shard (rows in the given order, page checksums on) and return its sha256."""
    rows = [image_row(r, c, images_root) for r, c in zip(images, clusters, strict=True)]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    for column in PIXEL_COLUMNS:
        blobs = table[column].combine_chunks()
        wrapped = pa.StructArray.from_arrays(
            [blobs, pa.nulls(len(blobs), pa.string())],
            fields=list(IMAGE_TYPE),
            mask=blobs.is_null(),
        )
        table = table.set_column(table.schema.get_field_index(column), column, wrapped)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table.replace_schema_metadata(metadata),
        path,
        compression=COMPRESSION,
        compression_level=COMPRESSION_LEVEL,
        row_group_size=4096,
        use_dictionary=DATA_COLUMNS,
        write_statistics=DATA_COLUMNS,
        write_page_checksum=True,
    )
    return sha256_file(path)


def shard_entry(
    root: Path,
    file: str,
    images: Sequence[dict],
    clusters: np.ndarray,
    num_clusters: int,
    images_root: Path | None,
    metadata: dict[bytes, bytes],
) -> dict:
    """Write ``root/file`` and describe it for the manifest."""
    return {
        "file": file,
        "num_images": len(images),
        "num_relations": sum(len(r["relations"]) for r in images),
        "sha256": write_shard(root / file, images, clusters.tolist(), images_root, metadata),
        "cluster_histogram": np.bincount(clusters, minlength=num_clusters).tolist(),
    }


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` (indented; deterministic, no timestamps)."""
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error it vanishes.

    An existing ``out`` is refused unless ``overwrite``; it is only removed once the new folder
    is complete. Parent folders created for it are removed again if the write fails.
    """
    out = Path(out)
    check_output(out, overwrite)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as error:
        _remove_empty(created)
        raise BenchmarkError(f"{out}: cannot be created ({error.strerror})") from error
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` (unless ``overwrite``) before any work is done."""
    if out.exists() and not (overwrite and out.is_dir()):
        raise BenchmarkError(f"{out}: already exists (pass overwrite to replace a folder)")


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this process created, deepest first, if they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


# ---- reading and checking ------------------------------------------------------------------


def _read_parquet(path: Path, verify: bool) -> pa.Table:
    """The table of a shard file; an unreadable or corrupt file is an error naming it."""
    try:
        return pq.read_table(path, page_checksum_verification=verify)
    except (OSError, pa.ArrowException) as error:
        raise _mismatch(path, "<parquet>", "a readable Parquet shard", error) from error


def _plain(table: pa.Table) -> pa.Table:
    """The ``ROW_SCHEMA`` view of a shard table: pixels as encoded bytes."""
    for column in PIXEL_COLUMNS:
        if column in table.column_names and pa.types.is_struct(table.schema.field(column).type):
            index = table.schema.get_field_index(column)
            table = table.set_column(index, column, pa.compute.struct_field(table[column], "bytes"))
    return table.replace_schema_metadata(None)


class ShardFacts:
    """What a shard's rows say, for comparison with the manifest."""

    def __init__(self, table: pa.Table, path: Path, layout: Layout) -> None:
        self.num_images = table.num_rows
        self.image_ids: list[str] = table["image_id"].to_pylist()
        segments = table["segments"].combine_chunks()
        relations = table["relations"].combine_chunks()
        seg_flat, rel_flat = segments.flatten(), relations.flatten()
        category = seg_flat.field("category_id").to_numpy(zero_copy_only=False)
        isthing = seg_flat.field("isthing").to_numpy(zero_copy_only=False)
        seg_row = pa.compute.list_parent_indices(segments).to_numpy()
        rel_row = pa.compute.list_parent_indices(relations).to_numpy()
        self.clusters = table["cluster"].to_numpy().astype(np.int64)
        subject, obj, predicate = (
            rel_flat.field(k).to_numpy(zero_copy_only=False).astype(np.int64)
            for k in ("subject", "object", "predicate")
        )
        self.num_relations = len(predicate)

        def refuse(rows: np.ndarray, field: str, expected: str, got: np.ndarray) -> None:
            if len(rows):
                raise BenchmarkError(
                    f"{path}: image {self.image_ids[rows[0]]} field {field}: expected {expected}"
                    f" ({MANIFEST} lists {layout.summary()}), got {got[0]}"
                )

        bad = np.flatnonzero((self.clusters < 0) | (self.clusters >= layout.num_clusters))
        refuse(bad, "cluster", f"a cluster in [0, {layout.num_clusters})", self.clusters[bad])
        bad = np.flatnonzero((category < 0) | (category >= layout.num_classes))
        refuse(
            seg_row[bad], "segments.category_id", f"a class in [0, {layout.num_classes})",
            category[bad],
        )  # fmt: skip
        bad = np.flatnonzero(isthing != (category < layout.num_things))
        refuse(seg_row[bad], "segments.isthing", "1 exactly for thing classes", isthing[bad])
        bad = np.flatnonzero((predicate < 0) | (predicate >= layout.num_predicates))
        refuse(
            rel_row[bad], "relations.predicate", f"a predicate in [0, {layout.num_predicates})",
            predicate[bad],
        )  # fmt: skip
        counts = pa.compute.list_value_length(segments).to_numpy(zero_copy_only=False)
        for key, index in (("subject", subject), ("object", obj)):
            bad = np.flatnonzero((index < 0) | (index >= counts[rel_row]))
            refuse(rel_row[bad], f"relations.{key}", "an index into the row's segments", index[bad])
        self.cluster_histogram = np.bincount(self.clusters, minlength=layout.num_clusters)
        self.predicate_histogram = np.bincount(predicate, minlength=layout.num_predicates)
        offsets = segments.offsets.to_numpy()[rel_row]
        self._relations = (rel_row, category[offsets + subject], predicate, category[offsets + obj])
        pixels = {c: table[c].null_count for c in PIXEL_COLUMNS}
        self.has_pixels = pixels["image"] == 0 and self.num_images > 0
        for column, nulls in pixels.items():
            if nulls not in (0, self.num_images) or (nulls == 0) != (pixels["image"] == 0):
                raise _mismatch(
                    path, column, "pixels in every row or in none", f"{nulls} null rows"
                )

    def triplets(self, layout: Layout) -> list[list[str]]:
        """The triplet text of every relation, per row (as ``featurizers.image_triplets``)."""
        from benchmark_builder.featurizers import humanize

        names = [humanize(c) for c in layout.classes]
        texts: list[list[str]] = [[] for _ in range(self.num_images)]
        rows, subjects, predicates, objects = (a.tolist() for a in self._relations)
        for row, s, p, o in zip(rows, subjects, predicates, objects, strict=True):
            texts[row].append(f"{names[s]} {layout.predicates[p]} {names[o]}")
        return texts


class Layout:
    """What every shard of one benchmark must agree on, taken from its manifest."""

    def __init__(self, manifest: dict) -> None:
        classes = manifest["classes"]
        self.classes: list[str] = classes["thing"] + classes["stuff"]
        self.predicates: list[str] = classes["predicates"]
        self.num_things = len(classes["thing"])
        self.num_classes = len(self.classes)
        self.num_predicates = len(self.predicates)
        self.num_clusters: int = manifest["clustering"]["num_clusters"]
        self.metadata = shard_metadata(
            {k: classes[k] for k in ("thing", "stuff", "predicates")},
            manifest["clustering"]["clusters"],
        )

    def summary(self) -> str:
        return (
            f"{self.num_things} thing + {self.num_classes - self.num_things} stuff classes,"
            f" {self.num_predicates} predicates, {self.num_clusters} clusters"
        )


class Benchmark:
    """A benchmark folder opened for reading; every table read can verify what it holds."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.num_clients: int = manifest["num_clients"]
        classes = manifest["classes"]
        self.classes: list[str] = classes["thing"] + classes["stuff"]
        self.predicate_classes: list[str] = classes["predicates"]
        self._layout: Layout | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def shard_entries(self) -> list[dict]:
        """Manifest entries of every shard: the clients, then the test split."""
        return [*self.manifest["clients"], self.manifest["test"]]

    def verify(self) -> None:
        """Check every shard and recompute every claim of the manifest from the rows.

        Raises ``BenchmarkError`` naming the file and field of the first mismatch.
        """
        facts = [self._read(entry, True)[1] for entry in self.shard_entries()]
        clients, test = facts[:-1], facts[-1]
        where = self.manifest_path
        ids = [i for f in facts for i in f.image_ids]
        if len(set(ids)) < len(ids):
            seen: set[str] = set()
            twice = next(i for i in ids if i in seen or seen.add(i))
            raise _mismatch(where, "clients", "each image in one shard once", f"{twice} twice")
        source = self.manifest["source"]
        if source.get("num_images") != len(ids):
            raise _mismatch(
                where, "source.num_images", f"{len(ids)} (the rows of all shards)",
                source.get("num_images"),
            )  # fmt: skip
        has_pixels = test.has_pixels
        if source.get("has_pixels") != has_pixels or any(f.has_pixels != has_pixels for f in facts):
            raise _mismatch(
                where, "source.has_pixels", f"{has_pixels} (as the test shard's rows)",
                source.get("has_pixels"),
            )  # fmt: skip
        self._check_heterogeneity(clients)
        self._check_clusters(facts)

    def _check_heterogeneity(self, clients: list[ShardFacts]) -> None:
        from benchmark_builder.heterogeneity import heterogeneity

        het = heterogeneity(
            np.stack([f.cluster_histogram for f in clients]),
            np.stack([f.predicate_histogram for f in clients]),
        )
        claims = [("heterogeneity", self.manifest["heterogeneity"], het.summary())]
        claims += [
            (f"clients[{i}].heterogeneity", entry.get("heterogeneity"), het.clients[i])
            for i, entry in enumerate(self.manifest["clients"])
        ]
        for field, claimed, actual in claims:
            for key, value in actual.items():
                got = claimed.get(key, "nothing") if isinstance(claimed, dict) else claimed
                if not _same_number(got, value):
                    raise _mismatch(
                        self.manifest_path, f"{field}.{key}",
                        f"{value} (recomputed from the shards)", got,
                    )  # fmt: skip

    def _check_clusters(self, facts: list[ShardFacts]) -> None:
        from benchmark_builder.clustering import top_triplets

        layout = self._get_layout()
        labels = np.concatenate([f.clusters for f in facts])
        texts = [t for f in facts for t in f.triplets(layout)]
        top = top_triplets(texts, labels, layout.num_clusters)
        sizes = np.bincount(labels, minlength=layout.num_clusters)
        for c, cluster in enumerate(self.manifest["clustering"]["clusters"]):
            expected = {
                "id": c,
                "num_images": int(sizes[c]),
                "description": "; ".join(text for text, _ in top[c]),
                "top_triplets": [{"text": text, "count": n} for text, n in top[c]],
            }
            for key, value in expected.items():
                if cluster.get(key) != value:
                    raise _mismatch(
                        self.manifest_path, f"clustering.clusters[{c}].{key}",
                        f"{value} (recomputed from the shards)", cluster.get(key),
                    )  # fmt: skip

    def _get_layout(self) -> Layout:
        if self._layout is None:
            self._layout = Layout(self.manifest)
        return self._layout

    def _read(self, entry: dict, verify: bool) -> tuple[pa.Table, ShardFacts | None]:
        """A shard's table and, with ``verify``, its checked facts."""
        path = self.root / entry["file"]
        if not path.is_file():
            raise BenchmarkError(f"{path}: shard listed in the manifest is missing")
        if not verify:
            return _plain(_read_parquet(path, False)), None
        if sha256_file(path) != entry["sha256"]:
            raise BenchmarkError(
                f"{path}: sha256 does not match the manifest (the shard was modified)"
            )
        table = _read_parquet(path, True)
        layout = self._get_layout()
        self._check_schema(path, table, layout)
        facts = ShardFacts(table, path, layout)
        index = next(i for i, e in enumerate(self.shard_entries()) if e is entry)
        field = "test" if entry is self.manifest["test"] else f"clients[{index}]"
        claims = {
            "num_images": facts.num_images,
            "num_relations": facts.num_relations,
            "cluster_histogram": facts.cluster_histogram.tolist(),
        }
        if "predicate_histogram" in entry or field != "test":
            claims["predicate_histogram"] = facts.predicate_histogram.tolist()
        for key, value in claims.items():
            if entry.get(key) != value:
                raise _mismatch(
                    self.manifest_path, f"{field}.{key}", f"{_brief(value)} (from {path.name})",
                    _brief(entry.get(key)),
                )  # fmt: skip
        return _plain(table), facts

    def _check_schema(self, path: Path, table: pa.Table, layout: Layout) -> None:
        """Columns and types as written, and the metadata agreeing with the manifest."""
        schema = table.schema
        if schema.remove_metadata() != SHARD_SCHEMA:
            raise _mismatch(path, "<schema>", "the shard columns of this format", schema.names)
        metadata = schema.metadata or {}
        try:
            own = json.loads(metadata[b"fedpsg"])
        except (KeyError, ValueError) as error:
            raise _mismatch(path, "<metadata>.fedpsg", "the class lists", error) from None
        expected = json.loads(layout.metadata[b"fedpsg"])
        for key in ("thing", "stuff", "predicates"):
            if own.get("classes", {}).get(key) != expected["classes"][key]:
                count = len(own.get("classes", {}).get(key) or [])
                raise _mismatch(
                    self.manifest_path, f"classes.{key}",
                    f"the {count} names recorded in {path.name}",
                    f"{len(expected['classes'][key])} different ones",
                )  # fmt: skip
        if own != expected:
            raise _mismatch(
                self.manifest_path, "clustering.num_clusters",
                f"{own.get('num_clusters')} as recorded in {path.name}", layout.num_clusters,
            )  # fmt: skip
        if metadata.get(b"huggingface") != layout.metadata[b"huggingface"]:
            raise _mismatch(
                self.manifest_path, "clustering.clusters",
                f"the cluster names recorded in {path.name}", "different ones",
            )  # fmt: skip

    def client_table(self, partition_id: int, verify: bool = True) -> pa.Table:
        """Rows of client ``partition_id`` (``ROW_SCHEMA``); ``verify`` checks them first."""
        if not 0 <= partition_id < self.num_clients:
            raise BenchmarkError(
                f"{self.manifest_path}: no client {partition_id} (it has {self.num_clients})"
            )
        return self._read(self.manifest["clients"][partition_id], verify)[0]

    def test_table(self, verify: bool = True) -> pa.Table:
        """Rows of the held-out test split (``ROW_SCHEMA``)."""
        return self._read(self.manifest["test"], verify)[0]


def _same_number(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not isinstance(a, int | float) or isinstance(a, bool):
        return False
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _brief(value: object) -> str:
    text = str(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


# ---- the manifest's structure ---------------------------------------------------------------


def _check_structure(path: Path, m: dict) -> None:
    """Types, ranges and cross-references of the manifest, before any shard is touched."""

    def need(ok: bool, field: str, expected: str, got: object) -> None:
        if not ok:
            raise _mismatch(path, field, expected, _brief(got))

    def count(value: object, low: int = 0) -> bool:
        return type(value) is int and value >= low

    if m["format_version"] != FORMAT_VERSION:
        raise _mismatch(path, "format_version", str(FORMAT_VERSION), m["format_version"])
    classes = m["classes"]
    need(isinstance(classes, dict), "classes", "an object", classes)
    for key in ("thing", "stuff", "predicates"):
        names = classes.get(key)
        need(isinstance(names, list) and names, f"classes.{key}", "a non-empty list", names)
        for j, name in enumerate(names):
            problem = name_problem(name)
            need(problem is None, f"classes.{key}[{j}]", str(problem), name)
        pool = names if key == "predicates" else classes["thing"] + names * (key == "stuff")
        need(len(set(pool)) == len(pool), f"classes.{key}", "unique names", "a repeated name")
    clustering = m["clustering"]
    need(isinstance(clustering, dict), "clustering", "an object", clustering)
    k = clustering.get("num_clusters")
    need(count(k, 1), "clustering.num_clusters", "a positive integer", k)
    clusters = clustering.get("clusters")
    need(
        isinstance(clusters, list) and len(clusters) == k
        and all(isinstance(c, dict) and isinstance(c.get("top_triplets"), list) for c in clusters),
        "clustering.clusters", f"{k} cluster descriptions", clusters,
    )  # fmt: skip
    n = m["num_clients"]
    need(count(n, 1), "num_clients", "a positive integer", n)
    need(
        isinstance(m["clients"], list) and len(m["clients"]) == n,
        "clients", f"{n} entries (num_clients)", f"{_len(m['clients'])} entries",
    )  # fmt: skip
    num_predicates = len(classes["predicates"])
    entries = [(f"clients[{i}]", e, client_file(i)) for i, e in enumerate(m["clients"])]
    per = {"cluster_histogram": "clustering.clusters", "predicate_histogram": "classes.predicates"}
    for field, entry, file in [*entries, ("test", m["test"], TEST_FILE)]:
        need(isinstance(entry, dict), field, "an object", entry)
        need(entry.get("file") == file, f"{field}.file", repr(file), entry.get("file"))
        if field != "test":
            index = int(field[8:-1])
            need(entry.get("id") == index, f"{field}.id", str(index), entry.get("id"))
        need(count(entry.get("num_images"), 1), f"{field}.num_images", "a positive integer",
             entry.get("num_images"))  # fmt: skip
        need(count(entry.get("num_relations")), f"{field}.num_relations",
             "a non-negative integer", entry.get("num_relations"))  # fmt: skip
        digest = entry.get("sha256")
        need(
            isinstance(digest, str) and len(digest) == HASH_LENGTH
            and all(c in "0123456789abcdef" for c in digest),
            f"{field}.sha256", "a hex sha256", digest,
        )  # fmt: skip
        for key, length in (("cluster_histogram", k), ("predicate_histogram", num_predicates)):
            if key in entry or (key == "predicate_histogram" and field != "test"):
                hist = entry.get(key)
                need(
                    isinstance(hist, list) and len(hist) == length
                    and all(count(v) for v in hist),
                    f"{field}.{key}",
                    f"{length} non-negative counts (one per {per[key]} entry)",
                    hist,
                )  # fmt: skip
    het = m["heterogeneity"]
    need(isinstance(het, dict), "heterogeneity", "an object", het)
    for key in ("cluster_jsd", "predicate_jsd"):
        value = het.get(key)
        need(
            isinstance(value, int | float) and 0 <= value <= 1, f"heterogeneity.{key}",
            "a number in [0, 1]", value,
        )  # fmt: skip
    partition = m["partition"]
    need(isinstance(partition, dict) and isinstance(partition.get("method"), str),
         "partition.method", "a partition method name", partition)  # fmt: skip
    source = m["source"]
    need(isinstance(source, dict) and isinstance(source.get("has_pixels"), bool),
         "source.has_pixels", "true or false", source)  # fmt: skip


def _len(value: object) -> object:
    return len(value) if isinstance(value, list) else type(value).__name__


def _check_files(root: Path, manifest: dict) -> None:
    """The shard files on disk are exactly the ones the manifest lists."""
    listed = {e["file"] for e in [*manifest["clients"], manifest["test"]]}
    present = {p.relative_to(root).as_posix() for p in root.rglob("*.parquet")}
    clients = root / CLIENTS_DIR
    if clients.is_dir():
        present |= {p.relative_to(root).as_posix() for p in clients.iterdir()}
    extra = sorted(present - listed)
    if extra:
        raise _mismatch(
            root / extra[0], "<file>", f"only the shards {MANIFEST} lists", "an unlisted file"
        )


REQUIRED_KEYS = (
    "format_version", "source", "classes", "clustering", "partition", "num_clients",
    "heterogeneity", "clients", "test",
)  # fmt: skip


def open_benchmark(root: str | Path, verify: bool = True) -> Benchmark:
    """Open a benchmark folder; with ``verify`` every shard and every manifest claim is checked.

    Always checked: the manifest (readable JSON without repeated keys, every required key,
    types, ranges, entry ids and file names) and that the shard files on disk are exactly the
    listed ones. ``verify=False`` leaves the per-shard checks to each ``client_table`` /
    ``test_table`` read (what a federation client does: it reads one shard). Raises
    ``BenchmarkError`` naming the file and field.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BenchmarkError(f"{path}: no manifest (is {root} a benchmark folder?)")
    try:
        manifest = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BenchmarkError(f"{path}: unreadable manifest ({error})") from error
    except KeyError as error:
        raise _mismatch(path, error.args[0], "each key once per object", "it twice") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise BenchmarkError(f"{path}: manifest lacks key(s) {', '.join(missing)}")
    _check_structure(path, manifest)
    _check_files(root, manifest)
    benchmark = Benchmark(root, manifest)
    if verify:
        benchmark.verify()
    return benchmark


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        raise KeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj
