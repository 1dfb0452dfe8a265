"""Racing a generation against its selection cut: on simulated 2PL generations whose full scores are
known, the parents racing keeps are those full scores select (beyond delta only by chance), for fewer
items; successive halving's rungs on real estimator inputs; and a real zoo search that races, killed
and resumed exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from test_adaptive import adaptive_on_synthetic, assert_answers_kept_and_resumes_exactly, synthetic
from test_search import experiment, run_cli

from evomerge.config import EstimatorSpec
from evomerge.estimators.base import Cut, EstimatorInputs, Selection, sampled_items
from evomerge.estimators.halving import SuccessiveHalving
from evomerge.estimators.racing import settled, z_value
from evomerge.evaluate.base import ItemResponses
from evomerge.irt.adaptive import next_items, predict
from evomerge.irt.calibrate import Population
from evomerge.irt.fit import Prior
from evomerge.objectives import Objectives
from evomerge.runstore import RunStore


def test_item_sample_is_a_seeded_subset_of_each_benchmark():
    ids = {"a": [f"a{i}" for i in range(1000)], "b": [f"b{i}" for i in range(30)]}
    p = sampled_items(ids, 100, seed=1)
    assert len(p["a"]) == 100 and p["b"] == ids["b"]  # a benchmark with fewer items keeps them all
    assert p["a"] == sorted(p["a"], key=ids["a"].index)  # in benchmark order
    assert sampled_items(ids, 100, seed=1) == p and sampled_items(ids, 100, seed=2)["a"] != p["a"]
    assert len(sampled_items(ids, 0.25, seed=1)["a"]) == 250 and len(sampled_items(ids, 0.25, seed=1)["b"]) == 8
    assert sampled_items(ids, None, seed=1) == ids


def test_settled_reads_the_cut_from_the_intervals():
    means = np.array([0.9, 0.5, 0.48, 0.1, -np.inf])
    ses = np.array([0.01, 0.01, 0.01, 0.01, 0.0])
    # keep 2 of 5: 0.9 is surely in, 0.1 and the failed one surely out; 0.5 vs 0.48 overlap at z=2
    assert settled(means, ses, keep=2, z=2.0).tolist() == [True, False, False, True, True]
    assert settled(means, ses, keep=2, z=0.5).tolist() == [True, True, True, True, True]
    assert settled(means, ses, keep=5, z=2.0).all()  # nothing is cut
    assert z_value(0.05, 1, 1) == np.float64(z_value(0.05, 1, 1)) and 1.95 < z_value(0.05, 1, 1) < 1.97
    assert z_value(0.05, 12, 10) > z_value(0.05, 12, 1)  # more looks, wider intervals


def race_generation(items, prior, answers: np.ndarray, keep: int, delta: float, start: int, batch: int
                    ) -> tuple[list[int], list[int], int]:
    """One simulated generation raced to the end (no tolerance: a candidate stops only once settled,
    or with every item): the ``keep`` chosen by estimate, those the first round's estimates would
    have chosen, and the items scored in all."""
    n, m = answers.shape
    rounds = 1 + -(-(m - start) // batch)
    z = z_value(delta, n, rounds)
    seen = [np.zeros(0, dtype=np.int64) for _ in range(n)]
    preds = [predict(items, prior, s, answers[i, s]) for i, s in enumerate(seen)]
    active = np.ones(n, dtype=bool)
    k = start
    first: list[int] = []
    while active.any():
        for i in np.flatnonzero(active):
            seen[i] = np.concatenate([seen[i], next_items(items, preds[i], seen[i], min(k, m - len(seen[i])))])
            preds[i] = predict(items, prior, seen[i], answers[i, seen[i]])
        k = batch
        first = first or np.argsort([-p.score for p in preds], kind="stable")[:keep].tolist()
        done = settled(np.array([p.score for p in preds]), np.array([p.se for p in preds]), keep, z)
        active = ~done & np.array([len(s) < m for s in seen])
    order = np.argsort([-p.score for p in preds], kind="stable")
    return order[:keep].tolist(), first, sum(len(s) for s in seen)


def test_racing_selects_the_parents_full_scores_select_beyond_delta_only_by_chance():
    items, prior = synthetic(n_items=200, seed=4), Prior.standard(2)
    rng = np.random.default_rng(5)
    n, keep, delta, generations = 12, 6, 0.1, 60
    wrong, wrong_first, used = 0, 0, 0
    for _ in range(generations):
        # a CMA-ES-like generation: abilities spread around a common mean
        centre = rng.multivariate_normal(prior.mean, prior.cov)
        theta = centre + 0.5 * rng.standard_normal((n, 2))
        answers = (rng.random((n, len(items))) < np.stack([items.prob(t) for t in theta])).astype(float)
        full = answers.mean(axis=1)
        chosen, first, scored = race_generation(items, prior, answers, keep, delta, start=16, batch=16)
        # same decision as full scores: the chosen keep have the top keep full scores (ties are equal)
        top = sorted(np.sort(full)[-keep:].tolist())
        wrong += sorted(full[chosen].tolist()) != top
        wrong_first += sorted(full[first].tolist()) != top
        used += scored
    assert wrong <= delta * generations, wrong
    assert wrong_first > 3 * delta * generations, wrong_first  # the cut is not easy: 16 items misjudge it
    assert used < 0.75 * generations * n * len(items), used / (generations * n * len(items))


def halving_inputs(tmp_path: Path, spec: EstimatorSpec, n_items: int) -> EstimatorInputs:
    def unused(*_args):
        raise AssertionError("successive halving scores no calibration population")

    return EstimatorInputs(spec=spec, seed=3, item_ids={"a": [f"a{i}" for i in range(n_items)],
                                                        "b": [f"b{i}" for i in range(n_items)]},
                           objectives=Objectives(("a", "b"), (1.0, 1.0)), score_all=unused, run_dir=tmp_path,
                           exp_dir=tmp_path, calibration_recipes=unused, say=lambda _line: None)


def test_successive_halving_doubles_the_better_half_on_the_same_items(tmp_path):
    est = SuccessiveHalving(halving_inputs(tmp_path, EstimatorSpec(kind="successive_halving", start_items=4,
                                                                   max_items=1.0), n_items=32))
    skill = np.linspace(0.1, 0.9, 8)  # candidate i answers item j right when hash(j) < skill[i]
    truth = {b: np.random.default_rng(7).random(32) for b in ("a", "b")}
    index = {f"{b}{j}": (b, j) for b in ("a", "b") for j in range(32)}

    def answer(i: int, sel: dict[str, list[str]]) -> list[ItemResponses]:
        return [ItemResponses(b, list(ids), np.array([float(truth[b][index[x][1]] < skill[i]) for x in ids]))
                for b, ids in sel.items()]

    first = est.select()
    assert first is not None and {b: len(v) for b, v in first.items()} == {"a": 4, "b": 4}
    answered: list[list[ItemResponses] | None] = [answer(i, first) for i in range(8)]
    active = [True] * 8
    rungs = []
    while True:
        nxt = est.race(answered, active, Cut(4))
        if not any(s is not None for s in nxt):
            break
        rungs.append([i for i, s in enumerate(nxt) if s is not None])
        for i, sel in enumerate(nxt):
            if sel is not None:
                answered[i] = (answered[i] or []) + answer(i, sel)
        active = [s is not None for s in nxt]
    assert [len(r) for r in rungs] == [4, 2, 1]  # the better half each time, until one is left
    assert rungs[-1] == [7]  # the most skilled goes furthest
    seen = {i: sorted(x for r in answered[i] or [] for x in r.item_ids) for i in range(8)}
    assert len(seen[7]) == 2 * 32 and len(seen[0]) == 2 * 4  # every item at the end, 4 per benchmark at first
    assert all(len(set(v)) == len(v) for v in seen.values())  # an item is never scored twice
    assert set(seen[0]) <= set(seen[5]) <= set(seen[7])  # one order of items for everyone
    est_7 = est.estimate(answered[7] or [], {})
    assert est_7 == {b: float(np.mean(truth[b] < skill[7])) for b in ("a", "b")}  # the plain mean


def test_racing_search_keeps_its_race_and_resumes_exactly(zoo, tmp_path):
    exp = experiment(zoo, tmp_path, budget={"evaluations": 18}, searcher={"name": "cmaes", "options": {"popsize": 6}})
    exp["fitness"]["estimator"] = {"kind": "adaptive", "calibration_models": 2, "start_items": 4, "batch": 4,
                                   "tolerance": 0.03, "max_items": 0.5, "racing": True, "delta": 0.2,
                                   "refit_every": 1, "final_top_k": 2, "report_checks": 2, "item_sample": 0.5}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    ref = tmp_path / "ref"
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(ref)], tmp_path)
    assert code == 0, out
    assert "racing with delta 0.2" in (ref / "report.md").read_text()
    with RunStore(ref / "phase0-ps" / "run.sqlite", readonly=True) as store:
        race = store.get_meta("race")
        assert race is not None and race["generation"] == 2  # the last generation's race, kept for a resume
        evs = store.evaluations()
        rounds = [len(ev.responses) // len(zoo.skills) for ev in evs]
        assert min(rounds) >= 1 and max(rounds) > 1  # some stopped at the start, some raced on
        searched = sum(len(r["item_ids"]) for ev in evs for r in ev.responses or [])
        asked: dict[str, set[str]] = {}
        for r in (r for ev in evs for r in ev.responses or []):
            asked.setdefault(r["benchmark"], set()).update(r["item_ids"])
    # item_sample 0.5: half of each benchmark's 40 items, drawn from the run's seed, is all the estimator sees
    every = {s: [json.loads(line)["id"] for line in open(tmp_path / f"{s}-fitness.jsonl")] for s in zoo.skills}
    sample = sampled_items(every, 0.5, exp["seed"])
    for b, ids in sample.items():
        assert len(ids) == 20 and asked[b] <= set(ids)
        assert Population.load(ref / "calibration" / "initial" / f"{b}.population.npz").item_ids == ids
    items = json.loads((ref / "summary.json").read_text())["items_scored"]
    parts = ("calibration", "search", "refits", "drift", "final", "report", "references", "checks")
    assert items["total"] == sum(items[p] for p in parts)
    assert items["search"] == searched and items["refits"] == 0 and items["refit_count"] == 3
    assert items["item_sample"] == 60 and items["full_evaluation"] == 120
    assert items["final"] == 2 * items["item_sample"] and items["report"] == 0  # report_checks <= final_top_k
    assert items["calibration"] == (2 + 1 + len(zoo.skills)) * items["item_sample"]  # 2 merges, base, sources
    assert "seeded sample of items (item_sample 0.5" in (ref / "report.md").read_text()
    assert_answers_kept_and_resumes_exactly(ref, tmp_path, seed=4)


def test_pareto_racing_keeps_the_survivors_full_scores_keep_beyond_delta_only_by_chance(tmp_path):
    """NSGA-II-like generations: 8 incumbents known on every item and 8 offspring race for 8 places
    through the adaptive estimator (no tolerance: a candidate stops when the race settles it, or with
    every item). Survival is pymoo's own (RankAndCrowding, whole fronts first): with the offspring's
    final estimates it must keep every settled offspring exactly when full scores keep it, in all but
    about a delta share of generations."""
    from pymoo.algorithms.moo.nsga2 import RankAndCrowding
    from pymoo.core.population import Population as PymooPopulation
    from pymoo.core.problem import Problem

    n_items, keep, generations = 120, 8, 25
    items = {"a": synthetic(n_items=n_items, dim=1, seed=6), "b": synthetic(n_items=n_items, dim=1, seed=7)}
    spec = EstimatorSpec(kind="adaptive", racing=True, delta=0.1, tolerance=1e-9, max_items=1.0, start_items=16,
                         batch=16)
    est = adaptive_on_synthetic(tmp_path, items, spec, Objectives(("a", "b"), (1.0, 1.0), n_obj=2))
    rng = np.random.default_rng(8)

    def survivors(values: np.ndarray) -> set[int]:
        pop = PymooPopulation.new("F", -values)  # pymoo minimizes
        return {int(i) for i in RankAndCrowding().do(Problem(n_var=1, n_obj=2), pop, n_survive=keep,
                                                     return_indices=True)}

    wrong = settled_early = scored = 0
    for _ in range(generations):
        # abilities on the two skills trade off, as for merges of two experts: a front to race along
        t = rng.uniform(-1.5, 1.5, 2 * keep)
        theta = np.stack([t, -t + rng.normal(0, 0.6, 2 * keep)], axis=1)
        answers = {b: (rng.random((2 * keep, n_items)) < np.stack([items[b].prob(th[[k]]) for th in theta])
                       ).astype(float) for k, b in enumerate(items)}
        full = np.stack([answers[b].mean(axis=1) for b in items], axis=1)

        def respond(i: int, sel: Selection) -> list[ItemResponses]:
            return [ItemResponses(b, list(x or []), answers[b][i, [est.positions[b][j] for j in x or []]])
                    for b, x in sel.items()]

        incumbents = [respond(i, {b: est.cals[b].item_ids for b in items}) for i in range(keep)]
        offspring: list[list[ItemResponses]] = [respond(keep + i, est.select() or {}) for i in range(keep)]
        active = [True] * keep
        while any(active):
            nxt = est.race(list(offspring), active, Cut(keep, incumbents))
            for i, sel in enumerate(nxt):
                if sel is not None:
                    offspring[i] = offspring[i] + respond(keep + i, sel)
            active = [s is not None for s in nxt]
        estimates = np.array([est.intervals(o)[0] for o in offspring])  # type: ignore[index]
        seen = np.array([sum(len(r.item_ids) for r in o) for o in offspring])
        early = np.flatnonzero(seen < 2 * n_items)  # settled by the race before every item was scored
        by_estimate, by_full = survivors(np.vstack([full[:keep], estimates])), survivors(full)
        wrong += any(((keep + i) in by_estimate) != ((keep + i) in by_full) for i in early)
        settled_early += len(early)
        scored += int(seen.sum())
    # measured: 74 of 200 offspring settled before their last item, none wrongly, 96% of the items
    # scored (Pareto cuts settle late: within the overflowing front only crowding decides)
    assert settled_early >= 0.25 * generations * keep, settled_early
    assert wrong <= spec.delta * generations, wrong
    assert scored < generations * keep * 2 * n_items


def test_nsga2_offers_its_population_as_the_cut():
    """pymoo's NSGA-II races its offspring against the population they compete with; before the
    first tell the whole first population survives, so there is nothing to race."""
    from evomerge.searchers.registry import make_searcher

    s = make_searcher("nsga2", np.zeros(3), np.ones(3), n_obj=2, seed=0, pop_size=6)
    assert s.selection_size == 6 and s.incumbents == []
    first = s.ask()
    s.tell(first, np.array([[g[0], 1 - g[0]] for g in first]))
    assert len(s.ask()) == 6
    told = {tuple(g) for g in first}
    assert len(s.incumbents) == 6 and all(tuple(g) in told for g in s.incumbents)
    cma = make_searcher("cmaes", np.zeros(3), np.ones(3), seed=0, popsize=8)
    assert cma.selection_size == 4 and cma.incumbents == []


def test_pareto_racing_search_races_offspring_against_the_population_and_resumes_exactly(zoo, tmp_path):
    """NSGA-II with racing through the driver: the first population is tested to the tolerance
    (nothing is cut), later generations race their offspring against the population they compete
    with; killed twice and resumed, the run ends in the uninterrupted run's exact state."""
    exp = experiment(zoo, tmp_path, budget={"evaluations": 16},
                     searcher={"name": "nsga2", "options": {"pop_size": 4}})
    exp["fitness"]["estimator"] = {"kind": "adaptive", "calibration_models": 2, "start_items": 4, "batch": 4,
                                   "tolerance": 0.03, "max_items": 0.5, "racing": True, "delta": 0.2,
                                   "refit_every": 2, "report_checks": 2}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    ref = tmp_path / "ref"
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(ref)], tmp_path)
    assert code == 0, out
    with RunStore(ref / "phase0-ps" / "run.sqlite", readonly=True) as store:
        race = store.get_meta("race")
        assert race is not None and race["generation"] == 3  # generations 1-3 raced; the last one is kept
        assert len(store.evaluations()) == 16
    assert "best" in json.loads((ref / "summary.json").read_text())["chosen"]  # the front's pick, exported
    assert_answers_kept_and_resumes_exactly(ref, tmp_path, seed=5)
