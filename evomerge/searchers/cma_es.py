"""CMA-ES with CyberAgent's `cmaes` package (the one Optuna and Sakana's EvoMerge use).

The engine works in the unit cube: genome = lower + u * (upper - lower). So one scalar ``sigma`` means
the same fraction of every gene's range (EvoMerge: genes in [0, 1], sigma 1/6), whatever the bounds.

Saving: pickling a `cmaes.CMA` silently drops its RNG (and stores the covariance as a triangle).
We save every attribute ourselves, exactly, with the RNG's full MT19937 state: JSON, no pickle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.searchers import state as st
from evomerge.searchers.base import Searcher, check_options, is_int, is_number, unique_points

OPTIONS = {
    "sigma": "initial step size as a fraction of each gene's range (default 1/6, as EvoMerge)",
    "popsize": "genomes per generation, >= 2 (default 4 + floor(3 ln d))",
    "lr_adapt": "learning-rate adaptation (Nomura et al. 2023) for noisy/multimodal fitness (default false)",
}


class CmaEsSearcher(Searcher):
    """Single-objective CMA-ES; x0 (the mean it starts from) defaults to the centre of the box.
    ``starts`` (e.g. x0 itself, a hand recipe) replace the first samples of the first generation, so
    they are evaluated and told like any member; the samples are still drawn, so the RNG stream is
    the same as without them."""

    steady_state = False
    multi_objective = False
    takes_starts = True

    def _start(self) -> None:
        import cmaes

        opts = self.spec.options
        check_options("cmaes", opts, OPTIONS)
        sigma = opts.get("sigma", 1 / 6)
        if not is_number(sigma) or not 0 < sigma <= 1:
            raise ValueError(f"cmaes: sigma must be a number in (0, 1] (a fraction of each gene's range), "
                             f"got {sigma!r}")
        popsize = opts.get("popsize")
        if popsize is not None and (not is_int(popsize) or popsize < 2):
            raise ValueError(f"cmaes: popsize must be an integer >= 2, got {popsize!r}")
        lr_adapt = opts.get("lr_adapt", False)
        if not isinstance(lr_adapt, bool):
            raise ValueError(f"cmaes: lr_adapt must be true or false, got {lr_adapt!r}")
        x0 = self.spec.centre if self.spec.x0 is None else self.spec.x0
        u0 = self._to_unit(x0)
        bounds = np.tile(np.array([0.0, 1.0]), (self.spec.dim, 1))
        self._cma = cmaes.CMA(mean=u0, sigma=float(sigma), bounds=bounds, seed=self.spec.seed,
                              population_size=popsize, lr_adapt=lr_adapt)
        # cmaes allocates its stop-criterion history with np.empty: garbage that is only read once it
        # has been overwritten, but it would make two identical runs save different bytes.
        self._cma._funhist_values[:] = np.nan
        self._units: list[np.ndarray] = []

    @property
    def popsize(self) -> int:
        return int(self._cma.population_size)

    @property
    def selection_size(self) -> int:
        """mu: the best of a generation that move the mean (cmaes' weighted recombination)."""
        return int(self._cma._mu)

    @property
    def generation(self) -> int:
        """Generations told so far."""
        return int(self._cma.generation)

    def _to_unit(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.spec.lower) / (self.spec.upper - self.spec.lower), 0.0, 1.0)

    def _ask(self, n: int | None) -> list[np.ndarray]:
        self._units = [self._cma.ask() for _ in range(self.popsize)]
        span = self.spec.upper - self.spec.lower
        out = [self.spec.lower + u * span for u in self._units]
        if self._cma.generation == 0:  # the given starting genomes join the first generation, exactly
            for j, x in enumerate(unique_points(self.spec.starts)[: self.popsize]):
                self._units[j], out[j] = self._to_unit(x), x.copy()
        return out

    def _tell(self, positions: list[int], losses: np.ndarray) -> None:
        ordered = np.empty(len(self._units))
        ordered[positions] = losses[:, 0]
        self._cma.tell([(u, float(v)) for u, v in zip(self._units, ordered)])
        self._units = []

    def _dump(self) -> tuple[dict[str, Any], bytes]:
        attrs = {k: _encode_value(k, v) for k, v in vars(self._cma).items() if k != "_rng"}
        return {"cma": attrs, "rng": st.encode_legacy_rng(self._cma._rng.get_state()),
                "units": [st.encode_array(u) for u in self._units]}, b""

    def _load(self, meta: dict[str, Any], payload: bytes) -> None:
        import cmaes

        cma = cmaes.CMA.__new__(cmaes.CMA)
        for k, v in meta["cma"].items():
            setattr(cma, k, _decode_value(v))
        rng = np.random.RandomState()
        rng.set_state(st.decode_legacy_rng(meta["rng"]))
        cma._rng = rng
        self._cma = cma
        self._units = [st.decode_array(u) for u in meta["units"]]


def _encode_value(name: str, v: Any) -> dict[str, Any]:
    """Tag each attribute with its exact type so that it comes back as the same type and value."""
    if v is None:
        return {"t": "none"}
    if isinstance(v, (bool, np.bool_)):
        return {"t": "bool", "v": bool(v)}
    if isinstance(v, np.ndarray):
        return {"t": "array", "v": st.encode_array(v)}
    if isinstance(v, np.floating):
        return {"t": "np." + type(v).__name__, "v": float(v)}
    if isinstance(v, np.integer):
        return {"t": "np." + type(v).__name__, "v": int(v)}
    if isinstance(v, float):
        return {"t": "float", "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": v}
    raise TypeError(f"cmaes.CMA.{name} has a type this saver does not know ({type(v).__name__}); "
                    f"the installed cmaes version is not supported by evomerge's state format")


def _decode_value(d: dict[str, Any]) -> Any:
    t = d["t"]
    if t == "none":
        return None
    if t == "array":
        return st.decode_array(d["v"])
    if t.startswith("np."):
        return getattr(np, t[3:])(d["v"])
    return {"bool": bool, "float": float, "int": int}[t](d["v"])
