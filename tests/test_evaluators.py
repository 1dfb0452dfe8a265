"""Evaluators on the zoo's real models: built-in (exact match, regex, multiple choice), the lm-eval
adapter (a real in-process lm-eval run), custom fitness functions and the spec registry."""

from __future__ import annotations

import importlib.util
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny

from evomerge.evaluate.base import EvalContext
from evomerge.evaluate.builtin import (
    ItemsBenchmark,
    choice_loglikelihoods,
    encode_pair,
    generate_texts,
    pick_choice,
    regex_extract,
)
from evomerge.evaluate.custom import BadFitnessReference, CustomFitness, load_fitness
from evomerge.evaluate.lm_eval_adapter import LmEvalBenchmark
from evomerge.evaluate.registry import make_evaluator, parse_spec, run_fitness
from evomerge.zoo.build import load

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = ROOT / "fitness" / "lm_eval"
EXAMPLES = ROOT / "fitness" / "examples"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared by several test runs: two OpenMP threads per process thrash, one does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(zoo):
    """(model, tokenizer) for the base and two experts, loaded once."""
    return {name: load(path) for name, path in {"base": zoo.base, "rev": zoo.experts["rev"],
                                                 "tr": zoo.experts["tr"]}.items()}


@pytest.fixture(scope="module")
def zoo_utils():
    spec = importlib.util.spec_from_file_location("zoo_utils_for_tests", LM_EVAL_TASKS / "zoo_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spread(zoo, skill: str, n: int, split: str = "fitness") -> list[dict]:
    """n items spread over the lengths (item files are ordered by length)."""
    items = zoo.items(skill, split)
    return items[:: len(items) // n][:n]


def generate_one_by_one(model, tok, prompt: str, max_new_tokens: int) -> str:
    """The reference: transformers' own generate, one unpadded prompt at a time."""
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------- built-in


def test_batched_left_padded_generation_equals_one_by_one_generate(zoo, models):
    items = spread(zoo, "rev", 30) + spread(zoo, "tr", 20)  # lengths 3..8: rows are padded differently
    for name in ("base", "rev"):
        model, tok = models[name]
        budgets = [len(it["answer"]) + 1 for it in items]
        batched = generate_texts(model, tok, [it["prompt"] for it in items], budgets, batch_size=16, device="cpu")
        single = [generate_one_by_one(model, tok, it["prompt"], n) for it, n in zip(items, budgets)]
        assert batched == single
        bench = ItemsBenchmark("mixed", items, batch_size=16)
        scores = bench.evaluate(model, tok, EvalContext()).scores
        expected = [float(s.strip() == it["answer"]) for s, it in zip(single, items)]
        assert scores.tolist() == expected
    # the base gets some right and some wrong: the comparison above is not between two constants
    base_scores = ItemsBenchmark("rev", spread(zoo, "rev", 30)).evaluate(*models["base"], EvalContext()).scores
    assert 0 < base_scores.mean() < 1


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_left_padding_is_exact_for_absolute_and_rotary_positions(tmp_path, arch):
    """Random tiny models emit long arbitrary strings, so every generated token is compared; GPT-2's
    learned absolute positions would expose position ids that ignore the left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny(arch, tmp_path / arch, seed=3)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompts = ["R:1=", "S:12345678=", "T:987=", "hello, world=", "X:55555="]
    batched = generate_texts(model, tok, prompts, [12] * len(prompts), batch_size=8, device="cpu")
    assert batched == [generate_one_by_one(model, tok, p, 12) for p in prompts]
    assert len(set(batched)) > 1
    choices = [(p, ["1", "22", "abc", "hello"]) for p in prompts]
    lls = choice_loglikelihoods(model, tok, choices, batch_size=6, device="cpu")
    assert np.allclose(np.stack(lls), np.stack([loglikelihoods_one_by_one(model, tok, p, c) for p, c in choices]),
                       atol=1e-4)


def loglikelihoods_one_by_one(model, tok, prompt: str, choices: list[str]) -> np.ndarray:
    """The reference: one unpadded forward pass per (prompt, choice)."""
    out = []
    with torch.inference_mode():
        for choice in choices:
            ctx, cont = encode_pair(tok, prompt, choice)
            logits = model(torch.tensor([ctx + cont])).logits[0]
            logp = torch.log_softmax(logits[len(ctx) - 1 : -1], -1)
            out.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    return np.array(out)


def test_exact_match_on_a_zoo_reference_reproduces_the_zoo_build(zoo, models):
    bench = ItemsBenchmark("rev", "zoo:rev/test")
    result = bench.evaluate(*models["rev"], EvalContext())
    assert result.item_ids == [it["id"] for it in zoo.items("rev", "test")]
    assert result.mean() == pytest.approx(zoo.accuracy()["accuracy"]["expert_rev"]["rev"], abs=1e-4)


def test_regex_scoring_extracts_from_generation_and_answer(zoo, models):
    model, tok = models["base"]
    items = spread(zoo, "rev", 40)
    texts = generate_texts(model, tok, [it["prompt"] for it in items], [10] * len(items), 64, "cpu")
    # GSM8K-style answers: the regex finds the number after "####" in the answer, and the bare number
    # in the generation; the score then equals exact match on these digit answers.
    gsm = [{**it, "answer": f"reverse the digits #### {it['answer']}"} for it in items]
    regex = ItemsBenchmark("gsm", gsm, scorer="regex", answer_regex=r"(?:#### )?(\d+)", max_new_tokens=10)
    exact = ItemsBenchmark("em", items)
    assert regex.evaluate(model, tok, EvalContext()).scores.tolist() == \
        exact.evaluate(model, tok, EvalContext()).scores.tolist()
    # a looser regex (first digit only) credits every item whose first generated digit is right
    first = ItemsBenchmark("first", items, scorer="regex", answer_regex=r"(\d)", max_new_tokens=10)
    scores = first.evaluate(model, tok, EvalContext()).scores
    assert scores.tolist() == [float(t[:1] == it["answer"][:1]) for t, it in zip(texts, items)]
    assert scores.sum() > exact.evaluate(model, tok, EvalContext()).scores.sum()
    assert regex_extract(re.compile(r"#### (\d+)"), "no marker here") is None


def test_multiple_choice_prefers_the_right_answer_and_agrees_with_unbatched(zoo, models, zoo_utils):
    items = [zoo_utils.mc_item(d) for d in spread(zoo, "rev", 40)]
    model, tok = models["rev"]
    bench = ItemsBenchmark("rev_mc", items, scorer="multiple_choice", batch_size=7)
    acc = bench.evaluate(model, tok, EvalContext()).mean()
    assert acc >= 0.9  # the rev expert clearly prefers the reversal over copies and rotations
    plain = ItemsBenchmark("rev_mc", items, scorer="multiple_choice")
    assert plain.evaluate(*models["base"], EvalContext()).mean() < acc
    batched = choice_loglikelihoods(model, tok, [(it["prompt"], it["choices"]) for it in items], 7, "cpu")
    for it, lls in zip(items, batched):
        assert np.allclose(lls, loglikelihoods_one_by_one(model, tok, it["prompt"], it["choices"]), atol=1e-4)
    assert int(np.argmax(batched[0])) == pick_choice(batched[0], items[0]["choices"], False)


def test_length_normalisation_divides_by_characters():
    lls = np.array([-4.0, -6.0])
    assert pick_choice(lls, ["ab", "abcdef"], length_normalize=False) == 0
    assert pick_choice(lls, ["ab", "abcdef"], length_normalize=True) == 1  # -2 per char vs -1 per char


def test_subsets_in_the_order_asked_and_unknown_ids_rejected(zoo, models):
    model, tok = models["base"]
    bench = ItemsBenchmark("rev", "zoo:rev/fitness")
    ids = bench.item_ids()
    full = dict(zip(ids, bench.evaluate(model, tok, EvalContext()).scores))
    subset = [ids[500], ids[3], ids[250]]
    part = bench.evaluate(model, tok, EvalContext(item_ids=subset))
    assert part.item_ids == subset and part.scores.tolist() == [full[i] for i in subset]
    assert bench.evaluate(model, tok, EvalContext(item_ids=[])).item_ids == []
    with pytest.raises(KeyError, match="rev-fitness-99999"):
        bench.evaluate(model, tok, EvalContext(item_ids=[ids[0], "rev-fitness-99999"]))
    with pytest.raises(ValueError, match="twice"):
        bench.evaluate(model, tok, EvalContext(item_ids=[ids[0], ids[0]]))
    with pytest.raises(ValueError, match="the model is on cpu"):
        bench.evaluate(model, tok, EvalContext(device=torch.device("cuda")))


def test_bad_items_and_settings_are_rejected_where_they_enter(tmp_path):
    with pytest.raises(ValueError, match="no string 'answer'"):
        ItemsBenchmark("b", [{"id": "a", "prompt": "x", "label": "y"}])
    with pytest.raises(ValueError, match="duplicate item id 'a'"):
        ItemsBenchmark("b", [{"id": "a", "prompt": "x", "answer": "1"}, {"id": "a", "prompt": "y", "answer": "2"}])
    with pytest.raises(ValueError, match=r"index of the right choice \(0..1\)"):
        ItemsBenchmark("b", [{"id": "a", "prompt": "x", "choices": ["p", "q"], "answer": 2}], scorer="multiple_choice")
    with pytest.raises(ValueError, match="needs max_new_tokens"):
        ItemsBenchmark("b", [{"id": "a", "prompt": "x", "answer": "1"}], scorer="regex", answer_regex="(\\d)")
    with pytest.raises(ValueError, match="not one of"):
        ItemsBenchmark("b", [{"id": "a", "prompt": "x", "answer": "1"}], scorer="bleu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "answer": "1"}\n{"id": "b", oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        ItemsBenchmark("b", bad)
    with pytest.raises(ValueError, match="zoo:rev/fitness"):
        ItemsBenchmark("b", "zoo:rev/nosuchsplit")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ItemsBenchmark("b", tmp_path / "missing.jsonl")
    # items without ids get stable positional ids; answers given as numbers are compared as text
    assert ItemsBenchmark("b", [{"prompt": "x", "answer": 1}]).item_ids() == ["b-00000"]


# ---------------------------------------------------------------------------------- lm-eval


def test_lm_eval_adapter_equals_builtin_on_the_same_items(zoo, models, zoo_utils):
    model, tok = models["base"]
    gen = LmEvalBenchmark("zoo_rev", include_path=LM_EVAL_TASKS)
    ids = gen.item_ids()
    assert ids == ItemsBenchmark("rev", "zoo:rev/fitness").item_ids()  # the same stable ids
    subset = ids[::12][::-1]  # 50 items over all lengths, asked in reverse order
    via_lm_eval = gen.evaluate(model, tok, EvalContext(item_ids=subset))
    builtin = ItemsBenchmark("rev", "zoo:rev/fitness").evaluate(model, tok, EvalContext(item_ids=subset))
    assert via_lm_eval.item_ids == subset
    assert via_lm_eval.scores.tolist() == builtin.scores.tolist()
    assert 0 < builtin.mean() < 1

    mc_items = [zoo_utils.mc_item(d) for d in zoo.items("rev", "fitness")]
    mc_subset = [it["id"] for it in mc_items[5::20]]
    for metric, normalise in (("acc", False), ("acc_norm", True)):
        mc = LmEvalBenchmark("zoo_rev_mc", include_path=LM_EVAL_TASKS, metric=metric)
        ours = ItemsBenchmark("mc", mc_items, scorer="multiple_choice", length_normalize=normalise)
        a = mc.evaluate(model, tok, EvalContext(item_ids=mc_subset))
        b = ours.evaluate(model, tok, EvalContext(item_ids=mc_subset))
        assert a.item_ids == b.item_ids and a.scores.tolist() == b.scores.tolist()

    with pytest.raises(KeyError, match=r"no per-item metric 'bleu'.*\['acc', 'acc_norm'\]"):
        LmEvalBenchmark("zoo_rev_mc", include_path=LM_EVAL_TASKS, metric="bleu").evaluate(
            model, tok, EvalContext(item_ids=mc_subset[:2]))


def test_lm_eval_tasks_ids_overrides_and_errors(zoo):
    held_out = LmEvalBenchmark("zoo_rev", include_path=LM_EVAL_TASKS, task_overrides={"test_split": "test"})
    assert held_out.item_ids() == [it["id"] for it in zoo.items("rev", "test")]
    both = LmEvalBenchmark(["zoo_rev", "zoo_tr"], include_path=LM_EVAL_TASKS)
    ids = both.item_ids()
    assert ids[0] == "zoo_rev/rev-fitness-00000" and "zoo_tr/tr-fitness-00000" in ids and len(ids) == 1200
    with pytest.raises(KeyError, match="set include_path"):
        LmEvalBenchmark("zoo_nosuchskill", include_path=LM_EVAL_TASKS).item_ids()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        LmEvalBenchmark("zoo_rev", include_path=LM_EVAL_TASKS / "nowhere")
    with pytest.raises(ValueError, match="device"):
        LmEvalBenchmark("zoo_rev", include_path=LM_EVAL_TASKS, hflm_kwargs={"device": "cuda"})
    assert pickle.loads(pickle.dumps(held_out))._loaded is None  # workers load their own datasets


def test_lm_eval_group_by_name_scores_each_subtask(tmp_path, zoo, models):
    """A group passes to lm-eval by name (its YAMLs use real paths); ids are prefixed by subtask."""
    for skill in ("rev", "tr"):
        write(tmp_path / f"g_{skill}.yaml", f"include: {LM_EVAL_TASKS / '_zoo_generate_template_yaml'}\n"
              f"task: g_{skill}\ndataset_kwargs:\n  data_files:\n    fitness: {zoo.items_path(skill, 'fitness')}\n")
    write(tmp_path / "g.yaml", "group: g_pair\ntask: [g_rev, g_tr]\n")
    group = LmEvalBenchmark("g_pair", include_path=tmp_path)
    subset = ["g_tr/tr-fitness-00300", "g_rev/rev-fitness-00300", "g_rev/rev-fitness-00500"]
    result = group.evaluate(*models["tr"], EvalContext(item_ids=subset))
    ours = {skill: ItemsBenchmark(skill, f"zoo:{skill}/fitness") for skill in ("rev", "tr")}
    expected = [ours[i.split("/")[0][2:]].evaluate(*models["tr"], EvalContext(item_ids=[i.split("/")[1]])).scores[0]
                for i in subset]
    assert result.item_ids == subset and result.scores.tolist() == expected


# ---------------------------------------------------------------------------------- custom


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_custom_file_reference_scores_like_the_builtin(zoo, models):
    model, tok = models["rev"]
    result = run_fitness(make_evaluator({"type": "custom", "fn": "fitness/examples/rev_fitness.py:score"},
                                        base_dir=ROOT), model, tok, EvalContext())
    expected = ItemsBenchmark("rev", "zoo:rev/fitness").evaluate(model, tok, EvalContext()).mean()
    assert result.ok and result.objectives == {"score": pytest.approx(expected)}

    responses = CustomFitness(f"{EXAMPLES / 'rev_fitness.py'}:responses")
    subset = ["rev-fitness-00590", "rev-fitness-00010"]
    r = responses.run(model, tok, EvalContext(item_ids=subset))
    assert r.ok and r.responses[0].item_ids == subset and set(r.objectives) == {"rev"}

    two = CustomFitness("fitness/examples/two_objectives.py:score", name="pair", base_dir=ROOT,
                        kwargs={"n_items": 40})
    r = two.run(model, tok, EvalContext())
    assert r.ok and set(r.objectives) == {"rev", "tr"} and r.objectives["rev"] > r.objectives["tr"]
    # a worker receives the reference and imports the file itself
    assert pickle.loads(pickle.dumps(two)).run(model, tok, EvalContext()).objectives == r.objectives


def test_custom_module_reference_dict_and_item_responses(tmp_path, monkeypatch, models):
    write(tmp_path / "my_fitness.py", '''
import numpy as np
from evomerge.evaluate.base import ItemResponses

def two(model, tokenizer, ctx):
    n = sum(p.numel() for p in model.parameters())
    return {"size": float(n), "seed": ctx.seed}

def items(model, tokenizer, ctx):
    return [ItemResponses("a", ["x", "y"], np.array([1.0, 0.0])), ItemResponses("b", ["z"], np.array([0.5]))]
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    model, tok = models["base"]
    r = CustomFitness("my_fitness:two").run(model, tok, EvalContext(seed=7))
    assert r.ok and r.objectives == {"size": float(sum(p.numel() for p in model.parameters())), "seed": 7.0}
    r = run_fitness(make_evaluator({"type": "custom", "fn": "my_fitness:items"}), model, tok, EvalContext())
    assert r.objectives == {"a": 0.5, "b": 0.5} and [x.benchmark for x in r.responses] == ["a", "b"]


@pytest.mark.parametrize("body, message", [
    ("raise RuntimeError('tokenizer exploded')", "raised RuntimeError: tokenizer exploded"),
    ("return float('nan')", "is nan, not a finite number"),
    ("return float('inf')", "is inf, not a finite number"),
    ("return None", "returned None"),
    ("return 'high'", "is a str"),
    ("return {'a': float('nan')}", "objective 'a' is nan"),
    ("return {}", "empty dict"),
    ("return ItemResponses('b', ['x'], [2.0])", "item 'x' has score 2.0"),
])
def test_failing_custom_functions_are_reported_not_raised(tmp_path, models, body, message):
    path = write(tmp_path / "failing.py", f"from evomerge.evaluate.base import ItemResponses\n"
                                          f"def fit(model, tokenizer, ctx):\n    {body}\n")
    result = CustomFitness(f"{path}:fit").run(*models["base"], EvalContext())
    assert not result.ok and result.objectives == {}
    assert message in result.error
    assert result.traceback and "Traceback" in result.traceback
    if "raise" in body:
        assert "failing.py" in result.traceback  # the user's own line is in it


def test_bad_fitness_references_fail_at_load_time(tmp_path, monkeypatch):
    path = write(tmp_path / "fit.py", "LIMIT = 3\ndef good(model, tokenizer, ctx):\n    return 1.0\n"
                                      "def one_arg(model):\n    return 1.0\n")
    write(tmp_path / "broken_import.py", "import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        f"{tmp_path / 'nope.py'}:good": "no file",
        f"{path}:missing": "the functions it defines are ['good', 'one_arg']",
        f"{path}:LIMIT": "is a int, not a function",
        f"{path}:one_arg": "cannot be called as one_arg(model, tokenizer, ctx)",
        f"{path}": "must look like",
        "no_such_module_xyz:fn": "no module 'no_such_module_xyz'",
        "broken_import:fn": "No module named 'no_such_dependency_xyz'",
    }
    for ref, message in cases.items():
        with pytest.raises(BadFitnessReference, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            load_fitness(ref)
    with pytest.raises(BadFitnessReference, match="kwargs"):
        CustomFitness(f"{path}:good", kwargs={"n_items": 3})
    assert load_fitness(f"{path}:good")(None, None, None) == 1.0
    assert math.isclose(load_fitness("fit.py:good", base_dir=tmp_path)(None, None, None), 1.0)


# ---------------------------------------------------------------------------------- registry


def test_registry_builds_each_type_and_names_bad_keys(tmp_path):
    items = make_evaluator({"type": "items", "name": "rev", "path": "zoo:rev/fitness", "scorer": "exact_match"})
    assert isinstance(items, ItemsBenchmark) and len(items.item_ids()) == 600
    lm = make_evaluator({"type": "lm_eval", "task": "zoo_rev", "include_path": "fitness/lm_eval",
                         "num_fewshot": 0, "metric": "exact_match"}, base_dir=ROOT)
    assert isinstance(lm, LmEvalBenchmark) and lm.include_paths == [LM_EVAL_TASKS]
    custom = make_evaluator({"type": "custom", "fn": "examples/rev_fitness.py:score", "name": "rev"},
                            base_dir=ROOT / "fitness")
    assert isinstance(custom, CustomFitness) and custom.name == "rev"
    write(tmp_path / "local.jsonl", '{"id": "q1", "prompt": "R:12=", "answer": "21"}\n')
    assert make_evaluator({"type": "items", "name": "l", "path": "local.jsonl"}, base_dir=tmp_path).item_ids() == ["q1"]

    with pytest.raises(ValueError, match=r"'type' must be one of \['custom', 'items', 'lm_eval'\]"):
        parse_spec({"type": "itemz", "name": "x"})
    with pytest.raises(ValueError, match=r"unknown key 'max_new_token'.*allowed keys: \[.*'max_new_tokens'"):
        parse_spec({"type": "items", "name": "r", "path": "zoo:rev/fitness", "max_new_token": 3})
    with pytest.raises(ValueError, match="missing key 'task'"):
        parse_spec({"type": "lm_eval"})
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        parse_spec({"type": "items", "name": "r"})
    with pytest.raises(ValueError, match="needs max_new_tokens"):
        make_evaluator({"type": "items", "name": "r", "path": "zoo:rev/fitness", "scorer": "regex",
                        "answer_regex": "(\\d+)"})
    with pytest.raises(BadFitnessReference, match="no file"):
        make_evaluator({"type": "custom", "fn": "nowhere.py:f"}, base_dir=tmp_path)
