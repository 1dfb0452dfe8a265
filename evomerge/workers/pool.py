"""Running candidates on workers: the ``Pool`` protocol, and the in-process pool of one worker.

The search loop hands out tasks and gets results back as they finish, in any order; a pool decides
where they run. Every pool offers the same calls (``submit`` / ``next_done`` / ``free_slots`` for
the loop, ``broadcast`` for calls on every worker), so the loop does not know whether it has one
worker in this process (``LocalPool``) or Ray actors over a cluster (``evomerge.workers.ray_pool``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence

from evomerge.recipe import Recipe
from evomerge.workers.worker import CandidateResult, Worker


@dataclass
class Task:
    """One evaluation: a recipe, the items to score per benchmark (None: all), the benchmark set
    ("fitness" or "test"), the candidate's seed (DARE masks), and optionally which benchmarks of the
    set to run (a later round of an adaptive estimator)."""

    recipe: Recipe
    item_ids: Mapping[str, Optional[list[str]]] | None = None
    which: str = "fitness"
    seed: int = 0
    benchmarks: Optional[list[str]] = None  # only these benchmarks of the set (None: all)


class Pool(Protocol):
    """What the search loop and the estimators need from a set of workers."""

    @property
    def size(self) -> int:
        """Workers alive."""

    def submit(self, task: Task) -> int:
        """Queue ``task``; returns its ticket. It starts as soon as a worker has room."""

    def next_done(self, timeout: Optional[float] = None) -> Optional[tuple[int, CandidateResult]]:
        """The next (ticket, result) to finish, waiting for it (None if ``timeout`` seconds pass first);
        each ticket comes back exactly once."""

    def free_slots(self) -> int:
        """Tasks that would start at once if submitted now (0 when submitting would only queue)."""

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call a ``Worker`` method on every worker (e.g. to add a PS result to the DFS pool); their answers."""

    def utilization(self) -> dict[str, dict[str, float]]:
        """Per worker: busy seconds and wall seconds since the pool started."""

    def close(self) -> None: ...


def run_tasks(pool: Pool, tasks: Sequence[Task]) -> Iterator[tuple[int, CandidateResult]]:
    """Evaluate ``tasks`` on ``pool``, yielding (index in ``tasks``, result) as each finishes.

    Only for a pool that has nothing else in flight (the loop's own tasks are never mixed in)."""
    index = {pool.submit(t): i for i, t in enumerate(tasks)}
    for _ in range(len(index)):
        done = pool.next_done()
        assert done is not None, "no timeout was given"
        yield index[done[0]], done[1]


class LocalPool:
    """One worker in this process: the default on a laptop, and what tests use.

    ``submit`` only queues; ``next_done`` runs the oldest queued task. One slot: a task runs at a
    time, so ``free_slots`` is 1 while nothing is queued."""

    def __init__(self, worker_kwargs: Mapping[str, Any]):
        self._t0 = time.perf_counter()
        self._busy = 0.0
        self._queue: deque[tuple[int, Task]] = deque()
        self._next_ticket = 0
        self.worker = Worker(**worker_kwargs)

    @property
    def size(self) -> int:
        return 1

    def submit(self, task: Task) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._queue.append((ticket, task))
        return ticket

    def next_done(self, timeout: Optional[float] = None) -> Optional[tuple[int, CandidateResult]]:
        """Runs the oldest queued task now (``timeout`` does not apply: the work happens in this call)."""
        if not self._queue:
            raise LookupError("next_done(): no task is pending; submit() one first")
        ticket, t = self._queue.popleft()
        start = time.perf_counter()
        result = self.worker.evaluate(t.recipe, t.item_ids, t.which, t.seed, t.benchmarks)
        self._busy += time.perf_counter() - start
        return ticket, result

    def free_slots(self) -> int:
        return 0 if self._queue else 1

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[int, CandidateResult]]:
        return run_tasks(self, tasks)

    def utilization(self) -> dict[str, dict[str, float]]:
        return {self.worker.name: {"busy_s": self._busy, "wall_s": time.perf_counter() - self._t0}}

    def close(self) -> None:
        pass
