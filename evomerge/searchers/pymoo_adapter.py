"""Any pymoo algorithm through ask/tell: ``nsga2`` and ``pymoo:<ClassName>``.

pymoo's own ask/tell: ``algorithm.setup(problem, termination=NoTermination(), seed=...)``,
``pop = algorithm.ask()``, evaluate outside, ``algorithm.evaluator.eval(StaticProblem(problem, F=F),
pop)``, ``algorithm.tell(infills=pop)``. pymoo (0.6.2) draws from a ``np.random.Generator`` that it
keeps on the algorithm, so (dill-)pickling the algorithm saves its RNG; a few algorithms keep part of
their state in a Python generator, which no pickle can save: those are refused up front.

Only the individuals of ``pop`` that pymoo has not evaluated yet are asked (local searches re-send
their current point), and their X is clipped into the box before anyone sees it, so what pymoo keeps
is exactly what was evaluated.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from typing import Any, Mapping

import numpy as np
from pymoo.core.algorithm import Algorithm
from pymoo.core.individual import Individual
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.termination import NoTermination
from pymoo.operators.sampling.rnd import FloatRandomSampling
from pymoo.problems.static import StaticProblem

from evomerge.searchers.base import Searcher, check_options, unique_points
from evomerge.searchers.state import GlobalRNG

# Found by saving after k tells and comparing with an uninterrupted run (pymoo 0.6.2).
NOT_RESUMABLE = {
    "CMAES": "keeps the CMA-ES loop in a Python generator that pickling drops; use 'cmaes'",
    "BIPOPCMAES": "keeps the CMA-ES loop in a Python generator that pickling drops; use 'cmaes'",
    "SimpleCMAES": "its `cma` engine does not continue bit-identically after a reload; use 'cmaes'",
    "PatternSearch": "keeps its state in a Python generator, which cannot be pickled",
    "G3PCX": "keeps its state in a Python generator, which cannot be pickled",
}
# Options that belong to the driver, not to the user.
RESERVED = {"seed", "termination", "evaluator", "display", "callback", "verbose", "save_history", "output",
            "archive", "return_least_infeasible", "progress"}
SUGGESTED = ["NSGA2", "NSGA3", "UNSGA3", "MOEAD", "SMSEMOA", "SPEA2", "GA", "DE", "PSO", "ES", "NelderMead"]


def algorithm_classes() -> dict[str, type]:
    """pymoo's algorithm classes by name (single- and multi-objective), importing their modules on demand."""
    from pymoo.algorithms import moo
    from pymoo.algorithms.soo import nonconvex

    found: dict[str, type] = {}
    for pkg in (nonconvex, moo):
        for info in pkgutil.iter_modules(pkg.__path__):
            try:
                mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
            except Exception:  # noqa: BLE001 - pymoo raises a bare Exception when optuna / numba is missing
                continue
            for name, obj in vars(mod).items():
                if inspect.isclass(obj) and issubclass(obj, Algorithm) and obj.__module__ == mod.__name__:
                    found.setdefault(name, obj)
    return found


def resolve_algorithm(name: str) -> type:
    """The pymoo class named ``name``; a clear error, with close and common names, otherwise."""
    classes = algorithm_classes()
    if name not in classes:
        close = difflib.get_close_matches(name, classes, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join('pymoo:' + c for c in close)}?" if close else ""
        raise ValueError(f"pymoo has no algorithm {name!r}.{hint} Valid names include: "
                         f"{', '.join('pymoo:' + s for s in SUGGESTED if s in classes)}")
    if name in NOT_RESUMABLE:
        raise ValueError(f"pymoo:{name} cannot be saved and resumed exactly: it {NOT_RESUMABLE[name]}")
    return classes[name]


def algorithm_name(searcher: str) -> str:
    """The pymoo class a searcher name stands for: ``nsga2`` or ``pymoo:<ClassName>``."""
    return "NSGA2" if searcher == "nsga2" else searcher.split(":", 1)[1]


def accepted_options(cls: type) -> dict[str, str]:
    """Constructor arguments along the class hierarchy (pymoo swallows unknown ones silently)."""
    names: dict[str, str] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in RESERVED:
                continue
            names.setdefault(p.name, f"{klass.__name__} argument")
    names["ref_dirs"] = "reference directions: a list of lists, or {'method': 'das-dennis', 'n_partitions': 12}"
    return names


class BoxProblem(Problem):
    """The box only: objectives always come from outside, through StaticProblem."""

    def __init__(self, lower: np.ndarray, upper: np.ndarray, n_obj: int) -> None:
        super().__init__(n_var=lower.size, n_obj=n_obj, xl=lower.copy(), xu=upper.copy())

    def _evaluate(self, x, out, *args, **kwargs):
        raise RuntimeError("evomerge evaluates candidates outside pymoo; this problem is never evaluated directly")


class X0Sampling(FloatRandomSampling):
    """Uniform in the box, except that the first points are given: x0 (the searcher's starting
    genome) and any initial genomes (e.g. the source models), as many as the population holds."""

    def __init__(self, points: np.ndarray) -> None:
        super().__init__()
        self.points = np.atleast_2d(np.array(points, dtype=np.float64))

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        X = super()._do(problem, n_samples, *args, random_state=random_state, **kwargs)
        k = min(len(self.points), n_samples)
        X[:k] = self.points[:k]
        return X


