"""Benchmark rows -> per-image `Scene`s -> collated `SceneBatch`es, what relation models eat.

A row is one image in the Parquet schema of DESIGN.md 2.3. Featurisation happens once per
image (`Scene`): segment labels, box and mask geometry normalised by the image size, and, when
the row has pixels, mask-pooled visual features. Pair geometry is computed at collation, for
all ordered pairs of a batch at once, so memory stays linear in the number of segments.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

GEOMETRY_FEATURES = (
    "x1", "y1", "x2", "y2", "width", "height", "box_area", "log_aspect",
    "mask_area", "mask_fill", "centre_x", "centre_y", "isthing",
)  # fmt: skip
PAIR_GEOMETRY_FEATURES = (
    "centre_dx", "centre_dy", "scaled_dx", "scaled_dy", "log_width_ratio", "log_height_ratio",
    "iou", "subject_in_object", "object_in_subject", "distance",
    "gap_right", "gap_left", "gap_below", "gap_above",
    "left_dx", "top_dy", "right_dx", "bottom_dy",
)  # fmt: skip
GEOMETRY_DIM = len(GEOMETRY_FEATURES)
PAIR_GEOMETRY_DIM = len(PAIR_GEOMETRY_FEATURES)
_EPS = 1e-3


@dataclass
class SceneBatch:
    """Several images' segments and all their ordered pairs, concatenated."""

    labels: torch.Tensor  # [N] long: ground-truth class of every segment
    geometry: torch.Tensor  # [N, G] float: per-segment box + mask geometry
    visual: torch.Tensor | None  # [N, D] float: mask-pooled CNN features, None without pixels
    segment_image: torch.Tensor  # [N] long: image index (0..B-1) of each segment
    pairs: torch.Tensor  # [M, 2] long: (subject, object) indices into N, all i != j per image
    pair_geometry: torch.Tensor  # [M, Q] float
    pair_image: torch.Tensor  # [M] long
    pair_labels: torch.Tensor  # [M] long: 0 = no relation, p + 1 = predicate p
    relations: torch.Tensor  # [R, 3] long: (subject, object, predicate), global segment indices
    num_images: int

    def to(self, device: torch.device | str) -> SceneBatch:
        """A copy with every tensor on `device`."""
        moved = {
            f.name: v.to(device) if isinstance(v, torch.Tensor) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return SceneBatch(**moved)


@dataclass
class Scene:
    """One featurised image: what collation needs, nothing else."""

    image_id: str
    labels: torch.Tensor  # [n] long
    geometry: torch.Tensor  # [n, G] float
    visual: torch.Tensor | None  # [n, D] float
    relations: torch.Tensor  # [r, 3] long, local segment indices

    @property
    def num_segments(self) -> int:
        return int(self.labels.numel())


class SceneError(ValueError):
    """A row that cannot be featurised; names the image and the field."""

    def __init__(self, image_id: Any, field: str, expected: str) -> None:
        self.image_id, self.field, self.expected = image_id, field, expected
        super().__init__(f"image {image_id!r}: field {field!r}: expected {expected}")


class VisualFeaturizer:
    """Mask-pooled appearance features from a frozen, randomly initialised ResNet-18 trunk.

    No pretrained weights can be downloaded, so the trunk (conv1..layer2, 128 channels at
    stride 8) keeps a fixed-seed random init: random conv features still separate colours
    and textures, are identical on every client (same seed), and are computed once per image.
    Each segment's vector is the trunk's feature map, upsampled to the image and averaged over
    the segment mask, plus the mask's mean and std RGB colour: 128 + 6 dimensions.
    """

    dim = 128 + 6

    def __init__(self, seed: int = 0, max_side: int = 128) -> None:
        from torchvision.models import resnet18

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = resnet18(weights=None)
        self.trunk = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2
        ).eval()
        self.trunk.requires_grad_(False)
        self.max_side = max_side

    @torch.no_grad()
    def __call__(self, image: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """`image` [H, W, 3] uint8, `masks` [n, H, W] bool -> [n, dim] float features."""
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)[None]
        pixels = nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True)
        weights = torch.from_numpy(masks).float()[None]
        weights = nn.functional.interpolate(weights, size=size, mode="area")[0]  # [n, h, w]
        weights = weights / weights.sum(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        fmap = self.trunk((pixels - 0.45) / 0.225)
        fmap = nn.functional.interpolate(fmap, size=size, mode="bilinear")[0]  # [c, h, w]
        pooled = torch.einsum("nhw,chw->nc", weights, fmap)
        mean = torch.einsum("nhw,chw->nc", weights, pixels[0])
        var = torch.einsum("nhw,chw->nc", weights, pixels[0] ** 2) - mean**2
        return torch.cat([pooled, mean, var.clamp_min(0).sqrt()], dim=1)


def _decode_rgb(data: bytes, image_id: Any, field: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))
    except Exception as err:  # PIL raises several unrelated types for bad bytes
        raise SceneError(image_id, field, f"a readable image ({err})") from err


