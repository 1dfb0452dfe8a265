"""DFS layer plans: validation, YAML, genome decoding, in-memory models that share weights, and plain
exports with folded scales that give the same logits and generations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.generation import greedy_generate
from evomerge.merge.config import MergeConfig
from evomerge.merge.dfs_export import cumulative_scales, export_dfs, merge_plan_to_disk
from evomerge.merge.dfs_model import ScaledLayer, build_dfs_model
from evomerge.merge.engine import MergeEngine
from evomerge.recipe import DFSError, LayerPlan, Recipe
from evomerge.spaces.dfs import decode_dfs, dfs_gene_count

# A plan with a layer used twice, layers moved to new depths, and scales on both sides of 1.
ZOO_PLAN = LayerPlan("base", [("base", 0), ("rev", 1), ("rev", 1), ("tr", 2), ("base", 3), ("sort", 3)],
                     [1.0, 0.8, 1.2, 0.9, 1.1, 1.3])


@pytest.fixture(scope="module")
def zoo_loaded(zoo_models):
    return {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in zoo_models.items()}


@pytest.fixture(scope="module")
def tok(zoo):
    return AutoTokenizer.from_pretrained(zoo.base)


def left_padded(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits
    return out * batch["attention_mask"][..., None]  # padded positions are not compared


# ---------------------------------------------------------------------------------------------- plans


def test_plan_rejects_bad_input_with_the_bad_value():
    with pytest.raises(DFSError, match="empty"):
        LayerPlan("base", [])
    with pytest.raises(DFSError, match=r"scales\[1\] = 0.0"):
        LayerPlan("base", [("base", 0), ("rev", 1)], [1.0, 0.0])
    with pytest.raises(DFSError, match=r"scales\[0\] = -1.0"):
        LayerPlan("base", [("base", 0)], [-1.0])
    with pytest.raises(DFSError, match="2 scales for 1 layers"):
        LayerPlan("base", [("base", 0)], [1.0, 1.0])
    with pytest.raises(DFSError, match="layer index -1"):
        LayerPlan("base", [("base", -1)])
    with pytest.raises(DFSError, match=r"\['zz'\].*does not list"):
        LayerPlan("base", [("zz", 0)], models={"base": "/x"})
    plan = LayerPlan("base", [("base", 0), ("rev", 4)])
    with pytest.raises(DFSError, match=r"\(rev, 4\) but 'rev' has 4 layers"):
        plan.check({"base": 4, "rev": 4})
    with pytest.raises(DFSError, match="'rev', which is not in the pool"):
        plan.check({"base": 4})
    assert plan.scales == [1.0, 1.0] and plan.members() == ["base", "rev"]


def test_plan_yaml_round_trip_keeps_members_and_merge_configs(tmp_path):
    ps = {"merge_method": "task_arithmetic", "base_model": "/m/base",
          "models": [{"model": "/m/rev", "parameters": {"weight": 0.5}}]}
    plan = LayerPlan("ps", [("rev", 0), ("ps", 1), ("ps", 1)], [1.0, 0.93, 1.25],
                     models={"ps": ps, "rev": "/m/rev"})
    text = plan.to_yaml()
    assert yaml.safe_load(text)["layer_plan"]["layers"] == [["rev", 0, 1.0], ["ps", 1, 0.93], ["ps", 1, 1.25]]
    back = LayerPlan.from_yaml(text)
    assert back == plan
    (tmp_path / "plan.yml").write_text(text)
    assert LayerPlan.from_yaml(tmp_path / "plan.yml") == plan
    assert LayerPlan.from_dict(yaml.safe_load(text)["layer_plan"]) == plan
    # two-element entries mean scale 1.0
    assert LayerPlan.from_dict({"host": "a", "layers": [["a", 2]]}).scales == [1.0]
    with pytest.raises(DFSError, match="unknown layer_plan keys"):
        LayerPlan.from_dict({"host": "a", "layers": [["a", 0]], "scale": 2})
    with pytest.raises(DFSError, match="neither a YAML file"):
        LayerPlan.from_yaml(str(tmp_path / "missing.yml"))
    with pytest.raises(DFSError, match=r"layers\[0\] = 'a'"):
        LayerPlan.from_dict({"host": "a", "layers": ["a"]})


def test_recipe_text_round_trip():
    merge = MergeConfig.model_validate({"merge_method": "task_arithmetic", "base_model": "base",
                                        "models": [{"model": "rev", "parameters": {"weight": 0.5}}]})
    plan = LayerPlan("rev", [("rev", 0), ("base", 1)], [1.0, 0.9])
    for recipe in (Recipe(merge=merge), Recipe(plan=plan), Recipe(merge=merge, plan=plan), Recipe()):
        back = Recipe.from_text(recipe.to_text())
        assert back.plan == recipe.plan and back.to_text() == recipe.to_text()
        assert (back.merge is None) == (recipe.merge is None)


# -------------------------------------------------------------------------------------------- genomes


def test_gene_counts():
    assert dfs_gene_count(8, 3, "matrix") == (24, 64)
    assert dfs_gene_count(8, 3, "hop") == (24, 24)
    with pytest.raises(DFSError, match="scale_mode 'per'"):
        dfs_gene_count(8, 3, "per")


def test_decode_hop_mode_lays_out_members_in_order_then_repeats():
    pool = [("a", 2), ("b", 3)]  # global layers: a0 a1 b0 b1 b2
    incl = np.array([1, 0, 0, 1, 0,   0, 1, 1, 0, 0.6])  # slots 0, 3 | 6, 7, 9
    scales = np.arange(10) / 10 + 0.5
    plan = decode_dfs(incl, scales, pool, repeats=2, scale_mode="hop", max_layers=10)
    assert plan.host == "a"
    assert plan.layers == [("a", 0), ("b", 1), ("a", 1), ("b", 0), ("b", 2)]
    assert plan.scales == pytest.approx([0.5, 0.8, 1.1, 1.2, 1.4])


def test_decode_matrix_mode_uses_the_hop_entry_and_the_diagonal_first():
    pool = [("a", 2), ("b", 1)]  # M = 3
    w = np.arange(1, 10, dtype=float).reshape(3, 3) / 10  # W[i, j] = (3 i + j + 1) / 10
    incl = np.array([0, 1, 1, 1, 0, 0])  # slots 1, 2, 3 -> globals 1, 2, 0
    plan = decode_dfs(incl, w.ravel(), pool, repeats=2, scale_mode="matrix", max_layers=6)
    assert plan.layers == [("a", 1), ("b", 0), ("a", 0)]
    assert plan.scales == pytest.approx([w[1, 1], w[1, 2], w[2, 0]])
    # the matrix may also come as M x M
    assert decode_dfs(incl, w, pool, 2, "matrix", 6) == plan


def test_decode_depth_rules():
    pool = [("a", 4)]
    ones = np.ones(4)
    empty = decode_dfs(np.array([0.1, 0.4, 0.2, 0.3]), ones, pool, 1, "hop", max_layers=4)
    assert empty.layers == [("a", 1)]  # the single highest gene
    too_deep = decode_dfs(np.array([0.9, 0.6, 0.95, 0.7]), ones, pool, 1, "hop", max_layers=2)
    assert too_deep.layers == [("a", 0), ("a", 2)]  # the two highest, in slot order
    ties = decode_dfs(np.array([0.8, 0.8, 0.8, 0.8]), ones, pool, 1, "hop", max_layers=3)
    assert ties.layers == [("a", 0), ("a", 1), ("a", 2)]
    padded = decode_dfs(np.array([0.9, 0.1, 0.45, 0.2]), ones, pool, 1, "hop", max_layers=4, min_layers=3)
    assert padded.layers == [("a", 0), ("a", 2), ("a", 3)]


def test_decode_rejects_wrong_gene_counts_and_bad_scales():
    pool = [("a", 2), ("b", 2)]
    with pytest.raises(DFSError, match="7 inclusion genes.*needs 8"):
        decode_dfs(np.ones(7), np.ones(16), pool, 2, "matrix", 8)
    with pytest.raises(DFSError, match="8 scale genes.*needs 16"):
        decode_dfs(np.ones(8), np.ones(8), pool, 2, "matrix", 8)
    with pytest.raises(DFSError, match="min_layers=3, max_layers=2"):
        decode_dfs(np.ones(8), np.ones(8), pool, 2, "hop", max_layers=2, min_layers=3)
    with pytest.raises(DFSError, match=r"scales\[0\] = -0.5"):
        decode_dfs(np.ones(8), -0.5 * np.ones(8), pool, 2, "hop", 8)
    with pytest.raises(DFSError, match="NaN or infinite"):
        decode_dfs(np.full(8, np.nan), np.ones(8), pool, 2, "hop", 8)


# ---------------------------------------------------------------------------------- in-memory models


def test_dfs_model_shares_every_weight_with_the_sources(zoo_loaded):
    model = build_dfs_model(ZOO_PLAN, zoo_loaded)
    source_ptrs = {p.data_ptr() for m in zoo_loaded.values() for p in m.parameters()}
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert ptrs and set(ptrs) <= source_ptrs
    assert model.config.num_hidden_layers == 6 and zoo_loaded["base"].config.num_hidden_layers == 4
    hops = model.model.layers
    assert all(isinstance(h, ScaledLayer) for h in hops) and len(hops) == 6
    assert hops[1].layer is hops[2].layer is zoo_loaded["rev"].model.layers[1]
    assert model.lm_head is zoo_loaded["base"].lm_head
    # a forward pass leaves the sources' layer indices as they were
    model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert zoo_loaded["rev"].model.layers[1].self_attn.layer_idx == 1


def test_identity_plan_is_the_host_exactly(zoo_loaded, tok):
    plan = LayerPlan("rev", [("rev", i) for i in range(4)])
    batch = left_padded(tok, ["R123=", "S98765="])
    assert torch.equal(logits(build_dfs_model(plan, zoo_loaded), batch), logits(zoo_loaded["rev"], batch))


def test_pool_of_mixed_architectures_is_refused(tmp_path, zoo_loaded):
    gpt2 = AutoModelForCausalLM.from_pretrained(make_tiny("gpt2", tmp_path / "g", 0))
    plan = LayerPlan("base", [("base", 0), ("g", 1)])
    with pytest.raises(DFSError, match="'g' is a GPT2LMHeadModel but host 'base' is a LlamaForCausalLM"):
        build_dfs_model(plan, {**zoo_loaded, "g": gpt2})
    with pytest.raises(DFSError, match=r"\(base, 9\) but 'base' has 4 layers"):
        build_dfs_model(LayerPlan("base", [("base", 9)]), zoo_loaded)
    with pytest.raises(DFSError, match=r"uses \['zz'\], which are not among the models"):
        build_dfs_model(LayerPlan("base", [("zz", 0)]), zoo_loaded)


# --------------------------------------------------------------------------------------------- export


def test_zoo_export_matches_in_memory_logits_and_generation(zoo, zoo_loaded, tok, tmp_path):
    model = build_dfs_model(ZOO_PLAN, zoo_loaded)
    out = export_dfs(ZOO_PLAN, zoo_loaded, tmp_path / "dfs")
    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(exported).__name__ == "LlamaForCausalLM" and exported.config.num_hidden_layers == 6
    assert (out / "tokenizer.json").exists()
    assert LayerPlan.from_yaml(out / "layer_plan.yml").layers == ZOO_PLAN.layers

    batch = left_padded(tok, ["R12345678=", "S91=", "T5550123="])
    a, b = logits(model, batch), logits(exported.eval(), batch)
    assert (a - b).abs().max() <= 1e-4
    assert a.abs().max() > 1.0  # trained logits, not a degenerate comparison

    # the scales are folded: layer k's residual writes are divided by the cumulative scale
    disk = load_file(out / "model.safetensors")
    c = cumulative_scales(ZOO_PLAN.scales)
    src = zoo_loaded["rev"].model.layers[1]
    torch.testing.assert_close(disk["model.layers.2.self_attn.o_proj.weight"], src.self_attn.o_proj.weight / c[2])
    torch.testing.assert_close(disk["model.layers.2.mlp.down_proj.weight"], src.mlp.down_proj.weight / c[2])
    assert torch.equal(disk["model.layers.2.self_attn.q_proj.weight"], src.self_attn.q_proj.weight.detach())

    # greedy generation with a KV cache: the layer used twice keeps two cache slots
    items = zoo.items("rev", "test")[:64] + zoo.items("tr", "test")[:64]
    prompts = [tok(it["prompt"])["input_ids"] for it in items]
    gen = lambda m: greedy_generate(m, prompts, 10, tok.eos_token_id, tok.pad_token_id)
    assert gen(model) == gen(exported)


TINY = {  # eps near zero: random-init streams are tiny, and a norm's eps is not scale-free
    "llama": dict(rms_norm_eps=1e-12),
    "mistral": dict(rms_norm_eps=1e-12),
    "qwen2": dict(rms_norm_eps=1e-12, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "gemma": dict(rms_norm_eps=1e-12),
    "phi": dict(layer_norm_eps=1e-12),
    "gpt2": dict(layer_norm_epsilon=1e-12),
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_architectures_export_matches_in_memory(arch, tmp_path, tok):
    paths = {n: make_tiny(arch, tmp_path / n, seed, **TINY[arch]) for n, seed in (("a", 0), ("b", 1))}
    models = {n: AutoModelForCausalLM.from_pretrained(p).eval() for n, p in paths.items()}
    plan = LayerPlan("a", [("b", 2), ("a", 0), ("a", 0), ("b", 1), ("a", 2), ("b", 0), ("a", 1)],
                     [0.7, 1.3, 0.9, 1.2, 0.8, 1.1, 1.0])
    model = build_dfs_model(plan, models)
    out = export_dfs(plan, models, tmp_path / "dfs")
    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert exported.config.num_hidden_layers == 7
    if arch == "qwen2":  # per-layer types follow the layers: (b, 2) was sliding, (a, 0) was not
        assert models["a"].config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        assert json.loads((out / "config.json").read_text())["layer_types"] == [
            "sliding_attention", "full_attention", "full_attention", "sliding_attention", "sliding_attention",
            "full_attention", "sliding_attention"]
    batch = left_padded(tok, ["R12345678=", "S91=", "T5550123="])  # longer than qwen2's window
    a, b = logits(model, batch), logits(exported.eval(), batch)
    assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()
    assert a.abs().max() > 1e-3
    prompts = [tok(t)["input_ids"] for t in ["R123=", "S9876=", "T11="]]
    gen = lambda m: greedy_generate(m, prompts, 8, tok.eos_token_id, tok.pad_token_id)
    assert gen(model) == gen(exported)


def test_hidden_states_are_one_per_hop_and_sources_keep_theirs(zoo_loaded, tok, tmp_path):
    batch = {"input_ids": torch.tensor([tok("R1234567=")["input_ids"]])}
    hidden = lambda m: m(**batch, output_hidden_states=True).hidden_states
    with torch.no_grad():
        assert len(hidden(zoo_loaded["rev"])) == 5  # the source records through its own hooks first
        model = build_dfs_model(ZOO_PLAN, zoo_loaded)
        exported = AutoModelForCausalLM.from_pretrained(export_dfs(ZOO_PLAN, zoo_loaded, tmp_path / "d")).eval()
        mem, exp = hidden(model), hidden(exported)
        assert len(mem) == len(exp) == len(ZOO_PLAN) + 1
        assert len(hidden(zoo_loaded["rev"])) == 5
    # the in-memory model runs the folded form: its stream is the export's (rounding apart)
    assert torch.equal(mem[0], exp[0])
    for k in range(len(ZOO_PLAN) - 1):
        torch.testing.assert_close(mem[k + 1], exp[k + 1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- replay


def test_plan_yaml_replays_to_the_in_memory_export(zoo_models, zoo_loaded, tmp_path):
    paths = {n: str(p) for n, p in zoo_models.items()}
    ps_cfg = {"merge_method": "task_arithmetic", "base_model": paths["base"],
              "models": [{"model": paths[m], "parameters": {"weight": w}}
                         for m, w in (("rev", 0.6), ("tr", 0.4))]}
    plan = LayerPlan("ps", [("ps", 0), ("rev", 1), ("ps", 1), ("ps", 1), ("tr", 3)], [1.0, 0.9, 1.1, 1.2, 0.8],
                     models={"ps": ps_cfg, "rev": paths["rev"], "tr": paths["tr"]})
    (tmp_path / "plan.yml").write_text(plan.to_yaml())
    replayed = merge_plan_to_disk(tmp_path / "plan.yml", tmp_path / "replayed")

    engine = MergeEngine({p: p for p in paths.values()}, base=paths["base"])  # the config names models by path
    ps = engine.materialize(MergeConfig.model_validate(ps_cfg))
    reference = export_dfs(plan, {"ps": ps, "rev": zoo_loaded["rev"], "tr": zoo_loaded["tr"]}, tmp_path / "ref")

    got, want = load_file(replayed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys() and len(got) == 3 + 9 * 5
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    assert (replayed / "tokenizer.json").exists()
    assert LayerPlan.from_yaml(replayed / "layer_plan.yml") == plan
    # the recorded plan replays again, as a dict too, to the same tensors
    again = merge_plan_to_disk(yaml.safe_load((replayed / "layer_plan.yml").read_text()), tmp_path / "again")
    assert all(torch.equal(t, got[k]) for k, t in load_file(again / "model.safetensors").items())


def test_replay_refuses_a_plan_without_sources(tmp_path):
    with pytest.raises(DFSError, match="no 'models:'"):
        merge_plan_to_disk({"layer_plan": {"host": "a", "layers": [["a", 0]]}}, tmp_path / "o")
    with pytest.raises(DFSError, match="does not exist"):
        merge_plan_to_disk(tmp_path / "missing.yml", tmp_path / "o")
