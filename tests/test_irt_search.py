"""IRT fitness inside real searches: calibration CLI, anchors per candidate, drift guard, exact resume."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_search import experiment, final_state, kill_and_resume, run_cli

from evomerge import run
from evomerge.irt.calibration import Calibration
from evomerge.run import start
from evomerge.runstore import RunStore
from evomerge.workers import LocalPool


def _with_estimator(exp: dict, tmp: Path, estimator: dict) -> dict:
    exp["searcher"] = {"name": "cmaes", "options": {"popsize": 6}}
    exp["fitness"]["estimator"] = {"kind": "gpirt", "budget": 0.25, "calibration_models": 10, **estimator}
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
    return exp


def test_calibrate_once_then_search_on_anchor_items_only(zoo, tmp_path):
    _with_estimator(experiment(zoo, tmp_path, budget={"evaluations": 12}), tmp_path, {})
    code, out = run_cli(["irt", "calibrate", str(tmp_path / "exp.yaml"), "-o", str(tmp_path / "cal")], tmp_path)
    assert code == 0, out
    cals = {s: Calibration.load(tmp_path / "cal" / f"{s}.npz") for s in zoo.skills}
    assert all(c.parents and len(c.anchors_for(0.25)) == 10 for c in cals.values())  # 25% of 40 items
    exp = yaml.safe_load((tmp_path / "exp.yaml").read_text())
    exp["fitness"]["estimator"]["calibration"] = str(tmp_path / "cal")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    run_dir = start(tmp_path / "exp.yaml", tmp_path / "run")
    assert not (run_dir / "calibration").exists()  # the given calibration was used, none was made
    store = RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True)
    for ev in store.evaluations():
        seen = {r["benchmark"]: r["item_ids"] for r in ev.responses}
        assert {b: len(ids) for b, ids in seen.items()} == {s: 10 for s in zoo.skills}
        anchors = {b: {cals[b].item_ids[i] for i in cals[b].anchors_for(0.25).index} for b in seen}
        assert all(set(ids) == anchors[b] for b, ids in seen.items())
        assert all(0.0 <= v <= 1.0 for v in ev.objectives.values())
    report = (run_dir / "report.md").read_text()
    assert "Fitness estimator (gpirt" in report and "MAE per benchmark" in report
    assert "(chosen)" in report and "On every fitness item" in report

    # the winner's curse: the 5 best estimates were scored on every item and the best of them exported
    evs = sorted(store.evaluations(), key=lambda e: (-e.fitness, e.rowid))
    full = store.get_meta("full_scores")
    assert {e.genome_hash for e in evs[:5]} <= set(full)
    assert all(x["items"] == 40 for scores in full.values() for x in scores.values())
    full_fitness = {h: np.mean([x["accuracy"] for x in scores.values()]) for h, scores in full.items()}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import load_experiment
    from evomerge.evaluate.base import EvalContext
    from evomerge.evaluate.builtin import ItemsBenchmark

    model = AutoModelForCausalLM.from_pretrained(run_dir / "best")
    tok = AutoTokenizer.from_pretrained(run_dir / "best")
    objectives = load_experiment(tmp_path / "exp.yaml").fitness.objectives
    exported = np.mean([ItemsBenchmark(o.name, o.benchmark["path"]).evaluate(model, tok, EvalContext()).mean()
                        for o in objectives])
    assert exported == pytest.approx(max(full_fitness[e.genome_hash] for e in evs[:5]), abs=1e-9)


def test_drift_guard_recalibrates_and_a_killed_run_resumes_exactly(zoo, tmp_path):
    _with_estimator(experiment(zoo, tmp_path, budget={"evaluations": 24}), tmp_path,
                    {"drift_every": 1, "drift_threshold": 0.001})
    ref = tmp_path / "ref"
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(ref)], tmp_path)
    assert code == 0, out
    assert "recalibrated" in out
    store = RunStore(ref / "phase0-ps" / "run.sqlite", readonly=True)
    drift = store.get_meta("drift")
    assert [d["generation"] for d in drift] == [0, 1, 2, 3]
    assert all(set(d["error"]) == set(zoo.skills) for d in drift)
    assert sorted(p.name for p in (ref / "calibration").iterdir())[0] == "initial"
    reference, _ = final_state(ref)

    cut = tmp_path / "cut"
    rng = random.Random(1)
    assert kill_and_resume(tmp_path / "exp.yaml", cut, tmp_path, sorted(rng.sample(range(2, 24), 2)), rng, 1.0) == 2
    resumed, hashes = final_state(cut)
    np.testing.assert_array_equal(resumed[0], reference[0])
    assert resumed[1:] == reference[1:]
    assert len(hashes) == len(set(hashes)) == 24
    again = RunStore(cut / "phase0-ps" / "run.sqlite", readonly=True)
    assert [d["error"] for d in again.get_meta("drift")] == [d["error"] for d in drift]


class TwoSlots(LocalPool):
    """One in-process worker that takes two tasks at a time and finishes them in the order submitted:
    what a steady-state searcher sees on two workers, without Ray and the same every run."""

    def free_slots(self) -> int:
        return max(0, 2 - len(self._queue))


def _steady_state_with_drift(zoo, tmp: Path, evaluations: int) -> dict:
    exp = experiment(zoo, tmp, budget={"evaluations": evaluations}, references=[],
                     searcher={"name": "nevergrad:TwoPointsDE", "options": {"num_workers": 2, "budget": 6}})
    exp["fitness"]["estimator"] = {"kind": "gpirt", "budget": 0.25, "calibration_models": 6,
                                   "drift_every": 1, "drift_threshold": 0.001}
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
    return exp


def test_drift_checks_while_a_steady_state_searcher_has_tasks_in_flight(zoo, tmp_path, monkeypatch):
    # a drift check scores the best on every item from inside the loop's tell, while the loop's other
    # task is still in flight: the check's answers and the loop's must each reach their own owner
    _steady_state_with_drift(zoo, tmp_path, 6)
    monkeypatch.setattr(run, "open_pool", lambda kwargs, **_: TwoSlots(kwargs))
    run_dir = start(tmp_path / "exp.yaml", tmp_path / "run")
    store = RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True)
    evs = store.evaluations()
    assert len(evs) == 6 and all(e.status == "ok" for e in evs)
    assert [d["generation"] for d in store.get_meta("drift")] == list(range(len(store.generations())))
    assert len(store.generations()) >= 6  # steady state: a generation per genome
