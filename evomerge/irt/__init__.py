"""IRT-reduced fitness: fit (multidimensional) 2PL models on a calibration population, choose
anchor items, and estimate a candidate's accuracy on a whole benchmark from a few items
(tinyBenchmarks; MERGE^3)."""

from evomerge.irt.anchors import Anchors, resolve_budget, select_anchors
from evomerge.irt.calibrate import (
    Population,
    build_population,
    calibrate,
    calibration_report,
    engine_evaluate,
    evaluate_estimators,
    pass_rate_summary,
    random_recipes,
    source_recipes,
    task_arithmetic_recipe,
)
from evomerge.irt.calibration import Calibration
from evomerge.irt.estimators import NAMES, Estimator, make_estimator
from evomerge.irt.fit import FitResult, ItemParams, Prior, estimate_mixture, estimate_theta, fit_m2pl, select_dim

__all__ = [
    "Anchors", "Calibration", "Estimator", "FitResult", "ItemParams", "NAMES", "Population", "Prior",
    "build_population", "calibrate", "calibration_report", "engine_evaluate", "estimate_mixture", "estimate_theta",
    "evaluate_estimators", "fit_m2pl", "make_estimator", "pass_rate_summary", "random_recipes", "resolve_budget",
    "select_anchors", "select_dim", "source_recipes", "task_arithmetic_recipe",
]
