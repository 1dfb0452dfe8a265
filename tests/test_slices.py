"""`slices:` merges and passthrough frankenmerges: layer counts, the layer map, mergekit's tensors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_mergekit_compat import assert_same, load_dir, run_both
from transformers import AutoModelForCausalLM

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import MergeEngine
from evomerge.merge.files import merge_to_disk
from evomerge.merge.plan import MergeError
from evomerge.merge.slices import layer_map, with_layer


def frankenmerge(p: dict) -> dict:
    """8 layers from 4-layer models: rev 0-2, sort 1-3, rev 2-3 again (layers 2 and 3 repeat)."""
    return {"merge_method": "passthrough", "base_model": str(p["base"]), "dtype": "float32", "slices": [
        {"sources": [{"model": str(p["rev"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(p["sort"]), "layer_range": [1, 4]},
                     ], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}},
        {"sources": [{"model": str(p["rev"]), "layer_range": [2, 4]}]},
    ]}


def test_layer_names_and_map(zoo_models):
    assert with_layer("model.layers.3.mlp.up_proj.weight", 11) == "model.layers.11.mlp.up_proj.weight"
    assert with_layer("transformer.h.0.attn.c_attn.bias", 5) == "transformer.h.5.attn.c_attn.bias"
    cfg = MergeConfig.model_validate(frankenmerge(zoo_models))
    n = {str(zoo_models[k]): 4 for k in zoo_models}
    rev, sort = str(zoo_models["rev"]), str(zoo_models["sort"])
    assert layer_map(cfg, n) == [{rev: 0}, {rev: 1}, {rev: 2}, {sort: 1}, {sort: 2}, {sort: 3}, {rev: 2}, {rev: 3}]


def test_passthrough_frankenmerge_repeating_layers_equals_mergekit(zoo_models, tmp_path):
    cfg = frankenmerge(zoo_models)
    ours, theirs = run_both(cfg, tmp_path, "franken")
    assert_same(ours, theirs, "frankenmerge")
    out = tmp_path / "franken-evomerge"
    for folder in (out, tmp_path / "franken-mergekit"):
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 8
    assert sum(k.endswith("self_attn.q_proj.weight") for k in ours) == 8
    rev = load_dir(zoo_models["rev"])
    sort = load_dir(zoo_models["sort"])
    # the layer map: output layer 6 is rev's layer 2 again, layer 3 sort's layer 1 with o_proj halved
    torch.testing.assert_close(ours["model.layers.6.mlp.down_proj.weight"], rev["model.layers.2.mlp.down_proj.weight"])
    torch.testing.assert_close(ours["model.layers.3.self_attn.o_proj.weight"],
                               0.5 * sort["model.layers.1.self_attn.o_proj.weight"])
    torch.testing.assert_close(ours["model.embed_tokens.weight"], rev["model.embed_tokens.weight"])  # first slice's
    torch.testing.assert_close(ours["lm_head.weight"], rev["lm_head.weight"])  # last slice's
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 8
    # the recipe written beside the weights is a slices: YAML both tools read back
    again = MergeConfig.from_yaml(out / "mergekit_config.yml")
    assert again.slices == MergeConfig.model_validate(cfg).slices
    from mergekit.config import MergeConfiguration

    assert len(MergeConfiguration.model_validate(yaml.safe_load((out / "mergekit_config.yml").read_text())).slices) == 3
    assert torch.isfinite(model(torch.tensor([[1, 5, 7, 9]])).logits).all()


def sliced(p: dict, method: str) -> dict:
    """Two slices of one method over different models, with slice- and source-level parameters."""
    b, rev, sort, tr = (str(p[k]) for k in ("base", "rev", "sort", "tr"))
    per = {"weight": 0.6, "density": 0.7} if method in ("ties", "task_arithmetic") else {}
    if method in ("linear", "nuslerp", "multislerp"):
        per = {"weight": 0.6}
    slice_params = {"ties": {"density": [0.3, 0.9], "weight": 0.4}, "task_arithmetic": {"weight": [0.2, 1.0]},
                    "slerp": {"t": [0.2, 0.7]}, "linear": {"weight": 0.3}, "karcher": {},
                    "nuslerp": {"weight": 0.3}, "multislerp": {"weight": [0.1, 0.9]}}[method]
    first = [{"model": b, "layer_range": [0, 2]}, {"model": rev, "layer_range": [0, 2], "parameters": per},
             {"model": sort, "layer_range": [0, 2]}]
    second = [{"model": b, "layer_range": [2, 4]}, {"model": tr, "layer_range": [2, 4], "parameters": per}]
    if method == "slerp":
        first = first[:2]
    if method == "nuslerp":
        second.append({"model": rev, "layer_range": [1, 3]})
    elif method != "slerp":  # a source with no parameters of its own: the top level's apply
        second.append({"model": sort, "layer_range": [0, 2]})
    params = {"weight": 0.5} if "weight" in slice_params or per.get("weight") else {}
    if method == "ties":
        params["density"] = 0.5
    if method == "slerp":
        params["t"] = 0.4
    return {"merge_method": method, "base_model": b, "parameters": params,
            "slices": [{"sources": first, "parameters": slice_params}, {"sources": second}]}


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp", "linear", "karcher", "nuslerp", "multislerp"])
def test_sliced_merges_equal_mergekit(zoo_models, tmp_path, method):
    assert_same(*run_both(sliced(zoo_models, method), tmp_path, method), f"slices {method}")


def test_per_layer_config_lists_follow_the_layer_map(tmp_path):
    from conftest import make_tiny

    a = make_tiny("qwen2", tmp_path / "a", seed=0, num_hidden_layers=3, use_sliding_window=True,
                  max_window_layers=1)
    src = json.loads((a / "config.json").read_text())
    assert len(src["layer_types"]) == 3 and len(set(src["layer_types"])) == 2
    cfg = MergeConfig.model_validate({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]}]})
    out = merge_to_disk(cfg, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 5
    assert written["layer_types"] == src["layer_types"] + src["layer_types"][:2]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 5


def test_slice_errors(zoo_models, tmp_path):
    b, rev = str(zoo_models["base"]), str(zoo_models["rev"])
    with pytest.raises(ValueError, match="same number of layers"):
        MergeConfig.model_validate({"merge_method": "linear", "slices": [{"sources": [
            {"model": b, "layer_range": [0, 2]}, {"model": rev, "layer_range": [0, 3]}]}]})
    with pytest.raises(ValueError, match="exactly one of 'models:'"):
        MergeConfig.model_validate({"merge_method": "linear", "models": [{"model": b}],
                                    "slices": [{"sources": [{"model": b, "layer_range": [0, 2]}]}]})
    past = MergeConfig.model_validate({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": rev, "layer_range": [2, 6]}]}]})
    with pytest.raises(MergeError, match="goes past its 4 layers"):
        merge_to_disk(past, tmp_path / "x")
    no_base = MergeConfig.model_validate({"merge_method": "ties", "base_model": b, "slices": [
        {"sources": [{"model": rev, "layer_range": [0, 4]}]}]})
    with pytest.raises(MergeError, match="not among the slice's sources"):
        merge_to_disk(no_base, tmp_path / "y")
    two = MergeConfig.model_validate({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": rev, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}]})
    with pytest.raises(MergeError, match="passthrough merges exactly one model in slices"):
        merge_to_disk(two, tmp_path / "z")
    with pytest.raises(MergeError, match="'slices:' merge changes the layers"):
        MergeEngine(zoo_models, base="base").materialize(MergeConfig.model_validate(frankenmerge(zoo_models)))
