"""Read and validate OpenPSG ``psg.json`` files (plain or gzipped), with optional pixel checks.

Validation stops at the first problem, found in a fixed order (top-level keys, then each image in
file order), and reports it as one :class:`PSGFormatError` naming the file, the image id, the field
and what was expected, so a CLI can print ``str(err)`` and exit non-zero.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

TOP_LEVEL_KEYS = ("thing_classes", "stuff_classes", "predicate_classes", "data")
IMAGE_KEYS = (
    "file_name",
    "height",
    "width",
    "image_id",
    "pan_seg_file_name",
    "segments_info",
    "annotations",
    "relations",
)
SEGMENT_KEYS = ("id", "category_id", "iscrowd", "isthing", "area")
ANNOTATION_KEYS = ("bbox", "category_id")
MAX_SEGMENT_IDS = 1 << 16  # distinct colours a panoptic PNG may hold (a photo has far more)


class PSGFormatError(ValueError):
    """One clear error: file, image id (or None), field, what was expected (and what was found).

    ``str()`` is one line: ``<file>: image <id> field <field>: expected <expected>``,
    e.g. ``psg.json: image 2345 field relations[3][1]: expected a segment index in [0, 5), got 7``.
    """

    def __init__(self, file: str | Path, image_id: str | None, field: str, expected: str) -> None:
        self.file = Path(file)
        self.image_id = image_id
        self.field = field
        self.expected = expected
        where = "" if image_id is None else f"image {image_id} "
        super().__init__(f"{file}: {where}field {field}: expected {expected}")


@dataclass
class PSGDataset:
    """A validated PSG dataset; ``images`` are the OpenPSG records exactly as in the file."""

    thing_classes: list[str]
    stuff_classes: list[str]
    predicate_classes: list[str]
    images: list[dict]
    test_image_ids: list[str]
    source: Path
    sha256: str
    images_root: Path | None

    @property
    def classes(self) -> list[str]:
        """Thing then stuff class names: ``segments_info[j]["category_id"]`` indexes this list."""
        return self.thing_classes + self.stuff_classes


def load_psg(
    path: str | Path, images_root: str | Path | None = None, check_images: bool = True
) -> PSGDataset:
    """Load and validate a ``psg.json`` (or ``.json.gz``; gzip is detected from the bytes).

    With ``images_root`` and ``check_images``, every image and panoptic PNG must also exist, decode,
    have the annotated size, and the panoptic PNG must contain every segment id.
    Raises :class:`PSGFormatError` on the first problem found.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PSGFormatError(path, None, "<file>", f"a readable file, got {err}") from err
    doc = _parse(path, raw)
    _check_top_level(path, doc)
    num_things = len(doc["thing_classes"])
    num_classes = num_things + len(doc["stuff_classes"])
    num_predicates = len(doc["predicate_classes"])
    seen: dict[str, int] = {}
    for index, record in enumerate(doc["data"]):
        image_id = _check_image(path, index, record, num_things, num_classes, num_predicates)
        if image_id in seen:
            raise PSGFormatError(
                path,
                image_id,
                "image_id",
                f"a unique image id, got a duplicate of data[{seen[image_id]}]",
            )
        seen[image_id] = index
    root = None if images_root is None else Path(images_root)
    if root is not None and check_images:
        if not root.is_dir():
            raise PSGFormatError(root, None, "<images_root>", "an existing folder")
        for record in doc["data"]:
            _check_pixels(root, record)
    return PSGDataset(
        thing_classes=doc["thing_classes"],
        stuff_classes=doc["stuff_classes"],
        predicate_classes=doc["predicate_classes"],
        images=doc["data"],
        test_image_ids=doc.get("test_image_ids", []),
        source=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        images_root=root,
    )


