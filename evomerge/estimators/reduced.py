"""Estimators that score each candidate on a subset of the items, and what they share: the final
choice confirmed on every item (the winner's curse) and the report of their error.

``SubsampledFitness`` is the baseline: one random subset, the same for every candidate. The IRT
family (``evomerge.estimators.irt``) chooses the subset by calibration and extrapolates from it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from evomerge.estimators.base import EstimatorInputs, FitnessEstimator, PhaseView, Selection
from evomerge.evaluate.base import ItemResponses
from evomerge.irt.estimators import make_estimator
from evomerge.objectives import named
from evomerge.run_folder import DRIFT, ESTIMATOR_CHECK, FINAL_CONFIRMED, FULL_SCORES
from evomerge.runstore import Evaluation


class ReducedFitness(FitnessEstimator):
    """Per-benchmark estimators (``per_benchmark``, each with ``select_items`` and ``estimate``) on a
    subset of the items; subclasses set them."""

    per_benchmark: dict[str, Any]

    def select(self, answered: Sequence[ItemResponses] = ()) -> Selection | None:
        if answered:
            return None
        return {name: est.select_items() for name, est in self.per_benchmark.items()}

    def estimate(self, responses: Sequence[ItemResponses], raw: Mapping[str, float]) -> dict[str, float]:
        out = dict(raw)
        for r in responses:
            if r.benchmark in self.per_benchmark:
                out[r.benchmark] = float(self.per_benchmark[r.benchmark].estimate(r.item_ids, r.scores))
        return out

    def final_choice(self, phase: PhaseView) -> list[Evaluation]:
        """The phase's best, chosen by full score among the ``final_top_k`` best estimates.

        The largest of many noisy estimates is biased upward (the winner's curse): with 240 candidates
        at 10% of the items, the top estimate is often a lucky draw rather than the best merge.
        Scoring a handful of the top estimates on every item costs k full evaluations and removes
        that luck. Several objectives: the Pareto choice on the estimates, as ``full`` does."""
        k = self.inputs.spec.final_top_k
        ok = phase.scored()
        if not k or self.inputs.objectives.n_obj != 1 or not ok:
            return super().final_choice(phase)
        ranked = self.ranking(phase, ok)
        top = [e for _, e in sorted(zip(ranked, ok), key=lambda x: (-x[0], x[1].rowid or 0))][:k]
        scores = full_scores(phase, top, self.inputs)
        phase.store.set_meta(FINAL_CONFIRMED, [e.genome_hash for e in top])
        fitness = self.inputs.objectives.fitness
        return [max(top, key=lambda e: (fitness({**named(e), **scores[e.genome_hash]}), -(e.rowid or 0)))]

    def ranking(self, phase: PhaseView, evs: Sequence[Evaluation]) -> list[float]:
        """The fitness the final choice ranks ``evs`` by: their estimates as recorded."""
        return [float(e.fitness or 0.0) for e in evs]

    def full_fitness(self, phase: PhaseView, ev: Evaluation) -> float:
        """The fitness on every item where the final choice or the report scored ``ev`` on all of them."""
        confirmed = (phase.store.get_meta(FULL_SCORES, {}) or {}).get(ev.genome_hash)
        if not confirmed:
            return super().full_fitness(phase, ev)
        return self.inputs.objectives.fitness({**named(ev), **{b: x["accuracy"] for b, x in confirmed.items()}})

    def report(self, phase: PhaseView, chosen: Evaluation) -> str:
        """The estimator's error measured on search candidates (never in the calibration population):
        the ``final_top_k`` best estimates (already scored on every item for the final choice), or else
        the best estimate, and others drawn evenly from the run up to ``report_checks``, each scored on
        every item; ``chosen`` (the phase's result) is marked."""
        evs = phase.scored()
        if not evs:
            return ""
        spec = self.inputs.spec
        n = spec.report_checks
        cached = phase.store.get_meta(FULL_SCORES, {}) or {}
        lines = []
        confirmed = cached.get(chosen.genome_hash)
        if confirmed:
            full_chosen = {b: x["accuracy"] for b, x in confirmed.items()}
            fit = self.inputs.objectives.fitness({**named(chosen), **full_chosen})
            lines += [f"On every fitness item, the chosen candidate has fitness {fit:.4f} ("
                      + ", ".join(f"{b} {v:.3f}" for b, v in full_chosen.items()) + ").", ""]
        picks = [e for e in evs if e.genome_hash in cached] or [self.inputs.objectives.best(evs)]
        seen = {e.genome_hash for e in picks}
        for i in np.linspace(0, len(evs) - 1, n):
            e = evs[int(i)]
            if len(picks) < n and e.genome_hash not in seen:
                picks.append(e)
                seen.add(e.genome_hash)
        full = full_scores(phase, picks, self.inputs)
        rows: list[str] = []
        errs: dict[str, list[float]] = {}
        for e in picks:
            est = named(e)
            for b, acc in full[e.genome_hash].items():
                if b in est:
                    err = est[b] - acc
                    errs.setdefault(b, []).append(abs(err))
                    mark = " (chosen)" if e.genome_hash == chosen.genome_hash else ""
                    rows.append(f"| {e.genome_hash[:10]}{mark} | g{e.generation} | {b} | {est[b]:.4f} | "
                                f"{acc:.4f} | {err:+.4f} |")
            fitness_of = self.inputs.objectives.fitness
            f_est, f_full = fitness_of(est), fitness_of({**est, **full[e.genome_hash]})
            if len(self.inputs.objectives.names) > 1 and np.isfinite(f_est) and np.isfinite(f_full):
                errs.setdefault("fitness", []).append(abs(f_est - f_full))  # what one objective's search is told
        drift = phase.store.get_meta(DRIFT, []) or []
        settings = {"adaptive": f"tolerance {spec.tolerance}, max_items {spec.max_items}"
                    + (f", racing with delta {spec.delta}" if spec.racing else ""),
                    "successive_halving": f"start_items {spec.start_items}, max_items {spec.max_items}"
                    }.get(spec.kind, f"budget {spec.budget}")
        if spec.item_sample is not None:
            lines = [f"The estimator works on a seeded sample of items (item_sample {spec.item_sample}: " + ", ".join(
                f"{b} {len(v):,}" for b, v in self.inputs.item_ids.items()) + "); every item below means every "
                "item of the sample.", "", *lines]
        text = [f"### Fitness estimator ({spec.kind}, {settings})", "", *lines,
                "Measured on search candidates that were never in the calibration population, each "
                "evaluated on every item after the search"
                + (f"; the {spec.final_top_k} best estimates among them, and the model chosen is the best "
                   "of those by full score:" if cached else ":"), "",
                "| candidate | generation | benchmark | estimated | full | error |", "|---|---|---|---|---|---|",
                *rows, "", "MAE per benchmark (and of the weighted fitness): "
                + ", ".join(f"{b} {np.mean(v):.4f} (max {np.max(v):.4f})" for b, v in errs.items())]
        if drift:
            text += ["", f"Drift checks during the search (every {spec.drift_every} generations): " + "; ".join(
                f"g{d['generation']}: " + ", ".join(f"{b} {x:.3f}" for b, x in d["error"].items()) for d in drift)]
        phase.store.set_meta(ESTIMATOR_CHECK, {b: [float(x) for x in v] for b, v in errs.items()})
        return "\n".join(text)


def full_scores(phase: PhaseView, evs: Sequence[Evaluation], inputs: EstimatorInputs) -> dict[str, dict[str, float]]:
    """Full-benchmark accuracy of these search candidates, {genome hash: {benchmark: accuracy}}.

    Cached in the run store (meta ``full_scores``, with the item count of each evaluation), so the
    final choice and the report share one evaluation per candidate and a resumed run redoes none."""
    cache = phase.store.get_meta(FULL_SCORES, {}) or {}
    todo = {e.genome_hash: phase.recipe_of(e) for e in evs if e.genome_hash not in cache}
    if todo:
        for h, benches in inputs.score_all(todo).items():
            cache[h] = {b: {"accuracy": float(np.mean(v)), "items": int(v.size)} for b, v in benches.items()}
        phase.store.set_meta(FULL_SCORES, cache)
    return {e.genome_hash: {b: x["accuracy"] for b, x in cache[e.genome_hash].items()} for e in evs}




class SubsampledFitness(ReducedFitness):
    """One random subset of each benchmark's items (``budget``: a fraction or a count), the same for
    every candidate, drawn from the run's seed; objectives are the subset means."""

    kind = "random"

    def __init__(self, inputs: EstimatorInputs) -> None:
        super().__init__(inputs)
        self.per_benchmark = {n: make_estimator("random", inputs.spec.budget, item_ids=ids, seed=inputs.seed)
                              for n, ids in inputs.item_ids.items()}
