"""The federated benchmark folder (DESIGN.md 2.3): Parquet shards, manifest, checksummed reader.

```
<out>/manifest.json
<out>/clients/client_00000.parquet ...
<out>/test.parquet
```

One Parquet row per image (``ROW_SCHEMA``). Writes are deterministic - fixed compression, no
timestamps, rows in partition order - so the same build gives byte-identical shards. A folder is
built in a temporary sibling and renamed into place (``atomic_directory``), so a failed build
leaves nothing behind. Readers check every shard's sha256 against the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
        ("cluster", pa.int32()),
    ]
)


class BenchmarkError(ValueError):
    """A benchmark folder is missing, malformed or tampered with; the message names the file."""


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
    """One Parquet row from an OpenPSG image record (pixels read when ``images_root`` is set)."""
    annotations = record["annotations"]
    return {
        "image_id": str(record["image_id"]),
        "file_name": record["file_name"],
        "pan_seg_file_name": record.get("pan_seg_file_name"),
        "height": record["height"],
        "width": record["width"],
        "image": None if images_root is None else (images_root / record["file_name"]).read_bytes(),
        "pan_seg": None
        if images_root is None
        else (images_root / record["pan_seg_file_name"]).read_bytes(),
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


def write_shard(
    path: Path, images: Sequence[dict], clusters: Sequence[int], images_root: Path | None
) -> str:
    """Write one shard (rows in the given order) and return its sha256."""
    rows = [image_row(r, c, images_root) for r, c in zip(images, clusters, strict=True)]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        path,
        compression=COMPRESSION,
        compression_level=COMPRESSION_LEVEL,
        row_group_size=4096,
    )
    return sha256_file(path)


def shard_entry(
    root: Path,
    file: str,
    images: Sequence[dict],
    clusters: np.ndarray,
    num_clusters: int,
    images_root: Path | None,
) -> dict:
    """Write ``root/file`` and describe it for the manifest."""
    return {
        "file": file,
        "num_images": len(images),
        "num_relations": sum(len(r["relations"]) for r in images),
        "sha256": write_shard(root / file, images, clusters.tolist(), images_root),
        "cluster_histogram": np.bincount(clusters, minlength=num_clusters).tolist(),
    }


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` (indented; deterministic, no timestamps)."""
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error it vanishes.

    An existing ``out`` is refused unless ``overwrite``; it is only removed once the new folder
    is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BenchmarkError(f"{out}: already exists (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
        raise


class Benchmark:
    """A benchmark folder opened for reading; every table read can verify its checksum."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.num_clients: int = manifest["num_clients"]
        classes = manifest["classes"]
        self.classes: list[str] = classes["thing"] + classes["stuff"]
        self.predicate_classes: list[str] = classes["predicates"]

    def shard_entries(self) -> list[dict]:
        """Manifest entries of every shard: the clients, then the test split."""
        return [*self.manifest["clients"], self.manifest["test"]]

    def verify(self) -> None:
        """Check every shard's sha256; raise ``BenchmarkError`` naming the first mismatch."""
        for entry in self.shard_entries():
            self._checked(entry, True)

    def _checked(self, entry: dict, verify: bool) -> Path:
        path = self.root / entry["file"]
        if not path.is_file():
            raise BenchmarkError(f"{path}: shard listed in the manifest is missing")
        if verify and sha256_file(path) != entry["sha256"]:
            raise BenchmarkError(
                f"{path}: sha256 does not match the manifest (the shard was modified)"
            )
        return path

    def client_table(self, partition_id: int, verify: bool = True) -> pa.Table:
        """Rows of client ``partition_id``; refuses a shard whose checksum does not match."""
        if not 0 <= partition_id < self.num_clients:
            raise BenchmarkError(
                f"{self.root / MANIFEST}: no client {partition_id} (it has {self.num_clients})"
            )
        return pq.read_table(self._checked(self.manifest["clients"][partition_id], verify))

    def test_table(self, verify: bool = True) -> pa.Table:
        """Rows of the held-out test split."""
        return pq.read_table(self._checked(self.manifest["test"], verify))


REQUIRED_KEYS = ("format_version", "num_clients", "classes", "partition", "clients", "test")


def open_benchmark(root: str | Path, verify: bool = True) -> Benchmark:
    """Open a benchmark folder; with ``verify`` every shard's sha256 is checked now.

    Raises ``BenchmarkError`` naming the file for a missing folder, manifest or shard, an
    unreadable or incomplete manifest, an unknown format version or a checksum mismatch.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BenchmarkError(f"{path}: no manifest (is {root} a benchmark folder?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BenchmarkError(f"{path}: unreadable manifest ({error})") from error
    missing = [k for k in REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise BenchmarkError(f"{path}: manifest lacks key(s) {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BenchmarkError(
            f"{path}: format_version {manifest['format_version']!r}, expected {FORMAT_VERSION}"
        )
    if len(manifest["clients"]) != manifest["num_clients"]:
        raise BenchmarkError(f"{path}: num_clients does not match the clients list")
    benchmark = Benchmark(root, manifest)
    if verify:
        benchmark.verify()
    return benchmark
