"""The search loop: ask -> submit -> record -> tell -> commit, one code path for every searcher and pool.

A *batch* is what one ``ask`` returns: a whole generation for a generational searcher (CMA-ES,
pymoo), one genome for a steady-state one (nevergrad, random). Genomes the run store already holds
are not evaluated again; the others go to the pool, which runs them on one worker or many and hands
results back in any order. Each result is recorded in the run store as it arrives. A batch whose
genomes are all recorded is told at once and committed as the next generation, with the searcher's
state, in one transaction: so a run killed at any instant resumes by restoring the last committed
state, whose ``ask`` hands out the same genomes again; those recorded before the kill are looked up,
only those in flight are evaluated again, and the run continues on the same trajectory.

Generational searchers get the next batch once the last one is told; steady-state ones whenever a
worker has room, so no worker waits for the slowest candidate of a generation. The estimator says
which items each candidate is scored on (in one or more rounds) and turns responses into
objectives; its ``after_generation`` hook (a drift check) runs before each commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from evomerge.estimators import FitnessEstimator, PhaseView, Selection
from evomerge.evaluate.base import ItemResponses
from evomerge.objectives import Objectives
from evomerge.recipe import Recipe
from evomerge.runstore import Evaluation, RunStore, genome_hash
from evomerge.searchers import Searcher
from evomerge.workers import CandidateResult, Pool, Task

#: genome -> (its recipe, its seed for randomized merges)
Decode = Callable[[np.ndarray], tuple[Recipe, int]]


@dataclass
class Candidate:
    """A genome in flight: what its evaluation rounds have gathered so far."""

    genome: np.ndarray
    recipe: Recipe
    seed: int
    responses: list[ItemResponses] = field(default_factory=list)
    raw: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    error: str | None = None

    def add(self, result: CandidateResult) -> None:
        self.responses += result.responses
        self.raw.update(result.objectives)
        self.seconds += result.merge_seconds + result.eval_seconds
        self.worker = result.worker
        self.error = result.error


@dataclass
class Batch:
    genomes: list[np.ndarray]
    waiting: set[str]  # hashes not yet recorded


def open_searcher(store: RunStore, make: Callable[[], Searcher]) -> tuple[Searcher, int]:
    """The searcher as of the last committed tell and the index of the next generation (a fresh
    searcher from ``make`` and 0 when the store holds no tell yet)."""
    last = store.last_state()
    if last is None:
        return make(), 0
    index, blob = last
    return Searcher.from_state(blob), index + 1


def best_summary(searcher: Searcher) -> tuple[list[float] | None, str | None]:
    """What a generation's record keeps as "best so far": the best values and genome hash (one
    objective), or the per-objective maxima over the Pareto front (several; no single genome)."""
    front = searcher.pareto_front()
    if not front:
        return None, None
    if searcher.n_obj == 1:
        g, f = front[0]
        return f.tolist(), genome_hash(g)
    return np.max(np.stack([f for _, f in front]), axis=0).tolist(), None


def to_evaluation(c: Candidate, generation: int, estimator: FitnessEstimator, objectives: Objectives) -> Evaluation:
    """A finished candidate as the run store keeps it: objectives estimated from its responses, the
    scalar fitness, and a failure when an objective is missing."""
    obj = estimator.estimate(c.responses, c.raw) if c.error is None else {}
    error = c.error
    missing = [n for n in objectives.names if n not in obj]
    if error is None and missing:
        error = (f"the fitness returned {sorted(obj)} but the experiment's objectives are "
                 f"{list(objectives.names)}: name a custom function's values with `outputs:`")
    return Evaluation.of(genome=c.genome, recipe=c.recipe.to_text(), objectives=obj, fitness=objectives.fitness(obj),
                         responses=[r.to_json() for r in c.responses], seconds=c.seconds, worker=c.worker,
                         error=error, generation=generation, seed=c.seed)


def search(searcher: Searcher, store: RunStore, pool: Pool, decode: Decode, estimator: FitnessEstimator,
           phase: PhaseView, objectives: Objectives, budget: int, generation: int,
           on_progress: Callable[[int], None] = lambda generation: None) -> int:
    """Run the loop until ``budget`` candidates are in the store (a generational searcher finishes
    its last generation); returns the index of the next generation."""
    batches: list[Batch] = []
    flying: dict[int, str] = {}  # ticket -> genome hash
    candidates: dict[str, Candidate] = {}  # genome hash -> candidate in flight

    def submit(h: str, items: Selection, later_round: bool = False) -> None:
        c = candidates[h]
        only = list(items) if later_round else None  # a later round scores only the benchmarks named
        flying[pool.submit(Task(c.recipe, items, "fitness", c.seed, only))] = h

    def tell(batch: Batch) -> None:
        nonlocal generation
        store.begin_generation(generation, batch.genomes)
        estimator.after_generation(phase, generation)
        values = np.array([objectives.search_values(_recorded(store, g)) for g in batch.genomes])
        searcher.tell(batch.genomes, values)
        store.commit_tell(generation, searcher.state_dict(), *best_summary(searcher))
        generation += 1
        on_progress(generation)

    def room() -> bool:
        # at the budget, a batch recorded but never told (a run killed before its tell) is still asked
        # again and told, so the resumed run ends with the same tells as an uninterrupted one
        if store.count() + len(candidates) >= budget and not store.count_from(generation):
            return False
        return pool.free_slots() > 0 if searcher.steady_state else not batches

    while True:
        while room():
            batch = Batch(searcher.ask(1) if searcher.steady_state else searcher.ask(), set())
            for g in batch.genomes:
                h = genome_hash(g)
                if store.lookup(g) is not None:
                    continue
                batch.waiting.add(h)
                if h not in candidates:
                    recipe, seed = decode(g)
                    candidates[h] = Candidate(g, recipe, seed)
                    submit(h, estimator.select() or {})
            if batch.waiting:
                batches.append(batch)
            else:  # every genome already recorded (a resumed run): told before anything new is asked
                tell(batch)
        if not flying:
            return generation
        done = pool.next_done()
        assert done is not None, "no timeout was given"
        ticket, result = done
        h = flying.pop(ticket)
        c = candidates[h]
        c.add(result)
        more = estimator.select(c.responses) if c.error is None else None
        if more:
            submit(h, more, later_round=True)
            continue
        store.record(to_evaluation(candidates.pop(h), generation, estimator, objectives))
        on_progress(generation)
        for b in batches:
            b.waiting.discard(h)
        for b in [b for b in batches if not b.waiting]:
            batches.remove(b)
            tell(b)


def _recorded(store: RunStore, genome: np.ndarray) -> Evaluation:
    ev = store.lookup(genome)
    if ev is None:  # the loop records every genome of a batch before telling it
        raise RuntimeError(f"genome {genome_hash(genome)[:12]} was told without a recorded evaluation")
    return ev
