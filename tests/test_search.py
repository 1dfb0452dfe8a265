"""`evomerge search` end to end on the zoo: outputs, exact resume after SIGKILL, clean Ctrl-C."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.config import load_experiment
from evomerge.run import RunExists, start
from evomerge.runstore import RunStore
from evomerge.searchers import Searcher
from evomerge.zoo.skills import write_jsonl

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


def small_items(zoo, tmp: Path, n: int = 40) -> dict[str, dict[str, str]]:
    """A few fitness and test items per skill, so a candidate costs a fraction of a second."""
    out = {}
    for skill in zoo.skills:
        for split in ("fitness", "test"):
            rows = zoo.items(skill, split)[:: max(1, 600 // n)][:n]
            path = tmp / f"{skill}-{split}.jsonl"
            write_jsonl(path, rows)
            out.setdefault(skill, {})[split] = str(path)
    return out


def experiment(zoo, tmp: Path, **over) -> dict:
    items = small_items(zoo, tmp)
    exp = {
        "name": "t", "seed": 3,
        "models": {"base": "zoo:base", "rev": "zoo:rev", "sort": "zoo:sort", "tr": "zoo:tr"},
        "base_model": "base",
        "search_space": "ps_task_arithmetic_layers",
        "budget": {"evaluations": 24},
        "searcher": {"name": "cmaes", "options": {"popsize": 6}},
        "fitness": {"objectives": [{"name": s, "benchmark": {"type": "items", "path": items[s]["fitness"]}}
                                   for s in zoo.skills],
                    "test": [{"name": s, "benchmark": {"type": "items", "path": items[s]["test"]}}
                             for s in zoo.skills]},
        "device": "cpu",
    }
    exp.update(over)
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return exp


def gated_test_objective(tmp: Path) -> dict:
    """A custom test-split objective that holds the run before its held-out evaluation while ``tmp/gate``
    exists (the base check before the search, its first call, passes): the killed run is then unfinished
    however slowly the machine lets a test poll it, with no race against the search's clock."""
    fn = tmp / "gate.py"
    fn.write_text(f"""import time
from pathlib import Path

def score(model, tokenizer, ctx):
    calls = Path({str(tmp / 'calls')!r})
    calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
    while len(calls.read_text()) > 1 and Path({str(tmp / 'gate')!r}).exists():
        time.sleep(0.2)
    return 1.0
""")
    (tmp / "gate").touch()
    return {"name": "gate", "benchmark": {"type": "custom", "fn": f"{fn}:score"}}


def final_state(run_dir: Path) -> tuple:
    store = RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True)
    evs = store.evaluations()
    best = max((e for e in evs if e.status == "ok"), key=lambda e: (e.fitness, -e.rowid))
    hashes = [e.genome_hash for e in evs]
    out = (np.array(best.genome), best.fitness, sorted(hashes), len(store.generations()))
    store.close()
    return out, hashes


