"""Anchor items: a few representative items, each standing for a cluster of similar ones.

tinyBenchmarks: cluster the items (on their IRT parameters, or on their correctness columns over a
population of models), take the item nearest each centroid, and weight it by its cluster's share of
the benchmark. The weighted anchor score is then an estimate of the full accuracy whose error is
the within-cluster spread, not the spread of the whole benchmark, which is why it beats a random
subsample of the same size. Stratifying by a grouping (e.g. skill) spends the budget on every group
in proportion to its size, so no skill is left without anchors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from evomerge.irt.fit import ItemParams


@dataclass(frozen=True)
class Anchors:
    """Positions of the anchor items in the benchmark's item list, and their weights (sum 1)."""

    index: np.ndarray  # int64 (n,)
    weight: np.ndarray  # float64 (n,)

    def __post_init__(self) -> None:
        if self.index.shape != self.weight.shape:
            raise ValueError(f"{len(self.index)} anchor positions but {len(self.weight)} weights")

    def __len__(self) -> int:
        return len(self.index)


def resolve_budget(budget: float | int, num_items: int) -> int:
    """Items to evaluate for a budget given as a fraction in (0, 1] or a count >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a fraction in (0, 1] or an item count, got {budget!r}")
    if isinstance(budget, (float, np.floating)) and 0 < budget <= 1:
        return max(1, int(round(budget * num_items)))
    if float(budget).is_integer() and 1 <= budget <= num_items:
        return int(budget)
    raise ValueError(f"budget {budget!r} is neither a fraction in (0, 1] nor an item count in 1..{num_items}")


def param_features(items: ItemParams) -> np.ndarray:
    """What tinyBenchmarks clusters: each item's discriminations and difficulty, [a_i, b_i]."""
    return np.hstack([items.a, items.b[:, None]])


def correctness_features(Y: np.ndarray) -> np.ndarray:
    """Each item's column of responses over the calibration models (NaN -> the item's mean)."""
    col = np.nanmean(Y, axis=0)
    return np.where(np.isnan(Y), col, Y).T


def allocate(sizes: Sequence[int], n: int) -> list[int]:
    """Split n anchors over groups in proportion to their sizes (largest remainder), at least one
    per group and never more than a group holds."""
    size = np.asarray(sizes)
    if n < len(size):
        raise ValueError(f"{n} anchors cannot cover {len(size)} groups; raise the budget or drop the grouping")
    quota = n * size / size.sum()
    out = np.maximum(1, np.floor(quota)).astype(int)
    out = np.minimum(out, size)
    while out.sum() < n:
        room = out < size
        i = int(np.argmax(np.where(room, quota - out, -np.inf)))
        out[i] += 1
    while out.sum() > n:
        i = int(np.argmax(np.where(out > 1, out - quota, -np.inf)))
        out[i] -= 1
    return out.tolist()


def _cluster(features: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Anchor positions (within ``features``) and cluster sizes for k clusters."""
    if k >= len(features):
        return np.arange(len(features)), np.ones(len(features))
    # one thread: a few thousand points gain nothing from more, and with a busy neighbour OpenMP's
    # spinning made the three zoo budgets take 7.4 s instead of 0.16 s (2 cores)
    with threadpool_limits(1):
        km = KMeans(n_clusters=k, n_init=5, random_state=seed).fit(features)
    dist = ((features[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)  # (items, clusters)
    index = np.empty(k, dtype=np.int64)
    empty = []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        if members.size:
            index[c] = members[np.argmin(dist[members, c])]
        else:
            empty.append(c)
    # KMeans leaves clusters empty when items repeat (few calibration models give few distinct response
    # patterns, and small benchmarks few items): such a cluster's anchor is the nearest item not yet an
    # anchor, with weight 0 (it stands for no item), instead of argmin over nothing
    used = set(index[[c for c in range(k) if c not in empty]].tolist())
    for c in empty:
        index[c] = next(int(i) for i in np.argsort(dist[:, c], kind="stable") if int(i) not in used)
        used.add(int(index[c]))
    sizes = np.bincount(km.labels_, minlength=k).astype(float)
    return index, sizes


def select_anchors(features: np.ndarray, n: int, *, groups: Sequence[str] | None = None, seed: int = 0) -> Anchors:
    """n anchors by KMeans on ``features`` (items x features), stratified by ``groups`` if given.

    Weights are cluster shares of the whole benchmark, so sum(w * y) estimates the plain mean
    accuracy over all items. With n >= the number of items every item is its own anchor.
    """
    features = np.asarray(features, dtype=np.float64)
    N = len(features)
    if features.ndim != 2 or N == 0:
        raise ValueError(f"features must be an (items x features) matrix, got shape {features.shape}")
    n = resolve_budget(n, N)
    if groups is None:
        index, sizes = _cluster(features, n, seed)
        return Anchors(index, sizes / N)
    labels = np.asarray(list(groups))
    if len(labels) != N:
        raise ValueError(f"{len(labels)} group labels for {N} items; give one label per item")
    names = list(dict.fromkeys(labels.tolist()))
    members = [np.flatnonzero(labels == g) for g in names]
    counts = allocate([len(m) for m in members], n)
    index_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    for m, k in zip(members, counts):
        idx, sizes = _cluster(features[m], k, seed)
        index_parts.append(m[idx])
        weight_parts.append(sizes / N)
    return Anchors(np.concatenate(index_parts), np.concatenate(weight_parts))
