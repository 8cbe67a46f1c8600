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
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
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
SEGMENT_ID_END = 1 << 24  # a panoptic id is R + 256 G + 256^2 B, so below 256^3
MAX_SIDE = 1 << 16  # pixels per image side (JPEG's limit; PIL refuses far smaller as a bomb)
MAX_NAME = 256  # characters of a class name, predicate name or image id
MAX_FILE_NAME = 1024  # characters of a file name
MAX_CLASSES = 1 << 16  # entries of a class or predicate list


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


def image_path(root: Path, record: dict, key: str) -> Path:
    """``root / record[key]``, resolved; refused unless it stays inside ``root``.

    ``file_name`` and ``pan_seg_file_name`` come from an untrusted file: an absolute name, ``..``
    or a symlink pointing out of the images root would otherwise read (and embed into a shard) a
    file the user never meant to share.
    """
    base = root.resolve()
    path = (root / record[key]).resolve()
    if not path.is_relative_to(base):
        raise PSGFormatError(
            root, record["image_id"], key, f"a file inside the images root, got {path}"
        )
    return path


def read_image_bytes(root: Path, record: dict, key: str) -> bytes:
    """The bytes of an image or panoptic PNG of ``record`` (see :func:`image_path`)."""
    path = image_path(root, record, key)
    try:
        return path.read_bytes()
    except OSError as err:
        raise PSGFormatError(
            path, record["image_id"], key, f"a readable file, got {err.strerror}"
        ) from err


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
    if root is not None:
        if not root.is_dir():
            raise PSGFormatError(root, None, "<images_root>", "an existing folder")
        for record in doc["data"]:
            paths = [image_path(root, record, key) for key in ("file_name", "pan_seg_file_name")]
            if check_images:
                _check_pixels(record, *paths)
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
    duplicated: list[tuple[dict, str]] = []

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen: set[str] = set()
            duplicated.append((obj, next(k for k, _ in pairs if k in seen or seen.add(k))))
        return obj

    try:
        doc = json.loads(raw, object_pairs_hook=unique_keys)
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
    if duplicated:
        _refuse_duplicate(path, doc, *duplicated[0])
    return doc


def _refuse_duplicate(path: Path, doc: Any, obj: dict, key: str) -> None:
    """Name the first object holding a repeated key: JSON would silently keep the last value."""
    where = _locate(doc, obj, "") or ""
    image_id = None
    match = re.match(r"^data\[(\d+)\]\.?(.*)$", where)
    if match:
        record = doc["data"][int(match.group(1))]
        if isinstance(record, dict) and name_problem(record.get("image_id")) is None:
            image_id, where = record["image_id"], match.group(2)
    field = f"{where}.{key}" if where else key
    raise PSGFormatError(path, image_id, field, "each key once per object, got it twice")


def _locate(node: Any, target: dict, where: str) -> str | None:
    """JSON path of ``target`` (by identity) inside ``node``, or None."""
    if node is target:
        return where
    children = (
        ((f"{where}.{k}" if where else k, v) for k, v in node.items())
        if isinstance(node, dict)
        else ((f"{where}[{i}]", v) for i, v in enumerate(node))
        if isinstance(node, list)
        else ()
    )
    for child_where, child in children:
        if isinstance(child, dict | list) and (found := _locate(child, target, child_where)):
            return found
    return None


def _check_top_level(path: Path, doc: Any) -> None:
    if not isinstance(doc, dict):
        raise PSGFormatError(path, None, "<root>", f"a JSON object, got {_kind(doc)}")
    for key in TOP_LEVEL_KEYS:
        if key not in doc:
            raise PSGFormatError(path, None, key, "this top-level key, it is missing")
    seen: dict[str, str] = {}
    for key in ("thing_classes", "stuff_classes", "predicate_classes"):
        names = doc[key]
        if not isinstance(names, list) or not 0 < len(names) <= MAX_CLASSES:
            raise PSGFormatError(path, None, key, f"a list of 1 to {MAX_CLASSES} class names")
        if key == "predicate_classes":
            seen = {}  # predicates are their own name space
        for j, name in enumerate(names):
            problem = name_problem(name)
            if problem:
                raise PSGFormatError(path, None, f"{key}[{j}]", problem)
            if name in seen:
                raise PSGFormatError(
                    path, None, f"{key}[{j}]", f"a unique name, got {name!r} as {seen[name]}"
                )
            seen[name] = f"{key}[{j}]"
    if not isinstance(doc["data"], list):
        raise PSGFormatError(path, None, "data", f"a list of images, got {_kind(doc['data'])}")
    test_ids = doc.get("test_image_ids", [])
    if not isinstance(test_ids, list):
        raise PSGFormatError(path, None, "test_image_ids", "a list of string image ids")
    for j, image_id in enumerate(test_ids):
        problem = name_problem(image_id)
        if problem:
            raise PSGFormatError(path, None, f"test_image_ids[{j}]", problem)
    if len(set(test_ids)) < len(test_ids):
        raise PSGFormatError(path, None, "test_image_ids", "each image id once")


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not a sane class name or id (it goes into texts and one-line errors)."""
    if not isinstance(name, str) or not name:
        return f"a non-empty string, got {_short(name)}"
    if len(name) > MAX_NAME:
        return f"at most {MAX_NAME} characters, got {len(name)}"
    if not name.isprintable():
        return f"printable characters only, got {name!r}"
    return None


def _short(value: Any) -> str:
    """``repr`` cut to 60 characters: an error line stays one short line whatever the input."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


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
    problem = name_problem(image_id)
    if problem:
        raise PSGFormatError(path, None, f"data[{index}].image_id", problem)

    def fail(field: str, expected: str) -> PSGFormatError:
        return PSGFormatError(path, image_id, field, expected)

    for key in ("file_name", "pan_seg_file_name"):
        problem = _filename_problem(record[key])
        if problem:
            raise fail(key, problem)
    height, width = record["height"], record["width"]
    for key, value in (("height", height), ("width", width)):
        if type(value) is not int or not 0 < value <= MAX_SIDE:
            raise fail(key, f"an integer in [1, {MAX_SIDE}], got {_short(value)}")

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
        category = _check_segment(fail, j, segment, num_things, num_classes, width * height)
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
                raise fail(
                    f"relations[{k}][{position}]", f"{what} in [0, {bound}), got {_short(value)}"
                )
    return image_id


