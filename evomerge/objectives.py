"""What "better" means in a run: objective names and weights, the scalar fitness, the values a
searcher is told, and the choice of the best candidate or of a spread of the Pareto front.

Plain values and pure functions: the loop, the estimators and the outputs all take an
``Objectives`` and never the experiment or the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from evomerge.runstore import Evaluation


@dataclass(frozen=True)
class Objectives:
    """``names`` of the objectives (every benchmark, or a custom function's named outputs), their
    ``weights`` in the scalar fitness, ``n_obj`` the number of values the searcher is told (1: the
    fitness; else every objective) and ``top_k`` how many Pareto models a multi-objective run exports."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    n_obj: int = 1
    top_k: int = 1

    def __post_init__(self) -> None:
        if len(self.names) != len(self.weights) or not self.names:
            raise ValueError(f"objectives {self.names} and weights {self.weights} must be non-empty and match")
        if self.n_obj not in (1, len(self.names)):
            raise ValueError(f"n_obj={self.n_obj}: a searcher is told the fitness (1) or every objective "
                             f"({len(self.names)})")

    def fitness(self, objectives: Mapping[str, float]) -> float:
        """The weighted mean of the objectives; NaN when one is missing or not finite."""
        values = [objectives.get(n, math.nan) for n in self.names]
        if not all(math.isfinite(v) for v in values):
            return math.nan
        w = np.asarray(self.weights, dtype=float)
        return float(np.dot(w, values) / w.sum())

    def search_values(self, ev: Evaluation) -> list[float]:
        """What the searcher is told of ``ev`` (maximized; NaN for a failed candidate)."""
        if not ev.ok:
            return [math.nan] * self.n_obj
        if self.n_obj == 1:
            return [float(ev.fitness) if ev.fitness is not None else math.nan]
        obj = ev.objectives if isinstance(ev.objectives, dict) else {}
        return [float(obj.get(n, math.nan)) for n in self.names]

    def best(self, evaluations: Sequence[Evaluation]) -> Evaluation:
        """The highest fitness, the earliest among equals."""
        return max(evaluations, key=lambda e: (e.fitness, -(e.rowid or 0)))

    def choose(self, evaluations: Sequence[Evaluation]) -> list[Evaluation]:
        """The best evaluation (one objective), or up to ``top_k`` of the Pareto set spread along the
        first objective. ``evaluations``: successful ones only."""
        if not evaluations:
            raise ValueError("no successful evaluation to choose from")
        if self.n_obj == 1:
            return [self.best(evaluations)]
        front = pareto_front(evaluations, self.names)
        front.sort(key=lambda e: named(e)[self.names[0]])
        k = min(self.top_k, len(front))
        picks = sorted({int(round(i)) for i in np.linspace(0, len(front) - 1, k)})
        return [front[i] for i in picks]


def named(ev: Evaluation) -> dict[str, float]:
    """An evaluation's objectives as a dict (empty for a failed one)."""
    return dict(ev.objectives) if isinstance(ev.objectives, dict) else {}


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Non-dominated rows of ``points`` (maximised); equal rows are all kept."""
    n = len(points)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if not keep[i]:
            continue
        dominated = np.all(points >= points[i], axis=1) & np.any(points > points[i], axis=1)
        if dominated.any():
            keep[i] = False
    return keep


def pareto_front(evaluations: Sequence[Evaluation], names: Sequence[str]) -> list[Evaluation]:
    """The non-dominated evaluations over the objectives ``names``."""
    pts = np.array([[named(e)[n] for n in names] for e in evaluations])
    return [evaluations[int(i)] for i in np.flatnonzero(pareto_mask(pts))]
