"""Hostile input to ``fedpsg-build build``: every case is refused by the contract.

The contract (docs/builder-data.md): exit 1 for bad data, 2 for bad flags; for data errors
exactly one stderr line that names the file, the image id and the field; no traceback; nothing
written - no output folder and none of the parent folders the build would have created.
Hand-written families first, then hypothesis-generated record mutations, which must either be
refused with one named line or convert to Arrow rows without error.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pytest
from builder_helpers import cache_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from benchmark_builder.cli import app
from benchmark_builder.psg import PSGFormatError, load_psg
from benchmark_builder.shards import ROW_SCHEMA, BenchmarkError, atomic_directory, image_row

runner = CliRunner()


@pytest.fixture(scope="module")
def doc(synthetic_psg: Path) -> dict:
    """The synthetic dataset (24 images with pixels) as a document to corrupt."""
    return json.loads(synthetic_psg.read_text())


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for the cases that get past validation."""
    return cache_dir(tmp_path_factory.mktemp("fuzz-cache"))


def refused(
    tmp: Path, psg: Path, *flags: object, code: int = 1, names: tuple[str, ...] = ()
) -> str:
    """Run a build that must fail; check the contract and return the error line."""
    out = tmp / "made" / "by" / "build" / "bench"
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    result = runner.invoke(app, ["build", "--psg", str(psg), "--out", str(out), *map(str, flags)])
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert not (tmp / "made").exists()
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before
    if code == 2:
        return result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in names), lines[0]
    return lines[0]


def write(tmp: Path, doc: dict, text: str | None = None) -> Path:
    path = tmp / "psg.json"
    path.write_text(json.dumps(doc) if text is None else text)
    return path


def with_placeholder(doc: dict, path: tuple, raw: str) -> str:
    """The document's JSON with the value at ``path`` replaced by raw JSON text (1e400, NaN...)."""
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "@@RAW@@"
    return json.dumps(doc).replace('"@@RAW@@"', raw)


# path inside data[i] -> (raw JSON, field named in the error); the image named is data[i]'s id
RAW_VALUES = {
    "area past float range": (3, ("segments_info", 0, "area"), "1e400"),
    "area not an integer": (3, ("segments_info", 0, "area"), "12.5"),
    "area larger than the image": (3, ("segments_info", 0, "area"), "4097"),
    "segment id near 2**64": (5, ("segments_info", 0, "id"), str(2**64 - 1)),
    "segment id past the panoptic range": (5, ("segments_info", 0, "id"), str(2**24)),
    "height near 2**40": (6, ("height",), str(2**40)),
    "width negative": (6, ("width",), "-64"),
    "isthing a boolean": (2, ("segments_info", 0, "isthing"), "true"),
    "iscrowd a float": (2, ("segments_info", 0, "iscrowd"), "0.0"),
    "bbox NaN": (4, ("annotations", 0, "bbox", 0), "NaN"),
    "bbox infinite": (4, ("annotations", 0, "bbox", 2), "Infinity"),
    "bbox boolean": (4, ("annotations", 0, "bbox", 1), "false"),
    "file_name escapes with ..": (1, ("file_name",), '"../../etc/passwd"'),
    "file_name absolute": (1, ("file_name",), '"/etc/passwd"'),
    "pan_seg_file_name escapes": (1, ("pan_seg_file_name",), '"panoptic/../../x.png"'),
    "file_name with a newline": (1, ("file_name",), '"a\\nb.jpg"'),
    "relation index near 2**63": (7, ("relations", 0, 2), str(2**63)),
}


def _field(path: tuple) -> str:
    """``("segments_info", 0, "area")`` -> ``segments_info[0].area`` (bbox items: the bbox)."""
    if path[0] == "annotations":
        path = path[:3]
    if path[0] == "relations":
        return f"relations[{path[1]}][{path[2]}]"
    text = path[0]
    for key in path[1:]:
        text += f"[{key}]" if isinstance(key, int) else f".{key}"
    return text


