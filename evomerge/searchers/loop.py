"""The resumable ask/tell step over a RunStore: the pattern the `evomerge search` loop follows.

    searcher, index = open_searcher(store, lambda: make_searcher(...))
    while index < n_generations:
        step(searcher, store, index, evaluate)
        index += 1

Kill the process at any instant and run the same lines again: `open_searcher` restores the searcher
saved with the last committed tell, the re-ask yields the same genomes, the ones already recorded
are looked up instead of evaluated, and the run ends exactly where an uninterrupted one would.
The real loop (Ray workers, retries, estimators) lives elsewhere; these are its building blocks.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from evomerge.runstore import Evaluation, RunStore, genome_hash
from evomerge.searchers.base import Searcher

Evaluate = Callable[[list[np.ndarray], int], Iterable[Evaluation]]


def open_searcher(store: RunStore, make: Callable[[], Searcher]) -> tuple[Searcher, int]:
    """The searcher as of the last committed tell and the index of the next generation
    (a fresh searcher from ``make`` and 0 when the store holds no tell yet)."""
    last = store.last_state()
    if last is None:
        return make(), 0
    index, blob = last
    return Searcher.from_state(blob), index + 1


def evaluate_missing(store: RunStore, genomes: Sequence[np.ndarray], evaluate: Evaluate,
                     generation: int) -> list[Evaluation]:
    """The evaluations of ``genomes`` (in their order), evaluating only distinct genomes the store lacks.

    ``evaluate(genomes, generation)`` may yield results one by one: each is recorded as it arrives,
    so a kill loses at most the evaluations in flight.
    """
    todo: dict[str, np.ndarray] = {}
    for g in genomes:
        h = genome_hash(g)
        if h not in todo and store.lookup(g) is None:
            todo[h] = np.asarray(g, dtype=np.float64)
    if todo:
        for ev in evaluate(list(todo.values()), generation):
            store.record(ev)
    results = []
    for g in genomes:
        ev = store.lookup(g)
        if ev is None:
            raise RuntimeError(f"generation {generation}: evaluate() returned no result for genome "
                               f"{genome_hash(g)[:12]}")
        results.append(ev)
    return results


def objectives_matrix(evaluations: Sequence[Evaluation], n_obj: int,
                      names: Sequence[str] | None = None) -> np.ndarray:
    """(len, n_obj) objectives to tell; a failed evaluation becomes a row of NaN.

    Named objectives are taken in the order of ``names`` (in their stored order without it)."""
    out = np.full((len(evaluations), n_obj), np.nan)
    for i, ev in enumerate(evaluations):
        if not ev.ok:
            continue
        obj = ev.objectives
        if isinstance(obj, dict):
            obj = np.array([obj[n] for n in names] if names is not None else list(obj.values()), dtype=np.float64)
        if obj is None or obj.shape != (n_obj,):
            raise ValueError(f"evaluation {ev.hash[:12]} has objectives {ev.objectives}, expected {n_obj} values")
        out[i] = obj
    return out


def best_summary(searcher: Searcher) -> tuple[list[float] | None, str | None]:
    """What `RunStore.commit_tell` keeps as "best so far": the best objectives and genome hash
    (one objective), or the per-objective maxima over the Pareto front (several; no single genome)."""
    front = searcher.pareto_front()
    if not front:
        return None, None
    if searcher.n_obj == 1:
        g, f = front[0]
        return f.tolist(), genome_hash(g)
    return np.max(np.stack([f for _, f in front]), axis=0).tolist(), None


def step(searcher: Searcher, store: RunStore, index: int, evaluate: Evaluate) -> list[Evaluation]:
    """One generation: ask, note it, evaluate what is missing, tell, commit the state with the tell."""
    genomes = searcher.ask()
    store.begin_generation(index, genomes)
    results = evaluate_missing(store, genomes, evaluate, index)
    searcher.tell(genomes, objectives_matrix(results, searcher.n_obj))
    best, best_hash = best_summary(searcher)
    store.commit_tell(index, searcher.state_dict(), best, best_hash)
    return results
