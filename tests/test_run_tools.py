"""Living with a long search: `evomerge status` while it runs, `evomerge export` of any candidate,
`evomerge report` of a killed run, and the trackers' files read back (real zoo searches)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_search import experiment, gated_test_objective

from evomerge.runstore import RunStore

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def launch(tmp: Path, run: Path) -> subprocess.Popen:
    return subprocess.Popen(EVOMERGE + ["search", str(tmp / "exp.yaml"), "-o", str(run)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(EVOMERGE + list(args), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def wait_for(proc: subprocess.Popen, run: Path, done: int, deadline: float = 900) -> dict:
    """Poll `evomerge status --json` (another process) until ``done`` candidates are recorded."""
    t0 = time.time()
    while time.time() - t0 < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "search ended"
        if (run / "experiment.yaml").exists():
            status = json.loads(cli("status", str(run), "--json").stdout)
            if status["phases"] and status["phases"][-1]["done"] >= done:
                return status
        time.sleep(1.0)
    raise AssertionError(f"fewer than {done} candidates after {deadline} s")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(log_dir))
    mux.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("tensors", []) + tags.get("scalars", []):
            events = mux.Tensors(run, tag) if tag in tags.get("tensors", []) else mux.Scalars(run, tag)
            for e in events:
                value = float(e.tensor_proto.float_val[0]) if hasattr(e, "tensor_proto") else float(e.value)
                out.setdefault(tag, []).append((e.step, value))
    return out


def test_status_while_running_export_any_candidate_and_tensorboard(zoo, tmp_path):
    experiment(zoo, tmp_path, budget={"evaluations": 24}, tracking={"tensorboard": "tb"})
    run = tmp_path / "run"
    proc = launch(tmp_path, run)
    try:
        mid = wait_for(proc, run, 3)
        # read from another process while the search writes: a consistent, plausible snapshot
        phase = mid["phases"][0]
        assert mid["state"].startswith("searching phase 0") and mid["phases_total"] == 1
        assert mid["pid"] == str(proc.pid)  # the run lock's holder
        assert phase["budget"] == 24 and 3 <= phase["done"] < 24, phase
        assert phase["best"]["fitness"] is not None and set(phase["best"]["objectives"]) == set(zoo.skills)
        assert phase["items_scored"] == phase["done"] * 40 * len(zoo.skills)  # every item, full estimator
        assert set(phase["workers"]) and all(0 < u["share"] <= 1.0 + 1e-6 for u in phase["workers"].values())
        assert phase["candidates_per_min"] > 0 and mid["left_s"] > 0
        assert set(mid["hand_recipes"]) == {"uniform merge", "task arithmetic (w=1)", "TIES (d=0.5, w=1)",
                                            "DARE-TIES (d=0.5, w=1)"}
        human = cli("status", str(run)).stdout
        assert "candidates" in human and "/ 24" in human and "best so far" in human
        # export while the run goes on: rank 1 of what is stored now
        cli("export", str(run), "--rank", "1", "-o", str(tmp_path / "early"))
        assert (tmp_path / "early" / "config.json").exists() and (tmp_path / "early.mergekit.yml").exists()
        assert proc.wait(timeout=900) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    final = json.loads(cli("status", str(run), "--json").stdout)
    assert final["state"] == "done" and final["phases"][0]["done"] == 24 and final["left_s"] is None
    summary = json.loads((run / "summary.json").read_text())
    best_hash = summary["chosen"]["best"]["genome_hash"]
    cli("export", str(run), "--rank", "1", "-o", str(tmp_path / "rank1"))
    cli("export", str(run), "--hash", best_hash[:10], "-o", str(tmp_path / "byhash"))
    by_rank, by_hash = tensors(tmp_path / "rank1"), tensors(tmp_path / "byhash")
    assert json.loads((tmp_path / "byhash.candidate.json").read_text())["genome_hash"] == best_hash
    assert json.loads((tmp_path / "rank1.candidate.json").read_text())["genome_hash"] == best_hash
    assert set(by_rank) == set(by_hash) and all(torch.equal(by_rank[k], by_hash[k]) for k in by_rank)
    if summary["exported_hand_recipe"] is None:  # the run exported the search's best: the same tensors
        own = tensors(run / "best")
        assert set(own) == set(by_hash) and all(torch.equal(own[k], by_hash[k]) for k in own)
    assert (tmp_path / "rank1" / "tokenizer.json").exists()
    # a lower rank is another candidate, with its own recipe
    cli("export", str(run), "--rank", "5", "-o", str(tmp_path / "rank5"))
    assert json.loads((tmp_path / "rank5.candidate.json").read_text())["genome_hash"] != best_hash
    # TensorBoard: one point per told generation, best so far never decreasing, the sources' run ids kept
    with RunStore(run / "phase0-ps" / "run.sqlite", readonly=True) as store:
        told = sum(g.told for g in store.generations())
        assert store.get_meta("tracking_run_ids") == {"tensorboard": str(run / "tb")}
    tb = scalars(run / "tb")
    best = [v for _, v in sorted(tb["phase0/best"])]
    assert [s for s, _ in sorted(tb["phase0/best"])] == list(range(told)) and best == sorted(best)
    assert best[-1] == pytest.approx(final["phases"][0]["best"]["fitness"], abs=1e-6)  # float32 in TB
    assert {f"phase0/objective/{s}" for s in zoo.skills} <= set(tb) and "phase0/items_scored" in tb
    assert (run / "sources.json").exists() and set(json.loads((run / "sources.json").read_text())) == \
        {"base", "rev", "sort", "tr"}


def test_report_of_a_killed_run_and_resume_continues_the_tracked_run(zoo, tmp_path):
    exp = experiment(zoo, tmp_path, budget={"evaluations": 18}, tracking={"tensorboard": "tb"})
    exp["fitness"]["test"].append(gated_test_objective(tmp_path))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    run = tmp_path / "run"
    proc = launch(tmp_path, run)
    try:
        wait_for(proc, run, 8)  # past the first generation (popsize 6); the gate holds it before the test split
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "summary.json").exists()
    cli("report", str(run))
    text = (run / "report.md").read_text()
    assert "has not finished" in text and "Held-out test" not in text
    for f in ("phase0-ps/fitness.png", "phase0-ps/coefficients.png", "phase0-ps/history.csv"):
        assert (run / f).stat().st_size > 0, f
    assert not (run / "summary.json").exists()  # still an unfinished run for status and resume
    killed = json.loads(cli("status", str(run), "--json").stdout)
    done = killed["phases"][0]["done"]
    # the killed process holds no lock: the run is stopped, not searching
    assert done >= 8 and killed["state"].startswith("stopped") and killed["pid"] is None
    cli("report", str(run), "--format", "svg")
    assert (run / "phase0-ps" / "fitness.svg").read_text().lstrip().startswith("<?xml")
    # resume: the same TensorBoard folder, each generation logged once
    from evomerge.run import resume

    (tmp_path / "gate").unlink()
    resume(run)
    with RunStore(run / "phase0-ps" / "run.sqlite", readonly=True) as store:
        told = sum(g.told for g in store.generations())
    steps = sorted(s for s, _ in scalars(run / "tb")["phase0/best"])
    assert steps == list(range(told))
    cli("report", str(run))
    assert "has not finished" not in (run / "report.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install "
                    "'evomerge[wandb]'); the W&B tracker is tested where it is")
def test_wandb_offline_writes_a_run_resume_continues_it(zoo, tmp_path):
    from evomerge.run import resume, start

    experiment(zoo, tmp_path, budget={"evaluations": 12}, tracking={"wandb": {"project": "t", "mode": "offline"}})
    run = start(tmp_path / "exp.yaml", tmp_path / "run")
    with RunStore(run / "phase0-ps" / "run.sqlite", readonly=True) as store:
        run_id = store.get_meta("tracking_run_ids")["wandb"]
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    resume(run)
    with RunStore(run / "phase0-ps" / "run.sqlite", readonly=True) as store:
        assert store.get_meta("tracking_run_ids")["wandb"] == run_id


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (pip install "
                    "'evomerge[mlflow]'); the MLflow tracker is tested where it is")
def test_mlflow_local_file_store(zoo, tmp_path):
    from mlflow.tracking import MlflowClient

    from evomerge.run import start

    uri = (tmp_path / "mlruns").as_uri()
    experiment(zoo, tmp_path, budget={"evaluations": 12}, tracking={"mlflow": {"tracking_uri": uri}})
    run = start(tmp_path / "exp.yaml", tmp_path / "run")
    with RunStore(run / "phase0-ps" / "run.sqlite", readonly=True) as store:
        run_id = store.get_meta("tracking_run_ids")["mlflow"]
        told = sum(g.told for g in store.generations())
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "phase0.best")
    assert sorted(m.step for m in history) == list(range(told))


def test_choose_by_rank_hash_and_pareto_on_a_real_store(tmp_path):
    """The choice rules on a run store written by hand: ranks by fitness (earliest among equals), hash
    prefixes that must be unique, failures never chosen, the Pareto set over the named objectives."""
    from evomerge.candidates import choose
    from evomerge.runstore import Evaluation

    with RunStore(tmp_path / "run.sqlite") as store:
        for i, (a, b) in enumerate([(0.9, 0.1), (0.5, 0.5), (0.1, 0.9), (0.4, 0.4), (0.5, 0.5)]):
            store.record(Evaluation.of([float(i)], {"a": a, "b": b}, fitness=(a + b) / 2, generation=0))
        store.record(Evaluation.of([9.0], None, error="out of memory", generation=0))
        evs = store.evaluations()
    assert [e.genome[0] for e in choose(evs, rank=1)] == [0.0]  # 0.5 for four of them: the first recorded
    assert choose(evs, rank=5)[0].genome[0] == 3.0
    with pytest.raises(ValueError, match="choose 1..5"):
        choose(evs, rank=6)
    failed = evs[-1]
    with pytest.raises(ValueError, match="out of memory"):
        choose(evs, hash_prefix=failed.genome_hash[:12])
    with pytest.raises(ValueError, match="no candidate"):
        choose(evs, hash_prefix="zz")
    with pytest.raises(ValueError, match="exactly one"):
        choose(evs, rank=1, pareto=True)
    # 1 and 4 score the same: neither dominates the other, both are on the front
    assert sorted(e.genome[0] for e in choose(evs, pareto=True)) == [0.0, 1.0, 2.0, 4.0]


def test_tracking_config_is_checked_before_any_model_loads(tmp_path):
    from evomerge.config import experiment_from_data

    base = {"name": "t", "models": {"base": "zoo:base", "rev": "zoo:rev"}, "base_model": "base",
            "search_space": "ps_task_arithmetic_layers", "budget": {"evaluations": 4},
            "fitness": {"objectives": [{"name": "rev", "benchmark": {"type": "items", "path": "zoo:rev/fitness"}}]}}
    assert experiment_from_data({**base, "tracking": {"tensorboard": "tb"}}, tmp_path / "e.yaml").tracking
    with pytest.raises(ValueError, match="tensorboard"):  # a misspelt key names the allowed ones
        experiment_from_data({**base, "tracking": {"tensorbord": "tb"}}, tmp_path / "e.yaml")
    with pytest.raises(ValueError, match="offline"):
        experiment_from_data({**base, "tracking": {"wandb": {"project": "p", "mode": "local"}}}, tmp_path / "e.yaml")
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(ValueError, match=r"evomerge\[mlflow\]"):
            experiment_from_data({**base, "tracking": {"mlflow": {"tracking_uri": "file:x"}}}, tmp_path / "e.yaml")


def test_pareto_search_draws_svg_and_exports_the_front(zoo, tmp_path):
    """NSGA-II on two objectives with `export: {figures: svg}`: the Pareto plot is an SVG, and
    `evomerge export --pareto` writes every non-dominated candidate of the store, each with its recipe."""
    from evomerge.candidates import choose
    from evomerge.run import start

    exp = experiment(zoo, tmp_path, budget={"evaluations": 12}, searcher={"name": "nsga2", "options": {"pop_size": 6}},
                     export={"top_k": 2, "figures": "svg"}, references=[])
    exp["fitness"]["objectives"] = exp["fitness"]["objectives"][:2]
    exp["fitness"]["test"] = exp["fitness"]["test"][:2]
    (tmp_path / "exp.yaml").write_text(__import__("yaml").safe_dump(exp))
    run = start(tmp_path / "exp.yaml", tmp_path / "run")
    assert (run / "phase0-ps" / "pareto.svg").read_text().lstrip().startswith("<?xml")
    assert not (run / "phase0-ps" / "pareto.png").exists()
    cli("export", str(run), "--pareto", "-o", str(tmp_path / "front"))
    with RunStore(run / "phase0-ps" / "run.sqlite", readonly=True) as store:
        front = choose(store.evaluations(), pareto=True)
    written = sorted(p.name for p in (tmp_path / "front").iterdir() if p.is_dir())
    assert written == sorted(f"pareto-{j + 1}" for j in range(len(front)))
    hashes = {json.loads((tmp_path / "front" / f"{n}.candidate.json").read_text())["genome_hash"] for n in written}
    assert hashes == {e.genome_hash for e in front}
    assert all((tmp_path / "front" / f"{n}.mergekit.yml").exists() for n in written)
