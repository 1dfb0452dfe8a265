"""Adaptive fitness: the stopping rule on synthetic 2PL candidates whose truth is known, items chosen
per candidate against a random subset of the same size, and a real search that refits its item model
on its own answers and resumes exactly after SIGKILL."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import yaml
from test_search import experiment, final_state, kill_and_resume, run_cli

from evomerge.config import EstimatorSpec
from evomerge.estimators.adaptive import AdaptiveFitness
from evomerge.estimators.base import EstimatorInputs
from evomerge.estimators.calibrations import INITIAL, CalibrationLog, save_calibrations
from evomerge.evaluate.base import ItemResponses
from evomerge.irt.adaptive import next_items, predict
from evomerge.irt.calibrate import Population
from evomerge.irt.calibration import Calibration
from evomerge.irt.fit import ItemParams, Prior
from evomerge.objectives import Objectives
from evomerge.runstore import RunStore


def synthetic(n_items: int = 400, dim: int = 2, seed: int = 0) -> ItemParams:
    rng = np.random.default_rng(seed)
    return ItemParams(np.abs(rng.normal(0.9, 0.4, (n_items, dim))), rng.normal(0.0, 1.5, n_items))


def adaptive_on_synthetic(tmp_path: Path, items: dict[str, ItemParams], spec: EstimatorSpec,
                          objectives: Objectives) -> AdaptiveFitness:
    """An adaptive estimator whose item model is the known truth: a calibration per benchmark saved in
    the run folder, which the estimator loads as a resumed run would."""
    def unused(*_args):
        raise AssertionError("the calibration is given")

    cals, pops = {}, {}
    for b, it in items.items():
        ids = [f"{b}{i}" for i in range(len(it))]
        pops[b] = Population(["m"], ids, np.zeros((1, len(ids))))
        cals[b] = Calibration(benchmark=b, item_ids=ids, items=it, prior=Prior.standard(it.dim), model_names=["m"],
                              thetas=np.zeros((1, it.dim)), responses=pops[b].responses, parents=[], anchors={},
                              gp_lambda={})
    save_calibrations(CalibrationLog(tmp_path).folder(INITIAL), cals, pops)
    inputs = EstimatorInputs(spec=spec, seed=0, item_ids={b: c.item_ids for b, c in cals.items()},
                             objectives=objectives, score_all=unused, run_dir=tmp_path, exp_dir=tmp_path,
                             calibration_recipes=unused, say=lambda _line: None)
    return AdaptiveFitness(inputs)



def cat(items: ItemParams, prior: Prior, answers: np.ndarray, tol: float, start: int = 16, batch: int = 16,
        limit: int | None = None) -> tuple[np.ndarray, float, float]:
    """Adaptive testing of one simulated candidate: positions seen, predicted score, its standard error."""
    limit = limit or len(items)
    seen = np.zeros(0, dtype=np.int64)
    pred = predict(items, prior, seen, answers[seen])
    k = start
    while True:
        seen = np.concatenate([seen, next_items(items, pred, seen, min(k, limit - len(seen)))])
        pred = predict(items, prior, seen, answers[seen])
        if pred.se <= tol or len(seen) >= limit:
            return seen, pred.score, pred.se
        k = batch


def test_stopping_rule_covers_the_true_score_at_its_nominal_level():
    items, prior = synthetic(), Prior.standard(2)
    rng = np.random.default_rng(1)
    hits, used, widths = 0, [], []
    n = 300
    for _ in range(n):
        theta = rng.multivariate_normal(prior.mean, prior.cov)
        answers = (rng.random(len(items)) < items.prob(theta)).astype(float)
        seen, score, se = cat(items, prior, answers, tol=0.02)
        hits += abs(score - answers.mean()) <= 1.96 * se
        used.append(len(seen))
        widths.append(se)
    coverage = hits / n
    assert 0.90 <= coverage <= 0.99, coverage  # nominal 0.95
    assert max(widths) <= 0.02 + 1e-12
    assert np.mean(used) < 0.5 * len(items)  # it stopped early: the tolerance was met on a fraction


def test_items_chosen_per_candidate_beat_a_random_subset_of_the_same_size():
    items, prior = synthetic(seed=2), Prior.standard(2)
    rng = np.random.default_rng(3)
    err_cat, err_random = [], []
    for _ in range(200):
        theta = rng.multivariate_normal(prior.mean, prior.cov)
        answers = (rng.random(len(items)) < items.prob(theta)).astype(float)
        seen, score, _ = cat(items, prior, answers, tol=0.0, limit=48)  # a fixed budget of 48 items
        err_cat.append(abs(score - answers.mean()))
        subset = rng.choice(len(items), len(seen), replace=False)
        err_random.append(abs(answers[subset].mean() - answers.mean()))
    assert np.mean(err_cat) < 0.8 * np.mean(err_random), (np.mean(err_cat), np.mean(err_random))


def test_adaptive_search_refits_on_its_answers_and_resumes_exactly(zoo, tmp_path):
    exp = experiment(zoo, tmp_path, budget={"evaluations": 18}, searcher={"name": "cmaes", "options": {"popsize": 6}})
    exp["fitness"]["estimator"] = {"kind": "adaptive", "calibration_models": 4, "start_items": 8, "batch": 8,
                                   "tolerance": 0.05, "max_items": 0.5, "refit_every": 1, "final_top_k": 2}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    ref = tmp_path / "ref"
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(ref)], tmp_path)
    assert code == 0, out
    assert "refitted the item model" in out
    folders = sorted(p.name for p in (ref / "calibration").iterdir())
    assert folders[0] == "initial" and len(folders) == 4  # the initial fit and one refit per generation
    with RunStore(ref / "phase0-ps" / "run.sqlite", readonly=True) as store:
        evs = store.evaluations()
        counts = []  # items scored per benchmark, over every round of the candidate
        for ev in evs:
            n: dict[str, int] = {}
            for r in ev.responses:
                n[r["benchmark"]] = n.get(r["benchmark"], 0) + len(r["item_ids"])
            counts.append(n)
        assert all(set(c) == set(zoo.skills) for c in counts)
        assert all(8 <= n <= 20 for c in counts for n in c.values())  # 40 items each: start 8, at most half
        assert any(n > 8 for c in counts for n in c.values())  # some needed a second round
    reference, _ = final_state(ref)
    assert_answers_kept_and_resumes_exactly(ref, tmp_path, seed=2)

    # two workers finish candidates in another order; the refits, and so the search, are the same
    (tmp_path / "exp2.yaml").write_text(yaml.safe_dump({**exp, "workers": 2}))
    code, out = run_cli(["search", str(tmp_path / "exp2.yaml"), "-o", str(tmp_path / "two")], tmp_path)
    assert code == 0, out
    two, _ = final_state(tmp_path / "two")
    np.testing.assert_array_equal(two[0], reference[0])
    assert two[1:] == reference[1:]


def assert_answers_kept_and_resumes_exactly(ref: Path, tmp_path: Path, seed: int) -> None:
    """No candidate of the finished run ``ref`` scored an item twice, and the same experiment
    (tmp_path/exp.yaml) SIGKILLed twice at random points and resumed ends in ``ref``'s exact state."""
    with RunStore(ref / "phase0-ps" / "run.sqlite", readonly=True) as store:
        for ev in store.evaluations():
            ids = [(r["benchmark"], i) for r in ev.responses for i in r["item_ids"]]
            assert len(ids) == len(set(ids))
    reference, ref_hashes = final_state(ref)
    cut = tmp_path / "cut"
    rng = random.Random(seed)
    assert kill_and_resume(tmp_path / "exp.yaml", cut, tmp_path, sorted(rng.sample(range(2, 17), 2)), rng, 0.5) == 2
    resumed, hashes = final_state(cut)
    assert hashes == ref_hashes
    np.testing.assert_array_equal(resumed[0], reference[0])
    assert resumed[1:] == reference[1:]


