"""Calibrating IRT fitness on the user's own benchmark.

1. A calibration population: merge recipes (the sources and random merges, or a search's own
   candidates), each materialized and evaluated on every item.
2. Cross-validation over the population's merges (the sources always stay in the training part, as
   mp-IRT needs their abilities): for each candidate D, fit on the training models, pick anchors,
   estimate the held-out models' accuracy from their anchor scores. D is chosen by that error,
   which is what fitness needs; gp-IRT's lambda comes from the same held-out errors.
3. The final fit on the whole population with the chosen D, anchors per budget, the models' abilities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from evomerge.estimator_kinds import IRT_KINDS
from evomerge.evaluate.base import ItemResponses
from evomerge.irt.anchors import correctness_features, param_features, resolve_budget, select_anchors
from evomerge.irt.calibration import Calibration
from evomerge.irt.estimators import NAMES, make_estimator, mpirt_estimate, pirt_estimate, weighted_estimate
from evomerge.irt.fit import Prior, check_responses, fit_m2pl
from evomerge.merge.config import MergeConfig

FEATURES = ("params", "correctness")


# ---- the population ---------------------------------------------------------------------------

@dataclass
class Population:
    """Responses of named models (rows) on a benchmark's items (columns), with the recipes if known."""

    names: list[str]
    item_ids: list[str]
    responses: np.ndarray  # (M, N)
    recipes: list[MergeConfig | None] | None = None

    def __post_init__(self) -> None:
        self.responses = check_responses(self.responses)
        if self.responses.shape != (len(self.names), len(self.item_ids)):
            raise ValueError(f"{len(self.names)} models x {len(self.item_ids)} items but responses of shape "
                             f"{self.responses.shape}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("model names repeat; give every population member its own name")

    def accuracy(self) -> np.ndarray:
        return np.nanmean(self.responses, axis=1)

    def take(self, names: Sequence[str]) -> "Population":
        where = {n: i for i, n in enumerate(self.names)}
        rows = [where[n] for n in names]
        recipes = None if self.recipes is None else [self.recipes[i] for i in rows]
        return Population(list(names), self.item_ids, self.responses[rows], recipes)

    def columns(self, item_ids: Sequence[str]) -> "Population":
        where = {n: i for i, n in enumerate(self.item_ids)}
        return Population(self.names, list(item_ids), self.responses[:, [where[i] for i in item_ids]], self.recipes)

    def __add__(self, other: "Population") -> "Population":
        if other.item_ids != self.item_ids:
            raise ValueError("populations cover different items; select the same item ids first")
        recipes = None if self.recipes is None or other.recipes is None else self.recipes + other.recipes
        return Population(self.names + other.names, self.item_ids,
                          np.vstack([self.responses, other.responses]), recipes)

    def save(self, path: str | Path) -> None:
        recipes = [r.model_dump_json() if r is not None else "" for r in (self.recipes or [None] * len(self.names))]
        np.savez_compressed(path, names=np.array(self.names), item_ids=np.array(self.item_ids),
                            responses=self.responses, recipes=np.array(recipes))

    @classmethod
    def load(cls, path: str | Path) -> "Population":
        with np.load(path, allow_pickle=False) as z:
            recipes = [MergeConfig.model_validate_json(r) if r else None for r in z["recipes"].tolist()]
            return cls(z["names"].tolist(), z["item_ids"].tolist(), z["responses"], recipes)


def task_arithmetic_recipe(weights: np.ndarray, experts: Sequence[str], base: str = "base") -> MergeConfig:
    """A per-layer task-arithmetic merge: ``weights`` (experts x layers), one weight per layer as a
    mergekit gradient list (embeddings and head take layer 0's weight)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if weights.shape[0] != len(experts):
        raise ValueError(f"weights for {weights.shape[0]} experts but {len(experts)} expert names")
    return MergeConfig.model_validate({
        "merge_method": "task_arithmetic", "base_model": base,
        "models": [{"model": e, "parameters": {"weight": [float(w) for w in row]}}
                   for e, row in zip(experts, weights)]})


def source_recipes(experts: Sequence[str], num_layers: int, base: str = "base") -> dict[str, MergeConfig]:
    """Recipes that reproduce the sources exactly: all weights 0 (the base), or 1 on one expert."""
    out = {base: task_arithmetic_recipe(np.zeros((len(experts), num_layers)), experts, base)}
    for k, e in enumerate(experts):
        w = np.zeros((len(experts), num_layers))
        w[k] = 1.0
        out[e] = task_arithmetic_recipe(w, experts, base)
    return out


def random_recipes(experts: Sequence[str], num_layers: int, n: int, *, seed: int = 0, low: float = 0.0,
                   high: float = 1.5, base: str = "base") -> list[MergeConfig]:
    """n per-layer task-arithmetic merges with weights uniform in [low, high]."""
    if n < 0 or high < low:
        raise ValueError(f"need n >= 0 and low <= high, got n={n}, low={low}, high={high}")
    rng = np.random.default_rng(seed)
    return [task_arithmetic_recipe(rng.uniform(low, high, (len(experts), num_layers)), experts, base)
            for _ in range(n)]


def engine_evaluate(engine,
                    evaluate_model: Callable[[object], ItemResponses]) -> Callable[[MergeConfig], ItemResponses]:
    """Compose a MergeEngine with a model evaluator into the recipe -> responses callable that
    ``build_population`` takes (the engine writes each candidate into its one resident model)."""
    return lambda recipe: evaluate_model(engine.materialize(recipe))


def build_population(recipes: Sequence[MergeConfig], evaluate: Callable[[MergeConfig], ItemResponses],
                     names: Sequence[str] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Population:
    """Evaluate every recipe on all items. ``evaluate`` maps a recipe to its item responses; the
    item order of the first answer is the population's."""
    names = list(names) if names is not None else [f"m{i:04d}" for i in range(len(recipes))]
    if len(names) != len(recipes):
        raise ValueError(f"{len(names)} names for {len(recipes)} recipes")
    rows, item_ids = [], None
    for k, recipe in enumerate(recipes):
        r = evaluate(recipe)
        if item_ids is None:
            item_ids = list(r.item_ids)
            where = {i: j for j, i in enumerate(item_ids)}
        elif set(r.item_ids) != set(item_ids):
            raise ValueError(f"recipe {names[k]} was evaluated on other items than the first; evaluate all on the same")
        row = np.full(len(item_ids), np.nan)
        row[[where[i] for i in r.item_ids]] = r.scores
        rows.append(row)
        if progress:
            progress(k + 1, len(recipes))
    if item_ids is None:
        raise ValueError("no recipes to evaluate")
    return Population(names, item_ids, np.vstack(rows), list(recipes))


def pass_rate_summary(Y: np.ndarray, groups: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Per group: share of items with a pass rate in [0.2, 0.8] (informative) and solved by <= 5%
    (floor) or >= 95% (ceiling) of the models. Floor and ceiling items carry little information."""
    rate = np.nanmean(Y, axis=0)
    labels = np.asarray(groups if groups is not None else ["all"] * len(rate))
    out = {}
    for g in dict.fromkeys(labels.tolist()):
        r = rate[labels == g]
        out[g] = {"items": int(len(r)), "mid_0.2_0.8": float(((r >= 0.2) & (r <= 0.8)).mean()),
                  "floor_le_0.05": float((r <= 0.05).mean()), "ceiling_ge_0.95": float((r >= 0.95).mean()),
                  "median": float(np.median(r))}
    return out


# ---- cross-validation ---------------------------------------------------------------------------

def _features(kind: str, fit, Y: np.ndarray) -> np.ndarray:
    if kind not in FEATURES:
        raise ValueError(f"anchor features '{kind}' unknown; choose one of {list(FEATURES)}")
    return param_features(fit.items) if kind == "params" else correctness_features(Y)


def heuristic_lambda(pirt_err: np.ndarray, irt_err: np.ndarray) -> float:
    """tinyBenchmarks' gp-IRT weight b^2 / (b^2 + v): b the p-IRT error (its bias, which does not
    shrink with more anchors), v the variance of the weighted anchor estimate. Both are measured
    on held-out calibration models (tinyBenchmarks approximates v from item variances)."""
    b2 = float(np.mean(np.abs(pirt_err))) ** 2
    v = float(np.mean(np.asarray(irt_err) ** 2))
    return b2 / (b2 + v) if b2 + v > 0 else 0.5


def validated_lambda(pirt: np.ndarray, irt: np.ndarray, truth: np.ndarray) -> float:
    """The lambda on a 0.05 grid with the least mean absolute error on held-out calibration models."""
    grid = np.linspace(0, 1, 21)
    err = [np.abs(lam * irt + (1 - lam) * pirt - truth).mean() for lam in grid]
    return float(grid[int(np.argmin(err))])


def cross_validate(Y: np.ndarray, parents: Sequence[int], budgets: Sequence[int], dims: Sequence[int], *,
                   folds: int = 5, groups: Sequence[str] | None = None, features: str = "params",
                   seed: int = 0, fit_kw: dict | None = None) -> dict:
    """Held-out estimates of every IRT estimator for every D and budget.

    Returns {"truth": (M',), "models": rows, dim: {n: {estimator: (M',)}}} over the non-parent rows,
    each estimated by a fit that did not see it.
    """
    fit_kw = fit_kw or {}
    M = len(Y)
    others = np.setdiff1d(np.arange(M), parents)
    if len(others) < folds:
        raise ValueError(f"{len(others)} non-parent models cannot make {folds} folds; add random merges")
    order = np.random.default_rng(seed).permutation(others)
    truth = Y[order].mean(1)
    out: dict = {"truth": truth, "models": order, "fit_seconds": []}
    for d in dims:
        out[d] = {n: {k: np.empty(len(order)) for k in ("irt", "pirt", "mpirt")} for n in budgets}
    for k in range(folds):
        val = np.arange(k, len(order), folds)
        train = np.concatenate([np.asarray(parents, dtype=np.int64), np.delete(order, val)])
        parent_rows = np.arange(len(parents))
        for d in dims:
            fit = fit_m2pl(Y[train], d, seed=seed, **fit_kw)
            out["fit_seconds"].append(fit.seconds)
            prior = Prior.empirical(fit.theta)
            feats = _features(features, fit, Y[train])
            for n in budgets:
                anchors = select_anchors(feats, n, groups=groups, seed=seed)
                idx = np.sort(anchors.index)
                w = anchors.weight[np.argsort(anchors.index)]
                y = Y[order[val]][:, idx]
                out[d][n]["irt"][val] = weighted_estimate(w, y)
                out[d][n]["pirt"][val] = pirt_estimate(fit.items, prior, idx, y)
                out[d][n]["mpirt"][val] = mpirt_estimate(fit.items, fit.theta[parent_rows], idx, y)
    return out


def _summarise(cv: dict, dims: Sequence[int], budgets: Sequence[int], lambda_method: str) -> tuple[dict, dict]:
    """MAE / max error per (D, budget, estimator), and the gp lambda per (D, budget)."""
    truth = cv["truth"]
    mae: dict[int, dict[int, dict[str, dict[str, float]]]] = {}
    lam: dict[int, dict[int, float]] = {}
    for d in dims:
        mae[d], lam[d] = {}, {}
        for n in budgets:
            e = dict(cv[d][n])
            if lambda_method == "heuristic":
                lam[d][n] = heuristic_lambda(e["pirt"] - truth, e["irt"] - truth)
            else:
                lam[d][n] = validated_lambda(e["pirt"], e["irt"], truth)
            e["gpirt"] = lam[d][n] * e["irt"] + (1 - lam[d][n]) * e["pirt"]
            e["gmpirt"] = 0.5 * e["irt"] + 0.5 * e["mpirt"]
            cv[d][n] = e
            mae[d][n] = {k: {"mae": float(np.abs(v - truth).mean()), "max": float(np.abs(v - truth).max())}
                         for k, v in e.items()}
    return mae, lam


def random_baselines(Y: np.ndarray, rows: np.ndarray, budgets: Sequence[int], groups: Sequence[str] | None,
                     repeats: int = 50, seed: int = 0) -> dict[int, dict[str, float]]:
    """Expected MAE of random and stratified-random subsets (averaged over ``repeats`` subsets),
    using the estimators' own subsets and the same arithmetic, vectorized over models."""
    item_ids = [str(i) for i in range(Y.shape[1])]
    Yr = Y[rows]
    truth = Yr.mean(1)
    labels = np.asarray(groups) if groups is not None else None
    out: dict[int, dict[str, float]] = {}
    for n in budgets:
        out[n] = {}
        for name in ("random", "stratified") if groups is not None else ("random",):
            errs = []
            for r in range(repeats):
                est = make_estimator(name, n, item_ids=item_ids, groups=groups, seed=seed + r)
                pos = np.array([int(i) for i in est.select_items()])
                if name == "random":
                    pred = Yr[:, pos].mean(1)
                else:
                    assert labels is not None  # "stratified" is tried only when groups are given
                    pred = sum(np.mean(labels == g) * Yr[:, pos[labels[pos] == g]].mean(1)
                               for g in dict.fromkeys(labels.tolist()))
                errs.append(np.abs(pred - truth).mean())
            out[n][name] = float(np.mean(errs))
    return out


