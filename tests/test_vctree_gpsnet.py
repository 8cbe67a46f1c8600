"""VCTree and GPS-Net: the dynamic tree, ragged batches in both modes, their losses, learning."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scene_helpers import NUM_CLASSES, NUM_PREDICATES, VISUAL_DIM, random_scene
from scipy.sparse.csgraph import minimum_spanning_tree

from benchmark_builder.psg import load_psg
from benchmark_builder.synthetic import generate_synthetic_psg
from fedpsg.psg.data import (
    GEOMETRY_DIM,
    PAIR_GEOMETRY_DIM,
    Scene,
    collate,
    scenes_from_rows,
)
from fedpsg.psg.models import ModelSpec, build_model
from fedpsg.psg.models.gpsnet import (
    DirectionAwareMessagePassing,
    node_priority,
    nps_loss,
    segment_softmax,
)
from fedpsg.psg.models.vctree import BiTreeLSTM, VCTreeOutput, build_forest, prim_tree
from fedpsg.psg.train import RelationLoss, SceneLoader, evaluate, frequency_prior
from strategies.base import ClientHalf, train_local

NEW_MODELS = ["vctree", "gpsnet"]


def ragged_scenes(visual: bool, sizes=((1, 0), (2, 1), (9, 6), (4, 0))) -> list[Scene]:
    """1 segment (no pairs), 2 segments, many segments, and an image without relations."""
    rng = np.random.default_rng(0)
    return [random_scene(rng, n, r, visual) for n, r in sizes]


def spec(visual: bool) -> ModelSpec:
    return ModelSpec(
        NUM_CLASSES, NUM_PREDICATES, GEOMETRY_DIM, PAIR_GEOMETRY_DIM, VISUAL_DIM if visual else 0
    )


def max_spanning_weight(score: np.ndarray) -> float:
    """Reference: scipy's minimum spanning tree of the negated (shifted positive) scores."""
    return -minimum_spanning_tree(-(score + 1.0)).sum() - (len(score) - 1)


def tree_weight(score: np.ndarray, parent: np.ndarray) -> float:
    return sum(score[v, p] for v, p in enumerate(parent) if p >= 0)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12])
def test_prim_tree_is_the_maximum_spanning_tree(n):
    rng = np.random.default_rng(n)
    score = rng.random((n, n))
    score = (score + score.T) / 2
    np.fill_diagonal(score, 0.0)
    parent, order = prim_tree(score)
    assert order[0] == int(score.sum(1).argmax()) and parent[order[0]] == -1
    assert sorted(order) == list(range(n))
    assert all(order.index(parent[v]) < order.index(v) for v in order[1:])  # parents join first
    assert tree_weight(score, parent) == pytest.approx(max_spanning_weight(score))


def test_build_forest_is_a_spanning_tree_of_each_image_with_its_binary_form():
    sizes = [1, 2, 6, 9]
    image = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = len(image)
    torch.manual_seed(0)
    score = torch.rand(n, n)
    score = (score + score.T) / 2
    forest = build_forest(score, image, len(sizes))
    parent, left, right, up, depth = (
        t.tolist() for t in (forest.parent, forest.left, forest.right, forest.up, forest.depth)
    )
    for b, size in enumerate(sizes):
        nodes = (image == b).nonzero().squeeze(1).tolist()
        roots = [v for v in nodes if parent[v] == -1]
        assert len(roots) == 1 and depth[roots[0]] == 0 and up[roots[0]] == -1
        for v in nodes:  # every node reaches the root inside its image: a spanning tree
            seen, u = set(), v
            while parent[u] != -1:
                assert u not in seen and image[parent[u]] == b
                seen.add(u)
                u = parent[u]
            assert u == roots[0]
        local = score[nodes][:, nodes].numpy()
        weight = sum(float(score[v, parent[v]]) for v in nodes if parent[v] >= 0)
        assert weight == pytest.approx(max_spanning_weight(local), rel=1e-5)
        assert len(nodes) == size
    for v in range(n):  # binary form: left = first child, right = next sibling
        children, c = [], left[v]
        while c >= 0:
            children.append(c)
            c = right[c]
        assert sorted(children) == sorted(u for u in range(n) if parent[u] == v)
        if up[v] >= 0:
            assert left[up[v]] == v or right[up[v]] == v
            assert depth[v] == depth[up[v]] + 1


