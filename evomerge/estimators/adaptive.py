"""Adaptive fitness (``estimator.kind: adaptive``): each candidate is tested item batch by item batch,
chosen for it, until its predicted score is known to ``tolerance``; the IRT model is calibrated on the
sources and a handful of random merges, then refitted on the search's own responses.

- A candidate starts on the ``start_items`` most informative items at the prior ability; after each
  round its ability is re-estimated and the next ``batch`` items are those that reduce the variance
  of its predicted benchmark score most (``evomerge.irt.adaptive``). It stops when the standard
  error of what the searcher is told is below ``tolerance`` (one objective: the weighted fitness, and
  the next batch goes to the benchmarks that carry most of its variance; several objectives: each
  benchmark's score), or at ``max_items``. Its answers are kept: more precision later adds items,
  never re-scores.
- Calibration: the sources and ``calibration_models`` (default 8) random genomes of the first phase
  on every item; the dimension D is chosen by cross-validated likelihood, as for the IRT estimators.
  Every ``refit_every`` generations the model is refitted on that population plus every search
  candidate's answers (unseen items are missing data), deterministically, and saved with the run's
  calibrations (``CalibrationLog``), so a resumed run uses exactly the refit it had.
- Racing (``racing: true``, a searcher with a selection cut: CMA-ES's mu best, NSGA-II's population
  size over the population and its offspring): a generation is tested round by round together, and a
  candidate stops as soon as its fitness interval (several objectives: its box) is clear of the cut
  (``evomerge.estimators.racing``), so the searcher keeps the same candidates as with full scores
  with probability >= 1 - ``delta``; the others go on to the tolerance as before.
- The final choice confirms the best estimates on every item (``ReducedFitness``), and the report
  states the estimator's error on candidates it never calibrated on.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from evomerge.estimators.base import Cut, EstimatorInputs, PhaseView, Selection
from evomerge.estimators.calibrations import INITIAL, CalibrationLog, save_calibrations, score_population, tag_of
from evomerge.estimators.racing import combined_se, settled, settled_pareto, z_value
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


def fit_calibration(pop: Population, parents: list[str], benchmark: str, seed: int,
                    dims: Sequence[int] = REFIT_DIMS) -> Calibration:
    """A (M)2PL fit of ``pop`` (NaN = not seen) with D chosen among ``dims`` by 3-fold held-out
    likelihood; no anchors (adaptive testing chooses items per candidate)."""
    dims = [d for d in dims if d < max(2, len(pop.names))] or [1]
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
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0))
        seen = {b: state.get(b, empty) for b in self.cals}
        preds = {b: self.prediction(b, *seen[b]) for b in self.cals}
        limit = {b: min(resolve_budget(spec.max_items, cal.num_items), cal.num_items) for b, cal in self.cals.items()}
        if not answered:
            take = {b: min(spec.start_items, limit[b]) for b in self.cals}
        else:
            take = {b: min(spec.batch, limit[b] - len(seen[b][0])) for b in self.needing_items(preds, seen, limit)}
        out: Selection = {b: [self.cals[b].item_ids[int(i)] for i in next_items(self.cals[b].items, preds[b],
                                                                                 seen[b][0], k)]
                          for b, k in take.items() if k > 0}
        return out if out or not answered else None

    def needing_items(self, preds: Mapping[str, Prediction], seen: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      limit: Mapping[str, int]) -> list[str]:
        """The benchmarks a candidate scores another batch of.

        One objective (the searcher is told the weighted fitness): until the fitness' standard error is
        below ``tolerance``, the benchmarks whose share of its variance is at least an even share (at
        least the largest), since a benchmark known better than needed adds nothing to what the
        searcher sees. Several objectives (each told apart): every benchmark whose own standard error
        is above ``tolerance``. Never past ``max_items``."""
        tol = self.inputs.spec.tolerance
        open_ = [b for b in self.cals if len(seen[b][0]) < limit[b]]
        obj = self.inputs.objectives
        if obj.n_obj != 1 or any(n not in self.cals for n in obj.names):
            return [b for b in open_ if preds[b].se > tol]
        w = np.array(obj.weights, dtype=np.float64) / float(np.sum(obj.weights))
        share = {n: float((wn * preds[n].se) ** 2) for n, wn in zip(obj.names, w)}
        total = sum(share.values())
        if np.sqrt(total) <= tol or not open_:
            return []
        ranked = sorted(open_, key=lambda b: -share[b])
        return [b for b in ranked if share[b] >= total / len(share)] or ranked[:1]

    def estimate(self, responses: Sequence[ItemResponses], raw: Mapping[str, float]) -> dict[str, float]:
        out = dict(raw)
        for b, (seen, y) in self._answered(responses).items():
            out[b] = self.prediction(b, seen, y).score
        return out

    # -- racing against the selection cut -------------------------------------------------------------
    def intervals(self, responses: Sequence[ItemResponses]) -> tuple[np.ndarray, np.ndarray] | None:
        """The candidate's predicted score and its standard error per objective (None when an objective
        is not an item benchmark this estimator predicts: such a generation is not raced)."""
        state = self._answered(responses)
        names = self.inputs.objectives.names
        if any(name not in self.cals for name in names):
            return None
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0))
        preds = [self.prediction(name, *state.get(name, empty)) for name in names]
        return np.array([p.score for p in preds]), np.array([p.se for p in preds])

    def rounds(self) -> int:
        """The most rounds a candidate can take: the start and then ``batch`` items up to ``max_items``."""
        spec = self.inputs.spec
        return max(1 + math.ceil(max(resolve_budget(spec.max_items, cal.num_items) - spec.start_items, 0) / spec.batch)
                   for cal in self.cals.values())

    def race(self, answered: Sequence[Sequence[ItemResponses] | None], active: Sequence[bool],
             cut: Cut | None) -> list[Selection | None]:
        """Each active candidate's next items to the tolerance, except those whose side of the ``cut``
        is already settled (one objective: its fitness interval against the keep-th best; several:
        its box against the Pareto fronts). The incumbents race with their kept answers."""
        plain = super().race(answered, active, cut)
        everyone = [*answered, *(cut.incumbents if cut is not None else ())]
        if cut is None or cut.keep >= len(everyone) or not any(p is not None for p in plain):
            return plain  # no cut (NSGA-II's first population survives whole): the tolerance decides
        obj = self.inputs.objectives
        n, m = len(everyone), len(obj.names)
        means, ses = np.full((n, m), -math.inf), np.zeros((n, m))
        for i, a in enumerate(everyone):
            if a is not None:
                got = self.intervals(a)
                if got is None:
                    return plain
                means[i], ses[i] = got
        if obj.n_obj == 1:  # the searcher is told the weighted fitness: one interval per candidate
            weights = np.array(obj.weights)
            fitness = np.array([obj.fitness(dict(zip(obj.names, row))) for row in means])
            fitness[~np.isfinite(fitness)] = -math.inf
            done = settled(fitness, np.array([combined_se(weights, row) for row in ses]), cut.keep,
                           z_value(self.inputs.spec.delta, n, self.rounds()))
        else:  # a box per candidate, one interval per objective, all holding together
            z = z_value(self.inputs.spec.delta, n * m, self.rounds())
            done = settled_pareto(means - z * ses, means + z * ses, cut.keep)
        return [None if d else p for p, d in zip(plain, done[:len(answered)])]

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
            # D moves by at most one a refit: three cross-validated dimensions instead of four, the
            # refit's largest cost (the workers wait for it)
            near = [d for d in REFIT_DIMS if abs(d - self.cals[b].dim) <= 1]
            cals[b] = fit_calibration(both, self.cals[b].parents, b, self.inputs.seed, near)
            pops[b] = both
        self.log.save(tag_of(phase.index, generation), cals, pops)
        self._use(cals)
        dims = ", ".join(f"{b} D={c.validation['chosen_dim']}" for b, c in cals.items())
        self.inputs.say(f"generation {generation}: refitted the item model on {len(evs)} search candidates ({dims})")
