"""Residency policies: the same bits under every policy, a shared delta cache that is never trusted
half-written or stale, and memory errors before any weight is read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from merge_configs import CONFIGS, RANDOMIZED
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from evomerge.merge.config import MergeConfig
from evomerge.merge.delta_cache import StaleCacheError, open_cache
from evomerge.merge.engine import MergeEngine
from evomerge.merge.residency import (
    Footprint,
    MemorySettingError,
    MemorySettings,
    choose_policy,
)

CASES = ["linear", "task_arithmetic", "ties", "breadcrumbs", "model_stock", "slerp", "dare_ties", "della"]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def recipe(name: str, seed: int = 11) -> MergeConfig:
    return MergeConfig.model_validate({**{**CONFIGS, **RANDOMIZED}[name], "evomerge": {"seed": seed}})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("deltas")


@pytest.fixture(scope="module")
def engines(zoo_models, cache_root):
    return {p: MergeEngine(zoo_models, "base", memory={"policy": p, "cache_dir": cache_root})
            for p in ("device", "host", "disk")}


@pytest.mark.parametrize("name", CASES)
def test_every_policy_gives_the_same_bits(engines, name):
    """Deterministic methods and DARE / DELLA masks with the same seed: bit-equal under every policy."""
    results = {p: state(e.materialize(recipe(name))) for p, e in engines.items()}
    for policy in ("host", "disk"):
        for k, t in results["device"].items():
            assert torch.equal(results[policy][k], t), f"{name}: {k} differs under {policy}"


def test_disk_policy_maps_the_cache_and_reports_it(engines):
    disk, device = engines["disk"].memory_info(), engines["device"].memory_info()
    assert disk["policy"] == "disk" and disk["cache"] and Path(disk["cache"], "COMPLETE").is_file()
    model = engines["disk"].footprint.model_bytes
    assert disk["device_bytes"] == model  # on a CPU: the candidate only; the inputs are shared page cache
    assert disk["shared_bytes"] >= engines["device"].resident_bytes()
    assert device["device_bytes"] == model + engines["device"].resident_bytes()
    # the inputs are views of the mapped files, not private copies
    _, stack = engines["disk"]._held("model.layers.0.mlp.up_proj.weight")
    shard = Path(disk["cache"]) / engines["disk"].cache.manifest["tensors"]["model.layers.0.mlp.up_proj.weight"][0]
    maps = Path("/proc/self/maps").read_text()
    assert str(shard) in maps
    assert torch.equal(stack, engines["device"].deltas["model.layers.0.mlp.up_proj.weight"])


def test_a_second_engine_reuses_the_complete_cache(zoo_models, cache_root, engines):
    again = MergeEngine(zoo_models, "base", memory={"policy": "disk", "cache_dir": cache_root})
    assert again.cache is not None and not again.cache.built
    assert again.cache.folder == engines["disk"].cache.folder


def test_auto_picks_device_when_it_fits_and_says_why(zoo_models):
    engine = MergeEngine(zoo_models, "base")
    assert engine.policy == "device" and "auto" in engine.memory_info()["reason"]


def test_delta_dtype_lowers_precision_with_a_small_error(zoo_models, cache_root):
    full = MergeEngine(zoo_models, "base", dtype="float32", memory="device")
    half = MergeEngine(zoo_models, "base", dtype="float32", memory={"policy": "device", "delta_dtype": "bfloat16"})
    disk = MergeEngine(zoo_models, "base", dtype="float32",
                       memory={"policy": "disk", "delta_dtype": "bfloat16", "cache_dir": cache_root})
    assert half.resident_bytes() < full.resident_bytes()
    assert next(iter(half.deltas.values())).dtype == torch.bfloat16
    r = recipe("task_arithmetic")
    a, b, c = state(full.materialize(r)), state(half.materialize(r)), state(disk.materialize(r))
    assert all(torch.equal(b[k], c[k]) for k in a)  # same inputs, same bits, whatever the policy
    assert all(b[k].dtype == torch.float32 for k in a)
    rel = max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a if a[k].is_floating_point())
    assert 0 < rel < 1e-2  # bf16 task vectors: a relative error of the order of bf16's 2^-8


def _copy_zoo(zoo_models, dest: Path) -> dict[str, Path]:
    out = {}
    for name, folder in zoo_models.items():
        shutil.copytree(folder, dest / name)
        out[name] = dest / name
    return out


def test_a_stale_cache_is_refused_naming_the_setting(zoo_models, tmp_path):
    models = _copy_zoo(zoo_models, tmp_path / "models")
    root = tmp_path / "cache"
    MergeEngine(models, "base", memory={"policy": "disk", "cache_dir": root})
    weights = models["rev"] / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key] + 1  # same size, other contents
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(StaleCacheError, match=r"model 'rev' file model.safetensors changed.*delta_cache"):
        MergeEngine(models, "base", memory={"policy": "disk", "cache_dir": root})


def test_budgets_that_cannot_hold_a_candidate_are_refused(zoo_models):
    with pytest.raises(MemorySettingError, match="memory_budget 1000 .* cannot hold one candidate"):
        MergeEngine(zoo_models, "base", memory={"policy": "auto", "budget": 1000})
    fp = MergeEngine(zoo_models, "base").footprint
    between = fp.model_bytes + 1000  # holds the candidate (disk) but not the resident inputs (device)
    with pytest.raises(MemorySettingError, match="memory: device needs .* set memory: disk"):
        MergeEngine(zoo_models, "base", memory={"policy": "device", "budget": between})
    cpu = torch.device("cpu")
    assert choose_policy(MemorySettings("auto", between), fp, cpu).policy == "disk"
    assert choose_policy(MemorySettings("auto", 0.5), fp, cpu, capacity=10 * fp.device_bytes("device", cpu)
                         ).policy == "device"


def test_the_footprint_of_streaming_policies_does_not_grow_with_sources():
    shapes = {"a": (1000, 100), "b": (100,)}
    gpu = torch.device("cuda")
    small = Footprint.of(shapes, {"a", "b"}, 2, 2, 2)
    large = Footprint.of(shapes, {"a", "b"}, 20, 2, 2)
    assert large.device_bytes("device", gpu) > 5 * small.device_bytes("device", gpu)
    assert large.device_bytes("disk", torch.device("cpu")) == small.device_bytes("disk", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_cpu_machine_is_refused(zoo_models):
    with pytest.raises(MemorySettingError, match="needs CUDA.*set device: cpu"):
        MergeEngine(zoo_models, "base", device="cuda", memory="host")


def test_a_disk_without_room_is_refused_before_writing(zoo_models, tmp_path):
    engine = MergeEngine(zoo_models, "base")
    with pytest.raises(MemorySettingError, match="delta_cache .* GiB free but the cache needs"):
        open_cache(tmp_path, "base", engine.others, engine.sources.paths, engine.tensor_names, engine.dtype,
                   engine.dtype, need_bytes=2**60)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_experiment_memory_keys_are_validated():
    from evomerge.config import Experiment

    base = {"name": "x", "models": {"a": "a", "b": "b"}, "base_model": "a", "search_space": "ps_linear",
            "budget": {"evaluations": 1},
            "fitness": {"objectives": [{"name": "f", "benchmark": {"type": "custom", "fn": "m:f"}}]}}
    exp = Experiment.model_validate({**base, "memory": "disk", "memory_budget": "20GB", "delta_dtype": "bfloat16"})
    assert exp.memory_settings() == {"policy": "disk", "budget": "20GB", "delta_dtype": "bfloat16", "cache_dir": None}
    assert Experiment.model_validate(base).memory == "auto"
    for bad, key in [({"memory": "ram"}, "memory"), ({"memory_budget": "lots"}, "memory_budget"),
                     ({"memory_budget": -1}, "memory_budget"), ({"delta_dtype": "int8"}, "delta_dtype")]:
        with pytest.raises(ValidationError, match=key):
            Experiment.model_validate({**base, **bad})


# -- real processes ------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys, time
    import torch
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import MergeEngine
    models, root, recipe, stall = json.loads(sys.argv[1])
    def on_tensor(name, count=[0]):
        count[0] += 1
        if stall and count[0] == stall:
            print("STALLED", flush=True)
            time.sleep(600)
    engine = MergeEngine(models, "base", memory={"policy": "disk", "cache_dir": root}, on_cache_tensor=on_tensor)
    model = engine.materialize(MergeConfig.model_validate(recipe))
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode()); digest.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    maps = open("/proc/self/maps").read()
    shards = [s for s in engine.cache.manifest["shards"] if str(engine.cache.folder / s) in maps]
    print(json.dumps({"built": engine.cache.built, "folder": str(engine.cache.folder), "digest": digest.hexdigest(),
                      "mapped": len(shards), "shards": len(engine.cache.manifest["shards"])}), flush=True)
""")