def tree_lstm_node_by_node(tree: BiTreeLSTM, x, forest, gate) -> torch.Tensor:
    """The BiTreeLSTM's definition, one node at a time: children before parents bottom-up,
    parents before children top-down, every message scaled by the gate of its edge."""
    n, hidden = x.size(0), tree.hidden_dim
    zero = x.new_zeros(hidden)
    left, right, up = forest.left.tolist(), forest.right.tolist(), forest.up.tolist()
    by_depth = sorted(range(n), key=lambda v: int(forest.depth[v]))
    up_h, up_c, down_h, down_c = {}, {}, {}, {}

    def child(v: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (up_h[v] * gate[v], up_c[v] * gate[v]) if v >= 0 else (zero, zero)

    for v in reversed(by_depth):
        (hl, cl), (hr, cr) = child(left[v]), child(right[v])
        gates = tree.up_input(x[v]) + tree.up_hidden(torch.cat([hl, hr]))
        i, fl, fr, o, u = gates.chunk(5)
        up_c[v] = i.sigmoid() * u.tanh() + fl.sigmoid() * cl + fr.sigmoid() * cr
        up_h[v] = o.sigmoid() * up_c[v].tanh()
    for v in by_depth:
        p = up[v]
        state = (down_h[p] * gate[v], down_c[p] * gate[v]) if p >= 0 else (zero, zero)
        h, c = tree.down(x[v][None], (state[0][None], state[1][None]))
        down_h[v], down_c[v] = h[0], c[0]
    return torch.stack([torch.cat([up_h[v], down_h[v]]) for v in range(n)])


def test_bitreelstm_sweeps_equal_the_node_by_node_definition():
    sizes = [1, 3, 9, 14, 5]
    image = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = len(image)
    torch.manual_seed(0)
    score = torch.rand(n, n)
    forest = build_forest((score + score.T) / 2, image, len(sizes))
    assert len(forest.sizes) > 4  # deep enough for the levels to matter
    tree = BiTreeLSTM(6, 5)
    x = torch.randn(n, 6, requires_grad=True)
    gate = torch.rand(n, requires_grad=True)
    weights = torch.randn(n, 10)
    swept = tree(x, forest, gate)
    reference = tree_lstm_node_by_node(tree, x, forest, gate)
    torch.testing.assert_close(swept, reference)
    inputs = (x, gate, *tree.parameters())
    grads = torch.autograd.grad((swept * weights).sum(), inputs)
    expected = torch.autograd.grad((reference * weights).sum(), inputs)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_vctree_pair_score_is_its_score_layer_on_the_concatenated_pair():
    torch.manual_seed(0)
    model = build_model("vctree", spec(False))
    batch = collate(ragged_scenes(False))
    nodes = torch.randn(len(batch.labels), (model.score[0].in_features - PAIR_GEOMETRY_DIM) // 2)
    subject, obj = batch.pairs.unbind(1)
    plain = model.score(torch.cat([nodes[subject], nodes[obj], batch.pair_geometry], 1))
    split = model.pair_score(nodes, subject, obj, batch.pair_geometry)
    torch.testing.assert_close(split, plain.squeeze(1))


@pytest.mark.parametrize("visual", [False, True], ids=["geometry", "visual"])
@pytest.mark.parametrize("mode", ["predcls", "sgcls"])
@pytest.mark.parametrize("name", NEW_MODELS)
def test_forward_on_ragged_batches_and_every_weight_learns(name, mode, visual):
    torch.manual_seed(0)
    data = ragged_scenes(visual)
    model = build_model(name, spec(visual), frequency_prior(data, NUM_CLASSES, NUM_PREDICATES))
    batch = collate(data)
    out = model(batch, mode)
    assert out.predicate_logits.shape == (len(batch.pairs), NUM_PREDICATES + 1)
    assert out.object_logits.shape == (len(batch.labels), NUM_CLASSES)
    loss = RelationLoss(mode)(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    # In PredCls the classes are given, so only the object heads stay idle.
    idle = {"encoder.classify.weight", "encoder.classify.bias"}
    idle |= {"object_classify.weight", "object_classify.bias"}
    for param_name, param in model.named_parameters():
        if mode == "predcls" and param_name in idle:
            assert param.grad is None
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
            assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("mode", ["predcls", "sgcls"])
@pytest.mark.parametrize("name", NEW_MODELS)
def test_images_of_one_segment_only(name, mode):
    batch = collate(ragged_scenes(False, sizes=((1, 0), (1, 0))))
    model = build_model(name, spec(False))
    out = model(batch, mode)
    assert out.predicate_logits.shape == (0, NUM_PREDICATES + 1)
    loss = RelationLoss(mode)(model, batch)
    assert torch.isfinite(loss)
    loss.backward()


@torch.no_grad()
def test_the_trainer_loss_applies_the_model_hooks():
    """VCTree's tree loss is added in both modes; GPS-Net's NPS-loss is its SGCls object term."""
    torch.manual_seed(0)
    batch = collate(ragged_scenes(False))
    vctree = build_model("vctree", spec(False), tree_loss_weight=0.5)
    gpsnet = build_model("gpsnet", spec(False))
    for mode in ("predcls", "sgcls"):
        out = vctree(batch, mode)
        expected = RelationLoss(mode).loss(out.predicate_logits, out.object_logits, batch)
        expected = expected + vctree.auxiliary_loss(out, batch, mode)
        assert float(RelationLoss(mode)(vctree, batch)) == pytest.approx(float(expected))
    out = gpsnet(batch, "sgcls")
    expected = RelationLoss("predcls").loss(out.predicate_logits, out.object_logits, batch)
    expected = expected + nps_loss(out.object_logits, batch.labels, node_priority(batch))
    assert float(RelationLoss("sgcls")(gpsnet, batch)) == pytest.approx(float(expected))


def test_vctree_scores_learn_from_the_relation_loss_alone():
    """The tree gates carry the relation loss back to the score MLP (no REINFORCE needed)."""
    torch.manual_seed(0)
    model = build_model("vctree", spec(False), tree_loss_weight=0.0)
    batch = collate(ragged_scenes(False))
    RelationLoss("predcls")(model, batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.score.parameters())


def test_vctree_tree_loss_targets_related_pairs_in_either_direction():
    # 3 segments, one relation 0 -> 1: pairs (0,1) and (1,0) are positives, the rest negative.
    scene = Scene("x", torch.tensor([0, 1, 2]), torch.rand(3, GEOMETRY_DIM), None,
                  torch.tensor([[0, 1, 3]]))  # fmt: skip
    batch = collate([scene])
    model = build_model("vctree", spec(False), tree_loss_weight=2.0)
    positive = torch.tensor([set(p) == {0, 1} for p in batch.pairs.tolist()])
    empty = torch.zeros(0)

    def loss(logits):
        return float(model.auxiliary_loss(VCTreeOutput(empty, empty, logits), batch))

    assert loss(torch.where(positive, 20.0, -20.0)) < 1e-6
    assert loss(torch.zeros(len(positive))) == pytest.approx(2.0 * math.log(2.0))
    assert loss(torch.where(positive, -20.0, 20.0)) == pytest.approx(2.0 * 20.0, rel=1e-3)


def test_vctree_output_depends_on_the_tree_scores():
    torch.manual_seed(0)
    model = build_model("vctree", spec(False)).eval()
    batch = collate(ragged_scenes(False))
    before = model(batch).predicate_logits
    with torch.no_grad():
        model.score[2].bias += 3.0
    assert not torch.allclose(model(batch).predicate_logits, before)


def test_node_priority_by_hand():
    # Image 0: relations 0->1, 0->2 (node 0 in both, 1 and 2 in one each); image 1: none.
    scenes = [
        Scene("a", torch.tensor([0, 1, 2]), torch.rand(3, GEOMETRY_DIM), None,
              torch.tensor([[0, 1, 0], [0, 2, 1]])),
        Scene("b", torch.tensor([0, 1]), torch.rand(2, GEOMETRY_DIM), None,
              torch.zeros(0, 3, dtype=torch.long)),
    ]  # fmt: skip
    assert node_priority(collate(scenes)).tolist() == [1.0, 0.5, 0.5, 0.0, 0.0]


def test_nps_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0, 1])
    priority = torch.tensor([1.0, 0.0, 0.5])
    p = torch.softmax(logits, 1)[torch.arange(3), target].tolist()
    gamma = [0.0, 2.0, min(2.0, -(0.5**4) * math.log(0.5))]
    expected = sum(-((1 - pt) ** g) * math.log(pt) for pt, g in zip(p, gamma, strict=True)) / 3
    assert float(nps_loss(logits, target, priority, mu=4.0)) == pytest.approx(expected)
    # Full priority is plain cross-entropy; no priority is focal loss with gamma 2.
    ce = F.cross_entropy(logits, target)
    assert float(nps_loss(logits, target, torch.ones(3))) == pytest.approx(float(ce))


def test_segment_softmax_normalises_within_groups():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.5, -1.0])
    groups = torch.tensor([0, 0, 2, 2, 2])
    out = segment_softmax(scores, groups, 3)
    assert torch.allclose(out[:2], torch.softmax(scores[:2], 0))
    assert torch.allclose(out[2:], torch.softmax(scores[2:], 0))


