"""The synthetic generator: deterministic, drawn geometry matches the annotations, themes differ."""

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import jensenshannon
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier

from benchmark_builder import synthetic
from benchmark_builder.psg import load_psg
from benchmark_builder.synthetic import generate_synthetic_psg, scene_relations


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first = _files(generate_synthetic_psg(tmp_path / "a", 10, seed=7).parent)
    again = _files(generate_synthetic_psg(tmp_path / "b", 10, seed=7).parent)
    other = _files(generate_synthetic_psg(tmp_path / "c", 10, seed=8).parent)
    assert len(first) == 21 and first == again
    assert first.keys() == other.keys()
    assert first["psg.json"] != other["psg.json"]
    assert sum(first[name] != other[name] for name in first) >= 18


def test_sizes_scale_and_images_do_not_depend_on_the_count(tmp_path, synthetic_psg):
    small = generate_synthetic_psg(tmp_path / "small", 5, seed=0, image_size=96)
    dataset = load_psg(small, images_root=small.parent)
    assert len(dataset.images) == 5
    assert {(i["width"], i["height"]) for i in dataset.images} == {(96, 96)}
    with Image.open(small.parent / dataset.images[0]["file_name"]) as image:
        assert image.size == (96, 96)
    # image i is the same whatever the dataset size
    few = json.loads(generate_synthetic_psg(tmp_path / "few", 6, seed=0).read_text())["data"]
    many = json.loads(synthetic_psg.read_text())["data"]
    assert few == many[:6]
    assert (tmp_path / "few" / few[3]["file_name"]).read_bytes() == (
        synthetic_psg.parent / many[3]["file_name"]
    ).read_bytes()


def test_annotations_are_what_was_drawn(synthetic_psg):
    """Every segment's box and area are those of its pixels in the panoptic PNG."""
    dataset = load_psg(synthetic_psg)
    for record in dataset.images[:8]:
        pan = np.asarray(Image.open(synthetic_psg.parent / record["pan_seg_file_name"]))
        ids = pan.astype(np.int64) @ [1, 256, 65536]
        for segment, annotation in zip(record["segments_info"], record["annotations"], strict=True):
            rows, cols = np.nonzero(ids == segment["id"])
            assert segment["area"] == rows.size > 0
            box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert annotation["bbox"] == [float(c) for c in box]


def _check_geometry(predicate: str, s: list, o: list, s_stuff: bool, o_stuff: bool) -> bool:
    """What each predicate means for the two boxes, written out independently of the generator."""
    sx1, sy1, sx2, sy2 = s
    ox1, oy1, ox2, oy2 = o
    rows_meet = min(sy2, oy2) > max(sy1, oy1)
    columns_meet = min(sx2, ox2) > max(sx1, ox1)
    if predicate == "on":
        return oy1 <= sy2 <= oy2 and (o_stuff or (ox1 <= (sx1 + sx2) / 2 <= ox2))
    if predicate == "in":
        return o_stuff and oy1 <= sy1 and sy2 <= oy2
    if predicate in ("in front of", "behind"):
        nearer = sy2 > oy2 if predicate == "in front of" else sy2 < oy2
        return rows_meet and (o_stuff or (columns_meet and nearer))
    if predicate in ("above", "below"):
        upper, lower = (s, o) if predicate == "above" else (o, s)
        return upper[3] <= lower[1] and (s_stuff or columns_meet)
    if predicate in ("left of", "right of"):
        left, right = (s, o) if predicate == "left of" else (o, s)
        return left[2] <= right[0] and rows_meet
    return False


@pytest.fixture(scope="module")
def scenes_path(tmp_path_factory) -> Path:
    return generate_synthetic_psg(tmp_path_factory.mktemp("scenes") / "psg", 150, seed=1)


@pytest.fixture(scope="module")
def scenes(scenes_path) -> dict:
    return json.loads(scenes_path.read_text())


def test_predicates_are_functions_of_the_boxes(scenes):
    classes = scenes["thing_classes"] + scenes["stuff_classes"]
    stuff = set(scenes["stuff_classes"])
    predicates = scenes["predicate_classes"]
    seen = Counter()
    for record in scenes["data"]:
        boxes = [a["bbox"] for a in record["annotations"]]
        names = [classes[s["category_id"]] for s in record["segments_info"]]
        annotated = {(s, o): predicates[p] for s, o, p in record["relations"]}
        assert len(annotated) == len(record["relations"])  # one predicate per ordered pair
        for (s, o), predicate in annotated.items():
            assert _check_geometry(
                predicate, boxes[s], boxes[o], names[s] in stuff, names[o] in stuff
            )
            seen[predicate] += 1
        # recomputing from the annotated classes and boxes alone gives the annotated relations
        assert scene_relations(names, boxes, record["width"]) == record["relations"]
    assert set(seen) == set(predicates)  # every predicate occurs


