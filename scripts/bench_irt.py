"""Benchmark the IRT fitness estimators on the tiny zoo against random subsampling.

Calibrate on one population (the sources + random per-layer task-arithmetic merges), then score
held-out candidates that the calibration never saw: fresh random merges and the candidates of a
real CMA-ES run over the same genome (a search drifts where random genomes rarely go). Every
held-out candidate is evaluated on all items once; each estimator then sees only its own items.

    python scripts/bench_irt.py                       # prints tables
    python scripts/bench_irt.py --cache /tmp/irt-bench  # reuse evaluated populations
    python scripts/bench_irt.py --markdown docs/benchmarks_irt.md

Nothing is written into the repository unless --markdown is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from scipy.stats import spearmanr
from transformers import AutoTokenizer

from evomerge.evaluate.base import ItemResponses
from evomerge.evaluate.generation import exact_match
from evomerge.irt.calibrate import (
    Population,
    build_population,
    calibrate,
    engine_evaluate,
    evaluate_estimators,
    pass_rate_summary,
    random_recipes,
    source_recipes,
    task_arithmetic_recipe,
)
from evomerge.irt.estimators import NAMES
from evomerge.merge.engine import MergeEngine
from evomerge.zoo import ensure_zoo

SKILLS = ("rev", "sort", "tr")
LOW, HIGH = 0.0, 1.5


def zoo_items(zoo, per_skill: int | None) -> list[dict]:
    items = []
    for s in SKILLS:
        items += zoo.items(s, "fitness")[:per_skill]
    return items


def model_evaluator(tokenizer, items: list[dict]):
    ids = [it["id"] for it in items]
    return lambda model: ItemResponses("zoo-fitness", ids, np.asarray(exact_match(model, tokenizer, items)))


def cma_trajectory(evaluate_recipe, experts, num_layers: int, generations: int, seed: int):
    """Candidates (recipes and their full responses) of a CMA-ES maximising full accuracy."""
    dim = len(experts) * num_layers
    bounds = np.array([[LOW, HIGH]] * dim)
    recipes, responses = [], []

    def score(x):
        r = task_arithmetic_recipe(np.asarray(x).reshape(len(experts), num_layers), experts)
        resp = evaluate_recipe(r)
        recipes.append(r)
        responses.append(resp)
        return resp.mean()

    from cmaes import CMA

    opt = CMA(mean=np.full(dim, 0.5), sigma=0.25, bounds=bounds, seed=seed)
    for _ in range(generations):
        told = [(x, -score(x)) for x in (opt.ask() for _ in range(opt.population_size))]
        opt.tell(told)
    return recipes, responses


def population(path: Path | None, make) -> Population:
    if path is not None and path.exists():
        return Population.load(path)
    pop = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pop.save(path)
    return pop


def metrics(est: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """est (repeats, M): each metric per repeat (a random subset, or a calibration seed), then
    averaged; ``mae_sd`` is the spread of the MAE over repeats."""
    top = truth >= np.quantile(truth, 0.75)
    rows = []
    for e in est:
        err = np.abs(e - truth)
        best5 = np.argsort(-e)[:5]
        rows.append({
            "mae": err.mean(), "max": err.max(),
            "spearman": spearmanr(e, truth).statistic,
            "spearman_top25": spearmanr(e[top], truth[top]).statistic,
            "regret1": truth.max() - truth[np.argmax(e)],
            "regret5": truth.max() - truth[best5].max(),
        })
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["mae_sd"] = float(np.std([r["mae"] for r in rows]))
    return out


def table(title: str, est: dict, truth: np.ndarray, num_items: int) -> tuple[str, dict]:
    lines = [f"### {title} ({len(truth)} candidates, true accuracy {truth.min():.3f}..{truth.max():.3f})", "",
             "| budget | estimator | MAE | MAE sd | max err | Spearman | Spearman top 25% | regret@1 | regret@5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    out = {}
    for n in sorted(next(iter(est.values()))):
        for name in est:
            if name == "full" and n != min(next(iter(est.values()))):
                continue
            m = metrics(est[name][n], truth)
            out[(name, n)] = m
            budget = "all" if name == "full" else f"{n} ({100 * n / num_items:.0f}%)"
            lines.append(f"| {budget} | {name} | {m['mae']:.4f} | {m['mae_sd']:.4f} | {m['max']:.4f} | "
                         f"{m['spearman']:.3f} | {m['spearman_top25']:.3f} | {m['regret1']:.4f} | {m['regret5']:.4f} |")
    return "\n".join(lines), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=120, help="random merges in the calibration population")
    ap.add_argument("--heldout", type=int, default=60, help="held-out random merges")
    ap.add_argument("--cma-generations", type=int, default=8, help="CMA-ES generations (popsize 11)")
    ap.add_argument("--per-skill", type=int, default=None, help="fitness items per skill (default all 600)")
    ap.add_argument("--dims", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--features", choices=["params", "correctness"], default="params")
    ap.add_argument("--no-stratify", dest="stratify", action="store_false", help="do not stratify anchors by skill")
    ap.add_argument("--lambda-method", choices=["heuristic", "validated"], default="heuristic")
    ap.add_argument("--select-by", default="gpirt")
    ap.add_argument("--recalibrate-generations", type=int, default=2,
                    help="also recalibrate with the first K CMA-ES generations (a search's full-evaluation checks)")
    ap.add_argument("--seeds", type=int, default=10, help="random subsets per baseline")
    ap.add_argument("--calib-seeds", type=int, default=3, help="calibrations (seeds) each IRT figure averages over")
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep evaluated populations in (not the repo)")
    ap.add_argument("--save-calibration", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables there")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    zoo = ensure_zoo()
    items = zoo_items(zoo, args.per_skill)
    groups = [it["skill"] for it in items]
    experts = list(zoo.experts)
    engine = MergeEngine({"base": zoo.base, **zoo.experts}, base="base")
    tok = AutoTokenizer.from_pretrained(zoo.base)
    evaluate = engine_evaluate(engine, model_evaluator(tok, items))
    L = engine.num_layers
    tag = f"{len(items)}"
    cache = lambda name: None if args.cache is None else args.cache / f"{name}-{tag}.npz"

    t = time.perf_counter()
    stages = (f"calib-{args.calib}", f"heldout-{args.heldout}", f"cma-{args.cma_generations}")
    cached = args.cache is not None and all((args.cache / f"{n}-{tag}.npz").exists() for n in stages)
    sources = source_recipes(experts, L)
    calib = population(cache(f"calib-{args.calib}"), lambda: build_population(
        list(sources.values()) + random_recipes(experts, L, args.calib, seed=0, low=LOW, high=HIGH), evaluate,
        names=list(sources) + [f"cal{i:03d}" for i in range(args.calib)]))
    held_random = population(cache(f"heldout-{args.heldout}"), lambda: build_population(
        random_recipes(experts, L, args.heldout, seed=1, low=LOW, high=HIGH), evaluate,
        names=[f"rnd{i:03d}" for i in range(args.heldout)]))

    def make_cma():
        recipes, responses = cma_trajectory(evaluate, experts, L, args.cma_generations, seed=0)
        return Population([f"cma{i:03d}" for i in range(len(recipes))], responses[0].item_ids,
                          np.vstack([r.scores for r in responses]), recipes)
    held_cma = population(cache(f"cma-{args.cma_generations}"), make_cma)
    t_eval = time.perf_counter() - t

    def calibrations(pop: Population) -> tuple[list, float]:
        """One calibration per seed (folds, KMeans starts): the spread between them is part of the
        estimator's error, so every IRT figure below is a mean over calibration seeds."""
        t = time.perf_counter()
        cals = [calibrate(pop, parents=list(sources), groups=groups, dims=args.dims, folds=args.folds,
                          features=args.features, stratify=args.stratify, lambda_method=args.lambda_method,
                          select_by=args.select_by, benchmark="zoo-fitness", seed=s) for s in range(args.calib_seeds)]
        return cals, (time.perf_counter() - t) / len(cals)

    def estimates(cals: list, pop: Population) -> dict:
        """{name: {n: (repeats, M)}}: random baselines over subset seeds, IRT over calibration seeds."""
        est = evaluate_estimators(cals[0], pop, seeds=range(args.seeds))
        for c in cals[1:]:
            more = evaluate_estimators(c, pop, names=[e for e in NAMES if e not in ("full", "random", "stratified")])
            for name, per in more.items():
                for n, e in per.items():
                    est[name][n] = np.vstack([est[name][n], e])
        return est

    cals, t_cal = calibrations(calib)
    cal = cals[0]
    if args.save_calibration:
        cal.save(args.save_calibration)
    N = cal.num_items
    v = cal.validation

    out = ["# IRT-reduced fitness on the tiny zoo", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}. "
           f"Items: {N} fitness items ({len(items) // len(SKILLS)} each of {', '.join(SKILLS)}), greedy exact match.",
           f"Calibration population: base + {len(experts)} experts + {args.calib} random per-layer task-arithmetic "
           f"merges (weights uniform in [{LOW}, {HIGH}], {len(experts)} x {L} genes). "
           f"Held out: {args.heldout} fresh random merges and {len(held_cma.names)} candidates of a CMA-ES run "
           f"({args.cma_generations} generations, full evaluation) over the same genome.",
           f"Options: features={args.features}, stratify={args.stratify}, lambda={args.lambda_method}, "
           f"D chosen by {args.select_by} {args.folds}-fold CV MAE over the calibration merges.", "",
           f"Every IRT figure is a mean over {args.calib_seeds} calibration seeds (CV folds and KMeans starts); "
           f"random baselines are means over {args.seeds} fixed subsets. MAE sd: spread over those repeats.", "",
           "## Choosing D (cross-validated on the calibration population only; calibration seed 0)", "",
           "| D | " + " | ".join(f"{e} n={n}" for n in sorted(cal.anchors) for e in ("pirt", "gpirt", "mpirt"))
           + " | score |",
           "|---|" + "---|" * (3 * len(cal.anchors) + 1)]
    for d in v["dims"]:
        errs = v["errors"][str(d)]
        out.append(f"| {d}{' *' if d == v['chosen_dim'] else ''} | " + " | ".join(
            f"{errs[str(n)][e]['mae']:.4f}" for n in sorted(cal.anchors) for e in ("pirt", "gpirt", "mpirt"))
            + f" | {v['score'][str(d)]:.4f} |")
    out += ["", "CV baselines (expected MAE over 50 subsets): " + ", ".join(
        f"n={n}: random {b['random']:.4f}, stratified {b['stratified']:.4f}" for n, b in v["baselines"].items()),
        f"D chosen per calibration seed: {[c.dim for c in cals]}.",
        f"gp-IRT lambda per budget (seed 0): {', '.join(f'{n}: {g:.2f}' for n, g in sorted(cal.gp_lambda.items()))}",
        f"Fit time: {v['fit_seconds_mean']:.2f} s mean per CV fit ({len(calib.names) * (args.folds - 1) // args.folds}"
        f" models x {N} items), final fit {v['final_fit_seconds']:.2f} s; a whole calibration "
        f"({len(args.dims)} D x {args.folds} folds + final) {t_cal:.1f} s.", ""]

    held = held_random + held_cma
    truth_all = held.accuracy()
    t = time.perf_counter()
    est = estimates(cals, held)
    t_est = time.perf_counter() - t
    results = {}
    for title, rows in (("All held-out candidates", slice(None)),
                        ("Random merges only", slice(0, len(held_random.names))),
                        ("CMA-ES trajectory only", slice(len(held_random.names), None))):
        sub = {name: {n: e[:, rows] for n, e in per.items()} for name, per in est.items()}
        text, res = table(title, sub, truth_all[rows], N)
        results[title] = res
        out += [text, ""]

    res = results["All held-out candidates"]
    n10 = cal.budget(0.1)
    if n10 in cal.anchors:
        r, s = res[("random", n10)]["mae"], res[("stratified", n10)]["mae"]
        m = res[(args.select_by, n10)]
        out += ["## Targets at 10% (all held-out candidates)", "",
                f"The estimator named before looking at held-out data (--select-by, which also chose D): "
                f"{args.select_by}: MAE {m['mae']:.4f} (target <= 0.02), "
                f"{100 * (1 - m['mae'] / r):.0f}% below random {r:.4f} (target >= 30%), "
                f"{100 * (1 - m['mae'] / s):.0f}% below stratified {s:.4f} (target >= 15%), "
                f"top-quartile Spearman {m['spearman_top25']:.3f} (target >= 0.9; full evaluation: 1.0).", ""]

    K = args.recalibrate_generations
    if K:
        # what a search does when its periodic full-evaluation checks show drift: add the candidates it
        # evaluated fully to the calibration population and refit. Judged on the later candidates only.
        popsize = len(held_cma.names) // args.cma_generations
        seen = held_cma.names[: K * popsize]
        later = held_cma.take(held_cma.names[K * popsize:])
        cals2, t_cal2 = calibrations(calib + held_cma.take(seen))
        est2 = estimates(cals2, later)
        text, _ = table(f"Recalibrated with the first {K} CMA-ES generations ({len(seen)} candidates, D = "
                        f"{[c.dim for c in cals2]}, {t_cal2:.0f} s each), judged on the later CMA-ES candidates",
                        est2, later.accuracy(), N)
        out += [text, ""]

    cover = calib.accuracy()
    out += ["## Coverage", "",
            f"True accuracy: calibration {cover.min():.3f}..{cover.max():.3f} (median {np.median(cover):.3f}); "
            f"held-out random {held_random.accuracy().min():.3f}..{held_random.accuracy().max():.3f}; "
            f"CMA-ES {held_cma.accuracy().min():.3f}..{held_cma.accuracy().max():.3f} "
            f"(best {held_cma.accuracy().max():.3f}).", "",
            "## Item pass rates over the calibration population", "",
            "| skill | items | pass rate in [0.2, 0.8] | solved by <= 5% | solved by >= 95% | median |",
            "|---|---|---|---|---|---|"]
    for g, s in pass_rate_summary(calib.responses, groups).items():
        out.append(f"| {g} | {s['items']} | {s['mid_0.2_0.8']:.2f} | {s['floor_le_0.05']:.2f} | "
                   f"{s['ceiling_ge_0.95']:.2f} | {s['median']:.2f} |")
    n_models = len(calib.names) + len(held.names)
    evaluated = "loaded from --cache" if cached else f"{t_eval:.0f} s ({t_eval / n_models:.2f} s per model)"
    out += ["", f"Timings: evaluation of the {n_models} models on all items {evaluated}, estimates of "
                f"{len(held.names)} candidates x all estimators {t_est:.1f} s, "
                f"total {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(out)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
