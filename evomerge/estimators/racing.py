"""Racing against a selection cut: which candidates of a generation are already known to be in (or
out of) the ``keep`` best, so that their evaluation can stop.

A generational searcher that selects the ``keep`` best of ``n`` (CMA-ES: its mu parents) makes the
same decision with full scores and with estimates as long as every candidate is on the right side of
the cut; the exact values of the others matter far less. With a confidence interval [lo, hi] per
candidate, candidate i is surely *in* once its lower bound is above the upper bounds of n - keep
others, and surely *out* once keep others have lower bounds above its upper bound (LUCB-style
racing). If every interval covers its candidate's full score, every such decision is the one full
scores give; the intervals are widened (Bonferroni) so that this holds jointly, over the n
candidates and every round, with probability at least 1 - delta.

Several objectives (NSGA-II: ``keep`` of the population and its offspring survive, whole fronts first)
use a box per candidate, one interval per objective, and bounds on each candidate's front: a
candidate is surely out once ``keep`` others are surely in earlier fronts, and surely in once its
front and the earlier ones cannot hold more than ``keep`` (it survives whole). Within the front that
overflows, crowding decides, which the race leaves to the tolerance.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def z_value(delta: float, candidates: int, rounds: int) -> float:
    """The normal quantile that makes ``candidates x rounds`` two-sided intervals hold together with
    probability >= 1 - ``delta``."""
    return NormalDist().inv_cdf(1 - delta / (2 * max(candidates, 1) * max(rounds, 1)))


def settled(means: np.ndarray, ses: np.ndarray, keep: int, z: float) -> np.ndarray:
    """Per candidate, whether its side of the cut (in the best ``keep`` or not) is already certain.

    ``means``/``ses``: fitness estimates (maximized) and their standard errors; a failed candidate is
    ``-inf`` with se 0 (certainly last). ``keep`` >= n settles everyone (nothing is cut)."""
    means = np.asarray(means, dtype=np.float64)
    ses = np.asarray(ses, dtype=np.float64)
    n = len(means)
    if keep >= n or keep <= 0:
        return np.ones(n, dtype=bool)
    with np.errstate(invalid="ignore"):
        lo = np.where(np.isinf(means), means, means - z * ses)
        hi = np.where(np.isinf(means), means, means + z * ses)
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        others = np.arange(n) != i
        surely_below = int(np.sum(hi[others] < lo[i]))  # others certainly worse than i
        surely_above = int(np.sum(lo[others] > hi[i]))  # others certainly better than i
        out[i] = surely_below >= n - keep or surely_above >= keep
    return out


def settled_pareto(lo: np.ndarray, hi: np.ndarray, keep: int) -> np.ndarray:
    """Per candidate, whether its side of a Pareto survival cut (``keep`` places, whole fronts first) is
    already certain, from boxes ``lo``/``hi`` of shape (n, objectives), maximized; a failed candidate
    is a row of ``-inf`` (dominated by everyone).

    Wherever the scores lie in their boxes, a candidate's front is at least ``low`` (one more than the
    longest chain of candidates that surely dominate it) and at most ``high`` (one more than the
    number that may dominate it). It is surely out once ``keep`` others are surely in earlier fronts
    (their ``high`` below its ``low``), and surely in once at most ``keep`` candidates can be in its
    front or earlier ones (their ``low`` at most its ``high``): its front then survives whole."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    n = len(lo)
    if keep >= n or keep <= 0:
        return np.ones(n, dtype=bool)
    # surely[j, i]: j dominates i wherever the scores lie in their boxes; possibly[j, i]: it may
    surely = np.all(lo[:, None, :] >= hi[None, :, :], axis=2) & np.any(lo[:, None, :] > hi[None, :, :], axis=2)
    possibly = np.all(hi[:, None, :] >= lo[None, :, :], axis=2) & np.any(hi[:, None, :] > lo[None, :, :], axis=2)
    np.fill_diagonal(surely, False)
    np.fill_diagonal(possibly, False)
    low = np.ones(n, dtype=np.int64)
    for _ in range(n):  # longest chains of sure domination (a partial order: no cycles)
        nxt = np.maximum(low, np.max(np.where(surely, low[:, None] + 1, 1), axis=0))
        if np.array_equal(nxt, low):
            break
        low = nxt
    high = 1 + possibly.sum(axis=0)
    out = (high[:, None] < low[None, :]).sum(axis=0) >= keep
    surely_in = (low[:, None] <= high[None, :]).sum(axis=0) <= keep
    return np.asarray(out | surely_in, dtype=bool)


def combined_se(weights: np.ndarray, ses: np.ndarray) -> float:
    """The standard error of a weighted mean of independent estimates."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return math.sqrt(float(np.sum((w * np.asarray(ses, dtype=np.float64)) ** 2)))
