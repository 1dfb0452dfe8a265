"""The plain estimator: every item of every benchmark."""

from __future__ import annotations

from typing import Sequence

from evomerge.estimators.base import FitnessEstimator, Selection
from evomerge.evaluate.base import ItemResponses


class FullFitness(FitnessEstimator):
    """Every item of every benchmark; the objective is the plain mean (or a custom function's value)."""

    kind = "full"

    def select(self, answered: Sequence[ItemResponses] = ()) -> Selection | None:
        return None if answered else {}
