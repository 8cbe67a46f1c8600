"""The relation-model contract, its registry, and the building blocks models share.

A relation model reads a `SceneBatch` (segments with labels and geometry, optional visual
features, all ordered pairs) and scores every pair over the predicates plus background.
PredCls gives the ground-truth labels; in SGCls a model may not read `batch.labels`, so it
predicts them from geometry and visual features (`ObjectEncoder`) and uses its own guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fedpsg.psg.data import SceneBatch

MODES = ("predcls", "sgcls")
# Object logits returned in PredCls: softmax of one-hot * this is one-hot to float precision.
PREDCLS_LOGIT = 100.0


@dataclass(frozen=True)
class ModelSpec:
    """Shapes a model must agree on with the data (the same on every client)."""

    num_classes: int
    num_predicates: int
    geometry_dim: int
    pair_geometry_dim: int
    visual_dim: int = 0  # 0 = label + geometry only (no pixels)


@dataclass
class RelationOutput:
    """Scores of one forward pass."""

    predicate_logits: torch.Tensor  # [M, P + 1], column 0 = background / no relation
    object_logits: torch.Tensor  # [N, C]


def check_mode(mode: str) -> str:
    """Return `mode` if it is a known evaluation mode, else raise a clear error."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    return mode


class RelationModel(nn.Module):
    """Base class: stores the spec; subclasses build their layers and define
    `forward(batch: SceneBatch, mode: str = "predcls") -> RelationOutput`.

    `freq_prior` is a [C, C, P + 1] log-frequency table of predicates per (subject class,
    object class), background included; it may only initialise weights, never change shapes.
    A model whose table is optional (IMP) says so with `optional_frequency_bias` and takes
    `use_bias`.
    """

    optional_frequency_bias: ClassVar[bool] = False

    def __init__(
        self, spec: ModelSpec, freq_prior: torch.Tensor | None = None, **hparams: object
    ) -> None:
        super().__init__()
        if hparams:
            raise TypeError(f"{type(self).__name__} got unknown hyper-parameters {sorted(hparams)}")
        if freq_prior is not None and tuple(freq_prior.shape) != prior_shape(spec):
            raise ValueError(
                f"freq_prior has shape {tuple(freq_prior.shape)}, expected {prior_shape(spec)}"
            )
        self.spec = spec

    @property
    def frequency_bias(self) -> FrequencyBias | None:
        """The model's (subject, object) frequency table; None for a model without one."""
        return next((m for m in self.modules() if isinstance(m, FrequencyBias)), None)

    def set_prior(self, freq_prior: torch.Tensor) -> None:
        """Load a [C, C, P + 1] log-frequency prior into the frequency table: how a prior
        that arrives after the model is built (the federated statistics round) gets in."""
        bias = self.frequency_bias
        if bias is None:
            raise ValueError(f"{type(self).__name__} has no frequency table to load a prior into")
        if tuple(freq_prior.shape) != prior_shape(self.spec):
            raise ValueError(
                f"freq_prior has shape {tuple(freq_prior.shape)}, expected {prior_shape(self.spec)}"
            )
        bias.load(freq_prior)

    def object_loss(self, object_logits: torch.Tensor, batch: SceneBatch) -> torch.Tensor:
        """The SGCls object term of the training loss (cross-entropy unless a model overrides
        it, as GPS-Net's node-priority-sensitive loss does)."""
        return F.cross_entropy(object_logits, batch.labels)

    def auxiliary_loss(
        self, output: RelationOutput, batch: SceneBatch, mode: str = "predcls"
    ) -> torch.Tensor | None:
        """A model's own extra training term (VCTree's tree-score loss); None for none."""
        return None

    def object_output(
        self, batch: SceneBatch, logits: torch.Tensor | None, mode: str
    ) -> torch.Tensor:
        """The object logits to return: ground truth as a sharp one-hot in PredCls."""
        if check_mode(mode) == "predcls" or logits is None:
            return F.one_hot(batch.labels, self.spec.num_classes).float() * PREDCLS_LOGIT
        return logits


def prior_shape(spec: ModelSpec) -> tuple[int, int, int]:
    """Shape of the frequency prior a model built from `spec` accepts."""
    return (spec.num_classes, spec.num_classes, spec.num_predicates + 1)


