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
objectives; its ``after_generation`` hook (a drift check) runs before each commit. When that hook
needs recipes scored, it does not run them itself: it yields ``ScoreRequest``s, and the loop runs
them on the pool and sends the answers back. Such a tell first waits for the candidates still in
flight (a steady-state searcher's, on several workers) to be recorded, by the estimator they were
chosen by (a recalibration changes the anchor items); until the tell is done, nothing new is asked.

A racing estimator (``estimator.races``, generational searchers only) decides a whole generation's
rounds together: a round is sent for every candidate still in the race, and only when all its answers
are in does the estimator choose the next (``race``), against the searcher's selection cut (its places
and the incumbents that compete for them, with their kept answers). So its
decisions depend on the answers alone, never on which worker finished first. The state between
rounds (every candidate's answers so far) is saved in the run store's meta ``race``; a run killed in
the middle of a generation resumes from its last completed round, and its candidates are recorded
together, in the batch's order, once the race is settled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from evomerge.estimators import Cut, FitnessEstimator, PhaseView, Requests, ScoreRequest, Scores, Selection
from evomerge.evaluate.base import ItemResponses
from evomerge.objectives import Objectives
from evomerge.recipe import Recipe
from evomerge.run_folder import RACE
from evomerge.runstore import Evaluation, RunStore, genome_hash
from evomerge.searchers import Searcher
from evomerge.workers import CandidateResult, Pool, Task, run_tasks

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


    def to_json(self) -> dict[str, object]:
        """What a race saves between rounds (the genome and recipe are decoded again on resume)."""
        return {"responses": [r.to_json() for r in self.responses], "raw": self.raw, "seconds": self.seconds,
                "worker": self.worker, "error": self.error}

    def restore(self, saved: dict[str, Any]) -> None:
        self.responses = [ItemResponses.from_json(r) for r in saved["responses"]]
        self.raw, self.seconds = dict(saved["raw"]), float(saved["seconds"])
        self.worker, self.error = saved["worker"], saved["error"]


@dataclass(eq=False)  # a batch is itself: numpy genomes do not compare to a bool (``list.remove``)
class Batch:
    genomes: list[np.ndarray]
    waiting: set[str]  # hashes not yet recorded


@dataclass
class Telling:
    """A batch whose tell waits for the estimator's requests (a drift check's full evaluation): the
    steps left, and the request in flight (None while the loop's own candidates are still in flight;
    ticket -> recipe name; answers as they arrive)."""

    batch: Batch
    steps: Requests
    request: ScoreRequest | None = None
    tickets: dict[int, str] = field(default_factory=dict)
    answers: dict[str, CandidateResult] = field(default_factory=dict)


@dataclass
class Race:
    """A generation tested round by round together: its genomes (unique, in batch order) and the
    hashes of those with nothing more to score."""

    generation: int
    genomes: dict[str, np.ndarray]
    settled: set[str] = field(default_factory=set)


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


def request_tasks(request: ScoreRequest) -> dict[str, Task]:
    """The pool's tasks for an estimator's request, by recipe name."""
    items = dict(request.items) if request.items is not None else None
    return {n: Task(r, items, "fitness", 0) for n, r in request.recipes.items()}


def request_scores(request: ScoreRequest, results: Mapping[str, CandidateResult]) -> Scores:
    """The answer to ``request`` from its results (by recipe name), in the request's order; raises on a
    recipe that could not be scored (the evaluators score selected items in the order asked for, so
    the scores line up with ``request.items`` as they do with every item)."""
    out: Scores = {}
    for name in request.recipes:
        result = results[name]
        if not result.ok:
            raise RuntimeError(f"evaluating '{name}' on every fitness item failed: {result.error}")
        out[name] = {r.benchmark: r.scores for r in result.responses}
    return out


def run_request(pool: Pool, request: ScoreRequest) -> Scores:
    """Run ``request`` on a pool with nothing else in flight (outside the loop: calibration, the final
    choice)."""
    names = list(request.recipes)
    tasks = request_tasks(request)
    results = {names[i]: r for i, r in run_tasks(pool, [tasks[n] for n in names])}
    return request_scores(request, results)


class Loop:
    """One phase's search: ask -> submit -> record -> tell -> commit (see the module docstring), its
    state as attributes. ``run()`` goes on until ``budget`` candidates are in the store (a generational
    searcher finishes its last generation) and returns the index of the next generation."""

    def __init__(self, searcher: Searcher, store: RunStore, pool: Pool, decode: Decode,
                 estimator: FitnessEstimator, phase: PhaseView, objectives: Objectives, budget: int,
                 generation: int, on_progress: Callable[[int], None] = lambda generation: None):
        self.searcher, self.store, self.pool, self.decode = searcher, store, pool, decode
        self.estimator, self.phase, self.objectives, self.budget = estimator, phase, objectives, budget
        self.generation = generation  # the index of the next tell
        self.on_progress = on_progress
        self.batches: list[Batch] = []  # asked, not yet recorded
        self.ready: list[Batch] = []  # recorded, waiting for their tell, in order
        self.telling: Telling | None = None  # the tell waiting for its estimator's request
        self.flying: dict[int, str] = {}  # the loop's tickets -> genome hash
        self.candidates: dict[str, Candidate] = {}  # genome hash -> candidate in flight
        self.racing = estimator.races and not searcher.steady_state
        self.race: Race | None = None

    def run(self) -> int:
        while True:
            while self.room():
                self.ask()
            t = self.telling
            if t is not None and t.request is None and not self.flying:
                self.step(None)  # the loop's candidates are recorded: the estimator's first request
                continue
            if t is None and not self.flying:
                return self.generation
            done = self.pool.next_done()
            assert done is not None, "no timeout was given"
            if t is not None and done[0] in t.tickets:
                self.answer_request(*done)
            else:
                self.handle(*done)

    # -- asking ---------------------------------------------------------------------------------
    def room(self) -> bool:
        if self.telling is not None or self.ready:  # nothing new is asked before the last batch is told
            return False
        # at the budget, a batch recorded but never told (a run killed before its tell) is still asked
        # again and told, so the resumed run ends with the same tells as an uninterrupted one
        if self.store.count() + len(self.candidates) >= self.budget and not self.store.count_from(self.generation):
            return False
        return self.pool.free_slots() > 0 if self.searcher.steady_state else not self.batches

    def ask(self) -> None:
        """The searcher's next batch: genomes the store holds are looked up, the others submitted."""
        s = self.searcher
        batch = Batch(s.ask(1) if s.steady_state else s.ask(), set())
        for g in batch.genomes:
            h = genome_hash(g)
            if self.store.lookup(g) is not None:
                continue
            batch.waiting.add(h)
            if h not in self.candidates:
                recipe, seed = self.decode(g)
                self.candidates[h] = Candidate(g, recipe, seed)
                if not self.racing:
                    self.submit(h, self.estimator.select() or {})
        if not batch.waiting:  # every genome already recorded (a resumed run): told before anything new is asked
            self.ready.append(batch)
            self.tell_ready()
            return
        self.batches.append(batch)
        if self.racing:
            self.race = self.start_race(batch)

    def submit(self, h: str, items: Selection, later_round: bool = False) -> None:
        c = self.candidates[h]
        only = list(items) if later_round else None  # a later round scores only the benchmarks named
        self.flying[self.pool.submit(Task(c.recipe, items, "fitness", c.seed, only))] = h

    # -- results --------------------------------------------------------------------------------
    def handle(self, ticket: int, result: CandidateResult) -> None:
        """One of the loop's own results: the candidate's next round, or its record (and tell)."""
        h = self.flying.pop(ticket)
        c = self.candidates[h]
        c.add(result)
        if self.race is not None and h in self.race.genomes:
            if not any(f in self.race.genomes for f in self.flying.values()):
                self.race = self.next_round(self.race)
            return
        more = self.estimator.select(c.responses) if c.error is None else None
        if more:
            self.submit(h, more, later_round=True)
            return
        self.record(h)

    def record(self, h: str) -> None:
        self.store.record(to_evaluation(self.candidates.pop(h), self.generation, self.estimator, self.objectives))
        self.on_progress(self.generation)
        for b in self.batches:
            b.waiting.discard(h)
        for b in [b for b in self.batches if not b.waiting]:
            self.batches.remove(b)
            self.ready.append(b)
        self.tell_ready()

    # -- telling --------------------------------------------------------------------------------
    def tell_ready(self) -> None:
        """Tell the recorded batches in order. One whose estimator asks for evaluations waits for them
        (``telling``; the loop sends the first request once nothing of its own is in flight), and the
        batches after it wait too."""
        while self.telling is None and self.ready:
            batch = self.ready.pop(0)
            self.store.begin_generation(self.generation, batch.genomes)
            steps = self.estimator.after_generation(self.phase, self.generation)
            if steps is None:
                self.finish(batch)
            else:
                self.telling = Telling(batch, steps)

    def step(self, answer: Scores | None) -> None:
        """The waiting tell's estimator gets ``answer`` (None: its start) and asks for the next
        request, which goes to the pool; with none left, the tell."""
        t = self.telling
        assert t is not None
        while True:
            try:
                request = t.steps.send(answer)  # type: ignore[arg-type]  # None starts the generator
            except StopIteration:
                break
            if request.recipes:
                t.request, t.answers = request, {}
                t.tickets = {self.pool.submit(task): n for n, task in request_tasks(request).items()}
                return
            answer = {}
        self.telling = None
        self.finish(t.batch)
        self.tell_ready()

    def answer_request(self, ticket: int, result: CandidateResult) -> None:
        """A result for the waiting tell's request; the last one sends the answer back."""
        t = self.telling
        assert t is not None and t.request is not None
        t.answers[t.tickets[ticket]] = result
        if len(t.answers) == len(t.tickets):
            self.step(request_scores(t.request, t.answers))

    def finish(self, batch: Batch) -> None:
        """The tell of a recorded batch, committed with the searcher's state."""
        values = np.array([self.objectives.search_values(_recorded(self.store, g)) for g in batch.genomes])
        self.searcher.tell(batch.genomes, values)
        self.store.commit_tell(self.generation, self.searcher.state_dict(), *best_summary(self.searcher))
        self.generation += 1
        self.on_progress(self.generation)

    # -- racing ---------------------------------------------------------------------------------
    def start_race(self, batch: Batch) -> Race | None:
        r = Race(self.generation, {genome_hash(g): g for g in batch.genomes})
        saved = self.store.get_meta(RACE) or {}
        if saved.get("generation") == self.generation and batch.waiting <= set(saved.get("candidates", {})):
            for h in batch.waiting:  # resumed in the middle of this generation's race
                self.candidates[h].restore(saved["candidates"][h])
            r.settled = set(saved["settled"]) & batch.waiting
            return self.next_round(r)
        for h in batch.waiting:
            self.submit(h, self.estimator.select() or {})
        return r

    def next_round(self, r: Race) -> Race | None:
        """Between two rounds: the estimator's decisions for every candidate; the settled race is
        recorded (None returned) once nobody needs more."""
        candidates = self.candidates
        answered: list[Sequence[ItemResponses] | None] = []
        active: list[bool] = []
        for h, g in r.genomes.items():
            c = candidates.get(h)
            ev = self.store.lookup(g) if c is None else None
            if c is not None and c.error is None:
                answered.append(c.responses)
            elif ev is not None and ev.ok:
                answered.append([ItemResponses.from_json(x) for x in ev.responses or []])
            else:
                answered.append(None)
            active.append(c is not None and c.error is None and h not in r.settled)
        decisions = self.estimator.race(answered, active, selection_cut(self.searcher, self.store, r.genomes))
        more = {h: d for (h, on, d) in zip(r.genomes, active, decisions) if on and d is not None}
        r.settled |= {h for h in r.genomes if h in candidates and h not in more}
        self.store.set_meta(RACE, {"generation": r.generation, "settled": sorted(r.settled),
                                     "candidates": {h: candidates[h].to_json() for h in r.genomes
                                                    if h in candidates}})
        for h, d in more.items():
            self.submit(h, d, later_round=True)
        if more:
            return r
        for h in r.genomes:
            if h in candidates:
                self.record(h)
        return None


def search(searcher: Searcher, store: RunStore, pool: Pool, decode: Decode, estimator: FitnessEstimator,
           phase: PhaseView, objectives: Objectives, budget: int, generation: int,
           on_progress: Callable[[int], None] = lambda generation: None) -> int:
    """Run the loop until ``budget`` candidates are in the store (a generational searcher finishes
    its last generation); returns the index of the next generation."""
    return Loop(searcher, store, pool, decode, estimator, phase, objectives, budget, generation, on_progress).run()


def selection_cut(searcher: Searcher, store: RunStore, racing: Mapping[str, np.ndarray]) -> Cut | None:
    """The searcher's cut for the generation ``racing``: its places and the incumbents' kept answers
    (None: no cut, or an incumbent the store does not hold, so nothing is raced)."""
    keep = searcher.selection_size
    if keep is None:
        return None
    incumbents: list[list[ItemResponses] | None] = []
    for g in searcher.incumbents:
        if genome_hash(g) in racing:
            continue
        ev = store.lookup(g)
        if ev is None:
            return None
        incumbents.append([ItemResponses.from_json(x) for x in ev.responses or []] if ev.ok else None)
    return Cut(keep, incumbents)


def _recorded(store: RunStore, genome: np.ndarray) -> Evaluation:
    ev = store.lookup(genome)
    if ev is None:  # the loop records every genome of a batch before telling it
        raise RuntimeError(f"genome {genome_hash(genome)[:12]} was told without a recorded evaluation")
    return ev
