"""Fitness-estimator kinds: the one table that the experiment's ``fitness.estimator.kind``, the
estimator factory (``evomerge.estimators.make_fitness_estimator``), the IRT family's names and the
"unknown kind" errors are all read from.

A kind names the class that implements it (``module:Class``, imported only when the kind is built, so
the experiment is validated without importing torch or scikit-learn). A kind the item-level
estimators know but a search cannot use says why (``refused``). Adding a kind is one class and one
line here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    #: ``module:Class`` of the ``FitnessEstimator`` (None: not usable in a search, see ``refused``)
    target: str | None
    #: an IRT estimator: scores anchor items chosen by a calibration (``evomerge.irt.estimators``)
    irt: bool = False
    #: why a search cannot use it (what to use instead)
    refused: str = ""


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("full", "evomerge.estimators.basic:FullFitness"),
    Kind("random", "evomerge.estimators.reduced:SubsampledFitness"),
    Kind("irt", "evomerge.estimators.irt:IRTFitness", irt=True),
    Kind("pirt", "evomerge.estimators.irt:IRTFitness", irt=True),
    Kind("gpirt", "evomerge.estimators.irt:IRTFitness", irt=True),
    Kind("mpirt", "evomerge.estimators.irt:IRTFitness", irt=True),
    Kind("gmpirt", "evomerge.estimators.irt:IRTFitness", irt=True),
    Kind("adaptive", "evomerge.estimators.adaptive:AdaptiveFitness"),
    Kind("successive_halving", "evomerge.estimators.halving:SuccessiveHalving"),
    Kind("stratified", None, refused="'stratified' needs a group label per item, which a search does not have; "
         "use 'random' or an IRT kind (per-benchmark objectives already stratify by benchmark)"),
)}

#: the kinds a search can use, in the table's order
SEARCH_KINDS: tuple[str, ...] = tuple(n for n, k in KINDS.items() if k.target is not None)
#: the IRT family (anchor items from a calibration), in the table's order
IRT_KINDS: tuple[str, ...] = tuple(n for n, k in KINDS.items() if k.irt)


def check_kind(name: str) -> Kind:
    """The kind a search uses; an unknown or refused name raises with what to write instead."""
    kind = KINDS.get(name)
    if kind is not None and kind.target is not None:
        return kind
    if kind is not None:
        raise ValueError(kind.refused)
    close = difflib.get_close_matches(str(name), SEARCH_KINDS, n=1)
    raise ValueError(f"unknown estimator kind '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                     + "; available: " + ", ".join(f"'{n}'" for n in SEARCH_KINDS))
