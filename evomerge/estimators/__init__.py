"""Fitness estimators behind one interface (``base.FitnessEstimator``): ``full`` (every item),
``random`` (a fixed random subset) and the IRT family ``irt``, ``pirt``, ``gpirt``, ``mpirt``,
``gmpirt`` (anchors chosen by a calibration on the user's own benchmark) and ``adaptive`` (items
chosen per candidate until its score is known to a tolerance, optionally racing against the
searcher's selection cut; calibration refitted on the search) and ``successive_halving`` (the
multi-fidelity baseline: the better half of a generation goes on to twice the items)."""

from __future__ import annotations

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
    """The estimator ``inputs.spec.kind`` names (an IRT one calibrates now, or loads the run's own
    calibration on resume, or the one the spec points to)."""
    kind = inputs.spec.kind
    if kind == "full":
        from evomerge.estimators.basic import FullFitness

        return FullFitness(inputs)
    if kind == "random":
        from evomerge.estimators.reduced import SubsampledFitness

        return SubsampledFitness(inputs)
    if kind == "successive_halving":
        from evomerge.estimators.halving import SuccessiveHalving

        return SuccessiveHalving(inputs)
    if kind == "adaptive":
        from evomerge.estimators.adaptive import AdaptiveFitness

        return AdaptiveFitness(inputs)
    from evomerge.estimators.irt import IRT_KINDS, IRTFitness

    if kind not in IRT_KINDS:
        raise ValueError(f"estimator kind '{kind}' is not one of full, random, {', '.join(IRT_KINDS)}")
    return IRTFitness(inputs)
