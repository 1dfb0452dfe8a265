"""Fitness estimators: the accuracy on a whole benchmark from a candidate's scores on a few items.

One interface for all: an estimator is built for a budget (a fraction of the items or a count),
``select_items()`` names the items a candidate is evaluated on, and
``estimate(seen_item_ids, scores, parents=None)`` returns the estimated mean accuracy over every
item. ``parents`` matters only to mp-IRT / gmp-IRT (names of calibration models whose abilities the
merge mixes; default: the calibration's parents).

Every subset is fixed for the run (seeded), never redrawn per candidate. With one subset for
everyone the sampling error is shared: two candidates are compared on the same items, so their
difference is estimated far better than either accuracy, and a genome always gets the same
fitness (caching, resume). A fresh draw per candidate adds independent noise to every fitness,
and selection then favours lucky draws (winner's curse). The price of a fixed subset is that a long
search can overfit it; the run's held-out test evaluation is what catches that.

Estimators (n seen of N items, y the seen scores):
  full        mean over all items (needs every item)
  random      mean of a fixed random subset
  stratified  group-weighted mean of a fixed random subset drawn per group (e.g. per skill)
  irt         sum of anchor weights x anchor scores (tinyBenchmarks)
  pirt        (n/N) mean(y) + (1 - n/N) mean over unseen items of P_i(theta_hat), theta_hat the MAP
              ability from the seen items
  gpirt       lam irt + (1 - lam) pirt, lam fitted on calibration models
  mpirt       pirt with theta = sum_j lam_j theta_j over the parents (MERGE^3), lam by maximum
              likelihood on the seen items
  gmpirt      0.5 irt + 0.5 mpirt
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from evomerge.estimator_kinds import IRT_KINDS
from evomerge.irt.anchors import Anchors, allocate, resolve_budget
from evomerge.irt.calibration import Calibration
from evomerge.irt.fit import ItemParams, Prior, estimate_mixture, estimate_theta

#: the baselines, then the IRT family (``evomerge.estimator_kinds`` names it; ``_CALIBRATED`` implements it)
NAMES = ("full", "random", "stratified", *IRT_KINDS)


class Estimator(Protocol):
    name: str

    def select_items(self) -> list[str]:
        """The items a candidate is evaluated on (the same for every candidate of a run)."""

    def estimate(self, seen_item_ids: Sequence[str], scores: Sequence[float] | np.ndarray,
                 parents: Sequence[str] | None = None) -> float:
        """Estimated mean score over all items of the benchmark."""


# ---- pure, batched estimates (B models seen on the same n items) --------------------------------

def weighted_estimate(weight: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum_i w_i y_i per row of y (B, n)."""
    return np.atleast_2d(y) @ weight


