"""Running candidates on workers: in-process for one worker, Ray for more (``evomerge.distributed``).

The driver hands out tasks and gets results back as they finish, in any order; a pool decides where
they run. Both pools offer the same two calls, so the search loop does not know which it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Protocol

from evomerge.recipe import Recipe
from evomerge.worker import CandidateResult, Worker


@dataclass
class Task:
    recipe: Recipe
    item_ids: Mapping[str, Optional[list[str]]] | None = None
    which: str = "fitness"
    seed: int = 0


class Pool(Protocol):
    size: int

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every worker (e.g. to add a PS result to the DFS pool); their answers."""

    def run(self, tasks: list[Task]) -> Iterator[tuple[int, CandidateResult]]:
        """Evaluate ``tasks``, yielding (task index, result) as each finishes."""

    def utilization(self) -> dict[str, dict[str, float]]:
        """Per worker: busy seconds and wall seconds since the pool started."""

    def close(self) -> None: ...


@dataclass
class LocalPool:
    """One worker in this process: the default on a laptop, and what tests use."""

    worker_kwargs: dict[str, Any]
    worker: Worker = field(init=False)
    size: int = 1

    def __post_init__(self) -> None:
        import time

        self._t0 = time.perf_counter()
        self._busy = 0.0
        self.worker = Worker(**self.worker_kwargs)

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def run(self, tasks: list[Task]) -> Iterator[tuple[int, CandidateResult]]:
        import time

        for i, t in enumerate(tasks):
            start = time.perf_counter()
            result = self.worker.evaluate(t.recipe, t.item_ids, t.which, t.seed)
            self._busy += time.perf_counter() - start
            yield i, result

    def utilization(self) -> dict[str, dict[str, float]]:
        import time

        return {self.worker.name: {"busy_s": self._busy, "wall_s": time.perf_counter() - self._t0}}

    def close(self) -> None:
        pass
