"""Every registered relation model: shapes, both modes, ragged scenes, gradients, no label leak."""

import numpy as np
import pytest
import torch
from scene_helpers import NUM_CLASSES, NUM_PREDICATES, VISUAL_DIM, random_scene

from fedpsg.psg.data import (
    GEOMETRY_DIM,
    GEOMETRY_FEATURES,
    PAIR_GEOMETRY_DIM,
    Scene,
    SceneError,
    VisualFeaturizer,
    collate,
    scene_from_row,
    scenes_from_rows,
)
from fedpsg.psg.models import MODELS, ModelSpec, build_model
from fedpsg.psg.train import RelationLoss, frequency_prior


def scenes(visual: bool) -> list:
    rng = np.random.default_rng(0)
    # 1 segment (no pairs), 2 segments, many segments, and an image with no relations.
    return [random_scene(rng, n, r, visual) for n, r in [(1, 0), (2, 1), (9, 6), (4, 0)]]


def with_table(name: str) -> dict:
    """IMP's frequency table is optional (off by default, as in the paper): on here."""
    return {"use_bias": True} if name == "imp" else {}


def spec(visual: bool) -> ModelSpec:
    return ModelSpec(
        NUM_CLASSES, NUM_PREDICATES, GEOMETRY_DIM, PAIR_GEOMETRY_DIM, VISUAL_DIM if visual else 0
    )


