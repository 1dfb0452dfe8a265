"""Adaptive fitness (``estimator.kind: adaptive``): each candidate is tested item batch by item batch,
chosen for it, until its predicted score is known to ``tolerance``; the IRT model is calibrated on the
sources and a handful of random merges, then refitted on the search's own responses.

- A candidate starts on the ``start_items`` most informative items at the prior ability; after each
  round its ability is re-estimated and the next ``batch`` items are those that reduce the variance
  of its predicted benchmark score most (``evomerge.irt.adaptive``). It stops when the standard
  error is below ``tolerance`` on every benchmark, or at ``max_items``. Its answers are kept: more
  precision later adds items, never re-scores.
- Calibration: the sources and ``calibration_models`` (default 8) random genomes of the first phase
  on every item; the dimension D is chosen by cross-validated likelihood, as for the IRT estimators.
  Every ``refit_every`` generations the model is refitted on that population plus every search
  candidate's answers (unseen items are missing data), deterministically, and saved with the run's
  calibrations (``CalibrationLog``), so a resumed run uses exactly the refit it had.
- Racing (``racing: true``, a searcher with a selection cut: CMA-ES's mu best): a generation is
  tested round by round together, and a candidate stops as soon as its fitness interval is clear of
  the cut (``evomerge.estimators.racing``), so the searcher selects the same parents as with full
  scores with probability >= 1 - ``delta``; the others go on to the tolerance as before.
- The final choice confirms the best estimates on every item (``ReducedFitness``), and the report
  states the estimator's error on candidates it never calibrated on.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from evomerge.estimators.base import EstimatorInputs, PhaseView, Selection
from evomerge.estimators.calibrations import INITIAL, CalibrationLog, save_calibrations, score_population, tag_of
from evomerge.estimators.racing import combined_se, settled, z_value
from evomerge.estimators.reduced import ReducedFitness
from evomerge.evaluate.base import ItemResponses
from evomerge.irt.adaptive import Prediction, next_items, predict
from evomerge.irt.anchors import resolve_budget
from evomerge.irt.calibrate import Population
from evomerge.irt.calibration import Calibration
from evomerge.irt.fit import Prior, fit_m2pl, select_dim
from evomerge.objectives import named
from evomerge.runstore import Evaluation

REFIT_DIMS = (1, 2, 3, 4)


def fit_calibration(pop: Population, parents: list[str], benchmark: str, seed: int) -> Calibration:
    """A (M)2PL fit of ``pop`` (NaN = not seen) with D chosen by 3-fold held-out likelihood; no anchors
    (adaptive testing chooses items per candidate)."""
    dims = [d for d in REFIT_DIMS if d < max(2, len(pop.names))]
    dim, scores = select_dim(pop.responses, dims, folds=min(3, len(pop.names)), seed=seed)
    fit = fit_m2pl(pop.responses, dim, seed=seed)
    return Calibration(benchmark=benchmark, item_ids=list(pop.item_ids), items=fit.items,
                       prior=Prior.empirical(fit.theta), model_names=list(pop.names), thetas=fit.theta,
                       responses=pop.responses, parents=parents, anchors={}, gp_lambda={},
                       validation={"chosen_dim": dim, "heldout_loglik": {str(d): s for d, s in scores.items()}})


class AdaptiveFitness(ReducedFitness):
    kind = "adaptive"

    def __init__(self, inputs: EstimatorInputs) -> None:
        super().__init__(inputs)
        self.races = inputs.spec.racing
        self.per_benchmark = {}
        self.log = CalibrationLog(inputs.run_dir)
        tag = self.log.latest(before=tag_of(0, 0))
        if tag is not None:
            self._use(self.log.load(tag)[0])
            return
        pops, parents = score_population(inputs, inputs.spec.models_to_calibrate)
        cals = {b: fit_calibration(pop, parents, b, inputs.seed) for b, pop in pops.items()}
        save_calibrations(self.log.folder(INITIAL), cals, pops)
        self._use(cals)

    def _use(self, cals: Mapping[str, Calibration]) -> None:
        self.cals = dict(cals)
        self.positions = {b: cal.position() for b, cal in cals.items()}

    # -- adaptive testing ---------------------------------------------------------------------------
    def _answered(self, responses: Sequence[ItemResponses]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per benchmark: the positions answered so far and the answers (first answer of an item kept)."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for r in responses:
            if r.benchmark not in self.cals:
                continue
            pos, ys = out.setdefault(r.benchmark, ([], []))
            where = self.positions[r.benchmark]
            for item, score in zip(r.item_ids, r.scores):
                p = where[item]
                if p not in pos:
                    pos.append(p)
                    ys.append(float(score))
        return {b: (np.array(p, dtype=np.int64), np.array(y)) for b, (p, y) in out.items()}

    def prediction(self, benchmark: str, seen: np.ndarray, y: np.ndarray) -> Prediction:
        cal = self.cals[benchmark]
        return predict(cal.items, cal.prior, seen, y)

    def select(self, answered: Sequence[ItemResponses] = ()) -> Selection | None:
        spec = self.inputs.spec
        state = self._answered(answered)
        out: Selection = {}
        for b, cal in self.cals.items():
            seen, y = state.get(b, (np.zeros(0, dtype=np.int64), np.zeros(0)))
            limit = resolve_budget(spec.max_items, cal.num_items)
            pred = self.prediction(b, seen, y)
            if not answered:
                k = min(spec.start_items, limit)
            elif pred.se <= spec.tolerance or len(seen) >= min(limit, cal.num_items):
                continue
            else:
                k = min(spec.batch, limit - len(seen))
            out[b] = [cal.item_ids[int(i)] for i in next_items(cal.items, pred, seen, k)]
        if answered and not out:
            return None
        return out

    def estimate(self, responses: Sequence[ItemResponses], raw: Mapping[str, float]) -> dict[str, float]:
        out = dict(raw)
        for b, (seen, y) in self._answered(responses).items():
            out[b] = self.prediction(b, seen, y).score
        return out

    # -- racing against the selection cut -------------------------------------------------------------
    def interval(self, responses: Sequence[ItemResponses]) -> tuple[float, float]:
        """The candidate's fitness estimate and its standard error (NaN, inf when an objective is not
        an item benchmark this estimator predicts: such a candidate is never settled by the race)."""
        state = self._answered(responses)
        obj = self.inputs.objectives
        est: dict[str, float] = {}
        ses: list[float] = []
        for name in obj.names:
            if name not in self.cals:
                return math.nan, math.inf
            seen, y = state.get(name, (np.zeros(0, dtype=np.int64), np.zeros(0)))
            pred = self.prediction(name, seen, y)
            est[name] = pred.score
            ses.append(pred.se)
        return obj.fitness(est), combined_se(np.array(obj.weights), np.array(ses))

    def rounds(self) -> int:
        """The most rounds a candidate can take: the start and then ``batch`` items up to ``max_items``."""
        spec = self.inputs.spec
        return max(1 + math.ceil(max(resolve_budget(spec.max_items, cal.num_items) - spec.start_items, 0) / spec.batch)
                   for cal in self.cals.values())

    def race(self, answered: Sequence[Sequence[ItemResponses] | None], active: Sequence[bool],
             keep: int | None) -> list[Selection | None]:
        plain = super().race(answered, active, keep)
        if keep is None or not any(p is not None for p in plain):
            return plain
        means, ses = np.full(len(answered), -math.inf), np.zeros(len(answered))
        for i, a in enumerate(answered):
            if a is not None:
                means[i], ses[i] = self.interval(a)
        z = z_value(self.inputs.spec.delta, len(answered), self.rounds())
        done = settled(means, ses, keep, z)
        return [None if d else p for p, d in zip(plain, done)]

    def ranking(self, phase: PhaseView, evs: Sequence[Evaluation]) -> list[float]:
        """Every candidate re-estimated from its kept answers by the phase's newest refit: an early
        candidate's estimate came from the first, small calibration, and on the demo the largest
        early overestimate (0.08) was the top estimate of its run. Costs no item."""
        tag = self.log.latest(before=tag_of(phase.index + 1, 0))
        if tag is not None:
            self._use(self.log.load(tag)[0])
        fitness = self.inputs.objectives.fitness
        out = []
        for e in evs:
            responses = [ItemResponses(r["benchmark"], list(r["item_ids"]), np.asarray(r["scores"]))
                         for r in e.responses or []]
            f = fitness(self.estimate(responses, named(e))) if responses else math.nan
            out.append(f if math.isfinite(f) else float(e.fitness or 0.0))
        return out

    # -- calibration from the search ----------------------------------------------------------------
    def begin_phase(self, phase: PhaseView, generation: int) -> None:
        tag = self.log.latest(before=tag_of(phase.index, generation))
        if tag is not None:
            self._use(self.log.load(tag)[0])

    def after_generation(self, phase: PhaseView, generation: int) -> None:
        """Every ``refit_every`` generations: refit on the calibration population plus the answers of
        every candidate of this phase so far (idempotent: the same data give the same fit)."""
        every = self.inputs.spec.refit_every
        if not every or (generation + 1) % every:
            return
        _, pops = self.log.load(INITIAL)
        # in a fixed order, not the order workers finished in: 1 or N workers give the same refit
        evs = sorted(phase.store.evaluations("ok"), key=lambda e: (e.generation, e.genome_hash))
        cals = {}
        for b, pop in pops.items():
            where = self.positions[b]
            rows, names = [], []
            for ev in evs:
                row = np.full(len(pop.item_ids), np.nan)
                for r in ev.responses or []:
                    if r["benchmark"] == b:
                        row[[where[i] for i in r["item_ids"]]] = r["scores"]
                if np.isfinite(row).any():
                    rows.append(row)
                    names.append(f"search:{ev.genome_hash[:16]}")
            both = pop + Population(names, pop.item_ids, np.array(rows)) if rows else pop
            cals[b] = fit_calibration(both, self.cals[b].parents, b, self.inputs.seed)
            pops[b] = both
        self.log.save(tag_of(phase.index, generation), cals, pops)
        self._use(cals)
        dims = ", ".join(f"{b} D={c.validation['chosen_dim']}" for b, c in cals.items())
        self.inputs.say(f"generation {generation}: refitted the item model on {len(evs)} search candidates ({dims})")
