"""From a candidate's item responses to its objectives: full evaluation or an IRT-reduced estimate.

The driver asks ``selection()`` which items each benchmark should evaluate, and ``estimate()`` what
the responses say about the whole benchmark. With ``estimator.kind: full`` every item is evaluated
and the objective is the plain mean; the IRT kinds evaluate a small anchor set chosen by a
calibration on the user's own benchmark (see ``evomerge.irt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from evomerge.worker import CandidateResult

if TYPE_CHECKING:
    from evomerge.search import Driver


@dataclass
class FitnessEstimator:
    kind: str = "full"
    estimators: dict[str, Any] = field(default_factory=dict)  # objective -> evomerge.irt estimator

    @classmethod
    def prepare(cls, driver: "Driver", run_dir: Path) -> "FitnessEstimator":
        spec = driver.exp.fitness.estimator
        if spec.kind == "full":
            return cls("full")
        from evomerge.irt_search import prepare_estimators

        return cls(spec.kind, prepare_estimators(driver, run_dir))

    def selection(self) -> dict[str, Optional[list[str]]]:
        return {name: est.select_items() for name, est in self.estimators.items()}

    def estimate(self, result: CandidateResult) -> dict[str, float]:
        if self.kind == "full":
            return dict(result.objectives)
        out = dict(result.objectives)
        for r in result.responses:
            if r.benchmark in self.estimators:
                out[r.benchmark] = float(self.estimators[r.benchmark].estimate(r.item_ids, r.scores))
        return out

    def sync(self, driver: "Driver", phase: int, gen: int) -> None:
        """On (re)entering a phase at ``gen``: the calibration the run had there."""
        if self.kind != "full":
            from evomerge.irt_search import sync

            sync(self, driver, phase, gen)

    def check_drift(self, driver: "Driver", store, genome, phase: int, gen: int) -> None:
        if self.kind != "full":
            from evomerge.irt_search import drift_check

            drift_check(self, driver, store, genome, phase, gen)
