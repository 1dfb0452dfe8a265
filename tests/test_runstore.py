"""The run store on real SQLite files and real processes, killed with SIGKILL; and a resumed search."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from evomerge.runstore import Evaluation, RunStore, genome_hash


def child(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, db: Path, enough, poll: float = 0.005) -> None:
    """Poll the store read-only until ``enough(store)`` or the child exits (no timing is asserted)."""
    while proc.poll() is None:
        try:
            with RunStore(db, readonly=True) as r:
                if enough(r):
                    return
        except (FileNotFoundError, sqlite3.OperationalError, RuntimeError):
            pass  # not created yet
        time.sleep(poll)


def kill9(proc: subprocess.Popen) -> str:
    """SIGKILL the child if it still runs; its stdout. A child that died on its own must have succeeded."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    return out


# ---- basics ----------------------------------------------------------------------------------------
def test_wal_schema_and_meta(tmp_path):
    db = tmp_path / "run.db"
    with RunStore(db) as s:
        assert s.journal_mode() == "wal"
        s.set_meta("experiment", {"name": "demo", "genes": 15})
        s.set_meta("seed", 3)
        s.set_meta("seed", 4)
    with RunStore(db, readonly=True) as r:
        meta = r.meta()
        assert meta["experiment"] == {"name": "demo", "genes": 15} and meta["seed"] == 4
        assert meta["schema_version"] == 1 and meta["created_at"] > 0
        assert r.integrity_check() == "ok"
        with pytest.raises(PermissionError, match="read-only"):
            r.set_meta("x", 1)
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_record_is_idempotent_and_failures_can_be_retried(tmp_path):
    with RunStore(tmp_path / "run.db") as s:
        g = np.array([0.25, -1.0, 3.5])
        first = Evaluation(g, [0.6], recipe="r1", seconds=1.5, worker="w0", generation=0)
        assert s.record(first)
        assert not s.record(Evaluation(g, [0.9], recipe="r2", generation=5))  # finished: ignored
        got = s.lookup(g)
        assert got.objectives.tolist() == [0.6] and got.recipe == "r1" and got.attempts == 1 and s.count() == 1

        h = np.array([1.0, 2.0, 3.0])
        assert s.record(Evaluation(h, None, error="CUDA OOM", status="failed", worker="w1"))
        assert s.count("failed") == 1 and s.lookup(h).objectives is None and s.lookup(h).error == "CUDA OOM"
        assert s.record(Evaluation(h, [0.1], worker="w2"))  # the retry succeeds
        retried = s.lookup(h)
        assert retried.ok and retried.attempts == 2 and retried.worker == "w2" and retried.error is None
        assert not s.record(Evaluation(h, [0.2]))
        assert s.count() == 2 and s.count("ok") == 2 and s.count("failed") == 0

        with pytest.raises(ValueError, match="status='failed'"):
            Evaluation(h, [np.nan])
        with pytest.raises(ValueError, match="status must be one of"):
            Evaluation(h, [0.1], status="done")
        with pytest.raises(ValueError, match="non-finite"):
            Evaluation([np.inf, 1.0], [0.1])


def test_lookup_finds_float_identical_genomes_only(tmp_path):
    with RunStore(tmp_path / "run.db") as s:
        g = np.array([0.1, 0.0, 1 / 3, -2.5])
        s.record(Evaluation(g, [0.5]))
        assert s.lookup([0.1, -0.0, 1 / 3, -2.5]) is not None  # a list, and the other zero
        assert s.lookup(np.array(g, dtype=np.float64).reshape(2, 2)) is not None
        assert s.lookup(g.astype(np.float32)) is None  # float32 rounding gives other numbers
        nudged = g.copy()
        nudged[2] = np.nextafter(nudged[2], 1.0)
        assert s.lookup(nudged) is None
        stored = s.lookup(g).genome
        assert stored.tobytes() == (g + 0.0).tobytes()
        assert genome_hash(g) == genome_hash(list(g)) != genome_hash(nudged)