def test_themes_make_distinct_triplet_distributions(scenes):
    """Triplet histograms of two halves of one theme are closer than those of any two themes."""
    classes = scenes["thing_classes"] + scenes["stuff_classes"]
    groups: dict[tuple[str, int], Counter] = {}
    for k, record in enumerate(scenes["data"]):
        names = [classes[s["category_id"]] for s in record["segments_info"]]
        triplets = ((names[s], p, names[o]) for s, o, p in record["relations"])
        groups.setdefault((record["theme"], k % 2), Counter()).update(triplets)
    assert {theme for theme, _ in groups} == {theme.name for theme in synthetic.THEMES}
    vocabulary = sorted(set().union(*groups.values()))
    vectors = {g: [counts[v] for v in vocabulary] for g, counts in groups.items()}
    within, between = [], []
    for a, b in itertools.combinations(sorted(vectors), 2):
        distance = jensenshannon(vectors[a], vectors[b], base=2)
        (within if a[0] == b[0] else between).append(distance)
    assert max(within) < min(between)
    assert np.median(between) > 0.9 > 0.5 > np.median(within)


def test_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "out"
    generate_synthetic_psg(out, 3, seed=0)
    with pytest.raises(FileExistsError):
        generate_synthetic_psg(out, 4, seed=0)
    assert len(load_psg(out / "psg.json").images) == 3

    def broken(rng, image_id, size):
        if image_id == "2":
            raise RuntimeError("disk full")
        return render(rng, image_id, size)

    render = synthetic._render_scene
    monkeypatch.setattr(synthetic, "_render_scene", broken)
    with pytest.raises(RuntimeError):
        generate_synthetic_psg(tmp_path / "half", 5, seed=0)
    with pytest.raises(RuntimeError):
        generate_synthetic_psg(out, 5, seed=0, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written
    assert len(load_psg(out / "psg.json").images) == 3  # the old dataset is intact
    monkeypatch.undo()
    written = []
    generate_synthetic_psg(out, 4, seed=0, overwrite=True, on_image=lambda: written.append(1))
    assert len(written) == 4
    assert len(load_psg(out / "psg.json", images_root=out).images) == 4


def _split(scenes: dict) -> tuple[list[dict], list[dict]]:
    return scenes["data"][:100], scenes["data"][100:]


def test_classes_are_told_apart_by_their_pixels(scenes_path, scenes):
    """Mean and spread of colour inside each segment's mask predict its class on unseen images."""

    def features(records):
        x, y = [], []
        for record in records:
            image = np.asarray(Image.open(scenes_path.parent / record["file_name"]), dtype=float)
            pan = np.asarray(Image.open(scenes_path.parent / record["pan_seg_file_name"]))
            ids = pan.astype(np.int64) @ [1, 256, 65536]
            for segment in record["segments_info"]:
                pixels = image[ids == segment["id"]]
                x.append(np.concatenate([pixels.mean(0), pixels.std(0)]))
                y.append(segment["category_id"])
        return np.array(x), np.array(y)

    train, test = (features(part) for part in _split(scenes))
    model = KNeighborsClassifier(n_neighbors=3).fit(*train)
    assert model.score(*test) > 0.9


def test_predicates_are_learnable_from_pair_geometry(scenes):
    """A tree on relative box geometry and classes tells related pairs and their predicates."""

    def pairs(records):
        x, y = [], []
        for record in records:
            boxes = np.array([a["bbox"] for a in record["annotations"]]) / record["width"]
            classes = [s["category_id"] for s in record["segments_info"]]
            label = {(s, o): p + 1 for s, o, p in record["relations"]}
            for s, o in itertools.permutations(range(len(boxes)), 2):
                (sx1, sy1, sx2, sy2), (ox1, oy1, ox2, oy2) = boxes[s], boxes[o]
                gaps = [
                    ox1 - sx2,
                    sx1 - ox2,
                    oy1 - sy2,
                    sy1 - oy2,
                    sy2 - oy2,
                    (sx1 + sx2) / 2 - ox1,
                ]
                x.append(
                    [*boxes[s], *boxes[o], *gaps, ox2 - (sx1 + sx2) / 2, classes[s], classes[o]]
                )
                y.append(label.get((s, o), 0))
        return np.array(x), np.array(y)

    (x_train, y_train), (x_test, y_test) = (pairs(part) for part in _split(scenes))
    model = DecisionTreeClassifier(random_state=0).fit(x_train, y_train)
    majority = np.mean(y_test == np.bincount(y_train).argmax())
    accuracy = model.score(x_test, y_test)
    assert accuracy > 0.95 and accuracy > majority + 0.3
