"""Featurizers: the real embedding model (no mocks), its disk cache, and FL-PSG's category map."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from builder_helpers import CATEGORY_MAP, cache_dir, real_subset

from benchmark_builder.featurizers import (
    CategoryMapFeaturizer,
    EmbeddingFeaturizer,
    build_featurizer,
    humanize,
    image_triplets,
)
from benchmark_builder.psg import PSGFormatError, load_psg

# (anchor, semantically close, unrelated), all built from the real PSG class and predicate names
TRIPLES = [
    (
        ("person", "riding", "horse"),
        ("person", "sitting on", "horse"),
        ("pizza", "on", "dining table"),
    ),
    (("car", "driving on", "road"), ("truck", "driving on", "road"), ("person", "eating", "cake")),
    (("cat", "lying on", "bed"), ("dog", "lying on", "couch"), ("airplane", "flying over", "sea")),
]


def test_semantically_close_triplets_embed_closer(tmp_path: Path) -> None:
    real = real_subset()
    featurizer = EmbeddingFeaturizer(cache_dir=cache_dir(tmp_path))
    for triple in TRIPLES:
        for subject, predicate, obj in triple:
            assert {subject, obj} <= set(real.classes) and predicate in real.predicate_classes
    texts = [" ".join(t) for triple in TRIPLES for t in triple]
    vectors = featurizer.embed(texts)
    assert vectors.shape == (9, 384) and featurizer.dim == 384
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    for i in range(0, 9, 3):
        anchor, close, far = vectors[i : i + 3]
        assert anchor @ close > anchor @ far + 0.1, texts[i : i + 3]


def test_image_vector_is_the_normalised_mean_and_cache_skips_the_model(
    tmp_path: Path, synthetic_psg: Path
) -> None:
    dataset = load_psg(synthetic_psg)
    first = EmbeddingFeaturizer(cache_dir=cache_dir(tmp_path))
    features = first.fit_transform(dataset)
    assert features.shape == (24, 384) and first.model_calls == 1

    image = dataset.images[5]
    texts = image_triplets(image, dataset.classes, dataset.predicate_classes)
    mean = first.embed(texts).mean(axis=0)
    assert np.allclose(features[5], mean / np.linalg.norm(mean), atol=1e-5)

    second = EmbeddingFeaturizer(cache_dir=cache_dir(tmp_path))
    assert np.array_equal(second.transform(dataset), features)
    assert second.model_calls == 0 and second._encoder is None  # never loaded: all cached

    other = EmbeddingFeaturizer(model_id="another-model", cache_dir=cache_dir(tmp_path))
    assert other.cache.path != second.cache.path and len(other.cache) == 0


def test_image_without_relations_falls_back_to_its_class_names(
    tmp_path: Path, synthetic_psg: Path
) -> None:
    dataset = load_psg(synthetic_psg)
    bare = dict(dataset.images[0], relations=[])
    empty = dict(dataset.images[1], relations=[], segments_info=[], annotations=[])
    small = dataclasses.replace(dataset, images=[bare, empty])
    featurizer = EmbeddingFeaturizer(cache_dir=cache_dir(tmp_path))
    features = featurizer.transform(small)
    names = [humanize(dataset.classes[s["category_id"]]) for s in bare["segments_info"]]
    mean = featurizer.embed(names).mean(axis=0)
    assert np.allclose(features[0], mean / np.linalg.norm(mean), atol=1e-5)
    assert not features[1].any()


def test_humanize_drops_merge_suffixes() -> None:
    assert humanize("sky-other-merged") == "sky"
    assert humanize("pavement-merged") == "pavement"
    assert humanize("traffic light") == "traffic light"


def test_category_map_counts_match_the_relations_of_real_images() -> None:
    dataset = real_subset()
    featurizer = build_featurizer("category-map", category_map=CATEGORY_MAP)
    features = featurizer.fit_transform(dataset)
    assert features.shape == (len(dataset.images), 13 * 13 * 7) and featurizer.dim == 1183
    relations = np.array([len(r["relations"]) for r in dataset.images])
    assert np.array_equal(features.sum(axis=1), relations)

    spec = json.loads(CATEGORY_MAP.read_text())
    group = {name: g for g, names in enumerate(spec["categories"].values()) for name in names}
    predicate_group = {p: g for g, ps in enumerate(spec["relations"].values()) for p in ps}
    image = dataset.images[0]
    s, o, p = image["relations"][0]
    segments = image["segments_info"]
    subject = group[dataset.classes[segments[s]["category_id"]]]
    obj = group[dataset.classes[segments[o]["category_id"]]]
    cell = (subject * 13 + obj) * 7 + predicate_group[dataset.predicate_classes[p]]
    assert features[0, cell] >= 1


def test_category_map_missing_a_class_is_named(tmp_path: Path) -> None:
    spec = json.loads(CATEGORY_MAP.read_text())
    spec["categories"]["Animals"].remove("zebra")
    broken = tmp_path / "map.json"
    broken.write_text(json.dumps(spec))
    with pytest.raises(PSGFormatError, match="zebra"):
        CategoryMapFeaturizer(broken).fit(real_subset())
    with pytest.raises(ValueError, match="unknown featurizer"):
        build_featurizer("nope")
