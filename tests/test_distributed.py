"""Distributed search on real Ray (CPU, the zoo): searches through ``evomerge.run.start`` on two
worker actors, a worker killed mid-evaluation, a fitness function that raises, a two-node cluster on
loopback, and the pool's retry limit and steady-state calls.

Every Ray process a test starts is stopped by that test and checked gone: the embedded Ray by the
pool's ``close()`` (the test records the processes it saw while the search ran), the two-node
cluster by killing the processes that name its temp folder, and their children.
"""

from __future__ import annotations

import os

# Ray reads its authentication mode when imported. Embedded clusters turn token auth on by default,
# and `ray start` honours a token it finds; a driver joining by explicit address only when told so.
# One mode for this process and the `ray start`s it runs keeps them able to talk to each other.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from rich.console import Console

from evomerge.merge.config import MergeConfig
from evomerge.recipe import LayerPlan, Recipe
from evomerge.run import start
from evomerge.runstore import RunStore
from evomerge.workers import Task
from evomerge.workers.placement import ClusterTooSmall, plan_placement
from evomerge.workers.ray_pool import RayPool

SKILLS = ("rev", "sort", "tr")
RAY_BIN = str(Path(sys.executable).with_name("ray"))

# A custom fitness function that logs every call (seed, pid) and misbehaves on request.
PROBE = '''
import os, time
from pathlib import Path


class Escape(BaseException):
    """Not an Exception: gets past Worker.evaluate and out of the actor method."""


def probe(model, tokenizer, ctx, log_dir, sleep=0.0, raise_odd=False, exit_seeds=(), escape_seeds=()):
    Path(log_dir, f"{ctx.seed}.{os.getpid()}.{time.time_ns()}").touch()
    if ctx.seed in exit_seeds:
        os._exit(13)  # the worker process dies, as under the OOM killer
    if ctx.seed in escape_seeds:
        raise Escape(f"escaped on seed {ctx.seed}")
    if raise_odd and ctx.seed % 2:
        raise ValueError(f"deliberate failure on seed {ctx.seed}")
    time.sleep(sleep)
    return float(next(model.parameters()).float().abs().mean())
'''


# ------------------------------------------------------------------------------------------ helpers


