"""load_psg accepts real and synthetic PSG data and names file, image and field for each defect."""

import copy
import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark_builder.psg import PSGFormatError, load_psg
from benchmark_builder.synthetic import generate_synthetic_psg


@pytest.fixture(scope="module")
def real_dataset(real_psg_path):
    return load_psg(real_psg_path)


def test_real_annotations_validate(real_dataset, real_psg_path):
    assert len(real_dataset.images) == 24378
    assert len(real_dataset.classes) == 133 and len(real_dataset.predicate_classes) == 56
    assert len(real_dataset.test_image_ids) == 2186
    assert sum(len(image["relations"]) for image in real_dataset.images) == 151086
    assert real_dataset.sha256 == hashlib.sha256(real_psg_path.read_bytes()).hexdigest()
    # extra keys are tolerated and kept as they are
    assert any("attribute_ids" in s for s in real_dataset.images[0]["segments_info"])


def test_synthetic_validates_with_pixel_checks(synthetic_psg):
    dataset = load_psg(synthetic_psg, images_root=synthetic_psg.parent)
    assert len(dataset.images) == 24 and dataset.images_root == synthetic_psg.parent
    assert all(image["relations"] for image in dataset.images)


@pytest.fixture(params=["real", "synthetic"])
def small_doc(request, real_dataset, synthetic_psg) -> dict:
    """A small psg.json document: 12 real records with relations, or the synthetic dataset."""
    if request.param == "synthetic":
        return json.loads(synthetic_psg.read_text())
    images = [i for i in real_dataset.images if i["relations"] and len(i["segments_info"]) > 2]
    return {
        "thing_classes": real_dataset.thing_classes,
        "stuff_classes": real_dataset.stuff_classes,
        "predicate_classes": real_dataset.predicate_classes,
        "test_image_ids": real_dataset.test_image_ids[:5],
        "data": copy.deepcopy(images[:12]),
    }


def _set(path: tuple, value) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(doc) if callable(value) else value

    return mutate


def _delete(path: tuple) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _num_segments(doc: dict, i: int) -> int:
    return len(doc["data"][i]["segments_info"])


def _isthing(doc: dict, i: int, j: int) -> int:
    return doc["data"][i]["segments_info"][j]["isthing"]


def _other_category(doc: dict) -> int:
    return (doc["data"][4]["segments_info"][0]["category_id"] + 1) % len(doc["thing_classes"])


