"""Any nevergrad optimizer through ask/tell: ``nevergrad:<Name>`` (NGOpt, TwoPointsDE, CMA, ...).

Built as ``registry[name](parametrization=ng.p.Array(init=x0).set_bounds(lower, upper), budget=...,
num_workers=...)``; ``opt.ask()`` / ``opt.tell(candidate, loss)``, several losses for several
objectives. nevergrad accepts tells in any order, so this searcher is steady state.

Saving. The optimizer is pickled together with the pending candidates (the `Parameter` objects it
handed out), in one pickle so that they stay the same objects the optimizer waits for. Their RNG is
the parametrization's ``RandomState`` (seeded here, pickled with it); several nevergrad optimizers
also draw from numpy's global RNG, which is swapped for a private one around every call
(`GlobalRNG`) and saved too. After `from_state`, the pending candidates are handed out again by
``ask()``, first and in their original order, and told as the very same candidates.

Refused up front, because they would fail later in a run:
- scipy-based optimizers that nevergrad runs in a thread (Cobyla, SQP, ...; NGOpt picks Cobyla for
  one worker in many settings): they cannot be pickled, and nevergrad's replay-on-load does not give
  back the same points. Use num_workers > 1, or another optimizer.
- meta-model optimizers when numpy refuses ``float()`` of a one-element array (numpy >= 2.4):
  nevergrad 1.0.12 does exactly that in its meta-model and crashes after ~dozens of tells.
"""

from __future__ import annotations

import difflib
import pickle
from typing import Any, Iterator

import numpy as np

from evomerge.searchers.base import Searcher, check_options, is_int, unique_points
from evomerge.searchers.state import GlobalRNG

OPTIONS = {
    "budget": "number of evaluations planned (required: nevergrad tunes and chooses its algorithm from it)",
    "num_workers": "evaluations run in parallel (default 1); also the default number of genomes per ask()",
}
SUGGESTED = ["NGOpt", "TwoPointsDE", "CMA", "DE", "PSO", "OnePlusOne", "DiagonalCMA", "RandomSearch"]


def resolve_optimizer(name: str):
    import nevergrad as ng

    registry = ng.optimizers.registry
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join('nevergrad:' + c for c in close)}?" if close else ""
        raise ValueError(f"nevergrad has no optimizer {name!r}.{hint} Valid names include: "
                         f"{', '.join('nevergrad:' + s for s in SUGGESTED)}")
    return registry[name]


def _walk(opt, seen: set[int] | None = None) -> Iterator[Any]:
    """The optimizer and every optimizer nested in it (NGOpt's choice, portfolios, chains)."""
    from nevergrad.optimization import base
    from nevergrad.optimization.optimizerlib import NGOptBase

    seen = set() if seen is None else seen
    if id(opt) in seen:
        return
    seen.add(id(opt))
    yield opt
    if isinstance(opt, NGOptBase):
        yield from _walk(opt.optim, seen)  # NGOpt creates its choice lazily; create it now, deterministically
    for v in list(vars(opt).values()):
        items = v if isinstance(v, (list, tuple)) else [v]
        for w in items:
            if isinstance(w, base.Optimizer):
                yield from _walk(w, seen)


def _numpy_rejects_float_of_1d() -> bool:
    try:
        float(np.ones(1))
    except TypeError:
        return True
    return False


