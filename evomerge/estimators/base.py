"""The fitness-estimator interface: from a candidate's item responses to its objectives.

An estimator decides which items each candidate is scored on (``select``), what the responses say
about the whole benchmark (``estimate``), what to do after each generation (``after_generation``:
e.g. a drift check against a full evaluation), which candidate a phase returns (``final_choice``:
e.g. confirming the top estimates on every item) and its part of the report (``report``).

It is built from plain values (``EstimatorInputs``) and callables that score recipes on every item;
it never sees the driver, the pool or the experiment. What it keeps across a resume lives in the
run folder it is given (``run_dir``) or in the phase's run store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Mapping, Optional, Sequence

import numpy as np

from evomerge.config import EstimatorSpec
from evomerge.evaluate.base import ItemResponses
from evomerge.objectives import Objectives
from evomerge.recipe import Recipe
from evomerge.runstore import Evaluation, RunStore

#: Recipes by name -> {name: {benchmark: one score per item, in the benchmark's item order}}, every
#: fitness item of every item benchmark. Raises when a recipe cannot be scored.
ScoreAll = Callable[[Mapping[str, Recipe]], dict[str, dict[str, np.ndarray]]]
#: Items to score per benchmark (None: every item, or a custom function's own choice).
Selection = dict[str, Optional[list[str]]]
#: {recipe name: {benchmark: one score per item}}: what a ``ScoreRequest`` is answered with.
Scores = dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class ScoreRequest:
    """An estimator's request to the loop: score ``recipes`` (by name) on every fitness item, or only on
    ``items`` (the estimator's item sample, scored in that order). The loop runs it between rounds,
    beside its own candidates, and sends back the ``Scores``; a recipe that cannot be scored stops the
    run."""

    recipes: Mapping[str, Recipe]
    items: Optional[Mapping[str, list[str]]] = None


#: What ``after_generation`` returns: a generator that yields each ``ScoreRequest`` and is sent its
#: answer (None: nothing to ask).
Requests = Generator[ScoreRequest, Scores, None]


@dataclass(frozen=True)
class EstimatorInputs:
    """Everything an estimator is built from.

    ``item_ids``: every fitness item of each item benchmark (custom functions, which choose their own
    items, are absent); ``calibration_recipes(n)``: the calibration population (the sources and ``n``
    random genomes of the first phase), made only when a calibration is needed; ``say``: one line of
    progress for the person watching."""

    spec: EstimatorSpec
    seed: int
    item_ids: Mapping[str, list[str]]
    objectives: Objectives
    score_all: ScoreAll
    run_dir: Path
    exp_dir: Path
    calibration_recipes: Callable[[int], dict[str, Recipe]]
    say: Callable[[str], None] = print

    def request(self, recipes: Mapping[str, Recipe]) -> ScoreRequest:
        """``recipes`` scored as ``score_all`` scores them: on every item, or on the item sample."""
        return ScoreRequest(dict(recipes), self.item_ids if self.spec.item_sample is not None else None)


def sampled_items(item_ids: Mapping[str, list[str]], sample: float | None, seed: int) -> dict[str, list[str]]:
    """The items of each benchmark an estimator works with: all of them (``sample`` None), or a seeded
    random ``sample`` (a fraction, or a count; a benchmark with fewer keeps every item) in benchmark order.

    Why: on a benchmark of thousands of items, the mean of a thousand random ones is within about 0.016
    of the whole benchmark's, below a search's tolerance, while the estimator's fixed costs (scoring the
    calibration population and confirming the final choice on every item) grow with the item count."""
    if sample is None:
        return {b: list(ids) for b, ids in item_ids.items()}
    from evomerge.irt.anchors import resolve_budget  # scikit-learn behind it: only when a sample is asked

    out = {}
    for j, (b, ids) in enumerate(sorted(item_ids.items())):
        n = resolve_budget(sample if sample <= 1 else min(sample, len(ids)), len(ids))
        keep = np.sort(np.random.default_rng([seed, 104_729, j]).choice(len(ids), n, replace=False))
        out[b] = [ids[i] for i in keep]
    return {b: out[b] for b in item_ids}


@dataclass(frozen=True)
class PhaseView:
    """What an estimator sees of the phase being searched: its index, its run store (to keep what must
    survive a resume), and how a stored evaluation turns back into its recipe."""

    index: int
    store: RunStore
    recipe_of: Callable[[Evaluation], Recipe]

    def scored(self) -> list[Evaluation]:
        """The successful evaluations (those with a fitness), in the order recorded."""
        return [e for e in self.store.evaluations("ok") if e.fitness is not None]


@dataclass(frozen=True)
class Cut:
    """The searcher's selection cut that a racing estimator races against: ``keep`` places for the
    generation together with ``incumbents``, the answers of candidates already told that compete for
    them (NSGA-II's current population; none for CMA-ES, whose mu parents come from the generation
    alone; None for an incumbent that failed)."""

    keep: int
    incumbents: Sequence[Sequence[ItemResponses] | None] = ()


class FitnessEstimator(ABC):
    """See the module docstring. Subclasses: ``full``, ``random``, and the IRT family."""

    kind: str = "full"
    #: whether a generational search runs a whole generation's rounds together (``race``)
    races: bool = False

    def __init__(self, inputs: EstimatorInputs) -> None:
        self.inputs = inputs

    def begin_phase(self, phase: PhaseView, generation: int) -> None:
        """Entering (or re-entering, on resume) ``phase`` at ``generation``."""

    @abstractmethod
    def select(self, answered: Sequence[ItemResponses] = ()) -> Selection | None:
        """The items to score next for a candidate that has ``answered`` these so far (nothing yet: the
        first round); None once it has enough. Every estimator here needs one round."""

    def race(self, answered: Sequence[Sequence[ItemResponses] | None], active: Sequence[bool],
             cut: Cut | None) -> list[Selection | None]:
        """The next round of a whole generation (when ``races``): what each candidate that is still
        ``active`` scores next (None: it has enough), given what every candidate of the generation has
        ``answered`` so far (None: it failed) and the searcher's selection ``cut`` (None when it has
        none). Called only between rounds, with every candidate's answers in, so the decisions depend
        on the answers alone: the same with one worker or many, and after a resume."""
        return [self.select(a) if on and a is not None else None for a, on in zip(answered, active)]

    def estimate(self, responses: Sequence[ItemResponses], raw: Mapping[str, float]) -> dict[str, float]:
        """Objectives from the responses; ``raw``: the worker's plain means (and custom functions'
        own values), kept for benchmarks the estimator does not estimate."""
        return dict(raw)

    def after_generation(self, phase: PhaseView, generation: int) -> Requests | None:
        """After ``generation`` is evaluated, before its tell is committed (so it must be idempotent:
        a run killed inside it redoes it on resume). An estimator that needs recipes scored (a drift
        check) returns a generator that yields ``ScoreRequest``s and receives their ``Scores``: the
        loop runs them, so the estimator never touches the pool."""
        return None

    def final_choice(self, phase: PhaseView) -> list[Evaluation]:
        """What the phase returns: the best candidate, or a spread of the Pareto front."""
        ok = phase.scored()
        if not ok:
            raise RuntimeError(f"no candidate of {phase.store.path} was evaluated successfully; see the errors there")
        return self.inputs.objectives.choose(ok)

    def full_fitness(self, phase: PhaseView, ev: Evaluation) -> float:
        """``ev``'s fitness on every fitness item, as far as the run knows it (an estimate otherwise)."""
        return float(ev.fitness) if ev.fitness is not None else float("nan")

    def report(self, phase: PhaseView, chosen: Evaluation) -> str:
        """The estimator's part of the phase's report (markdown; empty when there is nothing to say)."""
        return ""