# ---- calibrate ----------------------------------------------------------------------------------

def calibrate(population: Population, parents: Sequence[str], *, budgets: Sequence[float | int] = (0.05, 0.1, 0.2),
              dims: Sequence[int] = (1, 2, 3, 4, 5, 6), folds: int = 5, groups: Sequence[str] | None = None,
              features: str = "params", stratify: bool = True, select_by: str = "gpirt",
              lambda_method: str = "heuristic", benchmark: str = "benchmark", seed: int = 0,
              fit_kw: dict | None = None) -> Calibration:
    """Fit the IRT fitness estimators on a fully evaluated calibration population.

    ``parents``: the sources of the merges (mp-IRT mixes their abilities); ``groups``: a label per
    item (e.g. skill), kept for the stratified baseline and used to stratify anchors if
    ``stratify`` (on the zoo, stratified anchors cut the cross-validated gp-IRT error at 10% of the
    items from .0149 to .0124); ``select_by``: the estimator whose held-out error chooses D; ``lambda_method``:
    "heuristic" (tinyBenchmarks) or "validated" (grid search on the held-out errors).
    """
    Y = population.responses
    if np.isnan(Y).any():
        raise ValueError("the calibration population has unevaluated items (NaN); evaluate every model on all items")
    if select_by not in IRT_KINDS:
        raise ValueError(f"select_by '{select_by}' is not an IRT estimator {list(IRT_KINDS)}")
    if lambda_method not in ("heuristic", "validated"):
        raise ValueError(f"lambda_method '{lambda_method}': choose 'heuristic' or 'validated'")
    if groups is not None and len(groups) != Y.shape[1]:
        raise ValueError(f"{len(groups)} group labels for {Y.shape[1]} items")
    missing = [p for p in parents if p not in population.names]
    if missing:
        raise ValueError(f"parents {missing} are not in the population; add the sources' responses")
    if not dims or min(dims) < 1:
        raise ValueError(f"dims must be positive integers, got {list(dims)}")
    t0 = time.perf_counter()
    N = Y.shape[1]
    counts = sorted({resolve_budget(b, N) for b in budgets})
    anchor_groups = list(groups) if (stratify and groups is not None) else None
    parent_rows = [population.names.index(p) for p in parents]
    cv = cross_validate(Y, parent_rows, counts, dims, folds=folds, groups=anchor_groups, features=features,
                        seed=seed, fit_kw=fit_kw)
    mae, lam = _summarise(cv, dims, counts, lambda_method)
    score = {d: float(np.mean([mae[d][n][select_by]["mae"] for n in counts])) for d in dims}
    dim = min(score, key=lambda d: score[d])
    fit = fit_m2pl(Y, dim, seed=seed, **(fit_kw or {}))
    feats = _features(features, fit, Y)
    anchors = {n: select_anchors(feats, n, groups=anchor_groups, seed=seed) for n in counts}
    validation = {
        "dims": list(map(int, dims)), "folds": folds, "select_by": select_by, "chosen_dim": dim,
        "score": {str(d): s for d, s in score.items()}, "features": features, "stratified": bool(anchor_groups),
        "lambda_method": lambda_method, "heldout_models": int(len(cv["truth"])),
        "errors": {str(d): {str(n): mae[d][n] for n in counts} for d in dims},
        "gp_lambda": {str(d): {str(n): lam[d][n] for n in counts} for d in dims},
        "baselines": {str(n): v for n, v in random_baselines(Y, cv["models"], counts, groups, seed=seed).items()},
        "fit_seconds_mean": float(np.mean(cv["fit_seconds"])), "final_fit_seconds": fit.seconds,
        "seconds": time.perf_counter() - t0,
    }
    return Calibration(benchmark=benchmark, item_ids=list(population.item_ids), items=fit.items,
                       prior=Prior.empirical(fit.theta), model_names=list(population.names), thetas=fit.theta,
                       responses=Y.copy(), parents=list(parents), anchors=anchors,
                       gp_lambda={n: lam[dim][n] for n in counts},
                       groups=list(groups) if groups is not None else None, validation=validation)


