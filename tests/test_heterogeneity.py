"""Heterogeneity indices against cases worked by hand."""

import math

import numpy as np
import pytest

from benchmark_builder.heterogeneity import heterogeneity, jsd


def entropy2(p: list[float]) -> float:
    return -sum(x * math.log2(x) for x in p if x > 0)


def jsd_by_hand(p: list[float], q: list[float]) -> float:
    """JSD = H((p + q) / 2) - (H(p) + H(q)) / 2, base 2."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return entropy2(m) - (entropy2(p) + entropy2(q)) / 2


def test_two_client_toy_case_matches_hand_computation() -> None:
    # client A: 4 images, all cluster 0; client B: 4 images, 1 in cluster 0 and 3 in cluster 1.
    # pooled: 5 / 3 -> g = (0.625, 0.375).
    # JSD(A, g) = H(.8125, .1875) - H(g) / 2 = 0.696212 - 0.477217 = 0.218995
    # JSD(B, g) = H(.4375, .5625) - (H(.25, .75) + H(g)) / 2 = 0.988699 - 0.882856 = 0.105843
    clusters = np.array([[4, 0], [1, 3]])
    # predicates: A uses only predicate 0 (2 relations); B predicates 0 and 1 (1 and 1).
    predicates = np.array([[2, 0], [1, 1]])
    h = heterogeneity(clusters, predicates)

    g = [0.625, 0.375]
    a, b = jsd_by_hand([1, 0], g), jsd_by_hand([0.25, 0.75], g)
    assert a == pytest.approx(0.218995, abs=1e-6)
    assert b == pytest.approx(0.105843, abs=1e-6)
    assert h.cluster_jsd == pytest.approx((4 * a + 4 * b) / 8, abs=1e-12)
    assert h.clients[0]["cluster_jsd"] == pytest.approx(a, abs=1e-12)

    pooled_p = [0.75, 0.25]
    pa, pb = jsd_by_hand([1, 0], pooled_p), jsd_by_hand([0.5, 0.5], pooled_p)
    assert h.predicate_jsd == pytest.approx((pa + pb) / 2, abs=1e-12)

    assert h.mean_largest_cluster_share == pytest.approx((1.0 + 0.75) / 2)
    assert h.mean_cluster_entropy == pytest.approx((0.0 + entropy2([0.25, 0.75])) / 2)

    # maximum: every client pure -> sum_c g_c JSD(e_c, g)
    expected_max = 0.625 * jsd_by_hand([1, 0], g) + 0.375 * jsd_by_hand([0, 1], g)
    assert h.cluster_jsd_max == pytest.approx(expected_max, abs=1e-12)
    assert h.cluster_jsd < h.cluster_jsd_max


def test_pure_clients_reach_the_maximum_and_identical_clients_score_zero() -> None:
    pure = heterogeneity(np.array([[5, 0], [0, 3]]), np.array([[1, 0], [0, 1]]))
    assert pure.cluster_jsd == pytest.approx(pure.cluster_jsd_max, abs=1e-12)
    assert pure.predicate_jsd == pytest.approx(jsd_by_hand([1, 0], [0.5, 0.5]), abs=1e-12)

    same = heterogeneity(np.array([[2, 6], [1, 3]]), np.array([[3, 3], [5, 5]]))
    assert same.cluster_jsd == pytest.approx(0.0, abs=1e-12)
    assert same.predicate_jsd == pytest.approx(0.0, abs=1e-12)


def test_bounds_and_client_without_relations() -> None:
    h = heterogeneity(
        np.array([[3, 0, 0], [0, 0, 2], [1, 1, 1]]), np.array([[4, 0], [0, 0], [1, 1]])
    )
    assert 0 <= h.cluster_jsd <= h.cluster_jsd_max <= 1
    assert h.clients[1]["predicate_jsd"] is None  # no relations: no predicate distribution
    assert 0 <= h.predicate_jsd <= 1
    assert jsd(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
