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


def combined_se(weights: np.ndarray, ses: np.ndarray) -> float:
    """The standard error of a weighted mean of independent estimates."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return math.sqrt(float(np.sum((w * np.asarray(ses, dtype=np.float64)) ** 2)))
