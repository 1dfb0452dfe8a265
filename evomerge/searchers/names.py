"""Searcher names -> the classes that implement them, imported only when one is asked for (pymoo and
nevergrad load slowly). A leaf module: the searcher base class restores states through it."""

from __future__ import annotations

import importlib
from typing import Any

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


def searcher_class(name: str) -> Any:
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
