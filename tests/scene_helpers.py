"""Random scenes of real shape for model tests (no data files needed)."""

import numpy as np
import torch

from fedpsg.psg.data import Scene, segment_geometry

NUM_CLASSES, NUM_PREDICATES, VISUAL_DIM = 9, 5, 6


def random_scene(rng: np.random.Generator, n: int, r: int, visual: bool) -> Scene:
    corner = rng.uniform(0, 50, size=(n, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(1, 50, size=(n, 2))], axis=1)
    geometry = segment_geometry(boxes, rng.uniform(1, 500, n), rng.random(n) < 0.5, 100, 100)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    chosen = rng.permutation(len(pairs))[:r]
    relations = torch.tensor(
        [[*pairs[k], rng.integers(NUM_PREDICATES)] for k in chosen], dtype=torch.long
    ).reshape(-1, 3)
    labels = torch.from_numpy(rng.integers(NUM_CLASSES, size=n))
    features = torch.from_numpy(rng.normal(size=(n, VISUAL_DIM))).float() if visual else None
    return Scene(f"img{n}", labels, geometry, features, relations)