@pytest.mark.parametrize("case", RAW_VALUES)
def test_out_of_range_values_are_refused(case: str, doc: dict, tmp_path: Path) -> None:
    index, path, raw = RAW_VALUES[case]
    image_id = doc["data"][index]["image_id"]
    psg = write(tmp_path, doc, with_placeholder(doc, ("data", index, *path), raw))
    field = _field(path)
    refused(tmp_path, psg, "--quiet", names=(str(psg), f"image {image_id} ", f"field {field}:"))


def test_duplicate_json_keys_are_refused_where_they_are(doc: dict, tmp_path: Path) -> None:
    record = json.dumps(doc["data"][4])
    text = json.dumps({**doc, "data": ["@@R@@"]}).replace(
        '"@@R@@"', record[:-1] + ', "relations": []}'
    )
    psg = write(tmp_path, doc, text)
    image_id = doc["data"][4]["image_id"]
    refused(tmp_path, psg, names=(f"image {image_id} ", "field relations:", "once"))
    nested = json.dumps({**doc, "data": ["@@R@@"]}).replace(
        '"@@R@@"', record.replace('"isthing": ', '"isthing": 0, "isthing": ', 1)
    )
    write(tmp_path, doc, nested)
    refused(tmp_path, psg, names=(f"image {image_id} ", "field segments_info[0].isthing:"))
    top = json.dumps(doc).replace('"thing_classes": ', '"thing_classes": [], "thing_classes": ')
    write(tmp_path, doc, top)
    refused(tmp_path, psg, names=("field thing_classes:",))


@pytest.mark.parametrize(
    ("key", "make", "field"),
    [
        ("thing_classes", lambda d: d["thing_classes"] + d["thing_classes"][:1], "thing_classes"),
        ("stuff_classes", lambda d: d["stuff_classes"] + d["thing_classes"][:1], "stuff_classes"),
        ("predicate_classes", lambda d: d["predicate_classes"] * 2, "predicate_classes"),
        ("thing_classes", lambda d: d["thing_classes"][:-1] + ["x" * 100_000], "thing_classes"),
        ("predicate_classes", lambda d: [""] + d["predicate_classes"], "predicate_classes[0]"),
        ("stuff_classes", lambda d: d["stuff_classes"] + ["sky\nblue"], "stuff_classes"),
        ("test_image_ids", lambda d: ["0", "0"], "test_image_ids"),
        ("test_image_ids", lambda d: [7], "test_image_ids[0]"),
    ],
)
def test_class_lists_unique_and_sane(doc: dict, tmp_path: Path, key, make, field) -> None:
    bad = copy.deepcopy(doc)
    bad[key] = make(doc)
    line = refused(tmp_path, write(tmp_path, bad), names=(f"field {field}",))
    assert len(line) < 400  # a 100,000-character name is not echoed