def _filename_problem(name: Any) -> str | None:
    """Why ``name`` is not a relative path inside the images root (checked lexically here)."""
    if not isinstance(name, str) or not name:
        return f"a non-empty file name, got {_short(name)}"
    if len(name) > MAX_FILE_NAME or not name.isprintable():
        return f"a printable file name of at most {MAX_FILE_NAME} characters, got {_short(name)}"
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or PureWindowsPath(name).drive:
        return f"a relative path inside the images root, got {_short(name)}"
    return None


_RELATION_PARTS = ("a segment index", "a segment index", "a predicate id")


def _check_segment(
    fail: Callable[[str, str], PSGFormatError],
    j: int,
    segment: Any,
    num_things: int,
    num_classes: int,
    pixels: int,
) -> int:
    """Validate ``segments_info[j]`` and return its category id."""
    if not isinstance(segment, dict):
        raise fail(f"segments_info[{j}]", f"an object, got {_kind(segment)}")
    for key in SEGMENT_KEYS:
        if key not in segment:
            raise fail(f"segments_info[{j}].{key}", "this key, it is missing")
    segment_id, category = segment["id"], segment["category_id"]
    if type(segment_id) is not int or not 0 < segment_id < SEGMENT_ID_END:
        raise fail(
            f"segments_info[{j}].id",
            f"a panoptic id (R + 256 G + 256^2 B) in [1, {SEGMENT_ID_END}),"
            f" got {_short(segment_id)}",
        )
    if type(category) is not int or not 0 <= category < num_classes:
        raise fail(
            f"segments_info[{j}].category_id",
            f"a category id in [0, {num_classes}), got {_short(category)}",
        )
    isthing = category < num_things
    if type(segment["isthing"]) is not int or segment["isthing"] != isthing:
        raise fail(
            f"segments_info[{j}].isthing",
            f"{int(isthing)} for a {'thing' if isthing else 'stuff'} category "
            f"({category}), got {_short(segment['isthing'])}",
        )
    if type(segment["iscrowd"]) is not int or segment["iscrowd"] not in (0, 1):
        raise fail(f"segments_info[{j}].iscrowd", f"0 or 1, got {_short(segment['iscrowd'])}")
    area = segment["area"]
    if type(area) is not int or not 0 <= area <= pixels:
        raise fail(
            f"segments_info[{j}].area",
            f"an integer pixel count in [0, {pixels}] (height x width), got {_short(area)}",
        )
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
    numbers = isinstance(box, list) and all(type(v) in (int, float) for v in box)
    try:  # NaN, infinities and wrong lengths all fail here
        x1, y1, x2, y2 = box if numbers else ()
        inside = 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    except ValueError:
        inside = False
    if not inside:
        raise fail(
            f"annotations[{j}].bbox",
            f"[x1, y1, x2, y2] with 0 <= x1 <= x2 <= {width}"
            f" and 0 <= y1 <= y2 <= {height}, got {_short(box)}",
        )


def _check_pixels(record: dict, picture_path: Path, pan_path: Path) -> None:
    """The image and its panoptic PNG exist, decode, match the size and hold every segment id."""
    image_id, size = record["image_id"], (record["width"], record["height"])
    with _open_image(picture_path, image_id, "file_name") as image:
        _check_size(picture_path, image_id, "file_name", image.size, size)
        image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))  # fast JPEG decode
        _decode(image, picture_path, image_id, "file_name")
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
