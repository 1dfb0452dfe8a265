"""Searchers by name. pymoo and nevergrad are imported only when one of theirs is asked for."""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import numpy as np

from evomerge.searchers.base import Searcher, SearcherSpec

BUILTIN = {
    "cmaes": ("evomerge.searchers.cma_es", "CmaEsSearcher"),
    "nsga2": ("evomerge.searchers.pymoo_adapter", "PymooSearcher"),
    "random": ("evomerge.searchers.random_search", "RandomSearcher"),
}
PREFIXES = {
    "pymoo": ("evomerge.searchers.pymoo_adapter", "PymooSearcher"),
    "nevergrad": ("evomerge.searchers.nevergrad_adapter", "NevergradSearcher"),
}
CHOICES = ("cmaes, nsga2, random, pymoo:<Algorithm> (e.g. pymoo:GA, pymoo:NSGA3), "
           "nevergrad:<Optimizer> (e.g. nevergrad:NGOpt)")


def searcher_class(name: str) -> type[Searcher]:
    """The class that implements searcher ``name`` (the name itself is checked when it is built)."""
    if not isinstance(name, str):
        raise ValueError(f"searcher name must be a string, got {name!r}; choose one of: {CHOICES}")
    if name in BUILTIN:
        module, cls = BUILTIN[name]
    else:
        prefix, sep, rest = name.partition(":")
        if not sep or prefix not in PREFIXES:
            raise ValueError(f"unknown searcher {name!r}; choose one of: {CHOICES}")
        if not rest:
            raise ValueError(f"searcher {name!r} names no {prefix} algorithm; write e.g. "
                             f"{'pymoo:GA' if prefix == 'pymoo' else 'nevergrad:NGOpt'}")
        module, cls = PREFIXES[prefix]
    return getattr(importlib.import_module(module), cls)


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


def load_searcher(blob: bytes) -> Searcher:
    """Rebuild any searcher from its `state_dict()` bytes."""
    return Searcher.from_state(blob)
