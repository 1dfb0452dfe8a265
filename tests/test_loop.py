"""The search loop in-process (``evomerge.loop.Loop``) over a real ``LocalPool`` on the zoo: what it
asks, records and tells, exact resume at the budget, and an estimator's requests run by the loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from test_search import small_items

from evomerge.config import EstimatorSpec
from evomerge.estimators import EstimatorInputs, PhaseView, Requests, ScoreRequest
from evomerge.estimators.basic import FullFitness
from evomerge.loop import Loop, open_searcher
from evomerge.merge.config import MergeConfig
from evomerge.objectives import Objectives
from evomerge.recipe import Recipe, single_model
from evomerge.runstore import RunStore
from evomerge.searchers import make_searcher
from evomerge.workers import LocalPool


class TwoSlots(LocalPool):
    """Two tasks at a time, finished in the order submitted: a steady-state searcher's view of two workers."""

    def free_slots(self) -> int:
        return max(0, 2 - len(self._queue))


def unused(*_: Any) -> Any:
    raise AssertionError("the loop runs every evaluation; the estimator never calls back")


def setup(zoo, tmp: Path) -> tuple[dict[str, Any], dict[str, list[str]], Objectives]:
    items = small_items(zoo, tmp, n=12)
    benchmarks = {s: {"type": "items", "path": items[s]["fitness"], "name": s} for s in zoo.skills}
    kwargs = dict(models={"base": zoo.base, **zoo.experts}, base="base", base_dir=tmp,
                  benchmarks={"fitness": benchmarks, "test": {}}, device="cpu")
    ids = {s: [json.loads(line)["id"] for line in Path(items[s]["fitness"]).read_text().splitlines()]
           for s in zoo.skills}
    return kwargs, ids, Objectives(tuple(zoo.skills), tuple(1.0 for _ in zoo.skills))


def decode(experts: list[str]):
    def recipe(g: np.ndarray) -> tuple[Recipe, int]:
        merge = MergeConfig.model_validate({"merge_method": "linear", "models": [
            {"model": m, "parameters": {"weight": float(w)}} for m, w in zip(experts, g)]})
        return Recipe(merge=merge), 0
    return recipe


def inputs(ids: dict[str, list[str]], objectives: Objectives, tmp: Path) -> EstimatorInputs:
    return EstimatorInputs(EstimatorSpec(), 0, ids, objectives, unused, tmp, tmp, unused, say=lambda _: None)


def test_a_generational_loop_tells_whole_generations_and_resumes_at_its_budget(zoo, tmp_path):
    kwargs, ids, objectives = setup(zoo, tmp_path)
    experts = list(zoo.experts)
    store = RunStore(tmp_path / "run.sqlite")
    view = PhaseView(0, store, lambda ev: decode(experts)(np.asarray(ev.genome))[0])
    make = lambda: make_searcher("cmaes", np.full(len(experts), 0.1), np.ones(len(experts)),  # noqa: E731
                                 seed=0, popsize=4)
    searcher, gen = open_searcher(store, make)
    seen: list[int] = []
    loop = Loop(searcher, store, LocalPool(kwargs), decode(experts), FullFitness(inputs(ids, objectives, tmp_path)),
                view, objectives, 8, gen, seen.append)
    assert loop.run() == 2
    evs = store.evaluations()
    assert len(evs) == 8 and all(e.ok and e.generation in (0, 1) for e in evs)
    assert [(len(g.asked), g.told) for g in store.generations()] == [(4, True), (4, True)] and seen[-1] == 2
    assert loop.batches == [] and loop.ready == [] and loop.flying == {} and loop.candidates == {}
    # every objective is the plain mean over the benchmark's items
    for e in evs:
        assert all(len(r["item_ids"]) == len(ids[r["benchmark"]]) for r in e.responses)
        assert e.objectives == {r["benchmark"]: float(np.mean(r["scores"])) for r in e.responses}

    # opened again at its budget: the same searcher state, nothing asked or evaluated
    again, gen = open_searcher(store, make)
    assert gen == 2
    assert Loop(again, store, LocalPool(kwargs), decode(experts), FullFitness(inputs(ids, objectives, tmp_path)),
                view, objectives, 8, gen).run() == 2
    assert len(store.evaluations()) == 8


class Checking(FullFitness):
    """After each generation, asks for the base model on every item (as a drift check does)."""

    def __init__(self, inputs: EstimatorInputs) -> None:
        super().__init__(inputs)
        self.loop: Loop | None = None
        self.answers: list[tuple[int, dict[str, int], int]] = []

    def after_generation(self, phase: PhaseView, generation: int) -> Requests | None:
        return self.check(phase, generation)

    def check(self, phase: PhaseView, generation: int) -> Requests:
        assert self.loop is not None and not self.loop.flying  # the loop's candidates are recorded first
        recorded = len(phase.store.evaluations())
        answer = yield ScoreRequest({"base": single_model("base")})
        self.answers.append((generation, {b: len(v) for b, v in answer["base"].items()}, recorded))


def test_a_steady_state_loop_runs_the_estimators_requests_between_its_own_tasks(zoo, tmp_path):
    kwargs, ids, objectives = setup(zoo, tmp_path)
    experts = list(zoo.experts)
    store = RunStore(tmp_path / "run.sqlite")
    view = PhaseView(0, store, lambda ev: decode(experts)(np.asarray(ev.genome))[0])
    searcher = make_searcher("random", np.full(len(experts), 0.1), np.ones(len(experts)), seed=0)
    assert searcher.steady_state
    estimator = Checking(inputs(ids, objectives, tmp_path))
    loop = Loop(searcher, store, TwoSlots(kwargs), decode(experts), estimator, view, objectives, 5, 0)
    estimator.loop = loop
    assert loop.run() == 5
    assert len(store.evaluations()) == 5 and all(e.ok for e in store.evaluations())
    assert [g for g, _, _ in estimator.answers] == [0, 1, 2, 3, 4]  # one request per tell, in order
    assert all(n == {s: len(ids[s]) for s in zoo.skills} for _, n, _ in estimator.answers)
    # the first tell waited for the second candidate, in flight beside the first, to be recorded
    assert estimator.answers[0][2] == 2