class ObjectEncoder(nn.Module):
    """Label-free segment features from geometry (and visual features), with a class head.

    This is what SGCls may use to guess labels; PredCls models use it as their
    geometry/appearance branch too.
    """

    def __init__(self, spec: ModelSpec, hidden_dim: int) -> None:
        super().__init__()
        in_dim = spec.geometry_dim + spec.visual_dim
        self.visual_norm = nn.LayerNorm(spec.visual_dim) if spec.visual_dim else None
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()
        )
        self.classify = nn.Linear(hidden_dim, spec.num_classes)

    def forward(self, batch: SceneBatch) -> torch.Tensor:
        """[N, hidden_dim] features of every segment."""
        parts = [batch.geometry]
        if self.visual_norm is not None:
            if batch.visual is None:
                raise ValueError("model was built with visual features but the batch has none")
            parts.append(self.visual_norm(batch.visual))
        return self.mlp(torch.cat(parts, dim=1))


def pair_mlp(spec: ModelSpec, hidden_dim: int, final_relu: bool = True) -> nn.Sequential:
    """The two-layer encoder every model puts on pair geometry (no union-box pixels here)."""
    layers: list[nn.Module] = [
        nn.Linear(spec.pair_geometry_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
    ]
    return nn.Sequential(*layers, nn.ReLU()) if final_relu else nn.Sequential(*layers)


class LabelEmbedding(nn.Embedding):
    """Class embedding of the ground truth (PredCls) or of the predicted distribution (SGCls)."""

    def embed(
        self, batch: SceneBatch, object_logits: torch.Tensor | None, mode: str
    ) -> torch.Tensor:
        if check_mode(mode) == "predcls":
            return self(batch.labels)
        if object_logits is None:
            raise ValueError("SGCls needs predicted object logits to embed")
        return object_logits.softmax(dim=1) @ self.weight


class FrequencyBias(nn.Module):
    """A learnable [C * C, P + 1] table of predicate logits per (subject, object) class pair.

    Initialised from the log-frequency prior when given, else zeros (uniform); MOTIFS adds it
    to its predicate logits, the frequency baseline is nothing but this table.
    """

    def __init__(self, spec: ModelSpec, freq_prior: torch.Tensor | None = None) -> None:
        super().__init__()
        num_classes, _, width = prior_shape(spec)
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes * num_classes, width)
        with torch.no_grad():
            self.table.weight.zero_()
        if freq_prior is not None:
            self.load(freq_prior)

    @torch.no_grad()
    def load(self, freq_prior: torch.Tensor) -> None:
        """Overwrite the table with a [C, C, P + 1] log-frequency prior."""
        weight = self.table.weight
        weight.copy_(freq_prior.reshape(weight.shape).to(weight.device, weight.dtype))

    def forward(self, subject_labels: torch.Tensor, object_labels: torch.Tensor) -> torch.Tensor:
        return self.table(subject_labels * self.num_classes + object_labels)


def pair_labels(
    batch: SceneBatch, object_logits: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(subject, object) class of every pair: ground truth in PredCls, predicted in SGCls."""
    labels = batch.labels if check_mode(mode) == "predcls" else object_logits.argmax(dim=1)
    return labels[batch.pairs[:, 0]], labels[batch.pairs[:, 1]]


MODELS: dict[str, type[RelationModel]] = {}
M = TypeVar("M", bound=type[RelationModel])


def register(name: str) -> Callable[[M], M]:
    """Class decorator adding a relation model to `MODELS` under `name`."""

    def add(cls: M) -> M:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"relation model {name!r} is already registered")
        MODELS[name] = cls
        return cls

    return add


def with_frequency_table(name: str, hparams: dict[str, object]) -> dict[str, object]:
    """`hparams` with the frequency table switched on for a model whose table is optional
    (a run that asks for a prior gives every model one; an explicit `use_bias` wins)."""
    if name in MODELS and MODELS[name].optional_frequency_bias:
        return {"use_bias": True, **hparams}
    return hparams


def build_model(
    name: str, spec: ModelSpec, freq_prior: torch.Tensor | None = None, **hparams: object
) -> RelationModel:
    """Instantiate the model registered under `name`."""
    if name not in MODELS:
        raise ValueError(f"unknown relation model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](spec, freq_prior, **hparams)
