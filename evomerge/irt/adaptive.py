"""Computerized adaptive testing of a candidate on one benchmark, under a (multidimensional) 2PL.

A candidate's benchmark score is the mean over all N items. After it has answered some items, the
score is predicted as (sum of its answers + sum over unseen items of P_i(theta)) / N, with theta its
MAP ability given the answers and the calibration's prior. The prediction's variance has two parts:
the ability's uncertainty, g' C g / N^2 with C the Laplace posterior covariance of theta and g the
gradient of the unseen items' expected sum, and the unseen items' own Bernoulli noise,
sum P_i (1 - P_i) / N^2. Testing stops when the standard error is below a tolerance.

The next items are those whose answer reduces that variance most: item i removes its own Bernoulli
term, P_i (1 - P_i), and shrinks the ability's term by the rank-one update of its Fisher information,
W_i (a_i' C g)^2 / (1 + W_i a_i' C a_i), W_i = P_i (1 - P_i). They are chosen a batch at a time (one
forward batch of the device), not one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.irt.fit import ItemParams, Prior, estimate_theta


@dataclass(frozen=True)
class Prediction:
    score: float  # predicted mean over every item
    se: float  # its standard error
    theta: np.ndarray  # (D,) MAP ability
    cov: np.ndarray  # (D, D) Laplace posterior covariance of theta


def predict(items: ItemParams, prior: Prior, seen: np.ndarray, y: np.ndarray) -> Prediction:
    """The predicted benchmark score of a model that answered ``y`` on item positions ``seen``."""
    seen = np.asarray(seen, dtype=np.int64)
    y = np.asarray(y, dtype=np.float64)
    n = len(items)
    theta = estimate_theta(items, seen, y, prior) if len(seen) else np.asarray(prior.mean, dtype=np.float64)
    p = items.prob(theta)
    w = p * (1 - p)
    precision = np.linalg.inv(prior.cov) + items.a[seen].T @ (w[seen, None] * items.a[seen])
    cov = np.linalg.inv(precision)
    unseen = np.ones(n, dtype=bool)
    unseen[seen] = False
    g = (w[unseen, None] * items.a[unseen]).sum(0)
    var = (float(g @ cov @ g) + float(w[unseen].sum())) / n**2
    score = (float(y.sum()) + float(p[unseen].sum())) / n
    return Prediction(score, float(np.sqrt(max(var, 0.0))), theta, cov)


def next_items(items: ItemParams, pred: Prediction, seen: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` unseen item positions whose answers reduce the score's variance most (ties: the
    lower position), in that order."""
    n = len(items)
    unseen = np.ones(n, dtype=bool)
    unseen[np.asarray(seen, dtype=np.int64)] = False
    p = items.prob(pred.theta)
    w = p * (1 - p)
    g = (w[unseen, None] * items.a[unseen]).sum(0)
    ag = items.a @ (pred.cov @ g)
    aca = np.einsum("nd,de,ne->n", items.a, pred.cov, items.a)
    gain = w + w * ag**2 / (1 + w * aca)
    candidates = np.flatnonzero(unseen)
    order = np.lexsort((candidates, -gain[candidates]))
    return candidates[order[:k]]