@pytest.mark.parametrize("visual", [False, True], ids=["geometry", "visual"])
@pytest.mark.parametrize("mode", ["predcls", "sgcls"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_and_gradients(name, mode, visual):
    torch.manual_seed(0)
    data = scenes(visual)
    prior = frequency_prior(data, NUM_CLASSES, NUM_PREDICATES)
    model = build_model(name, spec(visual), prior, hidden_dim=16, **with_table(name))
    batch = collate(data)
    assert batch.pairs.shape == (0 + 2 + 72 + 12, 2)
    out = model(batch, mode)
    assert out.predicate_logits.shape == (len(batch.pairs), NUM_PREDICATES + 1)
    assert out.object_logits.shape == (len(batch.labels), NUM_CLASSES)
    assert torch.isfinite(out.predicate_logits).all() and torch.isfinite(out.object_logits).all()
    if mode == "predcls":
        assert torch.equal(out.object_logits.argmax(1), batch.labels)
    loss = RelationLoss(mode)(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sgcls_does_not_read_ground_truth_labels(name):
    torch.manual_seed(0)
    model = build_model(name, spec(False), hidden_dim=16).eval()
    batch = collate(scenes(False))
    out = model(batch, "sgcls")
    batch.labels = (batch.labels + 1) % NUM_CLASSES
    again = model(batch, "sgcls")
    assert torch.equal(out.predicate_logits, again.predicate_logits)
    assert torch.equal(out.object_logits, again.object_logits)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prior_sets_weights_not_shapes(name):
    """Clients with different statistics build models with identical parameter shapes."""
    data = scenes(False)
    prior = frequency_prior(data, NUM_CLASSES, NUM_PREDICATES)
    with_prior = build_model(name, spec(False), prior, **with_table(name))
    without = build_model(name, spec(False), **with_table(name))
    shapes = {k: v.shape for k, v in without.state_dict().items()}
    assert {k: v.shape for k, v in with_prior.state_dict().items()} == shapes


def test_frequency_model_scores_the_prior():
    data = scenes(False)
    prior = frequency_prior(data, NUM_CLASSES, NUM_PREDICATES)
    batch = collate(data)
    out = build_model("frequency", spec(False), prior)(batch, "predcls")
    s, o = batch.labels[batch.pairs[:, 0]], batch.labels[batch.pairs[:, 1]]
    assert torch.allclose(out.predicate_logits, prior[s, o])


def test_frequency_prior_counts_by_hand():
    # Segments labelled [0, 1, 1]; relations 0->1 p2 and 0->2 p2: pair (0,1) class-wise twice p2;
    # background: pairs (1,0), (1,2), (2,0), (2,1) -> classes (1,0) x2, (1,1) x2.
    scene = Scene("x", torch.tensor([0, 1, 1]), torch.zeros(3, GEOMETRY_DIM), None,
                  torch.tensor([[0, 1, 2], [0, 2, 2]]))  # fmt: skip
    prior = frequency_prior([scene], 2, 3, strength=1e-9).exp()
    assert prior[0, 1, 3] == pytest.approx(1.0)
    assert prior[1, 0, 0] == pytest.approx(1.0) and prior[1, 1, 0] == pytest.approx(1.0)
    # Unseen pair (0,0): the pooled distribution, Laplace-smoothed: (bg 4+1, p2 2+1, others 1)/10.
    assert prior[0, 0].tolist() == pytest.approx([0.5, 0.1, 0.1, 0.3])


def test_unknown_model_and_mode_are_clear_errors():
    with pytest.raises(ValueError, match="unknown relation model 'nope'"):
        build_model("nope", spec(False))
    model = build_model("motifs", spec(False))
    with pytest.raises(ValueError, match="unknown mode 'sgdet'"):
        model(collate(scenes(False)), "sgdet")
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        build_model("imp", spec(False), hiden_dim=3)


def test_loss_uses_the_model_hooks():
    """SGCls trains a model's own object term; a model's auxiliary loss is added."""

    class Hooked(MODELS["frequency"]):
        def object_loss(self, object_logits, batch):
            return torch.tensor(10.0)

        def auxiliary_loss(self, output, batch, mode="predcls"):
            return torch.tensor(100.0)

    batch = collate(scenes(False))
    plain, hooked = build_model("frequency", spec(False)), Hooked(spec(False))
    hooked.load_state_dict(plain.state_dict())
    for mode, extra in [("predcls", 100.0), ("sgcls", 110.0)]:
        loss = RelationLoss(mode)
        with torch.no_grad():
            base = loss.predicate_loss(plain(batch, mode).predicate_logits, batch)
            assert float(loss(hooked, batch)) == pytest.approx(float(base) + extra)


def synthetic_rows(path):
    import json

    from benchmark_builder.shards import image_row

    records = json.loads(path.read_text())["data"]
    return [image_row(record, 0, path.parent) for record in records]


def test_rows_with_pixels_give_mask_geometry_and_visual_features(synthetic_psg):
    rows = synthetic_rows(synthetic_psg)
    featurizer = VisualFeaturizer()
    scenes = scenes_from_rows(rows[:6], featurizer)
    blind = scenes_from_rows([{**row, "pan_seg": None} for row in rows[:6]])
    for scene, row in zip(scenes, rows, strict=False):
        assert scene.visual.shape == (len(row["segments"]), featurizer.dim)
        assert torch.isfinite(scene.visual).all()
        assert torch.equal(
            scene.relations[:, 2], torch.tensor([r["predicate"] for r in row["relations"]])
        )
    centre = GEOMETRY_FEATURES.index("centre_x")
    # Mask centroids differ from box centres for non-rectangular shapes.
    assert not torch.allclose(
        torch.cat([s.geometry[:, centre] for s in scenes]),
        torch.cat([s.geometry[:, centre] for s in blind]),
    )
    # Same-class segments look alike (colour + texture): the nearest other segment by visual
    # feature shares the class at least twice as often as a random other segment does.
    features = torch.cat([s.visual for s in scenes])
    labels = torch.cat([s.labels for s in scenes])
    same = (labels[:, None] == labels[None]).float().fill_diagonal_(0)
    chance = float(same.sum() / (len(labels) * (len(labels) - 1)))
    distance = torch.cdist(features, features).fill_diagonal_(float("inf"))
    assert float((labels[distance.argmin(1)] == labels).float().mean()) > 2 * chance


def test_bad_rows_name_the_image_and_field(synthetic_psg):
    row = synthetic_rows(synthetic_psg)[0]
    bad_relation = {**row, "relations": [{"subject": 0, "object": 99, "predicate": 1}]}
    with pytest.raises(SceneError, match=r"image '0': field 'relations'"):
        scene_from_row(bad_relation)
    with pytest.raises(SceneError, match=r"field 'pan_seg'.*readable image"):
        scene_from_row({**row, "pan_seg": b"not a png"})
    with pytest.raises(SceneError, match=r"field 'image'.*encoded pixels"):
        scene_from_row({**row, "image": None}, VisualFeaturizer())
    box = {**row["segments"][0], "bbox": [5.0, 5.0, 1.0, 9.0]}
    with pytest.raises(SceneError, match=r"segments.bbox"):
        scene_from_row({**row, "segments": [box]})
