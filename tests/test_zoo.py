"""The zoo builds deterministically, its checkpoints are ordinary HF folders, and it keeps its promises."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.generation import exact_match
from evomerge.zoo import ZooSpec, ensure_zoo
from evomerge.zoo.skills import SKILLS, read_jsonl

MICRO = ZooSpec(base_steps=6, expert_steps=3, splits=(("train", 30), ("fitness", 20), ("test", 20)))


def test_zoo_promises_hold_on_the_test_split(zoo):
    report = zoo.accuracy()
    assert report["split"] == "test"
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed, failed
    acc = report["accuracy"]
    for skill in zoo.skills:
        assert acc[f"expert_{skill}"][skill] >= 0.85
        assert acc[f"expert_{skill}"][skill] >= acc["base"][skill] + 0.25
    assert zoo.spec.cross_target in acc["base"]


def test_checkpoints_load_with_plain_transformers_and_solve_their_skill(zoo):
    for skill, path in zoo.experts.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
        items = zoo.items(skill, "test")[:60]
        scores = exact_match(model, tok, items)
        # the same number the build measured, on a subset: an expert is right on most of its own items
        assert sum(scores) / len(scores) >= 0.8
        out = model.generate(**tok(items[0]["prompt"], return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert tok.decode(out[0], skip_special_tokens=True).startswith(items[0]["prompt"])


def test_item_splits_are_disjoint_and_span_the_difficulty_ladder(zoo):
    for skill in zoo.skills + [zoo.spec.cross_target]:
        splits = {s: read_jsonl(zoo.items_path(skill, s)) for s in ("train", "fitness", "test")}
        prompts = {s: {r["prompt"] for r in rows} for s, rows in splits.items()}
        assert not prompts["test"] & prompts["fitness"]
        assert not prompts["test"] & prompts["train"]
        assert not prompts["fitness"] & prompts["train"]
        lengths = {r["length"] for r in splits["test"]}
        assert lengths == set(range(zoo.spec.item_lengths[0], zoo.spec.item_lengths[1] + 1))
        for row in splits["fitness"][:50]:
            digits = row["prompt"].split(":", 1)[1][:-1]
            assert SKILLS[skill].fn(digits) == row["answer"]


def test_build_is_deterministic_and_cached(tmp_path):
    a = ensure_zoo(MICRO, tmp_path / "a")
    b = ensure_zoo(MICRO, tmp_path / "b")
    for name in ["base", *MICRO.experts]:
        ta, tb = load_file(a.root / name / "model.safetensors"), load_file(b.root / name / "model.safetensors")
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a.items_path("rev", "test").read_text() == b.items_path("rev", "test").read_text())
    stamp = (a.root / "accuracy.json").stat().st_mtime_ns
    again = ensure_zoo(MICRO, tmp_path / "a")  # cached: nothing is rebuilt
    assert again.root == a.root and (a.root / "accuracy.json").stat().st_mtime_ns == stamp
    assert json.loads((a.root / "spec.json").read_text())["base_steps"] == MICRO.base_steps
    assert ZooSpec(seed=1).digest() != ZooSpec().digest()


def test_large_fitness_split_is_made_on_first_use_apart_from_every_other_split(zoo):
    """``zoo:<skill>/fitness_large`` (the large-benchmark variant of the estimator benchmark): 5,000
    items with no prompt of the train, fitness or test split, the same file on every call."""
    from evomerge.refs import resolve_items_ref

    path = resolve_items_ref("zoo:sort/fitness_large")
    rows = read_jsonl(path)
    assert len(rows) == 5000 and len({r["prompt"] for r in rows}) == 5000
    assert len({r["id"] for r in rows}) == 5000
    others = {r["prompt"] for split, _ in zoo.spec.splits for r in zoo.items("sort", split)}
    assert not others & {r["prompt"] for r in rows}
    assert all(SKILLS["sort"].fn(r["prompt"].split(":", 1)[1][:-1]) == r["answer"] for r in rows[:50])
    assert {r["length"] for r in rows} == set(range(zoo.spec.item_lengths[0], zoo.spec.item_lengths[1] + 1))
    before = path.read_bytes()
    assert resolve_items_ref("zoo:sort/fitness_large").read_bytes() == before