def test_named_objectives_fitness_and_seed(tmp_path):
    """The driver's view: objectives by benchmark name, a scalar fitness, the candidate's seed."""
    with RunStore(tmp_path / "run.db") as s:
        a = Evaluation.of(genome=[0.1, 0.2], objectives={"rev": 0.9, "tr": 0.5}, fitness=0.7, seed=42, generation=0,
                          responses=[{"benchmark": "rev", "item_ids": ["r1"], "scores": [1.0]}])
        b = Evaluation.of(genome=[0.3, 0.2], objectives={}, fitness=float("nan"), error="worker died", generation=0)
        c = Evaluation.of(genome=[0.5, 0.2], objectives={"rev": 0.95, "tr": float("nan")}, fitness=None, generation=1)
        assert (a.status, b.status, c.status) == ("ok", "failed", "failed")
        for e in (a, b, c):
            s.record(e)
        got = s.lookup([0.1, 0.2])
        assert got.objectives == {"rev": 0.9, "tr": 0.5} and list(got.objectives) == ["rev", "tr"]
        assert got.fitness == 0.7 and got.seed == 42 and got.genome_hash == RunStore.genome_hash([0.1, 0.2])
        assert s.lookup([0.3, 0.2]).objectives is None and s.lookup([0.3, 0.2]).fitness is None
        assert np.isnan(s.lookup([0.5, 0.2]).objectives["tr"])
        assert [e.rowid for e in s.evaluations()] == [1, 2, 3]
        assert s.best_fitness() == 0.7
        rows = s.history()
        assert [r["obj_rev"] for r in rows][::2] == [0.9, 0.95] and np.isnan(rows[1]["obj_rev"])
        assert [r["best_rev"] for r in rows] == [0.9, 0.9, 0.9]  # failed rows do not count
        assert [r["best_fitness"] for r in rows] == [0.7, 0.7, 0.7] and rows[0]["seed"] == 42
        with pytest.raises(ValueError, match="finite fitness"):
            Evaluation([0.0], {"rev": 1.0}, fitness=float("nan"))


def test_large_responses_round_trip_compactly(tmp_path):
    rng = np.random.default_rng(0)
    responses = {
        "rev": {"benchmark": "rev", "item_ids": [f"rev-{i:05d}" for i in range(4000)],
                "scores": rng.integers(0, 2, 4000).astype(float).tolist()},
        "tr": {"benchmark": "tr", "item_ids": [f"tr-{i:05d}" for i in range(3000)],
               "scores": rng.random(3000).tolist()},
    }
    with RunStore(tmp_path / "run.db") as s:
        s.record(Evaluation(np.ones(5), [0.5, 0.4], responses=responses))
        got = s.lookup(np.ones(5)).responses
        assert got == responses
        stored = s._db.execute("SELECT length(responses) FROM evaluations").fetchone()[0]
        assert stored < len(json.dumps(responses)) / 2


def test_generations_and_state_are_committed_together(tmp_path):
    db = tmp_path / "run.db"
    with RunStore(db) as s:
        genomes = [np.array([0.0, 1.0]), np.array([1.0, 0.0])]
        assert s.last_state() is None
        s.begin_generation(0, genomes)
        s.begin_generation(0, genomes)  # re-ask after a resume: a no-op
        with pytest.raises(ValueError, match="other genomes"):
            s.begin_generation(0, genomes[::-1])
        s.record(Evaluation(genomes[0], [0.3], generation=0))
        with pytest.raises(ValueError, match="no recorded evaluation"):
            s.commit_tell(0, b"state-0")
        assert s.last_state() is None and not s.generations()[0].told  # the failed commit left nothing
        s.record(Evaluation(genomes[1], None, status="failed", error="boom", generation=0))
        s.commit_tell(0, b"state-0", best=[0.3], best_hash=genome_hash(genomes[0]))
        assert s.last_state() == (0, b"state-0")
        assert s.state_file.read_bytes() == b"state-0"
        with pytest.raises(ValueError, match="already told"):
            s.begin_generation(0, genomes)
        with pytest.raises(ValueError, match="never begun"):
            s.commit_tell(1, b"state-1")
        gen = s.generations()[0]
        assert gen.told and gen.best == [0.3] and gen.asked == [genome_hash(g) for g in genomes]
        rows = s.history()
        assert [r["status"] for r in rows] == ["ok", "failed"]
        assert rows[1]["best_0"] == 0.3 and np.isnan(rows[1]["obj_0"])
        assert rows[0]["gene_1"] == 1.0