def test_dmp_messages_depend_on_direction():
    torch.manual_seed(0)
    step = DirectionAwareMessagePassing(8, 4)
    x, u = torch.randn(3, 8), torch.randn(2, 8)
    pairs = torch.tensor([[0, 1], [0, 2]])
    assert not torch.allclose(step(x, pairs, u), step(x, pairs.flip(1), u))


# --- learning on synthetic PSG -------------------------------------------------------------


def record_to_row(record: dict) -> dict:
    """An OpenPSG record in the benchmark row schema (labels and geometry only)."""
    segments = [
        {**seg, "bbox": ann["bbox"]}
        for seg, ann in zip(record["segments_info"], record["annotations"], strict=True)
    ]
    relations = [{"subject": s, "object": o, "predicate": p} for s, o, p in record["relations"]]
    return {**record, "segments": segments, "relations": relations}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = generate_synthetic_psg(tmp_path_factory.mktemp("psg") / "data", 360, seed=0,
                                  image_size=32)  # fmt: skip
    dataset = load_psg(path, check_images=False)
    scenes = scenes_from_rows(record_to_row(r) for r in dataset.images)
    model_spec = ModelSpec(
        len(dataset.classes), len(dataset.predicate_classes), GEOMETRY_DIM, PAIR_GEOMETRY_DIM
    )
    return model_spec, scenes[:240], scenes[240:]


@pytest.mark.parametrize("name", NEW_MODELS)
def test_beats_the_frequency_baseline_on_synthetic_psg(synthetic, name):
    model_spec, train, test = synthetic
    prior = frequency_prior(train, model_spec.num_classes, model_spec.num_predicates)
    baseline = evaluate(build_model("frequency", model_spec, prior), test)
    torch.manual_seed(0)
    model = build_model(name, model_spec, prior, hidden_dim=64)
    loader = SceneLoader(train, batch_size=8, seed=0)
    train_local(model, loader, RelationLoss("predcls"), ClientHalf(0.05, momentum=0.9), epochs=6)
    trained = evaluate(model, test)
    assert trained["R@50"] > baseline["R@50"] + 0.02, (trained, baseline)
    assert trained["mR@50"] > baseline["mR@50"], (trained, baseline)