def _spawn(zoo_models, root: Path, stall: int = 0) -> subprocess.Popen:
    arg = json.dumps([{k: str(v) for k, v in zoo_models.items()}, str(root),
                      {**RANDOMIZED["dare_ties"], "evomerge": {"seed": 3}}, stall])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WORKER, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _digest(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_two_worker_processes_share_one_cache(zoo_models, tmp_path):
    procs = [_spawn(zoo_models, tmp_path) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(o["built"] for o in outs) == [False, True]  # built once, under the lock; the other mapped it
    assert outs[0]["folder"] == outs[1]["folder"]
    assert all(o["mapped"] == o["shards"] > 0 for o in outs)
    expected = _digest(MergeEngine(zoo_models, "base", memory="device").materialize(
        MergeConfig.model_validate({**RANDOMIZED["dare_ties"], "evomerge": {"seed": 3}})))
    assert outs[0]["digest"] == outs[1]["digest"] == expected


def test_a_killed_writer_leaves_no_trusted_cache(zoo_models, tmp_path):
    proc = _spawn(zoo_models, tmp_path, stall=5)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "STALLED", proc.stderr.read() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-deltas-")]
    assert leftovers and not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("deltas-")]
    engine = MergeEngine(zoo_models, "base", memory={"policy": "disk", "cache_dir": tmp_path})
    assert engine.cache is not None and engine.cache.built  # rebuilt, not trusted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-deltas-")]  # remains removed
    r = recipe("dare_ties", seed=3)
    device = MergeEngine(zoo_models, "base", memory="device")
    assert _digest(engine.materialize(r)) == _digest(device.materialize(r))


# -- DFS pool members ------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["device", "disk"])
def test_dfs_pool_members_share_what_the_engine_holds(zoo_models, tmp_path, policy):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.dfs_model import build_dfs_model
    from evomerge.recipe import LayerPlan
    from evomerge.workers import Worker

    worker = Worker(zoo_models, "base", {}, device="cpu", memory={"policy": policy, "cache_dir": tmp_path})
    ps = recipe("task_arithmetic")
    merged = worker.engine.materialize(ps)
    worker.set_pool_member("ps", ps)
    assert worker._pool["ps"] is merged and worker.engine.model is None  # held once: handed over, not copied
    for name in ("base", "rev"):
        worker.set_pool_member(name)
    key = "model.layers.0.mlp.up_proj.weight"
    base_param = dict(worker._pool["base"].named_parameters())[key]
    assert base_param.data_ptr() == worker.engine._held(key)[0].data_ptr()  # the engine's own base tensor
    plan = LayerPlan("base", [("base", 0), ("rev", 1), ("ps", 2), ("base", 3)], [1.0, 0.8, 1.2, 0.9])
    loaded = {n: AutoModelForCausalLM.from_pretrained(zoo_models[n]).eval() for n in ("base", "rev")}
    loaded["ps"] = AutoModelForCausalLM.from_pretrained(zoo_models["base"]).eval()
    loaded["ps"].load_state_dict(state(merged))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        shared = build_dfs_model(plan, worker._pool)(input_ids=ids).logits
        copied = build_dfs_model(plan, loaded)(input_ids=ids).logits
    assert torch.equal(shared, copied)
    # a PS recipe after the hand-over gets a fresh model; the pool member is untouched
    before = state(worker._pool["ps"])
    worker.engine.materialize(recipe("linear"))
    assert all(torch.equal(before[k], v) for k, v in state(worker._pool["ps"]).items())


def test_a_search_resumed_under_another_policy_follows_the_same_trajectory(zoo, tmp_path):
    """Killed under ``device``, resumed under ``disk``: the same genomes, fitness and best as one
    uninterrupted ``device`` run (the policy changes where inputs live, never a bit of a candidate)."""
    from test_search import experiment, final_state, run_cli

    from evomerge.run import resume, start
    from evomerge.runstore import RunStore

    experiment(zoo, tmp_path, budget={"evaluations": 18}, memory="device")
    reference, _ = final_state(start(tmp_path / "exp.yaml", tmp_path / "ref"))
    cut = tmp_path / "cut"
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(cut)], tmp_path, kill_at=8,
                        store=cut / "phase0-ps" / "run.sqlite")
    assert code == -signal.SIGKILL, out
    store = RunStore(cut / "phase0-ps" / "run.sqlite", readonly=True)
    assert 8 <= store.count() < 18
    store.close()
    with pytest.raises(ValueError, match="delta_dtype"):
        resume(cut, overrides={"delta_dtype": "bfloat16"})  # that would change the candidates
    resume(cut, overrides={"memory": "disk", "delta_cache": str(tmp_path / "cache")})
    resumed, hashes = final_state(cut)
    assert (tmp_path / "cache").is_dir() and len(hashes) == len(set(hashes)) == 18
    for got, want in zip(resumed, reference):
        assert (got == want).all() if hasattr(got, "all") else got == want
