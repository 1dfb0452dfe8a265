"""Fitness estimators behind one interface (``base.FitnessEstimator``), by kind (the table in
``evomerge.estimator_kinds``): ``full`` (every item),
``random`` (a fixed random subset) and the IRT family ``irt``, ``pirt``, ``gpirt``, ``mpirt``,
``gmpirt`` (anchors chosen by a calibration on the user's own benchmark) and ``adaptive`` (items
chosen per candidate until its score is known to a tolerance, optionally racing against the
searcher's selection cut; calibration refitted on the search) and ``successive_halving`` (the
multi-fidelity baseline: the better half of a generation goes on to twice the items)."""

from __future__ import annotations

import importlib

from evomerge.estimator_kinds import check_kind
from evomerge.estimators.base import (
    Cut,
    EstimatorInputs,
    FitnessEstimator,
    PhaseView,
    Requests,
    ScoreAll,
    ScoreRequest,
    Scores,
    Selection,
    sampled_items,
)

__all__ = ["Cut", "EstimatorInputs", "FitnessEstimator", "PhaseView", "Requests", "ScoreAll", "ScoreRequest",
           "Scores", "Selection",
           "make_fitness_estimator", "sampled_items"]


def make_fitness_estimator(inputs: EstimatorInputs) -> FitnessEstimator:
    """The estimator ``inputs.spec.kind`` names in ``evomerge.estimator_kinds`` (an IRT one calibrates
    now, or loads the run's own calibration on resume, or the one the spec points to)."""
    target = check_kind(inputs.spec.kind).target
    assert target is not None, "check_kind returns only the kinds a search can use"
    module, name = target.split(":")
    cls: type[FitnessEstimator] = getattr(importlib.import_module(module), name)
    return cls(inputs)