def extrapolate(items: ItemParams, seen: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(n/N) mean(seen y) + (1 - n/N) mean over the unseen items of P_i(theta), per row."""
    y, theta = np.atleast_2d(y), np.atleast_2d(theta)
    N = len(items)
    unseen = np.setdiff1d(np.arange(N), seen)
    seen_part = np.nanmean(y, axis=1) * (len(seen) / N)
    if len(unseen) == 0:
        return seen_part
    p = items.prob(theta)[:, unseen]
    return seen_part + p.mean(1) * (len(unseen) / N)


def pirt_estimate(items: ItemParams, prior: Prior, seen: np.ndarray, y: np.ndarray) -> np.ndarray:
    return extrapolate(items, seen, y, estimate_theta(items, seen, np.atleast_2d(y), prior))


def mpirt_estimate(items: ItemParams, parents: np.ndarray, seen: np.ndarray, y: np.ndarray) -> np.ndarray:
    lam = estimate_mixture(items, seen, np.atleast_2d(y), parents)
    return extrapolate(items, seen, y, lam @ parents)


# ---- the seen items -----------------------------------------------------------------------------

def seen_positions(position: dict[str, int], seen_item_ids: Sequence[str],
                   scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions and scores of the seen items, checked: known ids, no repeats, scores in [0, 1]."""
    ids = list(seen_item_ids)
    y = np.asarray(scores, dtype=np.float64)
    if y.shape != (len(ids),):
        raise ValueError(f"{len(ids)} seen item ids but scores of shape {y.shape}")
    unknown = [i for i in ids if i not in position]
    if unknown:
        raise ValueError(f"items {unknown[:5]} are not in the benchmark this estimator was built for")
    if len(set(ids)) != len(ids):
        raise ValueError("seen item ids repeat; give each item once")
    if np.isnan(y).any() or (y < 0).any() or (y > 1).any():
        raise ValueError("scores must lie in [0, 1] with no NaN")
    pos = np.array([position[i] for i in ids], dtype=np.int64)
    order = np.argsort(pos)
    return pos[order], y[order]


def _require(pos: np.ndarray, needed: np.ndarray, what: str) -> None:
    missing = np.setdiff1d(needed, pos)
    if len(missing):
        raise ValueError(f"{what} needs scores on all of its {len(needed)} items; {len(missing)} are missing "
                         "(evaluate the candidate on select_items())")


# ---- baselines ----------------------------------------------------------------------------------

@dataclass
class Full:
    item_ids: list[str]
    name: str = "full"

    def __post_init__(self) -> None:
        self._position = {i: k for k, i in enumerate(self.item_ids)}

    def select_items(self) -> list[str]:
        return list(self.item_ids)

    def estimate(self, seen_item_ids, scores, parents=None) -> float:
        pos, y = seen_positions(self._position, seen_item_ids, scores)
        _require(pos, np.arange(len(self.item_ids)), "the full estimator")
        return float(y.mean())


@dataclass
class RandomSubset:
    """Mean of a fixed random subset of n items (seeded: the same subset for every candidate)."""

    item_ids: list[str]
    n: int
    seed: int = 0
    name: str = "random"

    def __post_init__(self) -> None:
        self.n = resolve_budget(self.n, len(self.item_ids))
        self._position = {i: k for k, i in enumerate(self.item_ids)}

    def positions(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(len(self.item_ids), self.n, replace=False))

    def select_items(self) -> list[str]:
        return [self.item_ids[i] for i in self.positions()]

    def estimate(self, seen_item_ids, scores, parents=None) -> float:
        _, y = seen_positions(self._position, seen_item_ids, scores)
        if len(y) == 0:
            raise ValueError("no items seen; evaluate the candidate on select_items()")
        return float(y.mean())


@dataclass
class StratifiedRandom:
    """A fixed random subset drawn per group in proportion to its size; the estimate weights each
    group's mean by its share of the benchmark, so a group's share is never left to chance."""

    item_ids: list[str]
    groups: list[str]
    n: int
    seed: int = 0
    name: str = "stratified"

    def __post_init__(self) -> None:
        if len(self.groups) != len(self.item_ids):
            raise ValueError(f"{len(self.groups)} group labels for {len(self.item_ids)} items")
        self.n = resolve_budget(self.n, len(self.item_ids))
        self._position = {i: k for k, i in enumerate(self.item_ids)}

    def _members(self) -> dict[str, np.ndarray]:
        g = np.asarray(self.groups)
        return {name: np.flatnonzero(g == name) for name in dict.fromkeys(self.groups)}

    def positions(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        members = self._members()
        counts = allocate([len(m) for m in members.values()], self.n)
        return np.sort(np.concatenate([rng.choice(m, k, replace=False) for m, k in zip(members.values(), counts)]))

    def select_items(self) -> list[str]:
        return [self.item_ids[i] for i in self.positions()]

    def estimate(self, seen_item_ids, scores, parents=None) -> float:
        pos, y = seen_positions(self._position, seen_item_ids, scores)
        total = 0.0
        for name, m in self._members().items():
            inside = np.isin(pos, m)
            if not inside.any():
                raise ValueError(f"no seen item in group '{name}'; evaluate the candidate on select_items()")
            total += len(m) / len(self.item_ids) * y[inside].mean()
        return float(total)


# ---- IRT estimators -----------------------------------------------------------------------------

@dataclass
class _Calibrated:
    """What the IRT estimators share: a calibration, a budget, and the anchors fitted for it (the
    items every candidate is evaluated on)."""

    calibration: Calibration
    n: int
    anchors: Anchors = field(init=False)

    def __post_init__(self) -> None:
        self.n = self.calibration.budget(self.n)
        self.anchors = self.calibration.anchors_for(self.n)
        self._position = self.calibration.position()

    def select_items(self) -> list[str]:
        return [self.calibration.item_ids[i] for i in np.sort(self.anchors.index)]

    def _seen(self, seen_item_ids, scores) -> tuple[np.ndarray, np.ndarray]:
        pos, y = seen_positions(self._position, seen_item_ids, scores)
        if len(pos) == 0:
            raise ValueError("no items seen; evaluate the candidate on select_items()")
        return pos, y

    def _weighted(self, pos: np.ndarray, y: np.ndarray) -> float:
        _require(pos, self.anchors.index, "the weighted anchor estimate")
        where = np.searchsorted(pos, self.anchors.index)
        return float(weighted_estimate(self.anchors.weight, y[where])[0])

    def _parents(self, parents) -> np.ndarray:
        if parents is None:
            parents = self.calibration.parents
        if isinstance(parents, np.ndarray):
            return np.atleast_2d(parents)
        if not parents:
            raise ValueError("mp-IRT needs the names of at least one parent model of the calibration")
        return self.calibration.theta_of(list(parents))


@dataclass
class AnchorIRT(_Calibrated):
    name: str = "irt"

    def estimate(self, seen_item_ids, scores, parents=None) -> float:
        return self._weighted(*self._seen(seen_item_ids, scores))


@dataclass
class PIRT(_Calibrated):
    name: str = "pirt"

    def estimate(self, seen_item_ids, scores, parents=None) -> float:
        pos, y = self._seen(seen_item_ids, scores)
        cal = self.calibration
        return float(pirt_estimate(cal.items, cal.prior, pos, y)[0])


@dataclass
class GPIRT(_Calibrated):
    name: str = "gpirt"

    def estimate(self, seen_item_ids, scores, parents=None) -> float:
        pos, y = self._seen(seen_item_ids, scores)
        cal = self.calibration
        lam = cal.lambda_for(self.n)
        return float(lam * self._weighted(pos, y) + (1 - lam) * pirt_estimate(cal.items, cal.prior, pos, y)[0])


@dataclass
class MPIRT(_Calibrated):
    name: str = "mpirt"

    def estimate(self, seen_item_ids, scores, parents=None) -> float:
        pos, y = self._seen(seen_item_ids, scores)
        return float(mpirt_estimate(self.calibration.items, self._parents(parents), pos, y)[0])


@dataclass
class GMPIRT(_Calibrated):
    name: str = "gmpirt"

    def estimate(self, seen_item_ids, scores, parents=None) -> float:
        pos, y = self._seen(seen_item_ids, scores)
        mp = mpirt_estimate(self.calibration.items, self._parents(parents), pos, y)[0]
        return float(0.5 * self._weighted(pos, y) + 0.5 * mp)


_CALIBRATED: dict[str, Callable[[Calibration, int], Estimator]] = {
    c.name: c for c in (AnchorIRT, PIRT, GPIRT, MPIRT, GMPIRT)}
assert set(_CALIBRATED) == set(IRT_KINDS), "an IRT kind in evomerge.estimator_kinds without its estimator here"


def make_estimator(name: str, budget: float | int, *, calibration: Calibration | None = None,
                   item_ids: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                   seed: int = 0) -> Estimator:
    """An estimator by name for a budget (fraction in (0, 1] or item count).

    The baselines need only the item ids (and groups, for ``stratified``); they are taken from the
    calibration when one is given. The IRT estimators need a calibration with anchors for the budget.
    """
    if name not in NAMES:
        raise ValueError(f"unknown estimator '{name}'; choose one of {list(NAMES)}")
    if calibration is not None:
        item_ids = calibration.item_ids if item_ids is None else item_ids
        groups = calibration.groups if groups is None else groups
    if name in _CALIBRATED:
        if calibration is None:
            raise ValueError(f"estimator '{name}' needs a calibration (see evomerge.irt.calibrate)")
        return _CALIBRATED[name](calibration, calibration.budget(budget))
    if item_ids is None:
        raise ValueError(f"estimator '{name}' needs the benchmark's item ids")
    item_ids = list(item_ids)
    if name == "full":
        return Full(item_ids)
    if name == "random":
        return RandomSubset(item_ids, resolve_budget(budget, len(item_ids)), seed)
    if groups is None:
        raise ValueError("estimator 'stratified' needs a group label per item (e.g. its skill)")
    return StratifiedRandom(item_ids, list(groups), resolve_budget(budget, len(item_ids)), seed)
