"""The run folder under faults: a failed start does not block its fix, a changed experiment or a damaged
store is refused by resume before anything is written, one process per folder (a real second
`evomerge resume` while a search runs; a killed holder's lock released), plain progress lines in a
log, and a DFS run whose best is a hand recipe writes its report."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from evomerge.progress import PlainLines
from evomerge.run import RunExists, start
from evomerge.run_folder import RunFolder
from evomerge.runstore import RunStore, RunStoreDamaged
from evomerge.zoo.skills import write_jsonl

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "EVOMERGE_PROGRESS_EVERY": "0"}


def write_experiment(zoo, tmp: Path, name: str = "exp.yaml", **over) -> Path:
    """A small search: one skill, 24 fitness items, no hand recipes, no held-out test."""
    items = tmp / "rev-fitness.jsonl"
    if not items.exists():
        write_jsonl(items, zoo.items("rev", "fitness")[::25][:24])
    exp = {"name": "t", "seed": 3, "models": {"base": "zoo:base", "rev": "zoo:rev", "tr": "zoo:tr"},
           "base_model": "base", "search_space": "ps_task_arithmetic_layers", "budget": {"evaluations": 2},
           "searcher": {"name": "random"}, "references": [],
           "fitness": {"objectives": [{"name": "rev", "benchmark": {"type": "items", "path": str(items)}}]},
           "device": "cpu"}
    exp.update(over)
    path = tmp / name
    path.write_text(yaml.safe_dump(exp))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(EVOMERGE + list(args), env=ENV, capture_output=True, text=True, timeout=900)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's refusal: exit 2 and one line (no traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(zoo, tmp_path_factory) -> Path:
    """A real, finished tiny run (copied by each test that changes it)."""
    tmp = tmp_path_factory.mktemp("finished")
    return start(write_experiment(zoo, tmp), tmp / "run", Console(file=io.StringIO()))


def copy_run(run: Path, tmp: Path) -> Path:
    """A copy of a run folder whose frozen experiment still points at the original's files."""
    shutil.copytree(run, tmp / "run")
    return tmp / "run"


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run but the lock and SQLite's shared-memory index and write-ahead log, which
    opening a WAL store for reading may create (they hold no data of the run)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "run.lock" and not p.name.endswith(("-shm", "-wal"))}


# -- a failed start does not block its fix ----------------------------------------------------------
def test_a_failed_start_does_not_block_the_corrected_search(zoo, tmp_path):
    """The benchmark check fails after the experiment was frozen (the fitness function raises on the
    base model); the corrected experiment then starts in the same folder, no `resume`, no rm -rf."""
    fn = tmp_path / "broken.py"
    fn.write_text("def score(model, tokenizer, ctx):\n    raise RuntimeError('the scoring server is down')\n")
    bad = write_experiment(zoo, tmp_path, "bad.yaml", fitness={"objectives": [
        {"name": "rev", "benchmark": {"type": "custom", "fn": f"{fn}:score"}}]})
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="cannot score the base model 'base': .*scoring server is down"):
        start(bad, run, Console(file=io.StringIO()))
    assert (run / "experiment.yaml").exists() and not RunFolder(run).began()  # a start, not a run
    out = io.StringIO()
    start(write_experiment(zoo, tmp_path), run, Console(file=out))
    assert "an earlier start never reached the search" in out.getvalue()
    assert (run / "summary.json").exists()
    assert yaml.safe_load((run / "experiment.yaml").read_text())["fitness"]["objectives"][0]["benchmark"]["type"] \
        == "items"


