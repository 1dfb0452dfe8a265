"""IRT-reduced fitness inside a search (tinyBenchmarks; MERGE^3): calibrate, score anchors, guard drift.

One calibration per benchmark (each objective is one benchmark, and one IRT model of its items):
the sources and ``calibration_models`` random genomes of the first phase are scored on every
fitness item, the (M)2PL model is fitted and anchors are chosen for the item budget. Every candidate
is then scored on the anchors only. Every ``drift_every`` generations the current best is scored on
every item; its estimation error is kept in the run store and, past ``drift_threshold``, the
benchmark is recalibrated with that fully scored candidate added (``CalibrationLog`` keeps each
calibration, so a resumed run uses the one it had). At the end of a phase the ``final_top_k`` best
estimates are scored on every item and the best of them is the phase's result (the winner's curse).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from evomerge.estimators.base import EstimatorInputs, PhaseView, Requests
from evomerge.estimators.calibrations import INITIAL, CalibrationLog, save_calibrations, score_population, tag_of
from evomerge.estimators.reduced import ReducedFitness
from evomerge.irt.calibrate import Population, calibrate
from evomerge.irt.calibration import Calibration
from evomerge.irt.estimators import make_estimator
from evomerge.run_folder import DRIFT


def calibrate_population(inputs: EstimatorInputs, folder: Path, n_models: int | None = None) -> dict[str, Calibration]:
    """Score the calibration population on every fitness item, calibrate each benchmark, save the
    calibrations (and populations) into ``folder``; ``evomerge irt calibrate`` is this alone."""
    spec = inputs.spec
    pops, parents = score_population(inputs, spec.models_to_calibrate if n_models is None else n_models)
    cals = {b: calibrate(pop, parents, budgets=[spec.budget], benchmark=b, seed=inputs.seed) for b, pop in pops.items()}
    save_calibrations(folder, cals, pops)
    for b, cal in cals.items():
        v = cal.validation
        n = len(cal.anchors_for(spec.budget))
        base = v["baselines"].get(str(n), {})
        inputs.say(f"  {b}: D={v['chosen_dim']}, {n} anchor items; cross-validated MAE "
                   f"{v['score'][str(v['chosen_dim'])]:.4f} (random subsample {base.get('random', float('nan')):.4f})")
    return cals


class IRTFitness(ReducedFitness):
    """Anchors per candidate, scored by one of the IRT estimators (``spec.kind``)."""

    def __init__(self, inputs: EstimatorInputs) -> None:
        super().__init__(inputs)
        self.kind = inputs.spec.kind
        self.log = CalibrationLog(inputs.run_dir)
        spec = inputs.spec
        if spec.calibration:  # given: used as it is for the whole run, never recalibrated
            path = Path(spec.calibration)
            path = path if path.is_absolute() else inputs.exp_dir / path
            self._use({n: Calibration.load(path / f"{n}.npz" if path.is_dir() else path) for n in inputs.item_ids})
            return
        tag = self.log.latest(before=tag_of(0, 0))
        if tag is not None:  # a resumed run: begin_phase re-syncs to its generation
            self._use(self.log.load(tag)[0])
        else:
            self._use(calibrate_population(inputs, self.log.folder(INITIAL)))

    def _use(self, cals: Mapping[str, Calibration]) -> None:
        # mp-IRT / gmp-IRT take their parents (the sources) from the calibration itself
        spec = self.inputs.spec
        self.cals = dict(cals)
        self.per_benchmark = {
            name: make_estimator(spec.kind, spec.budget, calibration=cal, seed=self.inputs.seed)
            for name, cal in cals.items()}

    # -- the interface ------------------------------------------------------------------------------
    def begin_phase(self, phase: PhaseView, generation: int) -> None:
        """Use the calibration the run had at (phase, generation): the newest one made before it."""
        if self.inputs.spec.calibration:
            return
        tag = self.log.latest(before=tag_of(phase.index, generation))
        if tag is not None:
            self._use(self.log.load(tag)[0])

    def after_generation(self, phase: PhaseView, generation: int) -> Requests | None:
        """Every ``drift_every`` generations: the best so far on all items; error stored; recalibrate
        the benchmarks whose error passes the threshold (with the fully scored best added)."""
        spec = self.inputs.spec
        if not spec.drift_every or (generation + 1) % spec.drift_every or not phase.scored():
            return None
        return self._drift_check(phase, generation)

    def _drift_check(self, phase: PhaseView, generation: int) -> Requests:
        """The drift check as a generator: it asks the loop for the best's full scores (one request)."""
        spec = self.inputs.spec
        best = self.inputs.objectives.best(phase.scored())
        full = (yield self.inputs.request({best.genome_hash: phase.recipe_of(best)}))[best.genome_hash]
        estimated = dict(best.objectives) if isinstance(best.objectives, dict) else {}
        errors = {b: abs(float(np.mean(full[b])) - estimated[b]) for b in full if b in estimated}
        log = [e for e in (phase.store.get_meta(DRIFT, []) or []) if e["generation"] != generation]
        log.append({"generation": generation, "genome_hash": best.genome_hash, "estimated": estimated,
                    "full": {b: float(np.mean(v)) for b, v in full.items()}, "error": errors})
        phase.store.set_meta(DRIFT, log)
        drifted = {b for b, e in errors.items() if e > spec.drift_threshold}
        if not drifted or spec.calibration:
            return
        tag = self.log.latest(before=tag_of(phase.index, generation))
        assert tag is not None, "an IRT run always has its initial calibration"
        cals, pops = self.log.load(tag)
        name = f"search:{best.genome_hash[:12]}:g{generation}"
        for b in drifted:
            pops[b] = pops[b] + Population([name], pops[b].item_ids, full[b][None, :])
            cals[b] = calibrate(pops[b], cals[b].parents, budgets=[spec.budget], benchmark=b, seed=self.inputs.seed)
        self.log.save(tag_of(phase.index, generation), cals, pops)
        self._use(cals)
        self.inputs.say(f"drift at generation {generation}: "
                        f"{', '.join(f'{b} {errors[b]:.3f}' for b in sorted(drifted))} > {spec.drift_threshold}; "
                        "recalibrated")