def test_symlink_out_of_the_images_root_is_refused(
    doc: dict, synthetic_psg: Path, tmp_path: Path
) -> None:
    """The images root is a security boundary: a symlink inside it may not point out of it."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "panoptic").symlink_to(synthetic_psg.parent / "panoptic")  # outside: refused too
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((synthetic_psg.parent / doc["data"][0]["file_name"]).read_bytes())
    for record in doc["data"]:
        link = root / record["file_name"]
        link.symlink_to(secret if record is doc["data"][0] else synthetic_psg.parent / link.name)
    psg = write(tmp_path, doc)
    refused(
        tmp_path, psg, "--images-root", root,
        names=(str(root), f"image {doc['data'][0]['image_id']} ", "field file_name:", "inside"),
    )  # fmt: skip
    # the same links are fine when the root holds their targets
    assert load_psg(psg, synthetic_psg.parent, check_images=False).images_root is not None


def test_degenerate_data_is_refused_with_the_reason(
    doc: dict, tmp_path: Path, embeddings: Path
) -> None:
    bare = copy.deepcopy(doc)
    for record in bare["data"]:
        record["relations"] = []
    refused(tmp_path, write(tmp_path, bare), names=("data[*].relations", "no", "24 images"))
    psg = write(tmp_path, doc)
    cache = ("--cache-dir", embeddings)
    line = refused(tmp_path, psg, "--clusters", 20, "--clients", 2, *cache)
    assert str(psg) in line and "test split is empty" in line
    line = refused(tmp_path, psg, "--clusters", 24, "--clients", 2, *cache)
    assert "only 23 distinct image features (embedding) for 24 clusters" in line
    line = refused(tmp_path, psg, "--clusters", 25, *cache)
    assert "cannot form 25 clusters" in line
    for target in (5, -1, 0.99):
        line = refused(tmp_path, psg, "--clients", 3, "--clusters", 3, "--target-index", target,
                       *cache)  # fmt: skip
        assert f"target index {target:g} is outside the reachable" in line
        assert re.search(r"range \[0\.\d{4}, 0\.\d{4}\]", line), line


@pytest.mark.parametrize(
    "flags",
    [
        ("--seed", -1),
        ("--seed", 2**32),
        ("--seed", 2**70),
        ("--alpha", "nan"),
        ("--alpha", 0),
        ("--alpha", "-inf"),
        ("--target-index", "nan"),
        ("--test-fraction", 0),
        ("--test-fraction", 1),
        ("--test-fraction", "nan"),
        ("--alpha-sweep", "0.1,nan"),
        ("--alpha-sweep", "0.1,x"),
        ("--clients", 0),
        ("--partition", "iid", "--alpha", 1),
    ],
)
def test_bad_flags_are_usage_errors(doc: dict, tmp_path: Path, flags: tuple) -> None:
    stderr = refused(tmp_path, write(tmp_path, doc), *flags, code=2)
    assert "Invalid value" in stderr or "Error" in stderr


def test_output_under_a_file_is_refused_and_nothing_is_left(doc: dict, tmp_path: Path) -> None:
    psg = write(tmp_path, doc)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    result = runner.invoke(app, ["build", "--psg", str(psg), "--out", str(blocker / "a" / "b")])
    assert result.exit_code == 1 and str(blocker) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "psg.json"]


def test_failing_export_removes_the_parents_it_created(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "bench"
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a parent that existed before stays
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "kept" / "new" / "bench"):
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    with pytest.raises(BenchmarkError, match="already exists"), atomic_directory(tmp_path / "kept"):
        pass


def test_success_writes_nothing_to_stderr(doc: dict, tmp_path: Path, embeddings: Path) -> None:
    """No progress line leaks into a piped log; the sentence-transformers bars stay off."""
    psg = write(tmp_path, doc)
    result = runner.invoke(
        app,
        ["build", "--psg", str(psg), "--out", str(tmp_path / "ok"), "--clients", "2",
         "--clusters", "2", "--cache-dir", str(embeddings)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


# ---- generated: one field of a record set to an arbitrary JSON value --------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**31, 2**63, 2**64, -1, 0, 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path inside a record (objects and lists alike)."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_single_field_mutation_is_refused_or_converts(
    data: st.DataObject, doc: dict, tmp_path: Path
) -> None:
    """Whatever one field holds, the reader refuses it with one named line or Arrow takes it."""
    small = {**doc, "data": copy.deepcopy(doc["data"][:3])}
    index = data.draw(st.integers(0, 2))
    path = data.draw(st.sampled_from(_paths(small["data"][index])))
    value = data.draw(JSON_VALUES)
    target = small["data"][index]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    psg = tmp_path / "psg.json"
    psg.write_text(json.dumps(small, allow_nan=True))
    try:
        dataset = load_psg(psg)
    except PSGFormatError as error:
        message = str(error)
        assert "\n" not in message and message.startswith(f"{psg}: ")
        assert f"field {error.field}: expected " in message and len(message) < 600
        return
    rows = [image_row(record, 0, None) for record in dataset.images]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)  # never ArrowInvalid / OverflowError
    boxes = table["segments"].combine_chunks().flatten().field("bbox").flatten()
    assert all(math.isfinite(v) for v in boxes.to_pylist())
