"""IRT-reduced fitness inside a search: calibration at the start, anchors per candidate, drift guard.

One calibration per benchmark (each objective is one benchmark, and one IRT model of its items):
the sources and ``calibration_models`` random genomes of the first phase are evaluated on every
fitness item, the (M)2PL model is fitted and anchors are chosen for the experiment's item budget.
Every ``drift_every`` generations the current best is evaluated on every item; its estimation error
is stored in the run store and, past ``drift_threshold``, the benchmark is recalibrated with the
fully evaluated candidates added. Calibrations are files in ``RUN/calibration/`` tagged by the
generation that made them, so a resumed run picks up exactly the calibration it had. At the end of
a phase the ``final_top_k`` best estimates are scored on every item and the best of them is the
phase's result (``confirm_best``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.irt.calibrate import Population, calibrate
from evomerge.irt.calibration import Calibration
from evomerge.irt.estimators import make_estimator
from evomerge.pool import Task
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.estimation import FitnessEstimator
    from evomerge.search import Driver

INITIAL = -1  # tag of the calibration made before the search


def tag_of(phase: int, gen: int) -> int:
    """Calibrations are ordered by the (phase, generation) whose drift check made them."""
    return phase * 1_000_000 + gen


def _cal_dir(run_dir: Path, tag: int) -> Path:
    return run_dir / "calibration" / (f"t{tag:09d}" if tag >= 0 else "initial")


def _latest_tag(run_dir: Path, before: int | None = None) -> int | None:
    """The newest complete calibration made before ``before`` (a tag): what a generation uses."""
    tags = []
    root = run_dir / "calibration"
    if (root / "initial" / "complete").exists():
        tags.append(INITIAL)
    tags += [int(p.name[1:]) for p in root.glob("t*") if (p / "complete").exists()]
    tags = [t for t in tags if before is None or t < before]
    return max(tags) if tags else None


def _estimators(driver: "Driver", cals: dict[str, Calibration]) -> dict[str, Any]:
    spec = driver.exp.fitness.estimator
    # mp-IRT / gmp-IRT take their parents (the sources) from the calibration itself
    return {name: make_estimator(spec.kind, spec.budget, calibration=cal, seed=driver.exp.seed)
            for name, cal in cals.items()}


def _item_benchmarks(driver: "Driver") -> dict[str, list[str]]:
    ids = driver.pool.broadcast("item_ids", "fitness")[0]
    return {n: v for n, v in ids.items() if v is not None}


def evaluate_full(driver: "Driver", recipes: dict[str, Recipe]) -> dict[str, dict[str, np.ndarray]]:
    """Every fitness item of every benchmark for each recipe: {model: {benchmark: scores}}."""
    names = list(recipes)
    out: dict[str, dict[str, np.ndarray]] = {}
    for i, result in driver.pool.run([Task(recipes[n], None, "fitness", 0) for n in names]):
        if not result.ok:
            raise RuntimeError(f"evaluating '{names[i]}' on every fitness item failed: {result.error}")
        out[names[i]] = {r.benchmark: r.scores for r in result.responses}
    return out


def _population(names: list[str], full: dict[str, dict[str, np.ndarray]], bench: str, item_ids: list[str]) -> Population:
    return Population(names, item_ids, np.stack([full[n][bench] for n in names]))


def _calibrate_all(driver: "Driver", populations: dict[str, Population], parents: list[str],
                   out_dir: Path) -> dict[str, Calibration]:
    spec = driver.exp.fitness.estimator
    out_dir.mkdir(parents=True, exist_ok=True)
    cals = {}
    for bench, pop in populations.items():
        cal = calibrate(pop, parents, budgets=[spec.budget], benchmark=bench, seed=driver.exp.seed)
        cal.save(out_dir / f"{bench}.npz")
        pop.save(out_dir / f"{bench}.population.npz")
        cals[bench] = cal
    (out_dir / "complete").write_text("")
    return cals


def _load(run_dir: Path, tag: int) -> tuple[dict[str, Calibration], dict[str, Population]]:
    d = _cal_dir(run_dir, tag)
    cals = {p.name[: -len(".npz")]: Calibration.load(p) for p in sorted(d.glob("*.npz")) if ".population" not in p.name}
    pops = {p.name[: -len(".population.npz")]: Population.load(p) for p in sorted(d.glob("*.population.npz"))}
    return cals, pops


def calibrate_population(driver: "Driver", out_dir: Path, n_models: int) -> dict[str, Calibration]:
    """Evaluate the sources and ``n_models`` random genomes of the first phase on every fitness item,
    calibrate each benchmark, save ``<benchmark>.npz`` (+ its population) into ``out_dir``."""
    from evomerge.outputs import reference_recipes

    benches = _item_benchmarks(driver)
    genome = driver.genome_space(0, driver.spaces[0], [])
    rng = np.random.default_rng(driver.exp.seed + 7919)
    recipes = {f"source:{m}": r for m, r in reference_recipes(driver).items() if m != "uniform merge"}
    for j in range(n_models):
        x = rng.uniform(genome.lower, genome.upper)
        recipes[f"random:{j}"] = genome.decode(x, j)
    driver.console.print(f"calibrating the fitness estimator: {len(recipes)} models x "
                         f"{sum(len(v) for v in benches.values())} items")
    full = evaluate_full(driver, recipes)
    names = list(recipes)
    parents = [n for n in names if n.startswith("source:")]
    pops = {b: _population(names, full, b, ids) for b, ids in benches.items()}
    cals = _calibrate_all(driver, pops, parents, out_dir)
    budget = driver.exp.fitness.estimator.budget
    for b, cal in cals.items():
        v = cal.validation
        n = len(cal.anchors_for(budget))
        base = v["baselines"].get(str(n), {})
        driver.console.print(f"  {b}: D={v['chosen_dim']}, {n} anchor items; cross-validated MAE "
                             f"{v['score'][str(v['chosen_dim'])]:.4f} (random subsample "
                             f"{base.get('random', float('nan')):.4f})")
    return cals


def prepare_estimators(driver: "Driver", run_dir: Path) -> dict[str, Any]:
    """The estimators for this run: from the experiment's calibration files, the run's own latest
    calibration (resume), or a calibration made now."""
    spec = driver.exp.fitness.estimator
    benches = _item_benchmarks(driver)
    if spec.kind in ("random", "stratified"):
        if spec.kind == "stratified":
            raise ValueError("estimator 'stratified' needs a group per item; use 'random' or an IRT kind "
                             "(per-benchmark objectives already stratify by benchmark)")
        return {n: make_estimator("random", spec.budget, item_ids=ids, seed=driver.exp.seed) for n, ids in benches.items()}
    if spec.calibration:
        path = Path(spec.calibration)
        path = path if path.is_absolute() else driver.exp_dir / path
        cals = {n: Calibration.load(path / f"{n}.npz" if path.is_dir() else path) for n in benches}
        return _estimators(driver, cals)
    tag = _latest_tag(run_dir, before=tag_of(0, 0))
    if tag is not None:  # a resumed run: the estimators are re-synced to its generation by sync()
        cals, _ = _load(run_dir, tag)
        return _estimators(driver, cals)
    cals = calibrate_population(driver, _cal_dir(run_dir, INITIAL), spec.calibration_models)
    return _estimators(driver, cals)


def sync(fe: "FitnessEstimator", driver: "Driver", phase: int, gen: int) -> None:
    """Use the calibration a run had at (phase, gen): the newest one made before it."""
    if driver.exp.fitness.estimator.calibration or fe.kind in ("full", "random"):
        return
    tag = _latest_tag(driver.run_dir, before=tag_of(phase, gen))
    if tag is not None:
        fe.estimators = _estimators(driver, _load(driver.run_dir, tag)[0])


def drift_check(fe: "FitnessEstimator", driver: "Driver", store, genome, phase: int, gen: int) -> None:
    """Every ``drift_every`` generations: the best so far on all items; error stored; recalibrate
    the benchmarks whose error passes the threshold (with the fully evaluated best added).

    Runs before the generation's tell is committed and is idempotent, so a run killed anywhere in it
    redoes it identically on resume."""
    spec = driver.exp.fitness.estimator
    if not spec.drift_every or (gen + 1) % spec.drift_every or spec.kind in ("full", "random"):
        return
    best = driver.choose(store)[0]
    recipe = genome.decode(np.array(best.genome), best.seed)
    full = evaluate_full(driver, {best.genome_hash: recipe})[best.genome_hash]
    errors = {b: abs(float(np.mean(full[b])) - best.objectives[b]) for b in full if b in best.objectives}
    log = [e for e in (store.get_meta("drift", []) or []) if e["generation"] != gen]
    log.append({"generation": gen, "genome_hash": best.genome_hash, "estimated": best.objectives,
                "full": {b: float(np.mean(v)) for b, v in full.items()}, "error": errors})
    store.set_meta("drift", log)
    drifted = {b for b, e in errors.items() if e > spec.drift_threshold}
    if not drifted or spec.calibration:
        return
    tag = _latest_tag(driver.run_dir, before=tag_of(phase, gen))
    cals, pops = _load(driver.run_dir, tag)
    for b in drifted:
        pops[b] = pops[b] + Population([f"search:{best.genome_hash[:12]}:g{gen}"], pops[b].item_ids,
                                       full[b][None, :])
    parents = cals[next(iter(cals))].parents
    new_tag = tag_of(phase, gen)
    target = _cal_dir(driver.run_dir, new_tag)
    if (target / "complete").exists():
        (target / "complete").unlink()
    for b in set(cals) - drifted:  # unchanged benchmarks are carried into the new tag
        target.mkdir(parents=True, exist_ok=True)
        cals[b].save(target / f"{b}.npz")
        pops[b].save(target / f"{b}.population.npz")
    new = _calibrate_all(driver, {b: pops[b] for b in drifted}, parents, target)
    cals.update(new)
    fe.estimators = _estimators(driver, cals)
    driver.console.print(f"drift at generation {gen}: {', '.join(f'{b} {errors[b]:.3f}' for b in sorted(drifted))} "
                         f"> {spec.drift_threshold}; recalibrated")


def full_scores(driver: "Driver", store, genome, evs: list) -> dict[str, dict[str, float]]:
    """Full-benchmark accuracy of these search candidates, {genome hash: {benchmark: accuracy}}.

    Cached in the run store (meta ``full_scores``, with the item count of each evaluation), so the
    final choice and the report share one evaluation per candidate and a resumed run redoes none."""
    cache = store.get_meta("full_scores", {}) or {}
    todo = {e.genome_hash: genome.decode(np.array(e.genome), e.seed) for e in evs if e.genome_hash not in cache}
    if todo:
        for h, benches in evaluate_full(driver, todo).items():
            cache[h] = {b: {"accuracy": float(np.mean(v)), "items": int(v.size)} for b, v in benches.items()}
        store.set_meta("full_scores", cache)
    return {e.genome_hash: {b: x["accuracy"] for b, x in cache[e.genome_hash].items()} for e in evs}


def confirm_best(driver: "Driver", store, genome) -> list:
    """The phase's best, chosen by full score among the ``final_top_k`` best estimates.

    The largest of many noisy estimates is biased upward (the winner's curse): with 240 candidates
    at 10% of the items, the top estimate is often a lucky draw rather than the best merge. Scoring
    a handful of the top estimates on every item costs k full evaluations and removes that luck."""
    k = driver.exp.fitness.estimator.final_top_k
    ok = driver.scored(store)
    if not ok:
        return driver.choose(store)  # raises with the run store's path
    top = sorted(ok, key=lambda e: (-e.fitness, e.rowid))[:k]
    scores = full_scores(driver, store, genome, top)
    return [max(top, key=lambda e: (driver.fitness({**e.objectives, **scores[e.genome_hash]}), -e.rowid))]


def final_check(driver: "Driver", store, genome, chosen, n: int = 8) -> str:
    """The estimator's error measured on search candidates (never in the calibration population):
    the ``final_top_k`` best estimates (already scored on every item for the final choice), or else
    the best estimate, and others drawn evenly from the run up to ``n``, each evaluated on every item;
    ``chosen`` (the phase's result) is marked."""
    evs = driver.scored(store)
    if not evs:
        return ""
    cached = store.get_meta("full_scores", {}) or {}
    picks = [e for e in evs if e.genome_hash in cached] or [max(evs, key=lambda e: (e.fitness, -e.rowid))]
    seen = {e.genome_hash for e in picks}
    for i in np.linspace(0, len(evs) - 1, n):
        e = evs[int(i)]
        if len(picks) < n and e.genome_hash not in seen:
            picks.append(e)
            seen.add(e.genome_hash)
    full = full_scores(driver, store, genome, picks)
    rows, errs = [], {}
    for e in picks:
        for b, acc in full[e.genome_hash].items():
            if b in e.objectives:
                err = e.objectives[b] - acc
                errs.setdefault(b, []).append(abs(err))
                mark = " (chosen)" if e.genome_hash == chosen.genome_hash else ""
                rows.append(f"| {e.genome_hash[:10]}{mark} | g{e.generation} | {b} | {e.objectives[b]:.4f} | "
                            f"{acc:.4f} | {err:+.4f} |")
    drift = store.get_meta("drift", []) or []
    spec = driver.exp.fitness.estimator
    text = [f"", f"### Fitness estimator ({spec.kind}, budget {spec.budget})", "",
            "Measured on search candidates that were never in the calibration population, each "
            "evaluated on every item after the search"
            + (f"; the {spec.final_top_k} best estimates among them, and the model chosen is the best "
               "of those by full score:" if cached else ":"), "",
            "| candidate | generation | benchmark | estimated | full | error |", "|---|---|---|---|---|---|",
            *rows, "", "MAE per benchmark: " + ", ".join(f"{b} {np.mean(v):.4f} (max {np.max(v):.4f})"
                                                        for b, v in errs.items())]
    if drift:
        text += ["", f"Drift checks during the search (every {spec.drift_every} generations): " + "; ".join(
            f"g{d['generation']}: " + ", ".join(f"{b} {x:.3f}" for b, x in d["error"].items()) for d in drift)]
    store.set_meta("estimator_check", {b: [float(x) for x in v] for b, v in errs.items()})
    return "\n".join(text)