def _check_saveable(name: str, opt) -> None:
    from nevergrad.optimization.recaster import RecastOptimizer

    chain = list(_walk(opt))
    names = " -> ".join(o.name for o in chain)
    for o in chain:
        if isinstance(o, RecastOptimizer):
            raise ValueError(f"nevergrad:{name} runs {o.name} here ({names}), a scipy-based optimizer in a thread "
                             f"whose state cannot be saved, so the run could not be resumed. Use num_workers > 1 "
                             f"or another budget (NGOpt then picks another method), or another optimizer, e.g. "
                             f"nevergrad:TwoPointsDE or nevergrad:CMA")
        if "MetaModel" in type(o).__name__ and _numpy_rejects_float_of_1d():
            raise ValueError(f"nevergrad:{name} runs a meta-model here ({names}); nevergrad's meta-model calls "
                             f"float() on a one-element array, which numpy {np.__version__} rejects, so it would "
                             f"crash mid-run. Change budget / num_workers, or choose e.g. nevergrad:CMA or "
                             f"nevergrad:TwoPointsDE")
    try:
        pickle.dumps(opt)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"nevergrad:{name} ({names}) cannot be saved ({type(e).__name__}: {e}); "
                         f"choose another optimizer for a resumable run") from e


class NevergradSearcher(Searcher):
    """x0 is the parametrization's init; the starting genomes (``starts``) are suggested to the
    optimizer, so its first asks return them exactly, in order."""

    steady_state = True
    multi_objective = True
    takes_starts = True

    @property
    def optimizer_name(self) -> str:
        return self.spec.name.split(":", 1)[1]

    def _start(self) -> None:
        import nevergrad as ng

        opts = self.spec.options
        check_options(self.spec.name, opts, OPTIONS)
        budget = opts.get("budget")
        if budget is None:
            raise ValueError(f"{self.spec.name}: give the option budget=<number of evaluations planned>; "
                             f"nevergrad chooses and tunes its method from it")
        if not is_int(budget) or budget < 1:
            raise ValueError(f"{self.spec.name}: budget must be an integer >= 1, got {budget!r}")
        workers = opts.get("num_workers", 1)
        if not is_int(workers) or workers < 1:
            raise ValueError(f"{self.spec.name}: num_workers must be an integer >= 1, got {workers!r}")
        cls = resolve_optimizer(self.optimizer_name)
        x0 = self.spec.centre if self.spec.x0 is None else self.spec.x0
        self._rng = GlobalRNG(self.spec.seed)
        with self._rng.active():
            param = ng.p.Array(init=x0.copy()).set_bounds(self.spec.lower.copy(), self.spec.upper.copy())
            param.random_state = np.random.RandomState(self.spec.seed)
            self._opt = cls(parametrization=param, budget=int(budget), num_workers=int(workers))
            _check_saveable(self.optimizer_name, self._opt)
            for start in reversed(unique_points(self.spec.starts)):  # nevergrad pops the last suggestion first
                self._opt.suggest(start.copy())
        self._candidates: list[Any] = []  # nevergrad Parameters, parallel to the pending genomes

    def _default_batch(self) -> int:
        return int(self.spec.options.get("num_workers", 1))

    def _ask(self, n: int | None) -> list[np.ndarray]:
        assert n is not None
        out = []
        with self._rng.active():
            for _ in range(n):
                cand = self._opt.ask()
                self._candidates.append(cand)
                out.append(np.array(cand.value, dtype=np.float64))
        return out

    def _tell(self, positions: list[int], losses: np.ndarray) -> None:
        with self._rng.active():
            for p, loss in zip(positions, losses):
                value = float(loss[0]) if self.spec.n_obj == 1 else [float(v) for v in loss]
                self._opt.tell(self._candidates[p], value)
        for p in sorted(positions, reverse=True):
            del self._candidates[p]

    def _dump(self) -> tuple[dict[str, Any], bytes]:
        return {"global_rng": self._rng.to_json()}, pickle.dumps((self._opt, self._candidates))

    def _load(self, meta: dict[str, Any], payload: bytes) -> None:
        self._opt, self._candidates = pickle.loads(payload)
        self._rng = GlobalRNG.from_json(meta["global_rng"])

    def recommendation(self) -> np.ndarray:
        """nevergrad's own recommendation (for noisy fitness it may differ from the best told)."""
        with self._rng.active():
            return np.array(self._opt.provide_recommendation().value, dtype=np.float64)
