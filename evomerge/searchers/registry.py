"""Searchers by name (``make_searcher``); from saved state: ``Searcher.from_state``."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge.searchers.base import Searcher, SearcherSpec
from evomerge.searchers.names import CHOICES, searcher_class  # noqa: F401 - re-exported


def make_searcher(name: str, lower: Any, upper: Any, x0: Any = None, n_obj: int = 1, seed: int = 0,
                  starts: Sequence[Any] = (), **options: Any) -> Searcher:
    """Build searcher ``name`` over the box [lower, upper] (objectives maximized).

    ``options`` are the searcher's own (cmaes: sigma, popsize, lr_adapt; random: popsize;
    nevergrad: budget, num_workers; pymoo: the algorithm's constructor arguments, e.g. pop_size,
    and ref_dirs). They must be plain JSON values: they are saved with the searcher's state.
    ``starts``: genomes the first population must hold besides x0 (population-based searchers).
    """
    cls = searcher_class(name)
    spec = SearcherSpec(name, np.asarray(lower), np.asarray(upper), None if x0 is None else np.asarray(x0),
                        n_obj, seed, options, [np.asarray(s) for s in starts])
    return cls(spec)