def _segment_masks(row: Mapping[str, Any], height: int, width: int) -> np.ndarray | None:
    """[n, H, W] bool masks from the panoptic PNG (COCO id = R + 256 G + 256^2 B), or None."""
    if row.get("pan_seg") is None:
        return None
    rgb = _decode_rgb(row["pan_seg"], row["image_id"], "pan_seg").astype(np.int64)
    if rgb.shape[:2] != (height, width):
        raise SceneError(row["image_id"], "pan_seg", f"a {height}x{width} PNG, got {rgb.shape[:2]}")
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    return np.stack([ids == seg["id"] for seg in row["segments"]]) if row["segments"] else None


def _box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack(
        [
            (xs >= x1) & (xs < max(x2, x1 + 1)) & (ys >= y1) & (ys < max(y2, y1 + 1))
            for x1, y1, x2, y2 in boxes
        ]
    )


def segment_geometry(
    boxes: np.ndarray, areas: np.ndarray, isthing: np.ndarray, height: int, width: int,
    masks: np.ndarray | None = None,
) -> torch.Tensor:  # fmt: skip
    """[n, G] geometry (GEOMETRY_FEATURES) from pixel boxes x1,y1,x2,y2 and mask areas.

    The centre is the mask centroid when masks exist, else the box centre.
    """
    scale = np.array([width, height, width, height], dtype=np.float64)
    box = np.clip(boxes / scale, 0.0, 1.0)
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    box_pixels = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1.0)
    if masks is not None:
        ys, xs = np.mgrid[0:height, 0:width]
        count = np.maximum(masks.sum(axis=(1, 2)), 1)
        centre_x = (masks * xs).sum(axis=(1, 2)) / count / width
        centre_y = (masks * ys).sum(axis=(1, 2)) / count / height
    else:
        centre_x, centre_y = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    log_aspect = np.log((boxes[:, 2] - boxes[:, 0] + 1) / (boxes[:, 3] - boxes[:, 1] + 1))
    columns = [
        *box.T, w, h, w * h, log_aspect, areas / (height * width),
        np.clip(areas / box_pixels, 0.0, 1.0), centre_x, centre_y, isthing.astype(np.float64),
    ]  # fmt: skip
    return torch.from_numpy(np.stack(columns, axis=1)).float()


def scene_from_row(row: Mapping[str, Any], visual: VisualFeaturizer | None = None) -> Scene:
    """Featurise one benchmark row; `visual` adds appearance features (needs `row["image"]`)."""
    image_id = row.get("image_id")
    height, width = int(row["height"]), int(row["width"])
    if height <= 0 or width <= 0:
        raise SceneError(image_id, "height/width", f"positive sizes, got {height}x{width}")
    segments = row["segments"] or []
    n = len(segments)
    boxes = np.array([s["bbox"] for s in segments], dtype=np.float64).reshape(n, 4)
    if n and (not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any()):
        raise SceneError(image_id, "segments.bbox", "finite [x1, y1, x2, y2] with x2>=x1, y2>=y1")
    areas = np.array([s["area"] for s in segments], dtype=np.float64)
    isthing = np.array([bool(s["isthing"]) for s in segments])
    labels = torch.tensor([int(s["category_id"]) for s in segments], dtype=torch.long)
    relations = torch.tensor(
        [[r["subject"], r["object"], r["predicate"]] for r in row["relations"] or []],
        dtype=torch.long,
    ).reshape(-1, 3)
    if relations.numel() and (
        (relations[:, :2] < 0).any() or (relations[:, :2] >= n).any() or (relations[:, 2] < 0).any()
    ):
        raise SceneError(image_id, "relations", f"subject/object in [0, {n}) and predicate >= 0")
    masks = _segment_masks(row, height, width)
    features = None
    if visual is not None:
        if row.get("image") is None:
            raise SceneError(image_id, "image", "encoded pixels (visual features were requested)")
        pixels = _decode_rgb(row["image"], image_id, "image")
        if pixels.shape[:2] != (height, width):
            raise SceneError(image_id, "image", f"{height}x{width} pixels, got {pixels.shape[:2]}")
        if n:
            features = visual(
                pixels, masks if masks is not None else _box_masks(boxes, height, width)
            )
        else:
            features = torch.zeros(0, visual.dim)
    geometry = segment_geometry(boxes, areas, isthing, height, width, masks)
    return Scene(str(image_id), labels, geometry, features, relations)