def write_experiment(tmp_path: Path, zoo, probe: dict | None = None, workers: int = 2, budget: int = 8,
                     items_per_skill: int = 60) -> Path:
    """A tiny demo: CMA-ES popsize 4 over per-layer task arithmetic of the zoo's experts, fitness on
    60 items per skill (every 10th fitness item, so all lengths appear), no test split."""
    (tmp_path / "items").mkdir(exist_ok=True)
    objectives = []
    for skill in SKILLS:
        rows = zoo.items(skill, "fitness")[::10][:items_per_skill]
        (tmp_path / "items" / f"{skill}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        objectives.append({"name": skill, "benchmark": {"type": "items", "path": f"items/{skill}.jsonl"}})
    if probe is not None:
        (tmp_path / "probe.py").write_text(PROBE)
        objectives.append({"name": "probe", "benchmark": {"type": "custom", "fn": "probe.py:probe", "kwargs": probe}})
    exp = {"name": "tiny", "seed": 0, "models": {"base": "zoo:base", **{s: f"zoo:{s}" for s in SKILLS}},
           "base_model": "base", "search_space": "ps_task_arithmetic_layers", "budget": {"evaluations": budget},
           "searcher": {"name": "cmaes", "options": {"popsize": 4, "sigma": 0.25}},
           "fitness": {"objectives": objectives}, "device": "cpu", "workers": workers,
           "references": []}  # these tests are about the pool: no hand recipes
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@contextmanager
def descendants_seen():
    """Every process below this one seen while the block runs (sampled): the embedded Ray's."""
    seen: dict[int, psutil.Process] = {}
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.is_set():
            for child in me.children(recursive=True):
                seen.setdefault(child.pid, child)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        if ray.is_initialized():  # only when the block failed before its pool closed
            ray.shutdown()


def running(p: psutil.Process) -> bool:
    """Still executing (a zombie has exited; only its parent, maybe init, has yet to reap it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_running(pid: int) -> bool:
    try:
        return running(psutil.Process(pid))
    except psutil.Error:
        return False


def assert_gone(procs, what: str) -> None:
    """Wait for ``procs`` to exit; kill and report any that did not (so a failure leaks nothing)."""
    alive = [p for p in procs if running(p)]
    deadline = time.monotonic() + 60
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if running(p)]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not alive, f"{what} left running: {[(p.pid, p.name()) for p in alive]}"


def probe_calls(log_dir: Path, candidates_only: bool = False) -> list[tuple[int, int]]:
    """(seed, pid) of every call of the probe fitness function, in call order. In a search, seed 0 is
    the check before it (the base scored on a few items of every benchmark): ``candidates_only``
    leaves it out."""
    calls = sorted((int(ns), int(seed), int(pid)) for seed, pid, ns in (f.name.split(".") for f in log_dir.iterdir()))
    return [(seed, pid) for _, seed, pid in calls if not (candidates_only and seed == 0)]


def store_of(run_dir: Path) -> RunStore:
    return RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True)


def parse_worker(name: str) -> dict:
    """``ray-<node8>-<actor8>:<host>:<pid>:<device>`` -> its parts."""
    ids, host, pid, device = name.split(":")
    _, node, actor = ids.split("-")
    return {"node": node, "actor": actor, "host": host, "pid": int(pid), "device": device}


# ------------------------------------------------------------------------------------ searches


@pytest.mark.slow
def test_search_runs_on_two_ray_workers(tmp_path, zoo):
    exp = write_experiment(tmp_path, zoo)
    with descendants_seen() as seen:
        run_dir = start(exp, tmp_path / "run", quiet())
        assert not ray.is_initialized()  # the pool started an embedded Ray and shut it down with the run
    assert len(seen) >= 4  # gcs, raylet, two actors at least
    assert_gone(seen.values(), "the embedded Ray")

    with store_of(run_dir) as store:
        evs = store.evaluations()
    assert len(evs) == 8
    assert all(e.status == "ok" and e.attempts == 1 for e in evs)
    workers = [parse_worker(e.worker) for e in evs]
    assert len({(w["node"], w["actor"]) for w in workers}) == 2  # both actors evaluated candidates
    assert len({w["node"] for w in workers}) == 1 and {w["device"] for w in workers} == {"cpu"}
    util = json.loads((run_dir / "summary.json").read_text())["worker_utilization"]
    assert set(util) == {e.worker for e in evs}
    assert all(0 < u <= 1 for u in util.values())


@pytest.mark.slow
def test_steady_state_search_with_drift_checks_on_two_ray_workers(tmp_path, zoo):
    # issue 24's crash: a drift check ran its full evaluation on the pool while the loop's other
    # candidate was in flight, and took the loop's result for its own (KeyError)
    path = write_experiment(tmp_path, zoo, budget=6, items_per_skill=20)
    exp = yaml.safe_load(path.read_text())
    exp["searcher"] = {"name": "nevergrad:TwoPointsDE", "options": {"num_workers": 2, "budget": 6}}
    exp["fitness"]["estimator"] = {"kind": "gpirt", "budget": 0.25, "calibration_models": 6,
                                   "drift_every": 1, "drift_threshold": 0.001}
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    with descendants_seen() as seen:
        run_dir = start(path, tmp_path / "run", quiet())
    assert_gone(seen.values(), "the embedded Ray")
    with store_of(run_dir) as store:
        evs = store.evaluations()
        assert len(evs) == 6 and all(e.status == "ok" for e in evs)
        assert [d["generation"] for d in store.get_meta("drift")] == list(range(len(store.generations())))


@pytest.mark.slow
def test_a_killed_worker_costs_only_its_candidate(tmp_path, zoo):
    log = tmp_path / "calls"
    log.mkdir()
    exp = write_experiment(tmp_path, zoo, probe={"log_dir": str(log), "sleep": 1.5})
    killed: list[tuple[int, int]] = []
    stop = threading.Event()

    def kill_first_caller() -> None:  # SIGKILL the first worker seen inside the fitness function
        while not stop.is_set() and not killed:
            calls = probe_calls(log, candidates_only=True)
            if calls:
                seed, pid = calls[0]
                os.kill(pid, signal.SIGKILL)
                killed.append((seed, pid))
            stop.wait(0.05)

    killer = threading.Thread(target=kill_first_caller, daemon=True)
    killer.start()
    try:
        with descendants_seen() as seen:
            run_dir = start(exp, tmp_path / "run", quiet())
    finally:
        stop.set()
        killer.join()
    assert_gone(seen.values(), "the embedded Ray")
    assert killed, "the fitness function was never called"
    seed, pid = killed[0]

    with store_of(run_dir) as store:
        evs = store.evaluations()
    assert len(evs) == 8 and all(e.status == "ok" and e.attempts == 1 for e in evs)
    calls = Counter(s for s, _ in probe_calls(log, candidates_only=True))
    assert set(calls) == {e.seed for e in evs}
    # The killed candidate was evaluated once more, on another process; every other one exactly once.
    assert calls[seed] == 2 and all(n == 1 for s, n in calls.items() if s != seed)
    retried = next(e for e in evs if e.seed == seed)
    assert parse_worker(retried.worker)["pid"] != pid
    assert not pid_running(pid)


@pytest.mark.slow
def test_a_failing_fitness_function_is_recorded_not_retried(tmp_path, zoo):
    log = tmp_path / "calls"
    log.mkdir()
    exp = write_experiment(tmp_path, zoo, probe={"log_dir": str(log), "raise_odd": True})
    with descendants_seen() as seen:
        run_dir = start(exp, tmp_path / "run", quiet())
    assert_gone(seen.values(), "the embedded Ray")

    with store_of(run_dir) as store:
        evs = store.evaluations()
    assert len(evs) == 8
    failed = [e for e in evs if e.status == "failed"]
    ok = [e for e in evs if e.status == "ok"]
    assert failed and ok  # this seed gives both kinds; the test needs both
    assert all(e.seed % 2 == 1 for e in failed) and all(e.seed % 2 == 0 for e in ok)
    for e in failed:
        assert f"deliberate failure on seed {e.seed}" in e.error
        assert e.attempts == 1
    # A candidate's own failure is final: the pool did not evaluate anything twice.
    assert Counter(s for s, _ in probe_calls(log, candidates_only=True)) == Counter({e.seed: 1 for e in evs})


# ------------------------------------------------------------------------------- two-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(temp_dir: str) -> set[psutil.Process]:
    """Processes of the cluster living in ``temp_dir`` (their command lines name its session
    folder) and their children (Ray renames agents and workers, e.g. ``ray::WorkerActor``)."""
    found: set[psutil.Process] = set()
    mark = f"{temp_dir}/session_"
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and running(p) and any(mark in a for a in p.info["cmdline"] or []):
                found.add(p)
                found.update(p.children(recursive=True))
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_search_on_a_two_node_cluster(tmp_path, zoo):
    # AF_UNIX socket paths must stay under 107 bytes and Ray puts them in <temp>/session_<date>_<pid>/
    # sockets/, so the nodes get a short folder in /tmp (removed below), not one under tmp_path.
    temp = tempfile.mkdtemp(prefix="emt-", dir="/tmp")
    port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    if env["RAY_AUTH_MODE"] == "token":  # the token both nodes and this driver read (made once if missing)
        subprocess.run([RAY_BIN, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              f"--object-store-memory={100 * 2**20}"]
    exp = write_experiment(tmp_path, zoo)
    try:
        subprocess.run([RAY_BIN, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                        '--resources={"node_a": 1}', *common], env=env, check=True, capture_output=True)
        subprocess.run([RAY_BIN, "start", f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}', *common],
                       env=env, check=True, capture_output=True)
        ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR")
        try:
            nodes = {next(k for k in n["Resources"] if k.startswith("node_")): n["NodeID"]
                     for n in ray.nodes() if n["Alive"]}
        finally:
            ray.shutdown()
        assert set(nodes) == {"node_a", "node_b"}
        kw = {"models": {"base": zoo.base}, "base": "base", "benchmarks": {"fitness": {}}, "device": "cpu"}
        with pytest.raises(ClusterTooSmall, match=r"can host 2 worker\(s\) of 1 CPU each, not 3.*node_a.*--workers 2"):
            RayPool(kw, workers=3, address=f"127.0.0.1:{port}")
        assert not ray.is_initialized()  # the refused pool let go of its connection
        run_dir = start(exp, tmp_path / "run", quiet(), {"address": f"127.0.0.1:{port}", "workers": 2})
        assert not ray.is_initialized()  # the pool disconnected; the cluster itself still runs
        with store_of(run_dir) as store:
            evs = store.evaluations()
        assert len(evs) == 8 and all(e.status == "ok" for e in evs)
        used = {parse_worker(e.worker)["node"] for e in evs}
        assert used == {nodes["node_a"][:8], nodes["node_b"][:8]}  # candidates ran on both nodes
        assert len(_cluster_processes(temp)) >= 4
    finally:
        if ray.is_initialized():
            ray.shutdown()
        procs = _cluster_processes(temp)
        for p in procs:  # as `ray stop` does, but only for this cluster: SIGTERM, a grace period, SIGKILL
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, survivors = psutil.wait_procs(procs, timeout=5)
        for p in survivors:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            assert_gone(procs, "the two-node cluster")
            assert not _cluster_processes(temp)
        finally:
            shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ pool


def _recipe(weight: float) -> Recipe:
    return Recipe(merge=MergeConfig.model_validate({
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": s, "parameters": {"weight": weight}} for s in SKILLS]}))


@pytest.mark.slow
def test_pool_retries_faults_up_to_the_limit_and_serves_steady_state(tmp_path, zoo_models):
    log = tmp_path / "calls"
    log.mkdir()
    (tmp_path / "probe.py").write_text(PROBE)
    spec = {"type": "custom", "name": "probe", "fn": f"{tmp_path / 'probe.py'}:probe",
            "kwargs": {"log_dir": str(log), "exit_seeds": [100], "escape_seeds": [200]}}
    kw = {"models": zoo_models, "base": "base", "benchmarks": {"fitness": {"probe": spec}}, "device": "cpu"}
    seeds = [0, 1, 100, 2, 200, 3]
    with descendants_seen() as seen:
        pool = RayPool(kw, workers=2, max_retries=2)
        try:
            first = {w["pid"] for w in pool.workers()}
            # State given by broadcast (PS+DFS: the PS merge joins the layer pool) must survive replacements.
            pool.broadcast("set_pool_member", "ps", _recipe(0.3).merge)
            out = list(pool.run([Task(_recipe(0.1 + 0.05 * i), None, "fitness", s) for i, s in enumerate(seeds)]))
            # Each task yields exactly one result.
            assert sorted(i for i, _ in out) == list(range(len(seeds)))
            results = {seeds[i]: r for i, r in out}
            assert all(results[s].ok for s in (0, 1, 2, 3))
            assert len({results[s].objectives["probe"] for s in (0, 1, 2, 3)}) == 4
            # A task that kills its worker: tried 1 + max_retries times, then a failed result.
            assert "failed on a worker 3 time(s)" in results[100].error and "died" in results[100].error
            # An exception escaping the actor (not an Exception): the same limit; the actor lives on.
            assert "failed on a worker 3 time(s)" in results[200].error and "escaped on seed 200" in results[200].error
            calls = Counter(s for s, _ in probe_calls(log))
            # Usually exactly {0..3: 1, 100: 3, 200: 3}. A worker killed by os._exit can take with it
            # the unsent reply of the task it finished just before: that task is charged and runs
            # again, and the fatal one gets that try back. Each such loss adds one to both sides.
            lost = sum(calls[s] - 1 for s in (0, 1, 2, 3))
            assert set(calls) == {0, 1, 2, 3, 100, 200} and calls[200] == 3
            assert calls[100] == 3 + lost, calls
            pool.broadcast("info")  # answered by every live worker: the replacements still starting finish first
            names = [w["name"] for w in pool.workers() if "name" in w]
            assert len(set(names)) == len(names) >= 4
            # Three deaths, three replacements; the dead processes are gone.
            assert pool.restarts == calls[100]
            dead_pids = {pid for s, pid in probe_calls(log) if s == 100}
            assert len(dead_pids) == calls[100]
            assert not any(pid_running(p) for p in dead_pids)

            # The replacements replayed the broadcast: a layer plan over "ps" runs on every worker
            # (a worker without it fails: "ps" is no model of the experiment).
            pool.broadcast("info")  # every live worker has started
            originals = {w["name"] for w in pool.workers()[:2]}
            plan = Recipe(plan=LayerPlan("ps", [("ps", 0), ("base", 1), ("ps", 2), ("ps", 3)]))
            dfs = [r for _, r in pool.run([Task(plan, None, "fitness", 50 + i) for i in range(4)])]
            assert all(r.ok for r in dfs), [r.error for r in dfs]
            assert {r.worker for r in dfs} - originals  # some ran on a replacement

            # Steady state: a ticket per task, results as they finish, room reported.
            assert pool.pending() == 0
            with pytest.raises(LookupError):
                pool.next_done()
            tickets = [pool.submit(Task(_recipe(0.2), None, "fitness", s)) for s in (10, 11, 12)]
            assert pool.pending() == 3
            done = [pool.next_done() for _ in tickets]
            assert sorted(t for t, _ in done) == sorted(tickets) and all(r.ok for _, r in done)
            assert pool.free_slots() >= pool.depth and pool.idle_workers() >= 1
            util = pool.utilization()
            assert all(0 < u["busy_s"] <= u["wall_s"] for u in util.values() if u["busy_s"])
            workers = pool.workers()
            assert len(workers) == 2 + pool.restarts and sum(w["alive"] for w in workers) == pool.size == 2
            assert {w["pid"] for w in workers if w.get("pid")} >= first
            with pytest.raises(TypeError, match="Task"):
                pool.submit("not a task")
            with pytest.raises(ValueError, match="no public method '_model'"):
                pool.broadcast("_model")
            assert len(pool.broadcast("info")) == pool.size
        finally:
            pool.close()
        assert not ray.is_initialized()
    assert_gone(seen.values(), "the embedded Ray")


# ------------------------------------------------------------------------------------ placement

NODE = {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0, "GPU": 2.0}}
CPU_NODE = {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 4.0}}


def test_placement_uses_what_the_cluster_offers():
    assert plan_placement([NODE], 2, 1) == plan_placement([NODE], 2, 0, device="cuda")
    p = plan_placement([NODE], 4, 0.5)
    assert (p.gpus, p.cpus, p.device) == (0.5, 1, "cuda")
    assert plan_placement([NODE], 3, 0).gpus == 0.5  # more workers than GPUs: equal shares
    p = plan_placement([NODE, CPU_NODE], 2, 0, device="cpu")  # CPU workers: the CPUs shared out
    assert (p.gpus, p.cpus, p.device) == (0, 4, "cpu")  # 6 each would not fit two workers
    assert plan_placement([CPU_NODE], 2).device == "cpu"  # auto without GPUs: CPU workers


def test_placement_refuses_with_what_the_cluster_has():
    with pytest.raises(ClusterTooSmall, match=r"can host 2 worker\(s\) of 1 CPU \+ 1 GPU each, not 3.*10.0.0.1: "
                                              r"8 CPU, 2 GPU.*--workers 2"):
        plan_placement([NODE, CPU_NODE], 3, 1)
    with pytest.raises(ClusterTooSmall, match="needs GPUs, but the Ray cluster has none"):
        plan_placement([CPU_NODE], 1, 0.5)
    with pytest.raises(ValueError, match="device 'cpu' with gpus_per_worker=1"):
        plan_placement([NODE], 1, 1, device="cpu")
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        plan_placement([NODE], 0)
    with pytest.raises(ClusterTooSmall, match="can host 4 worker"):
        plan_placement([CPU_NODE], 5, device="cpu")
