"""The estimator kinds' one table: what the config accepts, what the factory builds, the IRT family."""

from __future__ import annotations

import importlib

import pytest

from evomerge.config import EstimatorSpec
from evomerge.estimator_kinds import IRT_KINDS, KINDS, SEARCH_KINDS, check_kind
from evomerge.estimators import FitnessEstimator
from evomerge.irt.estimators import NAMES, make_estimator


def test_every_search_kind_is_accepted_and_names_a_fitness_estimator():
    assert {"full", "random", "adaptive", "successive_halving", *IRT_KINDS} == set(SEARCH_KINDS)
    for name in SEARCH_KINDS:
        assert EstimatorSpec(kind=name).kind == name
        module, cls = str(KINDS[name].target).split(":")
        assert issubclass(getattr(importlib.import_module(module), cls), FitnessEstimator)


def test_the_irt_family_is_the_item_level_estimators_calibrated_ones():
    assert set(IRT_KINDS) == set(NAMES) - {"full", "random", "stratified"}
    for name in IRT_KINDS:  # each one asks for a calibration: it is the IRT estimator of that name
        with pytest.raises(ValueError, match=f"estimator '{name}' needs a calibration"):
            make_estimator(name, 0.1, item_ids=["a", "b"])


def test_unknown_and_refused_kinds_say_what_to_write():
    with pytest.raises(ValueError, match="unknown estimator kind 'adaptiv' \\(did you mean 'adaptive'\\?\\); "
                                         "available: 'full', 'random', 'irt'"):
        check_kind("adaptiv")
    with pytest.raises(ValueError, match="'stratified' needs a group label per item"):
        check_kind("stratified")