def test_search_writes_checkpoint_recipe_history_plots_report(zoo, tmp_path):
    experiment(zoo, tmp_path)
    run_dir = start(tmp_path / "exp.yaml", tmp_path / "run")
    for f in ["report.md", "summary.json", "test_results.json", "best/config.json", "best/tokenizer.json",
              "best.mergekit.yml", "phase0-ps/history.csv", "phase0-ps/fitness.png", "phase0-ps/coefficients.png"]:
        assert (run_dir / f).exists(), f
    test = json.loads((run_dir / "test_results.json").read_text())
    assert set(test) == {"best", "base", "rev", "sort", "tr", "uniform merge", "task arithmetic (w=1)",
                         "TIES (d=0.5, w=1)", "DARE-TIES (d=0.5, w=1)"}
    assert all("error" not in v for v in test.values()), test
    # the exported recipe replays to the exported weights through `evomerge merge`
    replay = tmp_path / "replay"
    proc = subprocess.run(EVOMERGE + ["merge", str(run_dir / "best.mergekit.yml"), "-o", str(replay)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(run_dir / "best" / "model.safetensors"), load_file(replay / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint is what the search scored: the best fitness re-measured on the exported model
    store = RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True)
    assert store.count() == 24
    best_fitness = max(e.fitness for e in store.evaluations())
    summary = json.loads((run_dir / "summary.json").read_text())
    memory = summary["memory"][0]  # what the worker's engine holds, and why that policy
    assert memory["policy"] in ("device", "disk") and memory["device_bytes"] > 0 and memory["reason"]
    assert "## Memory per worker" in (run_dir / "report.md").read_text()
    hand = summary["hand_recipes_fitness"]
    assert set(hand) == set(test) - {"best", "base", "rev", "sort", "tr"} and all(v is not None for v in hand.values())
    if summary["exported_hand_recipe"]:  # a hand recipe scored higher than the search: it is what was exported
        assert hand[summary["exported_hand_recipe"]] > best_fitness
        best_fitness = hand[summary["exported_hand_recipe"]]
    else:
        assert best_fitness >= max(hand.values())
    from transformers import AutoTokenizer

    from evomerge.evaluate.base import EvalContext
    from evomerge.evaluate.builtin import ItemsBenchmark

    model = AutoModelForCausalLM.from_pretrained(run_dir / "best")
    tok = AutoTokenizer.from_pretrained(run_dir / "best")
    exp = load_experiment(tmp_path / "exp.yaml")
    scores = [ItemsBenchmark(o.name, o.benchmark["path"]).evaluate(model, tok, EvalContext()).mean()
              for o in exp.fitness.objectives]
    assert np.mean(scores) == pytest.approx(best_fitness, abs=1e-9)
    # a second search into the same folder is refused with the way out
    with pytest.raises(RunExists, match="evomerge resume"):
        start(tmp_path / "exp.yaml", tmp_path / "run")


def test_a_search_never_exports_below_a_hand_recipe(zoo, tmp_path):
    """A space that cannot leave the base (weights in [0, 0.01]) against the uniform merge: the hand
    recipe scores higher on the fitness split, so it is exported as best, and the report says so."""
    space = {"method": "task_arithmetic", "granularity": "global", "genes": {"weight": {"low": 0.0, "high": 0.01}}}
    experiment(zoo, tmp_path, search_space=space, budget={"evaluations": 4}, searcher={"name": "random"},
               references=[{"name": "uniform merge", "method": "task_arithmetic"}])
    run_dir = start(tmp_path / "exp.yaml", tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exported_hand_recipe"] == "uniform merge"
    with RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True) as store:
        assert summary["hand_recipes_fitness"]["uniform merge"] > max(e.fitness for e in store.evaluations())
    recipe = yaml.safe_load((run_dir / "best.mergekit.yml").read_text())
    assert recipe["merge_method"] == "task_arithmetic"
    assert [m["parameters"]["weight"] for m in recipe["models"]] == pytest.approx([1 / 3] * 3)
    test = json.loads((run_dir / "test_results.json").read_text())
    assert test["best"] == test["uniform merge"]
    report = (run_dir / "report.md").read_text()
    assert "the hand recipe 'uniform merge' scored higher and is exported as best" in report


def run_cli(args: list[str], cwd: Path, kill_at: int | None = None, store: Path | None = None,
            delay: float = 0.0, sig=signal.SIGKILL, kill_after: float | None = None):
    """Run the CLI; with ``kill_at``, send ``sig`` once ``store`` holds that many evaluations (plus
    ``delay`` seconds, to land inside an evaluation, a tell or the export)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a child inherits an ignored SIGINT (something earlier in the suite ignores it in this process), and
    # Python then installs no KeyboardInterrupt handler: give the CLI the default a terminal would
    proc = subprocess.Popen(EVOMERGE + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if kill_at is not None or kill_after is not None:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if kill_after is not None and time.time() > deadline - 600 + kill_after:
                break
            if kill_at is not None and store.exists():
                try:
                    s = RunStore(store, readonly=True)
                    n = s.count()
                    s.close()
                except Exception:  # being created
                    n = 0
                if n >= kill_at:
                    time.sleep(delay)
                    break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(sig)
    out, _ = proc.communicate(timeout=900)
    return proc.returncode, out


def kill_and_resume(exp_path: Path, run_dir: Path, cwd: Path, points: list[int], rng: random.Random,
                    max_delay: float) -> int:
    """Start a search, SIGKILL it once its store holds each of ``points`` evaluations (plus up to
    ``max_delay`` seconds, to land inside an evaluation, a tell or the export), resume after each
    kill, and finish with a resume; returns how many kills landed."""
    store = run_dir / "phase0-ps" / "run.sqlite"
    args = ["search", str(exp_path), "-o", str(run_dir)]
    kills = 0
    for point in points:
        code, _ = run_cli(args, cwd, kill_at=point, store=store, delay=rng.uniform(0, max_delay))
        kills += code == -signal.SIGKILL
        args = ["resume", str(run_dir)]
        if code == 0:
            break
    code, out = run_cli(["resume", str(run_dir)], cwd)
    assert code == 0, out
    return kills


def test_killed_and_resumed_run_follows_the_same_trajectory(zoo, tmp_path):
    experiment(zoo, tmp_path, budget={"evaluations": 36})
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(ref_dir)], tmp_path)
    assert code == 0, out
    reference, _ = final_state(ref_dir)

    rng = random.Random(0)
    kill_points = sorted(rng.sample(range(1, 36), 3)) + [36]  # the last one lands in the export
    kills = kill_and_resume(tmp_path / "exp.yaml", cut_dir, tmp_path, kill_points, rng, 0.5)
    assert kills >= 3, f"only {kills} kills landed"
    resumed, hashes = final_state(cut_dir)
    np.testing.assert_array_equal(resumed[0], reference[0])
    assert resumed[1] == reference[1]
    assert resumed[2] == reference[2]  # the same genomes were evaluated, each recorded once
    assert len(hashes) == len(set(hashes)) == 36
    assert resumed[3] == reference[3]
    with RunStore(cut_dir / "phase0-ps" / "run.sqlite", readonly=True) as store:  # seeded by a hand recipe
        assert any(np.ptp(np.array(e.genome)) == 0 for e in store.evaluations())
    assert json.loads((cut_dir / "test_results.json").read_text()) == json.loads(
        (ref_dir / "test_results.json").read_text())


def test_steady_state_searcher_killed_and_resumed_follows_the_same_trajectory(zoo, tmp_path):
    """nevergrad is steady state: one genome asked whenever a worker has room, each result told as it
    arrives. Killed at random points and resumed, it evaluates and tells exactly what an uninterrupted
    run does (one worker: the order of tells is the order of asks)."""
    experiment(zoo, tmp_path, budget={"evaluations": 14},
               searcher={"name": "nevergrad:TwoPointsDE", "options": {"num_workers": 1, "budget": 14}})
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(ref_dir)], tmp_path)
    assert code == 0, out
    reference, ref_hashes = final_state(ref_dir)
    assert reference[3] == 14  # one generation per tell

    rng = random.Random(1)
    kills = kill_and_resume(tmp_path / "exp.yaml", cut_dir, tmp_path, sorted(rng.sample(range(2, 13), 2)), rng, 0.3)
    assert kills == 2, f"only {kills} kills landed"
    resumed, hashes = final_state(cut_dir)
    assert hashes == ref_hashes  # the same genomes, recorded in the same order, each once
    np.testing.assert_array_equal(resumed[0], reference[0])
    assert resumed[1:] == reference[1:]
    store = cut_dir / "phase0-ps" / "run.sqlite"
    with RunStore(ref_dir / "phase0-ps" / "run.sqlite", readonly=True) as a, RunStore(store, readonly=True) as b:
        assert [g.best for g in a.generations()] == [g.best for g in b.generations()]
        assert all(g.best is not None and g.best_hash for g in b.generations())
        # nevergrad's pickled optimizer is not byte-stable across a reload; what it does next is
        after_ref, after_cut = Searcher.from_state(a.last_state()[1]), Searcher.from_state(b.last_state()[1])
        np.testing.assert_array_equal(np.array(after_ref.ask(3)), np.array(after_cut.ask(3)))


def test_ctrl_c_saves_and_says_how_to_resume(zoo, tmp_path):
    exp = experiment(zoo, tmp_path, budget={"evaluations": 600})
    exp["fitness"]["test"].append(gated_test_objective(tmp_path))  # the run cannot end before the Ctrl-C
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(tmp_path / "run")], tmp_path,
                        kill_at=2, store=tmp_path / "run" / "phase0-ps" / "run.sqlite", sig=signal.SIGINT)
    assert code == 130, out
    assert f"evomerge resume {tmp_path / 'run'}" in out
    store = RunStore(tmp_path / "run" / "phase0-ps" / "run.sqlite", readonly=True)
    assert store.count() > 0 and store.integrity_check() == "ok"


@pytest.mark.parametrize("bad, message", [
    ({"base_model": "nope"}, "base_model 'nope' is not a key of models"),
    ({"search_space": "no_such_space"}, "search space 'no_such_space' not found"),
    ({"searcher": {"name": "cmaes", "options": {}}, "budget": {"evaluations": 0}}, "greater than 0"),
    ({"fitness": {"objectives": [{"name": "x", "benchmark": {"type": "itemz"}}]}}, "'type' must be one of"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"searcher": {"name": "cmaes", "start_from_sources": True}}, "start_from_sources needs a population"),
    ({"evaluation": {"backend": "vllm", "vllm": {"tensor_parallel_size": 2}}}, "set gpus_per_worker: 2"),
    ({"evaluation": {"backend": "vllm", "vllm": {"kv_cache": "much"}}},
     "evaluation.vllm.kv_cache: 'much' is not a size"),
    ({"evaluation": {"backend": "tpu"}}, "evaluation.backend"),
])
def test_bad_experiments_fail_before_any_model_loads(zoo, tmp_path, bad, message):
    exp = experiment(zoo, tmp_path, **bad)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(exp))
    code, out = run_cli(["search", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "run")], tmp_path)
    assert code == 2 and message in out, out
    assert not (tmp_path / "run").exists()


def test_custom_function_with_two_objectives_drives_nsga2(zoo, tmp_path):
    """A user's fitness function returning {"rev": .., "tr": ..} feeds a two-objective search."""
    root = Path(__file__).resolve().parent.parent
    fn = f"{root / 'fitness/examples/two_objectives.py'}:score"
    exp = experiment(zoo, tmp_path, budget={"evaluations": 8}, searcher={"name": "nsga2", "options": {"pop_size": 4}},
                     fitness={"objectives": [{"name": "skills", "outputs": ["rev", "tr"],
                                              "benchmark": {"type": "custom", "fn": fn, "kwargs": {"n_items": 12}}}]})
    run_dir = start(tmp_path / "exp.yaml", tmp_path / "run")
    store = RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True)
    evs = store.evaluations()
    assert len(evs) == 8 and all(e.status == "ok" for e in evs)
    assert all(set(e.objectives) == {"rev", "tr"} for e in evs)
    assert (run_dir / "phase0-ps" / "pareto.png").exists()
    # the same function without `outputs:` is one clear error before the search, not a failure per candidate
    exp["fitness"]["objectives"][0].pop("outputs")
    exp["searcher"] = {"name": "cmaes", "options": {"popsize": 4}}
    exp["budget"] = {"evaluations": 4}
    (tmp_path / "exp2.yaml").write_text(yaml.safe_dump(exp))
    with pytest.raises(ValueError, match="cannot score the base model 'base': .*name a custom function's values "
                                         "with `outputs:`"):
        start(tmp_path / "exp2.yaml", tmp_path / "run2")
    assert not (tmp_path / "run2" / "phase0-ps").exists()  # no candidate was evaluated
