"""Successive halving over items (``estimator.kind: successive_halving``): the multi-fidelity
baseline of hyperparameter tools (the inner loop of Hyperband, as in Optuna and Ray Tune), with a
benchmark's items as the fidelity instead of training epochs.

Every candidate of a generation answers ``start_items`` items of each benchmark (the same items for
all, from one permutation drawn from the run's seed); the better half by fitness go on to twice as
many, and so on until one is left or it has ``max_items``. Objectives are the plain means of what
each candidate answered: there is no model, so a candidate dropped early keeps a noisier score. The
final choice and the report are those of the other subset estimators (the top estimates confirmed on
every item). Needs a generational searcher: the halving ranks a whole generation.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from evomerge.estimators.base import Cut, EstimatorInputs, Selection
from evomerge.estimators.reduced import ReducedFitness
from evomerge.evaluate.base import ItemResponses
from evomerge.irt.anchors import resolve_budget


class SuccessiveHalving(ReducedFitness):
    kind = "successive_halving"
    races = True

    def __init__(self, inputs: EstimatorInputs) -> None:
        super().__init__(inputs)
        self.per_benchmark = {}
        rng = np.random.default_rng(inputs.seed)
        self.order = {b: [ids[i] for i in rng.permutation(len(ids))] for b, ids in inputs.item_ids.items()}
        self.limit = {b: resolve_budget(inputs.spec.max_items, len(ids)) for b, ids in self.order.items()}

    def select(self, answered: Sequence[ItemResponses] = ()) -> Selection | None:
        """The first rung: ``start_items`` of every benchmark (later rungs come from ``race``)."""
        if answered:
            return None
        return {b: ids[:min(self.inputs.spec.start_items, self.limit[b])] for b, ids in self.order.items()}

    def estimate(self, responses: Sequence[ItemResponses], raw: Mapping[str, float]) -> dict[str, float]:
        out = dict(raw)
        scores: dict[str, list[float]] = {}
        for r in responses:
            if r.benchmark in self.order:
                scores.setdefault(r.benchmark, []).extend(r.scores.tolist())
        out.update({b: float(np.mean(v)) for b, v in scores.items()})
        return out

    def race(self, answered: Sequence[Sequence[ItemResponses] | None], active: Sequence[bool],
             cut: Cut | None) -> list[Selection | None]:
        """The better half of the candidates still in go on to twice their items (ties: batch order)."""
        out: list[Selection | None] = [None] * len(answered)
        alive = [i for i, on in enumerate(active) if on and answered[i] is not None]
        if len(alive) <= 1:
            return out
        fitness = self.inputs.objectives.fitness

        def score(i: int) -> float:
            f = fitness(self.estimate(answered[i] or [], {}))
            return f if math.isfinite(f) else -math.inf

        for i in sorted(alive, key=lambda i: (-score(i), i))[:math.ceil(len(alive) / 2)]:
            seen = {b: 0 for b in self.order}
            for r in answered[i] or []:
                if r.benchmark in seen:
                    seen[r.benchmark] += len(r.item_ids)
            nxt: Selection = {b: ids[seen[b]:min(2 * max(seen[b], 1), self.limit[b])]
                   for b, ids in self.order.items() if seen[b] < self.limit[b]}
            out[i] = nxt or None
        return out
