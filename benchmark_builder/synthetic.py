"""Synthetic PSG: a seeded generator of complete OpenPSG-format datasets (the embedded default).

Each image is a scene of one *theme* (street, kitchen, park, beach, living room): horizontal stuff
bands (sky over grass, wall over floor, ...) and a few thing objects drawn as shapes with a
class-specific colour and texture. The theme decides which classes appear, so images of one theme
share triplets and semantic clusters are real. Relations are a deterministic function of the
annotated boxes (see :func:`scene_relations`), so a model that sees the geometry can learn them.

Every image draws from its own generator ``default_rng([seed, index])``: image ``i`` is the same in
a dataset of 10 images and in one of 10,000, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 with exclusive x2, y2 (pixel edges)


@dataclass(frozen=True)
class ThingStyle:
    """How a thing class looks and where it goes: ``place`` is the band its bottom (or all of it,
    for "sky") lies in; ``supports`` are classes it is put on top of when one is in the scene."""

    name: str
    shape: str  # rect | ellipse | triangle | trapezoid
    colour: tuple[int, int, int]
    texture: str  # solid | hstripes | vstripes | checker | dots
    width: tuple[float, float]  # fraction of the image width
    height: tuple[float, float]  # fraction of the image height
    place: str = "ground"  # ground | sky | water
    supports: tuple[str, ...] = ()


@dataclass(frozen=True)
class StuffStyle:
    """A stuff class: a horizontal band; ``surface`` stuff is something things stand on."""

    name: str
    colour: tuple[int, int, int]
    texture: str
    surface: bool


@dataclass(frozen=True)
class Theme:
    """A scene type: stuff bands from top to bottom (one choice each) and thing-class weights."""

    name: str
    bands: tuple[tuple[str, ...], ...]
    things: dict[str, float] = field(hash=False)


THINGS = (
    ThingStyle("person", "ellipse", (230, 160, 120), "hstripes", (0.10, 0.16), (0.30, 0.45)),
    ThingStyle("dog", "rect", (140, 90, 40), "dots", (0.18, 0.28), (0.12, 0.18)),
    ThingStyle("cat", "triangle", (250, 140, 30), "hstripes", (0.12, 0.18), (0.10, 0.16),
               supports=("chair", "table", "bench")),
    ThingStyle("car", "rect", (200, 30, 30), "solid", (0.30, 0.42), (0.15, 0.22)),
    ThingStyle("bird", "triangle", (30, 30, 30), "solid", (0.08, 0.12), (0.05, 0.08), "sky"),
    ThingStyle("boat", "trapezoid", (245, 245, 245), "vstripes", (0.25, 0.35), (0.10, 0.16),
               "water"),
    ThingStyle("ball", "ellipse", (250, 230, 40), "checker", (0.07, 0.10), (0.07, 0.10)),
    ThingStyle("umbrella", "triangle", (230, 40, 150), "vstripes", (0.20, 0.30), (0.15, 0.22)),
    ThingStyle("bench", "rect", (170, 60, 200), "hstripes", (0.30, 0.40), (0.10, 0.14)),
    ThingStyle("chair", "rect", (60, 120, 200), "vstripes", (0.12, 0.18), (0.18, 0.26)),
    ThingStyle("table", "rect", (190, 190, 180), "checker", (0.35, 0.50), (0.18, 0.25)),
    ThingStyle("cup", "ellipse", (40, 200, 200), "solid", (0.06, 0.09), (0.07, 0.10),
               supports=("table",)),
)  # fmt: skip

STUFF = (
    StuffStyle("sky", (120, 180, 240), "gradient", surface=False),
    StuffStyle("building", (150, 140, 130), "checker", surface=False),
    StuffStyle("wall", (220, 210, 180), "solid", surface=False),
    StuffStyle("grass", (60, 150, 50), "noise", surface=True),
    StuffStyle("road", (80, 80, 85), "noise", surface=True),
    StuffStyle("floor", (170, 120, 70), "hstripes", surface=True),
    StuffStyle("carpet", (150, 40, 60), "dots", surface=True),
    StuffStyle("sand", (230, 210, 150), "noise", surface=True),
    StuffStyle("water", (40, 90, 180), "hstripes", surface=True),
)

THEMES = (
    Theme("street", (("sky",), ("building", "wall"), ("road",)),
          {"car": 3, "person": 3, "dog": 1, "bird": 1, "bench": 1}),
    Theme("kitchen", (("wall",), ("floor",)),
          {"table": 3, "cup": 3, "chair": 2, "person": 2, "cat": 1}),
    Theme("park", (("sky",), ("grass",)),
          {"person": 3, "dog": 3, "ball": 2, "bench": 2, "bird": 2}),
    Theme("beach", (("sky",), ("water",), ("sand",)),
          {"person": 3, "boat": 2, "umbrella": 2, "bird": 2, "ball": 1}),
    Theme("living room", (("wall",), ("carpet", "floor")),
          {"chair": 3, "cat": 3, "table": 2, "person": 1, "ball": 1}),
)  # fmt: skip

THING_CLASSES = [style.name for style in THINGS]
STUFF_CLASSES = [style.name for style in STUFF]
CLASSES = THING_CLASSES + STUFF_CLASSES
PREDICATE_CLASSES = ["on", "in", "in front of", "behind", "above", "below", "left of", "right of"]

_THING = {style.name: style for style in THINGS}
_STUFF = {style.name: style for style in STUFF}
_CATEGORY = {name: index for index, name in enumerate(CLASSES)}
_PREDICATE = {name: index for index, name in enumerate(PREDICATE_CLASSES)}
NEAR = 0.25  # "left of" / "right of" only for things at most this fraction of the width apart
ON_DEPTH = 0.35  # a thing is "on" another when its bottom is in the top 35% of the other's box
MIN_VISIBLE = 0.25  # things less visible than this (after occlusion) are left unlabelled (void)
TEST_FRACTION = 0.1  # share of images listed in test_image_ids


def generate_synthetic_psg(
    out_dir: str | Path,
    num_images: int,
    seed: int,
    image_size: int = 64,
    overwrite: bool = False,
    on_image: Callable[[], None] | None = None,
) -> Path:
    """Write ``images/*.jpg``, ``panoptic/*.png`` and ``psg.json`` in ``out_dir``; return the json.

    The folder is built in a temporary sibling and renamed at the end, so an interrupted run leaves
    nothing behind. An existing non-empty ``out_dir`` is replaced only with ``overwrite=True``.
    ``on_image`` (opt-in, for a CLI's progress bar) is called after each image is written.
    """
    if num_images < 1 or image_size < 16:
        raise ValueError(
            f"need num_images >= 1 and image_size >= 16, got {num_images}, {image_size}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; allow overwriting to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "images").mkdir(parents=True)
        (tmp / "panoptic").mkdir()
        records, test_ids = [], []
        for index in range(num_images):
            rng = np.random.default_rng([seed, index])
            record, image, panoptic = _render_scene(rng, str(index), image_size)
            Image.fromarray(image).save(tmp / record["file_name"], quality=90)
            Image.fromarray(panoptic).save(tmp / record["pan_seg_file_name"], compress_level=6)
            records.append(record)
            if rng.random() < TEST_FRACTION:
                test_ids.append(record["image_id"])
            if on_image is not None:
                on_image()
        doc = {
            "thing_classes": THING_CLASSES,
            "stuff_classes": STUFF_CLASSES,
            "predicate_classes": PREDICATE_CLASSES,
            "test_image_ids": test_ids,
            "data": records,
        }
        (tmp / "psg.json").write_text(json.dumps(doc, separators=(",", ":")))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "psg.json"


def scene_relations(classes: list[str], boxes: list[Box], width: int) -> list[list[int]]:
    """The ``[subject, object, predicate]`` relations of a scene, from its classes and boxes alone.

    Each ordered pair gets at most one predicate, by these rules. Thing-thing: "on" (its bottom in
    the other's top band, centred over it, smaller), else "in front of" / "behind" (overlapping
    boxes, the lower bottom edge is nearer), else "above" / "below" (stacked columns) or
    "left of" / "right of" (same rows, near). Thing-stuff: "on" a surface band holding its bottom
    (unless it rests on a thing), "in" the sky when wholly inside it, "in front of" a wall or
    building it overlaps. Stuff-stuff: "above" / "below" for touching bands.
    """
    things = [k for k, name in enumerate(classes) if name in _THING]
    rests = {i: any(j != i and _rests_on(boxes[i], boxes[j]) for j in things) for i in things}
    relations = []
    for i, j in itertools.permutations(range(len(classes)), 2):
        predicate = _predicate(boxes[i], boxes[j], classes[i], classes[j], rests.get(i), width)
        if predicate:
            relations.append([i, j, _PREDICATE[predicate]])
    return relations


def _predicate(
    subject: Box, obj: Box, subject_class: str, object_class: str, rests: bool | None, width: int
) -> str | None:
    """The rules of :func:`scene_relations` for one ordered pair."""
    if subject_class in _STUFF:
        if object_class in _STUFF:
            return "above" if subject[3] == obj[1] else "below" if subject[1] == obj[3] else None
        return None
    if object_class in _STUFF:
        return _thing_on_stuff(subject, obj, object_class, bool(rests))
    if _rests_on(subject, obj):
        return "on"
    if _rests_on(obj, subject):
        return None
    x_overlap = min(subject[2], obj[2]) - max(subject[0], obj[0])
    y_overlap = min(subject[3], obj[3]) - max(subject[1], obj[1])
    if x_overlap > 0 and y_overlap > 0:
        return "in front of" if subject[3] > obj[3] else "behind" if subject[3] < obj[3] else None
    if x_overlap > 0:
        return "above" if subject[3] <= obj[1] else "below"
    if y_overlap > 0 and -x_overlap <= NEAR * width:
        return "left of" if subject[2] <= obj[0] else "right of"
    return None


def _thing_on_stuff(thing: Box, stuff: Box, stuff_class: str, rests_on_thing: bool) -> str | None:
    if _STUFF[stuff_class].surface:
        return "on" if not rests_on_thing and stuff[1] < thing[3] <= stuff[3] else None
    if stuff_class == "sky":
        return "in" if stuff[1] <= thing[1] and thing[3] <= stuff[3] else None
    return "in front of" if min(thing[3], stuff[3]) > max(thing[1], stuff[1]) else None


def _rests_on(top: Box, bottom: Box) -> bool:
    """``top``'s bottom edge lies in ``bottom``'s top band, centred over it, and it is smaller."""
    centre = (top[0] + top[2]) / 2
    return (
        bottom[1] <= top[3] <= bottom[1] + ON_DEPTH * (bottom[3] - bottom[1])
        and bottom[0] <= centre <= bottom[2]
        and _area(top) < _area(bottom)
    )


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _render_scene(
    rng: np.random.Generator, image_id: str, size: int
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Draw one scene; return its OpenPSG record, the RGB image and the panoptic PNG array."""
    theme = THEMES[rng.integers(len(THEMES))]
    image = np.empty((size, size, 3), dtype=np.int16)
    labels = np.zeros((size, size), dtype=np.int32)  # 0 = void, k + 1 = drawn element k

    cuts = np.cumsum(rng.uniform(0.6, 1.4, len(theme.bands)))
    cuts = np.round(np.concatenate([[0.0], cuts / cuts[-1]]) * size).astype(int)
    bands = []  # (stuff name, top, bottom) from top to bottom
    for choices, top, bottom in zip(theme.bands, cuts[:-1], cuts[1:], strict=True):
        bands.append((choices[rng.integers(len(choices))], int(top), int(bottom)))
    elements: list[tuple[str, Box]] = []  # drawn order: bands, then things back to front
    for name, top, bottom in bands:
        elements.append((name, (0, top, size, bottom)))
        style = _STUFF[name]
        _paint(image, labels, len(elements), (0, top, size, bottom), "rect", style, rng)

    names = list(theme.things)
    weights = np.array([theme.things[n] for n in names], dtype=float)
    chosen = [
        names[k] for k in rng.choice(len(names), rng.integers(2, 6), p=weights / weights.sum())
    ]
    chosen.sort(
        key=lambda n: bool(_THING[n].supports)
    )  # supports are placed before what sits on them
    placed: list[tuple[float, str, Box]] = []  # (depth key, class, box)
    for name in chosen:
        placed.append(_place(rng, _THING[name], placed, bands, size))
    for _, name, box in sorted(placed, key=lambda item: item[0]):
        elements.append((name, box))
        _paint(image, labels, len(elements), box, _THING[name].shape, _THING[name], rng)

    image += rng.integers(-6, 7, size=image.shape, dtype=np.int16)
    record, panoptic = _annotate(image_id, size, theme, elements, labels)
    return record, np.clip(image, 0, 255).astype(np.uint8), panoptic


def _place(
    rng: np.random.Generator,
    style: ThingStyle,
    placed: list[tuple[float, str, Box]],
    bands: list[tuple[str, int, int]],
    size: int,
) -> tuple[float, str, Box]:
    """Size and place a thing; return (depth key, class, box). Larger key: nearer, drawn later."""
    w = max(2, round(rng.uniform(*style.width) * size))
    h = max(2, round(rng.uniform(*style.height) * size))
    supports = [(key, box) for key, name, box in placed if name in style.supports]
    if supports and rng.random() < 0.8:
        key, (sx1, sy1, sx2, sy2) = supports[rng.integers(len(supports))]
        y2 = sy1 + int(rng.integers(1, max(2, int(ON_DEPTH * (sy2 - sy1)) + 1)))
        x1 = int(np.clip(rng.integers(sx1, sx2) - w // 2, 0, size - w))
        return key + 0.5, style.name, (x1, max(0, y2 - h), x1 + w, y2)
    x1 = int(rng.integers(0, size - w + 1))
    if style.place == "sky":
        _, _, bottom = bands[0]
        y1 = int(rng.integers(0, max(1, bottom - h + 1)))
        y2 = min(y1 + h, bottom)
    else:
        band = bands[-1] if style.place == "ground" else next(b for b in bands if b[0] == "water")
        _, top, bottom = band
        y2 = int(rng.integers(min(top + 2, bottom), bottom + 1))
        y1 = max(0, y2 - h)
    return float(y2), style.name, (x1, y1, x1 + w, y2)


def _paint(
    image: np.ndarray,
    labels: np.ndarray,
    label: int,
    box: Box,
    shape: str,
    style: ThingStyle | StuffStyle,
    rng: np.random.Generator,
) -> None:
    """Fill ``shape`` inside ``box`` with the style's jittered colour and texture."""
    x1, y1, x2, y2 = box
    h, w = y2 - y1, x2 - x1
    v = (np.arange(h)[:, None] + 0.5) / h
    u = (np.arange(w)[None, :] + 0.5) / w
    if shape == "ellipse":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":
        mask = np.abs(u - 0.5) <= v / 2
    elif shape == "trapezoid":
        mask = np.abs(u - 0.5) <= 0.5 - 0.25 * v
    else:
        mask = np.s_[:]  # a rectangle fills its box
    period = max(2, image.shape[0] // 16)
    rows, cols = np.arange(y1, y2)[:, None] // period, np.arange(x1, x2)[None, :] // period
    shade = np.broadcast_to(_texture(style.texture, rows, cols, v, rng), (h, w))
    colour = np.array(style.colour) + rng.integers(-15, 16, 3)
    pixels = colour * (1.0 - 0.35 * shade)[..., None]
    image[y1:y2, x1:x2][mask] = pixels[mask]
    labels[y1:y2, x1:x2][mask] = label


def _texture(
    texture: str, rows: np.ndarray, cols: np.ndarray, v: np.ndarray, rng: np.random.Generator
) -> np.ndarray | float:
    """How much darker each pixel is (0..1); ``rows``/``cols`` count texture periods."""
    if texture == "hstripes":
        return rows % 2
    if texture == "vstripes":
        return cols % 2
    if texture == "checker":
        return (rows + cols) % 2
    if texture == "dots":
        return (rows % 2 == 0) & (cols % 2 == 0)
    if texture == "noise":
        return rng.random((rows.shape[0], cols.shape[1])) < 0.3
    if texture == "gradient":
        return v
    return 0.0


def _annotate(
    image_id: str, size: int, theme: Theme, elements: list[tuple[str, Box]], labels: np.ndarray
) -> tuple[dict, np.ndarray]:
    """Segments, boxes and relations from the final pixels; the COCO-panoptic RGB array."""
    areas = np.bincount(labels.ravel(), minlength=len(elements) + 1)
    order = sorted(range(len(elements)), key=lambda k: elements[k][0] in _STUFF)  # things first
    ids = np.zeros(len(elements) + 1, dtype=np.int64)
    instances: dict[int, int] = {}
    segments, annotations, kept = [], [], []  # kept: (class, box) per segment
    for k in order:
        name, drawn = elements[k]
        isthing = name in _THING
        area = int(areas[k + 1])
        if area == 0 or (isthing and area < MIN_VISIBLE * _area(drawn)):
            continue  # (nearly) hidden things become void pixels
        mask = labels == k + 1
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        category = _CATEGORY[name]
        instances[category] = instances.get(category, 0) + 1
        ids[k + 1] = category * 256 + instances[category]
        segments.append(
            {
                "id": int(ids[k + 1]),
                "category_id": category,
                "iscrowd": 0,
                "isthing": int(isthing),
                "area": area,
            }
        )
        annotations.append(
            {"bbox": [float(c) for c in box], "bbox_mode": 0, "category_id": category}
        )
        kept.append((name, box))
    classes = [name for name, _ in kept]
    relations = scene_relations(classes, [box for _, box in kept], size)
    pan = ids[labels]
    panoptic = np.stack([pan & 255, (pan >> 8) & 255, pan >> 16], axis=-1).astype(np.uint8)
    stem = f"{int(image_id):06d}"
    record = {
        "file_name": f"images/{stem}.jpg",
        "height": size,
        "width": size,
        "image_id": image_id,
        "pan_seg_file_name": f"panoptic/{stem}.png",
        "segments_info": segments,
        "relations": relations,
        "annotations": annotations,
        "theme": theme.name,
    }
    return record, panoptic