def evaluate_estimators(calibration: Calibration, holdout: Population, *, names: Sequence[str] = NAMES,
                        budgets: Sequence[float | int] | None = None, seeds: Sequence[int] = (0,),
                        parents: Sequence[str] | None = None) -> dict[str, dict[int, np.ndarray]]:
    """Estimates of every held-out model by every estimator and budget: {name: {n: (seeds, M)}}.

    Each model is scored only on the estimator's ``select_items()``, exactly as in a search.
    Seeds matter only to the random baselines (one fixed subset per seed).
    """
    if holdout.item_ids != calibration.item_ids:
        holdout = holdout.columns(calibration.item_ids)
    counts = sorted(calibration.anchors) if budgets is None else [calibration.budget(b) for b in budgets]
    pos = calibration.position()
    out: dict[str, dict[int, np.ndarray]] = {}
    for name in names:
        out[name] = {}
        for n in counts:
            rows = []
            for s in (seeds if name in ("random", "stratified") else seeds[:1]):
                est = make_estimator(name, n if name != "full" else 1.0, calibration=calibration, seed=s)
                ids = est.select_items()
                cols = [pos[i] for i in ids]
                rows.append([est.estimate(ids, holdout.responses[m, cols], parents=parents)
                             for m in range(len(holdout.names))])
            out[name][n] = np.asarray(rows)
    return out


def calibration_report(calibration: Calibration, holdout: Population | None = None, *,
                       seeds: Sequence[int] = tuple(range(10))) -> dict[str, dict[int, float]]:
    """MAE per estimator and budget: {name: {n: mae}}.

    With ``holdout`` (models the calibration never saw, evaluated on all items) the MAE is measured
    on them, random baselines averaged over ``seeds``. Without, it is the cross-validated MAE of the
    chosen D on held-out calibration models, recorded when calibrating.
    """
    if holdout is None:
        v = calibration.validation
        d = str(v["chosen_dim"])
        out: dict[str, dict[int, float]] = {}
        for n, per in v["errors"][d].items():
            for name, e in per.items():
                out.setdefault(name, {})[int(n)] = e["mae"]
        for n, per in v["baselines"].items():
            for name, e in per.items():
                out.setdefault(name, {})[int(n)] = e
        return out
    truth = np.nanmean(holdout.columns(calibration.item_ids).responses, axis=1)
    est = evaluate_estimators(calibration, holdout, seeds=seeds)
    return {name: {n: float(np.abs(v - truth[None]).mean()) for n, v in per.items()} for name, per in est.items()}