class PymooSearcher(Searcher):
    """Generational: one ask() is one batch of pymoo infills."""

    steady_state = False
    multi_objective = True
    takes_starts = True

    @property
    def algorithm_name(self) -> str:
        return algorithm_name(self.spec.name)

    @classmethod
    def several_objectives(cls, name: str, options: Mapping[str, Any]) -> bool:
        """A pymoo.algorithms.moo algorithm (NSGA-II, NSGA-III, SMS-EMOA...) searches a Pareto front."""
        return resolve_algorithm(algorithm_name(name)).__module__.startswith("pymoo.algorithms.moo")

    def _start(self) -> None:
        cls = resolve_algorithm(self.algorithm_name)
        if self.spec.n_obj > 1 and cls.__module__.startswith("pymoo.algorithms.soo"):
            raise ValueError(f"{self.spec.name} is a single-objective algorithm, got n_obj={self.spec.n_obj}; "
                             f"use nsga2 or another pymoo.algorithms.moo algorithm (e.g. pymoo:NSGA3, pymoo:SMSEMOA)")
        kwargs = dict(self.spec.options)
        params = accepted_options(cls)
        check_options(self.spec.name, kwargs, params)
        if "ref_dirs" in kwargs or _requires(cls, "ref_dirs"):
            kwargs["ref_dirs"] = _ref_dirs(kwargs.get("ref_dirs"), self.spec.n_obj)
        points = unique_points(([self.spec.x0] if self.spec.x0 is not None else []) + list(self.spec.starts))
        if points:
            if "sampling" not in params:
                raise ValueError(f"{self.spec.name} takes no initial population, so neither x0 nor starting "
                                 f"genomes can be used: pass x0=None and no start_from_sources")
            kwargs["sampling"] = X0Sampling(np.array(points))
        self._rng = GlobalRNG(self.spec.seed)
        with self._rng.active():
            self._algo = cls(**kwargs)
            self._algo.setup(BoxProblem(self.spec.lower, self.spec.upper, self.spec.n_obj),
                             termination=NoTermination(), seed=self.spec.seed, verbose=False)
        self._infill = None  # what pymoo's ask() returned, still to be told
        self._todo: list[int] = []  # indices of its individuals that were asked

    @property
    def selection_size(self) -> int | None:
        """NSGA-II keeps ``pop_size`` of its population and the offspring by rank and crowding; other
        algorithms' survival (reference directions, indicators) is left unraced."""
        if type(self._algo).__name__ != "NSGA2":
            return None
        return int(self._algo.pop_size)

    @property
    def incumbents(self) -> list[np.ndarray]:
        pop = self._algo.pop if self.selection_size is not None else None
        return [] if pop is None or len(pop) == 0 else [np.asarray(x, dtype=np.float64) for x in pop.get("X")]

    def _ask(self, n: int | None) -> list[np.ndarray]:
        for _ in range(100):
            with self._rng.active():
                got = self._algo.ask()
            if got is None:
                raise RuntimeError(f"{self.spec.name}: pymoo returned no infill (the algorithm has stopped)")
            pop = Population.create(got) if isinstance(got, Individual) else got
            todo = [i for i, ind in enumerate(pop) if "F" not in ind.evaluated]
            if todo:
                X = np.clip(pop[todo].get("X").astype(np.float64), self.spec.lower, self.spec.upper)
                pop[todo].set("X", X)
                self._infill, self._todo = got, todo
                return list(X)
            with self._rng.active():  # nothing new to evaluate (all duplicates): let pymoo move on
                self._algo.evaluator.eval(StaticProblem(self._algo.problem), pop)
                self._algo.tell(infills=got)
        raise RuntimeError(f"{self.spec.name}: pymoo proposed nothing new 100 times in a row")

    def _tell(self, positions: list[int], losses: np.ndarray) -> None:
        F = np.empty((len(self._todo), self.spec.n_obj))
        F[positions] = losses
        got = self._infill
        pop = Population.create(got) if isinstance(got, Individual) else got
        with self._rng.active():
            self._algo.evaluator.eval(StaticProblem(self._algo.problem, F=F), pop)
            self._algo.tell(infills=got)
        self._infill, self._todo = None, []

    def _dump(self) -> tuple[dict[str, Any], bytes]:
        import dill

        try:
            payload = dill.dumps((self._algo, self._infill, self._todo))
        except Exception as e:  # noqa: BLE001 - any pickling failure means the same thing here
            raise RuntimeError(f"{self.spec.name}: pymoo's algorithm cannot be saved ({type(e).__name__}: {e}); "
                               f"choose another algorithm for a resumable run") from e
        return {"global_rng": self._rng.to_json()}, payload

    def _load(self, meta: dict[str, Any], payload: bytes) -> None:
        import dill

        self._algo, self._infill, self._todo = dill.loads(payload)
        self._rng = GlobalRNG.from_json(meta["global_rng"])


def _requires(cls: type, arg: str) -> bool:
    """Whether the constructor has ``arg`` without a default (NSGA3 and kin need ref_dirs)."""
    p = inspect.signature(cls).parameters.get(arg)
    return p is not None and p.default is inspect.Parameter.empty


def _ref_dirs(value: Any, n_obj: int) -> np.ndarray:
    """Reference directions from an option value (JSON) or a default Das-Dennis lattice."""
    from pymoo.util.ref_dirs import get_reference_directions

    if value is None:
        value = {"method": "das-dennis", "n_partitions": 12 if n_obj <= 3 else 4}
    if isinstance(value, dict):
        value = dict(value)
        method = value.pop("method", "das-dennis")
        return get_reference_directions(method, n_obj, **value)
    dirs = np.asarray(value, dtype=np.float64)
    if dirs.ndim != 2 or dirs.shape[1] != n_obj:
        raise ValueError(f"ref_dirs must be a list of {n_obj}-element lists, got shape {dirs.shape}")
    return dirs
