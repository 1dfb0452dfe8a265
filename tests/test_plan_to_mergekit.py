"""A DFS layer plan exported as a mergekit YAML rebuilds evomerge's own DFS export in mergekit."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_mergekit_compat import assert_same, load_dir, mergekit_yaml

from evomerge.merge.config import MergeConfig
from evomerge.merge.dfs_export import merge_plan_to_disk
from evomerge.merge.files import merge_to_disk
from evomerge.merge.plan_to_mergekit import plan_to_mergekit
from evomerge.recipe import LayerPlan

# host tr, whose layers the plan never runs; repeated layers; a run of rev 0-1 at one scale
HOPS = [("rev", 0, 1.0), ("rev", 1, 1.0), ("base", 1, 1.2), ("base", 1, 0.9), ("sort", 2, 1.0),
        ("sort", 3, 1.1), ("rev", 3, 0.8)]


def zoo_plan(zoo_models) -> dict:
    members = {"tr", "rev", "base", "sort"}
    return LayerPlan("tr", [(m, i) for m, i, _ in HOPS], [s for _, _, s in HOPS],
                     {m: str(zoo_models[m]) for m in members}).to_dict()


def test_yaml_shape(zoo_models):
    cfg = plan_to_mergekit(zoo_plan(zoo_models))
    slices = cfg["slices"]
    assert cfg["merge_method"] == "passthrough" and cfg["base_model"] == str(zoo_models["tr"])
    ranges = [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in slices]
    tr, rev, base, sort = (str(zoo_models[k]) for k in ("tr", "rev", "base", "sort"))
    assert ranges == [(tr, [0, 0]), (rev, [0, 2]), (base, [1, 2]), (base, [1, 2]), (sort, [2, 3]),
                      (sort, [3, 4]), (rev, [3, 4]), (tr, [0, 0])]
    scales = [s["sources"][0].get("parameters", {}).get("scale") for s in slices]
    assert scales[1] is None and scales[2][0] == {"filter": "self_attn.o_proj", "value": pytest.approx(1 / 1.2)}
    assert scales[3][1] == {"filter": "mlp.down_proj", "value": pytest.approx(1 / (1.2 * 0.9))}
    assert scales[6][0]["value"] == pytest.approx(1 / (1.2 * 0.9 * 1.1 * 0.8))
    with pytest.raises(ValueError, match="merge config, which mergekit cannot read"):
        plan_to_mergekit({"host": "a", "layers": [["a", 0]], "models": {"a": {"merge_method": "linear"}}})
    assert plan_to_mergekit({"host": "a", "layers": [["a", 0]], "models": {"a": {}}},
                            paths={"a": "/m/a"})["base_model"] == "/m/a"


def test_mergekit_on_the_yaml_equals_evomerge_dfs_export(zoo_models, tmp_path):
    plan = zoo_plan(zoo_models)
    ours = merge_plan_to_disk(plan, tmp_path / "dfs")
    path = tmp_path / "plan_mergekit.yml"
    path.write_text(yaml.safe_dump(plan_to_mergekit(plan), sort_keys=False))
    mergekit_yaml(path, tmp_path / "mergekit")
    a, b = load_dir(ours), load_dir(tmp_path / "mergekit")
    assert_same(a, b, "dfs as mergekit")
    assert json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"] == len(HOPS)
    # a folded write really is scaled: hop 3 (base layer 1 again) has o_proj / (1.2 * 0.9)
    base = load_dir(zoo_models["base"])
    torch.testing.assert_close(b["model.layers.3.self_attn.o_proj.weight"],
                               base["model.layers.1.self_attn.o_proj.weight"] / (1.2 * 0.9))
    # and evomerge merge reads the same YAML to the same tensors
    again = merge_to_disk(MergeConfig.from_yaml(path), tmp_path / "evomerge")
    assert_same(load_dir(again), a, "evomerge merge of the mergekit YAML")


def test_gpt2_plan_with_its_residual_writes(tmp_path):
    """GPT-2 names its residual writes attn.c_proj / mlp.c_proj (evomerge.merge.dfs_export.RESIDUAL_WRITES)."""
    from conftest import make_tiny

    a, b = make_tiny("gpt2", tmp_path / "a", 0), make_tiny("gpt2", tmp_path / "b", 1)
    plan = LayerPlan("a", [("b", 0), ("a", 1), ("b", 2), ("b", 2)], [1.0, 1.3, 0.9, 1.1],
                     {"a": str(a), "b": str(b)}).to_dict()
    ours = merge_plan_to_disk(plan, tmp_path / "dfs")
    path = tmp_path / "plan_mergekit.yml"
    path.write_text(yaml.safe_dump(plan_to_mergekit(plan, residual_writes=("attn.c_proj", "mlp.c_proj"))))
    mergekit_yaml(path, tmp_path / "mergekit")
    assert_same(load_dir(ours), load_dir(tmp_path / "mergekit"), "gpt2 dfs as mergekit")


def test_a_searched_plan_is_exported_with_its_mergekit_yaml(zoo_models, tmp_path):
    """What a DFS search's export writes beside the checkpoint: the layer plan and the same plan as a
    mergekit YAML, which mergekit turns into the exported tensors."""
    from evomerge.outputs import export_recipe
    from evomerge.recipe import Recipe

    plan = LayerPlan.from_dict(zoo_plan(zoo_models))
    out = export_recipe(Recipe(plan=plan), tmp_path / "best", {})
    assert (tmp_path / "best.layer_plan.yml").exists()
    config = yaml.safe_load((tmp_path / "best.mergekit.yml").read_text())
    assert config == plan_to_mergekit(plan.to_dict())
    mergekit_yaml(tmp_path / "best.mergekit.yml", tmp_path / "mergekit")
    assert_same(load_dir(out), load_dir(tmp_path / "mergekit"), "exported plan vs mergekit")