def test_a_run_that_began_is_refused_unless_restarted(zoo, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    exp = write_experiment(zoo, tmp_path)
    with pytest.raises(RunExists, match=r"evomerge resume .*--restart"):
        start(exp, run)
    out = io.StringIO()
    start(exp, run, Console(file=out), restart=True)
    assert "--restart: removed" in out.getvalue()
    with RunStore(run / "phase0-ps" / "run.sqlite", readonly=True) as store:
        assert store.count() == 2


def test_clear_removes_only_what_a_run_writes(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.freeze({"name": "x"}, {"seed": "0"})
    (folder.root / "phase0-ps").mkdir()
    RunStore(folder.root / "phase0-ps" / "run.sqlite").close()
    (folder.root / "notes.txt").write_text("mine")
    assert not folder.began()  # a phase store without generations or evaluations: not a run yet
    folder.clear()
    assert sorted(p.name for p in folder.root.iterdir()) == ["notes.txt"]


# -- fingerprint and resume -------------------------------------------------------------------------
@pytest.mark.parametrize("change, said", [
    (lambda exp, tmp: exp.update(seed=4), "seed (3 -> 4)"),
    (lambda exp, tmp: exp.update(search_space="ps_dare_ties_layers"), "search space"),
    (lambda exp, tmp: exp["fitness"].update(estimator={"kind": "random", "budget": 8}), "fitness.estimator"),
])
def test_resume_refuses_an_edited_experiment_before_writing(finished, tmp_path, change, said):
    run = copy_run(finished, tmp_path)
    frozen = yaml.safe_load((run / "experiment.yaml").read_text())
    change(frozen, tmp_path)
    (run / "experiment.yaml").write_text(yaml.safe_dump(frozen, sort_keys=False))
    before = snapshot(run)
    line = error_line(cli("resume", str(run)))
    assert "the experiment changed since the run started" in line and said in line, line
    assert snapshot(run) == before  # nothing written: the store's gene names are the run's


def test_resume_continues_with_an_edited_budget(finished, tmp_path):
    """The budget is not what results depend on: a user extends a finished search by editing it."""
    run = copy_run(finished, tmp_path)
    frozen = yaml.safe_load((run / "experiment.yaml").read_text())
    frozen["budget"] = {"evaluations": 3}
    (run / "experiment.yaml").write_text(yaml.safe_dump(frozen, sort_keys=False))
    out = cli("resume", str(run))
    assert out.returncode == 0, out.stderr
    assert "budget ([2] -> [3])" in out.stderr and "continuing" in out.stderr
    with RunStore(run / "phase0-ps" / "run.sqlite", readonly=True) as store:
        assert store.count() == 3
    assert json.loads((run / "fingerprint.json").read_text())["budget"] == "[3]"


def test_resume_refuses_an_item_file_edited_in_place(zoo, tmp_path):
    exp = write_experiment(zoo, tmp_path)
    run = start(exp, tmp_path / "run", Console(file=io.StringIO()))
    items = tmp_path / "rev-fitness.jsonl"
    items.write_text(items.read_text().replace('"answer": "', '"answer": "x', 1))
    before = snapshot(run)
    line = error_line(cli("resume", str(run)))
    assert "items of fitness 'rev'" in line, line
    assert snapshot(run) == before


@pytest.mark.parametrize("damage, said", [
    (lambda p: os.truncate(p, p.stat().st_size // 2), "database disk image is malformed"),
    (lambda p: os.truncate(p, 0), "no such table: meta"),
])
def test_a_damaged_run_store_is_refused_naming_the_file(finished, tmp_path, damage, said):
    run = copy_run(finished, tmp_path)
    db = run / "phase0-ps" / "run.sqlite"
    damage(db)
    before = snapshot(run)
    for args in (["resume", str(run)], ["status", str(run)], ["export", str(run), "--rank", "1", "-o",
                                                                 str(tmp_path / "out")]):
        line = error_line(cli(*args))
        assert str(db) in line and said in line and "damaged" in line, line
    with pytest.raises(RunStoreDamaged):
        RunStore(db)  # never opened as a new, empty store
    assert snapshot(run) == before
    exp = Path(yaml.safe_load((run / "experiment.yaml").read_text())["_experiment_dir"]) / "exp.yaml"
    with pytest.raises(RunStoreDamaged, match="damaged"):  # a search into the folder is refused too
        start(exp, run)


# -- one process per run folder ---------------------------------------------------------------------
def test_a_second_process_is_refused_and_a_killed_holder_releases_the_lock(zoo, tmp_path):
    exp = write_experiment(zoo, tmp_path, budget={"evaluations": 600})
    run = tmp_path / "run"
    proc = subprocess.Popen(EVOMERGE + ["search", str(exp), "-o", str(run)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        store = run / "phase0-ps" / "run.sqlite"
        deadline = time.time() + 900  # a guard against a hung child, not a measurement
        while proc.poll() is None and time.time() < deadline:
            if store.exists():
                with RunStore(store, readonly=True) as s:
                    if s.count() >= 1:
                        break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0]
        line = error_line(cli("resume", str(run)))
        assert f"in use by evomerge process {proc.pid}" in line, line
        line = error_line(cli("search", str(exp), "-o", str(run)))
        assert f"in use by evomerge process {proc.pid}" in line, line
        status = cli("status", str(run), "--json")  # readers take no lock
        assert status.returncode == 0, status.stderr
        running = json.loads(status.stdout)
        assert running["phases"][0]["done"] >= 1 and running["pid"] == str(proc.pid)
        with RunStore(store, readonly=True) as s:
            rank = cli("export", str(run), "--hash", s.evaluations("ok")[0].genome_hash[:16], "-o",
                       str(tmp_path / "out"))
        assert rank.returncode == 0, rank.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate()[0]
    # without a terminal (a pipe here, a file under nohup or SLURM) the search logs plain progress lines
    assert "phase 0 (ps): 1/600 candidates, generation 1, best " in log, log
    stopped = json.loads(cli("status", str(run), "--json").stdout)
    assert stopped["pid"] is None and stopped["state"] == "stopped in phase 0 (ps)"
    with RunFolder(run).lock():  # the kernel released the dead holder's lock
        assert (run / "run.lock").read_text().strip() == str(os.getpid())


def test_the_lock_names_its_holder_in_process(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        child = subprocess.run([sys.executable, "-c", "import sys; from evomerge.run_folder import RunFolder\n"
                                "try:\n with RunFolder(sys.argv[1]).lock(): print('got it')\n"
                                "except ValueError as e: print(e)", str(folder.root)],
                               capture_output=True, text=True, env=ENV)
        assert f"in use by evomerge process {os.getpid()}" in child.stdout, child.stdout + child.stderr
    with folder.lock():  # released on exit, taken again
        pass


# -- progress without a terminal --------------------------------------------------------------------
def test_plain_progress_lines_at_a_steady_interval():
    now = [0.0]
    lines: list[str] = []
    progress = PlainLines(lines.append, "phase 0 (ps)", 240, 0, every=60.0, clock=lambda: now[0])
    for t, done in [(0, 0), (10, 4), (59, 10), (61, 12), (100, 20), (121, 24)]:
        now[0] = t
        progress.update(done, done // 4, "0.500")
    progress.close()
    assert len(lines) == 4, lines  # t=0, t=61, t=121, and the last state at close
    assert lines[1] == "phase 0 (ps): 12/240 candidates, generation 3, best 0.500, 11.8 candidates/min, ~19m19s left"


# -- a DFS run whose best is a hand recipe ----------------------------------------------------------
def test_a_dfs_search_beaten_by_a_hand_recipe_exports_it_and_writes_the_report(zoo, tmp_path):
    """DFS over the base's layers only cannot beat the uniform merge of the experts: the hand recipe
    (a PS merge) is exported, and the DFS phase's report section still draws the search's layer plan."""
    space = {"kind": "dfs", "pool": ["base"], "repeats": 1, "scale_mode": "hop",
             "scale": {"low": 0.9, "high": 1.1, "init": 1.0}}
    exp = write_experiment(zoo, tmp_path, search_space=space,
                           references=[{"name": "uniform merge", "method": "task_arithmetic"}])
    out = io.StringIO()
    run = start(exp, tmp_path / "run", Console(file=out))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exported_hand_recipe"] == "uniform merge", out.getvalue()
    assert (run / "best.mergekit.yml").exists() and (run / "best" / "config.json").exists()
    report = (run / "report.md").read_text()
    assert "## Phase 0: dfs" in report and "layer_plan." in report
    assert "the hand recipe 'uniform merge' scored higher and is exported as best" in report


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A child forked while the lock is held (multiprocessing, an engine process) does not hold it once
    its parent is gone: the lock is released with the process that took it."""
    folder = RunFolder(tmp_path / "run")
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # the "driver": takes the lock, forks a long-lived child, then dies
        try:
            with folder.lock():
                if os.fork() == 0:  # the orphan: waits until the test has checked the lock
                    os.read(done_r, 1)
                    os._exit(0)
                os.write(ready_w, b"x")
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    os.waitpid(holder, 0)  # the driver is gone; its orphan still runs
    try:
        with folder.lock():
            pass
    finally:
        os.write(done_w, b"x")


def test_a_model_folder_changed_on_disk_is_named(tmp_path):
    """Weights are fingerprinted by name, size and mtime (never read), small files by content."""
    from evomerge.fingerprint import changes, model_signature

    model = tmp_path / "expert"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"\0" * (2 << 20))
    before = {"models.expert": f"./expert @ {model} #{model_signature(model)}", "seed": "0"}
    assert changes(before, {**before}) == []
    os.utime(model / "model.safetensors", ns=(1, 1))  # the weights rewritten (same size)
    after = {"models.expert": f"./expert @ {model} #{model_signature(model)}", "seed": "0"}
    assert changes(before, after) == ["models.expert (its files changed)"]
    (model / "config.json").write_text('{"hidden_size": 9}')
    moved = {"models.expert": f"./other @ {tmp_path / 'other'} #{model_signature(model)}", "seed": "1"}
    assert changes(before, moved) == [f"models.expert (./expert @ {model} -> ./other @ {tmp_path / 'other'})",
                                      "seed (0 -> 1)"]


def test_a_folder_evomerge_did_not_make_is_never_cleared(zoo, tmp_path):
    """`-o` pointed at a folder of one's own (here with a `best/` of its own): nothing of it is removed,
    even with --restart, since it holds no experiment.yaml or fingerprint of a run."""
    mine = tmp_path / "mine"
    (mine / "best").mkdir(parents=True)
    (mine / "best" / "weights.bin").write_bytes(b"1")
    fn = tmp_path / "broken.py"
    fn.write_text("def score(model, tokenizer, ctx):\n    raise RuntimeError('stop here')\n")
    exp = write_experiment(zoo, tmp_path, fitness={"objectives": [
        {"name": "rev", "benchmark": {"type": "custom", "fn": f"{fn}:score"}}]})
    with pytest.raises(ValueError, match="stop here"):
        start(exp, mine, Console(file=io.StringIO()), restart=True)
    assert (mine / "best" / "weights.bin").read_bytes() == b"1"


def test_a_missing_model_folder_leaves_no_run_folder(zoo, tmp_path):
    """Found before anything is written (before: RUN/experiment.yaml was left, and blocked the fix)."""
    exp = write_experiment(zoo, tmp_path, models={"base": "zoo:base", "rev": "./no_such_model", "tr": "zoo:tr"})
    line = error_line(cli("search", str(exp), "-o", str(tmp_path / "run")))
    assert "models.rev" in line and "no_such_model" in line, line
    assert not (tmp_path / "run").exists()
