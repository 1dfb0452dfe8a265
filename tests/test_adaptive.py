"""Adaptive fitness: the stopping rule on synthetic 2PL candidates whose truth is known, items chosen
per candidate against a random subset of the same size, and a real search that refits its item model
on its own answers and resumes exactly after SIGKILL."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import yaml
from test_search import experiment, final_state, kill_and_resume, run_cli

from evomerge.irt.adaptive import next_items, predict
from evomerge.irt.fit import ItemParams, Prior
from evomerge.runstore import RunStore


def synthetic(n_items: int = 400, dim: int = 2, seed: int = 0) -> ItemParams:
    rng = np.random.default_rng(seed)
    return ItemParams(np.abs(rng.normal(0.9, 0.4, (n_items, dim))), rng.normal(0.0, 1.5, n_items))


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
    from evomerge.irt.calibrate import Population

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