def scenes_from_rows(
    rows: Iterable[Mapping[str, Any]], visual: VisualFeaturizer | None = None
) -> list[Scene]:
    """Featurise every row (e.g. `pyarrow.Table.to_pylist()` of a shard)."""
    return [scene_from_row(row, visual) for row in rows]


def pair_geometry(subject: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    """[M, Q] relative geometry (PAIR_GEOMETRY_FEATURES) of subject/object geometry rows."""
    sx1, sy1, sx2, sy2, sw, sh = subject[:, :6].unbind(1)
    ox1, oy1, ox2, oy2, ow, oh = obj[:, :6].unbind(1)
    scx, scy = subject[:, 10], subject[:, 11]
    ocx, ocy = obj[:, 10], obj[:, 11]
    inter = (torch.minimum(sx2, ox2) - torch.maximum(sx1, ox1)).clamp_min(0) * (
        torch.minimum(sy2, oy2) - torch.maximum(sy1, oy1)
    ).clamp_min(0)
    s_area, o_area = sw * sh, ow * oh
    dx, dy = ocx - scx, ocy - scy
    columns = [
        dx, dy, dx / (sw + ow + _EPS), dy / (sh + oh + _EPS),
        torch.log((ow + _EPS) / (sw + _EPS)), torch.log((oh + _EPS) / (sh + _EPS)),
        inter / (s_area + o_area - inter + _EPS ** 2), inter / (s_area + _EPS ** 2),
        inter / (o_area + _EPS ** 2), torch.sqrt(dx**2 + dy**2),
        ox1 - sx2, sx1 - ox2, oy1 - sy2, sy1 - oy2,
        ox1 - sx1, oy1 - sy1, ox2 - sx2, oy2 - sy2,
    ]  # fmt: skip
    return torch.stack(columns, dim=1)


def collate(scenes: Sequence[Scene]) -> SceneBatch:
    """Concatenate scenes and enumerate all ordered pairs i != j within each image."""
    if not scenes:
        raise ValueError("cannot collate an empty list of scenes")
    has_visual = {scene.visual is not None for scene in scenes}
    if len(has_visual) > 1:
        raise ValueError("scenes mix rows with and without visual features")
    offsets = np.cumsum([0] + [s.num_segments for s in scenes])
    pairs, pair_image, pair_labels, relations = [], [], [], []
    for index, scene in enumerate(scenes):
        n, offset = scene.num_segments, int(offsets[index])
        subject, obj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = subject != obj
        pairs.append(torch.stack([subject[keep], obj[keep]], dim=1) + offset)
        pair_image.append(torch.full((n * (n - 1),), index, dtype=torch.long))
        labels = torch.zeros(n, n, dtype=torch.long)
        # Several predicates on one pair: the first listed is the label (written last).
        for subject_index, object_index, predicate in reversed(scene.relations.tolist()):
            labels[subject_index, object_index] = predicate + 1
        pair_labels.append(labels[keep])
        relations.append(scene.relations + torch.tensor([offset, offset, 0]))
    geometry = torch.cat([s.geometry for s in scenes])
    all_pairs = torch.cat(pairs).reshape(-1, 2)
    return SceneBatch(
        labels=torch.cat([s.labels for s in scenes]),
        geometry=geometry,
        visual=torch.cat([s.visual for s in scenes]) if has_visual == {True} else None,
        segment_image=torch.repeat_interleave(
            torch.arange(len(scenes)), torch.tensor([s.num_segments for s in scenes])
        ),
        pairs=all_pairs,
        pair_geometry=pair_geometry(geometry[all_pairs[:, 0]], geometry[all_pairs[:, 1]]),
        pair_image=torch.cat(pair_image),
        pair_labels=torch.cat(pair_labels),
        relations=torch.cat(relations).reshape(-1, 3),
        num_images=len(scenes),
    )