def test_refit_is_deterministic_with_unseen_items_missing():
    """A refit (the calibration population plus search candidates' partial answers, NaN where unseen)
    gives bit-identical item parameters and dimension each time: what makes a resumed run's refit the
    one it had."""
    from evomerge.estimators.adaptive import fit_calibration

    items = synthetic(n_items=60, dim=2, seed=9)
    rng = np.random.default_rng(10)
    theta = rng.standard_normal((14, 2))
    answers = (rng.random((14, 60)) < np.stack([items.prob(t) for t in theta])).astype(float)
    answers[6:][rng.random((8, 60)) < 0.7] = np.nan  # search candidates saw ~30% of the items
    pop = Population([f"m{i}" for i in range(14)], [f"i{j}" for j in range(60)], answers)
    one, two = fit_calibration(pop, ["m0"], "b", seed=3), fit_calibration(pop, ["m0"], "b", seed=3)
    np.testing.assert_array_equal(one.items.a, two.items.a)
    np.testing.assert_array_equal(one.items.b, two.items.b)
    assert one.validation == two.validation and one.dim in (1, 2, 3, 4)


def test_one_objective_stops_on_the_fitness_standard_error_for_fewer_items(tmp_path):
    """Three benchmarks averaged into one fitness: testing stops once the fitness' standard error is
    below the tolerance, its 95% interval covers the true fitness near the nominal rate, and it needs
    fewer items than holding every benchmark to the tolerance (what a Pareto search is told)."""
    items = {b: synthetic(n_items=200, dim=1, seed=s) for b, s in (("a", 11), ("b", 12), ("c", 13))}
    names = tuple(items)
    spec = EstimatorSpec(kind="adaptive", tolerance=0.02, max_items=1.0, start_items=16, batch=16)
    one = adaptive_on_synthetic(tmp_path / "one", items, spec, Objectives(names, (1.0, 1.0, 1.0)))
    each = adaptive_on_synthetic(tmp_path / "each", items, spec, Objectives(names, (1.0, 1.0, 1.0), n_obj=3))
    rng = np.random.default_rng(14)
    hits, used_one, used_each, n = 0, 0, 0, 150
    for _ in range(n):
        theta = rng.standard_normal(3)
        answers = {b: (rng.random(200) < items[b].prob(theta[[k]])).astype(float) for k, b in enumerate(names)}

        def test(est: AdaptiveFitness) -> list[ItemResponses]:
            got: list[ItemResponses] = []
            sel = est.select()
            while sel:
                got += [ItemResponses(b, list(x or []), answers[b][[est.positions[b][i] for i in x or []]])
                        for b, x in sel.items()]
                sel = est.select(got)
            return got

        got = test(one)
        mean, ses = one.intervals(got)  # type: ignore[misc]
        se = float(np.sqrt(np.sum(ses**2)) / 3)
        assert se <= 0.02 + 1e-12
        hits += abs(float(mean.mean()) - np.mean([answers[b].mean() for b in names])) <= 1.96 * se
        used_one += sum(len(r.item_ids) for r in got)
        used_each += sum(len(r.item_ids) for r in test(each))
    assert 0.90 <= hits / n <= 0.995, hits / n
    assert used_one < 0.6 * used_each, (used_one, used_each)