# (mutation, index of the image named in the error or None, field named in the error)
CORRUPTIONS = {
    "missing top-level key": (_delete(("predicate_classes",)), None, "predicate_classes"),
    "missing image key": (_delete(("data", 3, "relations")), 3, "data[3].relations"),
    "missing segment key": (
        _delete(("data", 2, "segments_info", 1, "isthing")),
        2,
        "segments_info[1].isthing",
    ),
    "subject out of range": (
        _set(("data", 2, "relations", 0, 0), lambda d: _num_segments(d, 2)),
        2,
        "relations[0][0]",
    ),
    "object out of range": (_set(("data", 6, "relations", 0, 1), -1), 6, "relations[0][1]"),
    "predicate out of range": (
        _set(("data", 1, "relations", 0, 2), lambda d: len(d["predicate_classes"])),
        1,
        "relations[0][2]",
    ),
    "malformed relation": (_set(("data", 1, "relations", 0), [0, 1]), 1, "relations[0]"),
    "category out of range": (
        _set(("data", 5, "segments_info", 1, "category_id"), 10_000),
        5,
        "segments_info[1].category_id",
    ),
    "image id not a string": (_set(("data", 7, "image_id"), 7), None, "data[7].image_id"),
    "duplicate image id": (
        _set(("data", 9, "image_id"), lambda d: d["data"][4]["image_id"]),
        9,
        "image_id",
    ),
    "annotations shorter than segments": (
        _delete(("data", 4, "annotations", -1)),
        4,
        "annotations",
    ),
    "annotation category differs": (
        _set(("data", 4, "annotations", 0, "category_id"), _other_category),
        4,
        "annotations[0].category_id",
    ),
    "bbox outside the image": (
        _set(
            ("data", 3, "annotations", 1, "bbox"),
            lambda d: [0.0, 0.0, 1.0, d["data"][3]["height"] + 5.0],
        ),
        3,
        "annotations[1].bbox",
    ),
    "isthing contradicts category": (
        _set(("data", 0, "segments_info", 0, "isthing"), lambda d: 1 - _isthing(d, 0, 0)),
        0,
        "segments_info[0].isthing",
    ),
    "non-positive height": (_set(("data", 8, "height"), 0), 8, "height"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_each_defect_is_named(small_doc, tmp_path, case):
    mutate, index, field = CORRUPTIONS[case]
    mutate(small_doc)
    expected_id = None if index is None else small_doc["data"][index]["image_id"]
    path = tmp_path / "psg.json"
    path.write_text(json.dumps(small_doc))
    with pytest.raises(PSGFormatError) as info:
        load_psg(path)
    err = info.value
    assert (err.file, err.image_id, err.field) == (path, expected_id, field)
    message = str(err)
    assert "\n" not in message and message.startswith(f"{path}: ") and f"field {field}: " in message


def test_first_defect_wins(small_doc, tmp_path):
    """Several defects: the one met first in file order is reported."""
    small_doc["data"][7]["relations"][0][2] = -3
    small_doc["data"][2]["segments_info"][0]["category_id"] = -1
    path = tmp_path / "psg.json"
    path.write_text(json.dumps(small_doc))
    with pytest.raises(PSGFormatError, match="segments_info\\[0\\].category_id"):
        load_psg(path)


def test_message_reads_as_one_line(small_doc, tmp_path):
    small_doc["data"][3]["relations"][0][1] = 99
    path = tmp_path / "psg.json"
    path.write_text(json.dumps(small_doc))
    n = _num_segments(small_doc, 3)
    image_id = small_doc["data"][3]["image_id"]
    with pytest.raises(PSGFormatError) as info:
        load_psg(path)
    assert str(info.value) == (
        f"{path}: image {image_id} field relations[0][1]: "
        f"expected a segment index in [0, {n}), got 99"
    )


def test_gzip_round_trip_and_truncation(small_doc, tmp_path):
    data = json.dumps(small_doc).encode()
    good = tmp_path / "psg.json.gz"
    good.write_bytes(gzip.compress(data, mtime=0))
    assert len(load_psg(good).images) == len(small_doc["data"])

    truncated_gzip = tmp_path / "cut.json.gz"
    truncated_gzip.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(PSGFormatError) as info:
        load_psg(truncated_gzip)
    assert (info.value.file, info.value.image_id, info.value.field) == (
        truncated_gzip,
        None,
        "<gzip>",
    )

    truncated_json = tmp_path / "cut.json"
    truncated_json.write_bytes(data[: len(data) // 2])
    with pytest.raises(PSGFormatError, match=r"char \d+") as info:
        load_psg(truncated_json)
    assert (info.value.image_id, info.value.field) == (None, "<json>")

    for bad, field in (("[1, 2]", "<root>"), ('{"data": []}', "thing_classes")):
        path = tmp_path / "odd.json"
        path.write_text(bad)
        with pytest.raises(PSGFormatError) as info:
            load_psg(path)
        assert info.value.field == field


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PSGFormatError) as info:
        load_psg(tmp_path / "nowhere.json")
    assert info.value.file == tmp_path / "nowhere.json"


def _break_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break_garbage(path: Path) -> None:
    path.write_bytes(b"this is not an image")


def _break_resize(path: Path) -> None:
    with Image.open(path) as image:
        image.load()
    image.resize((32, 48)).save(path)


def _break_erase_segment(path: Path) -> None:
    """Paint the first segment's pixels as void (id 0)."""
    pan = np.array(Image.open(path).convert("RGB"))
    ids = pan.astype(int) @ [1, 256, 65536]
    first = ids[ids > 0].min()
    pan[ids == first] = 0
    Image.fromarray(pan).save(path)


def _break_photo(path: Path) -> None:
    """Put a photo-like picture (random colours) where the panoptic PNG belongs."""
    with Image.open(path) as pan:
        size = pan.size
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


PIXEL_DEFECTS = {
    "image missing": ("file_name", Path.unlink),
    "image unreadable": ("file_name", _break_garbage),
    "image truncated": ("file_name", _break_truncate),
    "image size mismatch": ("file_name", _break_resize),
    "panoptic missing": ("pan_seg_file_name", Path.unlink),
    "panoptic size mismatch": ("pan_seg_file_name", _break_resize),
    "panoptic lacks a segment": ("pan_seg_file_name", _break_erase_segment),
    "panoptic is a photo": ("pan_seg_file_name", _break_photo),
}


@pytest.mark.parametrize("case", PIXEL_DEFECTS)
def test_pixel_defects_are_named(synthetic_psg, tmp_path, case):
    field, breaker = PIXEL_DEFECTS[case]
    root = tmp_path / "copy"
    shutil.copytree(synthetic_psg.parent, root)
    record = json.loads((root / "psg.json").read_text())["data"][5]
    broken = root / record[field]
    breaker(broken)
    with pytest.raises(PSGFormatError) as info:
        load_psg(root / "psg.json", images_root=root)
    assert (info.value.file, info.value.image_id, info.value.field) == (
        broken,
        record["image_id"],
        field,
    )
    assert len(load_psg(root / "psg.json", images_root=root, check_images=False).images) == 24


def test_images_root_must_exist(synthetic_psg, tmp_path):
    with pytest.raises(PSGFormatError) as info:
        load_psg(synthetic_psg, images_root=tmp_path / "missing")
    assert (info.value.file, info.value.field) == (tmp_path / "missing", "<images_root>")


def test_panoptic_with_too_many_colours_is_refused(tmp_path):
    path = generate_synthetic_psg(tmp_path / "big", 1, seed=0, image_size=300)
    record = json.loads(path.read_text())["data"][0]
    _break_photo(path.parent / record["pan_seg_file_name"])
    with pytest.raises(PSGFormatError, match="at most 65536 segment ids") as info:
        load_psg(path, images_root=path.parent)
    assert info.value.field == "pan_seg_file_name"
