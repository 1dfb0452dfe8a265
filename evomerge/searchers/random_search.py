"""Uniform random search in the box: the baseline every other searcher must beat.

Steady state (order of tells does not matter to it). If x0 is given it is the first genome asked,
so the baseline includes the starting point the other searchers start from; the starting genomes
(``starts``: sources, hand recipes) come next, then uniform draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.searchers.base import Searcher, check_options, is_int, unique_points

OPTIONS = {"popsize": "genomes returned by one ask() when no n is given (default 8)"}


class RandomSearcher(Searcher):
    steady_state = True
    multi_objective = True
    takes_starts = True

    def _start(self) -> None:
        check_options("random", self.spec.options, OPTIONS)
        popsize = self.spec.options.get("popsize", 8)
        if not is_int(popsize) or popsize < 1:
            raise ValueError(f"random: popsize must be an integer >= 1, got {popsize!r}")
        self._rng = np.random.Generator(np.random.PCG64(self.spec.seed))
        self._x0_due = self.spec.x0 is not None
        self._next_start = 0  # how many of _starts() were asked

    def _default_batch(self) -> int:
        return int(self.spec.options.get("popsize", 8))

    def _ask(self, n: int | None) -> list[np.ndarray]:
        assert n is not None
        out: list[np.ndarray] = []
        if self._x0_due and self.spec.x0 is not None:
            out.append(self.spec.x0.copy())
            self._x0_due = False
        starts = self._starts()
        while len(out) < n and self._next_start < len(starts):
            out.append(starts[self._next_start].copy())
            self._next_start += 1
        if n > len(out):
            draws = self._rng.uniform(self.spec.lower, self.spec.upper, size=(n - len(out), self.spec.dim))
            out.extend(draws)
        return out

    def _starts(self) -> list[np.ndarray]:
        x0 = self.spec.x0
        return [s for s in unique_points(self.spec.starts) if x0 is None or not np.array_equal(s, x0)]

    def _tell(self, positions: list[int], losses: np.ndarray) -> None:
        """Random search learns nothing; the base class keeps the best / front."""

    def _dump(self) -> tuple[dict[str, Any], bytes]:
        return {"bit_generator": self._rng.bit_generator.state, "x0_due": self._x0_due,
                "next_start": self._next_start}, b""

    def _load(self, meta: dict[str, Any], payload: bytes) -> None:
        bg = np.random.PCG64()
        bg.state = meta["bit_generator"]
        self._rng = np.random.Generator(bg)
        self._x0_due = bool(meta["x0_due"])
        self._next_start = int(meta.get("next_start", 0))