def _parse(path: Path, raw: bytes) -> Any:
    """Decompress (if gzipped) and parse, turning every decoding failure into a PSGFormatError."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise PSGFormatError(
                path, None, "<gzip>", f"a complete gzip stream, got {err}"
            ) from err
    collecting = gc.isenabled()
    gc.disable()  # millions of new containers, no cycles: halves the parse time on real files
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise PSGFormatError(
            path,
            None,
            "<json>",
            f"valid JSON, got '{err.msg}' at line {err.lineno} column {err.colno} (char {err.pos})",
        ) from err
    except UnicodeDecodeError as err:
        raise PSGFormatError(
            path, None, "<json>", f"UTF-8 text, got a bad byte at {err.start}"
        ) from err
    finally:
        if collecting:
            gc.enable()


def _check_top_level(path: Path, doc: Any) -> None:
    if not isinstance(doc, dict):
        raise PSGFormatError(path, None, "<root>", f"a JSON object, got {_kind(doc)}")
    for key in TOP_LEVEL_KEYS:
        if key not in doc:
            raise PSGFormatError(path, None, key, "this top-level key, it is missing")
    for key in ("thing_classes", "stuff_classes", "predicate_classes"):
        names = doc[key]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise PSGFormatError(path, None, key, "a non-empty list of class names")
    if not isinstance(doc["data"], list):
        raise PSGFormatError(path, None, "data", f"a list of images, got {_kind(doc['data'])}")
    test_ids = doc.get("test_image_ids", [])
    if not isinstance(test_ids, list) or not all(isinstance(i, str) for i in test_ids):
        raise PSGFormatError(path, None, "test_image_ids", "a list of string image ids")


def _check_image(
    path: Path, index: int, record: Any, num_things: int, num_classes: int, num_predicates: int
) -> str:
    """Validate one image record and return its id."""
    if not isinstance(record, dict):
        raise PSGFormatError(path, None, f"data[{index}]", f"an object, got {_kind(record)}")
    for key in IMAGE_KEYS:
        if key not in record:
            raise PSGFormatError(
                path,
                record.get("image_id"),
                f"data[{index}].{key}",
                "this key, it is missing",
            )
    image_id = record["image_id"]
    if not isinstance(image_id, str) or not image_id:
        raise PSGFormatError(
            path, None, f"data[{index}].image_id", f"a non-empty string, got {image_id!r}"
        )

    def fail(field: str, expected: str) -> PSGFormatError:
        return PSGFormatError(path, image_id, field, expected)

    for key in ("file_name", "pan_seg_file_name"):
        if not isinstance(record[key], str) or not record[key]:
            raise fail(key, f"a non-empty file name, got {record[key]!r}")
    height, width = record["height"], record["width"]
    for key, value in (("height", height), ("width", width)):
        if type(value) is not int or value <= 0:
            raise fail(key, f"a positive integer, got {value!r}")

    segments, annotations = record["segments_info"], record["annotations"]
    if not isinstance(segments, list):
        raise fail("segments_info", f"a list, got {_kind(segments)}")
    if not isinstance(annotations, list) or len(annotations) != len(segments):
        got = f"{len(annotations)} entries" if isinstance(annotations, list) else _kind(annotations)
        raise fail(
            "annotations",
            f"a list aligned with segments_info ({len(segments)}), got {got}",
        )
    segment_ids = set()
    for j, (segment, annotation) in enumerate(zip(segments, annotations, strict=True)):
        category = _check_segment(fail, j, segment, num_things, num_classes)
        if segment["id"] in segment_ids:
            raise fail(f"segments_info[{j}].id", f"a unique segment id, got {segment['id']}")
        segment_ids.add(segment["id"])
        _check_annotation(fail, j, annotation, category, width, height)

    relations = record["relations"]
    if not isinstance(relations, list):
        raise fail("relations", f"a list of [subject, object, predicate], got {_kind(relations)}")
    num_segments = len(segments)
    for k, relation in enumerate(relations):
        if not isinstance(relation, list) or len(relation) != 3:
            raise fail(f"relations[{k}]", f"[subject, object, predicate], got {relation!r}")
        for position, (value, bound, what) in enumerate(
            zip(
                relation, (num_segments, num_segments, num_predicates), _RELATION_PARTS, strict=True
            )
        ):
            if type(value) is not int or not 0 <= value < bound:
                raise fail(f"relations[{k}][{position}]", f"{what} in [0, {bound}), got {value!r}")
    return image_id


_RELATION_PARTS = ("a segment index", "a segment index", "a predicate id")


def _check_segment(
    fail: Callable[[str, str], PSGFormatError],
    j: int,
    segment: Any,
    num_things: int,
    num_classes: int,
) -> int:
    """Validate ``segments_info[j]`` and return its category id."""
    if not isinstance(segment, dict):
        raise fail(f"segments_info[{j}]", f"an object, got {_kind(segment)}")
    for key in SEGMENT_KEYS:
        if key not in segment:
            raise fail(f"segments_info[{j}].{key}", "this key, it is missing")
    segment_id, category = segment["id"], segment["category_id"]
    if type(segment_id) is not int or segment_id <= 0:
        raise fail(f"segments_info[{j}].id", f"a positive integer, got {segment_id!r}")
    if type(category) is not int or not 0 <= category < num_classes:
        raise fail(
            f"segments_info[{j}].category_id",
            f"a category id in [0, {num_classes}), got {category!r}",
        )
    isthing = category < num_things
    if segment["isthing"] not in (0, 1) or bool(segment["isthing"]) != isthing:
        raise fail(
            f"segments_info[{j}].isthing",
            f"{int(isthing)} for a {'thing' if isthing else 'stuff'} category "
            f"({category}), got {segment['isthing']!r}",
        )
    if segment["iscrowd"] not in (0, 1):
        raise fail(f"segments_info[{j}].iscrowd", f"0 or 1, got {segment['iscrowd']!r}")
    area = segment["area"]
    if type(area) not in (int, float) or not area >= 0:
        raise fail(f"segments_info[{j}].area", f"a non-negative number, got {area!r}")
    return category


def _check_annotation(
    fail, j: int, annotation: Any, category: int, width: int, height: int
) -> None:
    """Validate ``annotations[j]`` against its segment and the image size."""
    if not isinstance(annotation, dict):
        raise fail(f"annotations[{j}]", f"an object, got {_kind(annotation)}")
    for key in ANNOTATION_KEYS:
        if key not in annotation:
            raise fail(f"annotations[{j}].{key}", "this key, it is missing")
    if annotation["category_id"] != category:
        raise fail(
            f"annotations[{j}].category_id",
            f"{category} as in segments_info[{j}], got {annotation['category_id']!r}",
        )
    if annotation.get("bbox_mode", 0) != 0:
        raise fail(
            f"annotations[{j}].bbox_mode",
            f"0 (absolute x1, y1, x2, y2), got {annotation['bbox_mode']!r}",
        )
    box = annotation["bbox"]
    try:  # NaN, infinities, wrong types and wrong lengths all fail here
        x1, y1, x2, y2 = box if isinstance(box, list) else ()
        inside = 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    except (TypeError, ValueError):
        inside = False
    if not inside:
        raise fail(
            f"annotations[{j}].bbox",
            f"[x1, y1, x2, y2] with 0 <= x1 <= x2 <= {width}"
            f" and 0 <= y1 <= y2 <= {height}, got {box!r}",
        )


def _check_pixels(root: Path, record: dict) -> None:
    """The image and its panoptic PNG exist, decode, match the size and hold every segment id."""
    image_id, size = record["image_id"], (record["width"], record["height"])
    image_path = root / record["file_name"]
    with _open_image(image_path, image_id, "file_name") as image:
        _check_size(image_path, image_id, "file_name", image.size, size)
        image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))  # fast JPEG decode
        _decode(image, image_path, image_id, "file_name")
    pan_path = root / record["pan_seg_file_name"]
    with _open_image(pan_path, image_id, "pan_seg_file_name") as pan:
        _check_size(pan_path, image_id, "pan_seg_file_name", pan.size, size)
        _decode(pan, pan_path, image_id, "pan_seg_file_name")
        colours = pan.convert("RGB").getcolors(MAX_SEGMENT_IDS)
    if colours is None:
        raise PSGFormatError(
            pan_path, image_id, "pan_seg_file_name", f"at most {MAX_SEGMENT_IDS} segment ids"
        )
    present = {r + 256 * g + 65536 * b for _, (r, g, b) in colours}
    missing = [s["id"] for s in record["segments_info"] if s["id"] not in present]
    if missing:
        raise PSGFormatError(
            pan_path,
            image_id,
            "pan_seg_file_name",
            f"every segment id (R + 256 G + 256^2 B) in the PNG, missing {missing}",
        )


def _open_image(path: Path, image_id: str, field: str) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, ValueError) as err:
        raise PSGFormatError(path, image_id, field, f"a readable image, got {err}") from err


def _decode(image: Image.Image, path: Path, image_id: str, field: str) -> None:
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise PSGFormatError(path, image_id, field, f"a decodable image, got {err}") from err


def _check_size(path: Path, image_id: str, field: str, got: tuple, size: tuple) -> None:
    if tuple(got) != size:
        raise PSGFormatError(
            path,
            image_id,
            field,
            f"width x height {size[0]}x{size[1]} as annotated, got {got[0]}x{got[1]}",
        )


def _kind(value: Any) -> str:
    return type(value).__name__