# ---- SIGKILL at a random instant -------------------------------------------------------------------
WRITER = """
    import json, sys
    import numpy as np
    from evomerge.runstore import Evaluation, RunStore, genome_hash
    db, start = sys.argv[1], int(sys.argv[2])
    s = RunStore(db)
    responses = {"b": {"item_ids": [f"i{k}" for k in range(300)], "scores": [0.5] * 300}}
    for gen in range(start, start + 10_000):
        rng = np.random.default_rng(gen)  # a resumed writer re-asks the same genomes
        genomes = [rng.random(8) for _ in range(5)]
        s.begin_generation(gen, genomes)
        for g in genomes:
            s.record(Evaluation(g, [float(g.sum())], recipe="r" * 200, responses=responses, generation=gen))
        state = json.dumps({"generation": gen, "hashes": [genome_hash(g) for g in genomes]}).encode() * 20
        s.commit_tell(gen, state, best=[float(max(g.sum() for g in genomes))])
        print(gen, flush=True)
"""


def check_consistent(db: Path) -> tuple[int, int]:
    """Everything a reopened store promises after a crash; returns (last told generation, rows)."""
    with RunStore(db) as s:
        assert s.integrity_check() == "ok"
        assert s.journal_mode() == "wal"
        gens = s.generations()
        told = [g for g in gens if g.told]
        assert [g.index for g in told] == list(range(len(told)))  # told generations form a prefix
        assert all(not g.told for g in gens[len(told):]) and len(gens) - len(told) <= 1
        last = s.last_state()
        assert last is not None and last[0] == told[-1].index  # the state is the last tell's, never a later one
        state = json.loads(last[1][: len(last[1]) // 20])
        assert state["generation"] == last[0] and state["hashes"] == told[-1].asked
        evaluations = {e.hash: e for e in s.evaluations()}
        for g in told:
            for h in g.asked:
                assert evaluations[h].ok and evaluations[h].generation == g.index
        for e in evaluations.values():  # every row fully readable
            assert e.objectives[0] == pytest.approx(e.genome.sum()) and len(e.responses["b"]["scores"]) == 300
        assert all(e.attempts == 1 for e in evaluations.values())
        return last[0], len(evaluations)


def test_writes_survive_sigkill_at_random_instants(tmp_path):
    db = tmp_path / "run.db"
    rng = random.Random(1234)
    start = 0
    for round_ in range(4):
        proc = child(WRITER, str(db), str(start))
        target = rng.randint(3, 25)
        wait_for(proc, db, lambda r: r.count() >= 5 * (start + target))
        time.sleep(rng.random() * 0.02)  # land anywhere: inside a transaction, between them, in an fsync
        out = kill9(proc)
        reported = [int(line) for line in out.split()]
        last, rows = check_consistent(db)
        assert reported and last >= reported[-1]  # every commit the writer saw return is there
        assert rows >= 5 * (last + 1)
        start = last + 1  # resume where the store says


def test_a_reader_sees_consistent_snapshots_while_a_writer_runs(tmp_path):
    db = tmp_path / "run.db"
    RunStore(db).close()
    proc = child(WRITER, str(db), "0")
    seen, reads = 0, 0
    try:
        while seen < 150 and proc.poll() is None:
            with RunStore(db, readonly=True) as r:
                rows = r.history()
                told = [g for g in r.generations() if g.told]
                last = r.last_state()
            assert len(rows) >= seen  # never goes back
            seen = len(rows)
            if told:
                assert last is not None and last[0] >= told[-1].index
            assert all(row["obj_0"] == pytest.approx(sum(row[f"gene_{i}"] for i in range(8))) for row in rows)
            reads += 1
    finally:
        kill9(proc)
    assert seen >= 150 and reads >= 2


# ---- end to end: a searcher killed and resumed from the store --------------------------------------
SEARCH = """
    import sys, time
    from pathlib import Path
    import numpy as np
    from evomerge.config import EstimatorSpec
    from evomerge.estimators import EstimatorInputs, PhaseView, make_fitness_estimator
    from evomerge.loop import open_searcher, search
    from evomerge.objectives import Objectives
    from evomerge.recipe import Recipe
    from evomerge.runstore import RunStore
    from evomerge.searchers import make_searcher
    from evomerge.workers import CandidateResult

    db, log, generations = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lower, upper = np.array([-1.0, -2, 0, 0, -1, -3]), np.array([1.0, 2, 1, 3, 2, 3])
    target = np.array([0.5, -1.5, 0.9, 0.2, 1.7, -2.0])
    genome_of = {}  # recipe id -> genome: the pool below scores the genome itself

    class FunctionPool:
        # The Pool protocol over a plain function: one slot, tasks run in submission order.
        size = 1
        def __init__(self):
            self.queue, self.next = [], 0
        def submit(self, task):
            self.queue.append((self.next, task)); self.next += 1
            return self.next - 1
        def free_slots(self):
            return 0 if self.queue else 1
        def next_done(self):
            ticket, task = self.queue.pop(0)
            g = genome_of[id(task.recipe)]
            with open(log, "a") as f:  # one line per evaluation actually computed
                f.write("x\\n")
            time.sleep(0.002)  # a little work, so that kills land during evaluations too
            if g[0] > 0.9:  # a failing corner: failures must resume too
                return ticket, CandidateResult(error="out of memory")
            return ticket, CandidateResult(objectives={"y": -float(np.sum((g - target) ** 2))})

    def decode(g):
        recipe = Recipe()
        genome_of[id(recipe)] = g
        return recipe, 0

    objectives = Objectives(("y",), (1.0,))
    store = RunStore(db)
    inputs = EstimatorInputs(EstimatorSpec(), 0, {}, objectives, None, Path(db).parent, Path(db).parent, None)
    estimator = make_fitness_estimator(inputs)
    searcher, index = open_searcher(store, lambda: make_searcher("cmaes", lower, upper, seed=11, popsize=8))
    search(searcher, store, FunctionPool(), decode, estimator, PhaseView(0, store, None), objectives,
           budget=8 * generations, generation=index)
    best = searcher.best()
    print(repr(best[0].tolist()), repr(best[1].tolist()), searcher.n_told)
"""


def run_search(db: Path, log: Path, generations: int) -> subprocess.Popen:
    return child(SEARCH, str(db), str(log), str(generations))


def test_killed_and_resumed_search_ends_exactly_like_an_uninterrupted_one(tmp_path):
    generations = 14
    ref = run_search(tmp_path / "ref.db", tmp_path / "ref.log", generations)
    ref_out, ref_err = ref.communicate()
    assert ref.returncode == 0, ref_err[-3000:]

    db, log = tmp_path / "run.db", tmp_path / "run.log"
    rng = random.Random(7)
    kills = 0
    for target in sorted(rng.sample(range(4, 8 * generations - 30), 5)):  # leave work after the last kill
        proc = run_search(db, log, generations)
        wait_for(proc, db, lambda r: r.count() >= target)
        time.sleep(rng.random() * 0.01)
        if proc.poll() is None:
            kills += 1
        kill9(proc)
    final = run_search(db, log, generations)
    out, err = final.communicate()
    assert final.returncode == 0, err[-3000:]
    assert kills >= 3

    assert out == ref_out  # same best genome and objectives (repr of the floats) and the same number of tells
    with RunStore(tmp_path / "ref.db", readonly=True) as a, RunStore(db, readonly=True) as b:
        ea, eb = a.evaluations(), b.evaluations()
        assert [e.hash for e in ea] == [e.hash for e in eb]  # same evaluations, recorded in the same order
        assert [(e.status, e.objectives) for e in ea] == [(e.status, e.objectives) for e in eb]
        assert all(e.attempts == 1 for e in eb)  # none recorded twice
        assert b.count("failed") > 0
        assert [g.asked for g in a.generations()] == [g.asked for g in b.generations()]
        assert [g.best for g in a.generations()] == [g.best for g in b.generations()]
        assert a.last_state()[1] == b.last_state()[1]  # even the saved searcher states are byte-identical
        assert b.integrity_check() == "ok"
    computed = len(log.read_text().split())
    # evaluations lost with a killed process were computed again, nothing else was
    assert len(eb) <= computed <= len(eb) + kills
