"""The in-memory engine and the file merger agree, are reproducible, and refuse bad input clearly."""

from __future__ import annotations

import pytest
import torch
from merge_configs import CONFIGS, RANDOMIZED, with_paths
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import MergeEngine
from evomerge.merge.files import merge_to_disk
from evomerge.merge.plan import MergeError


@pytest.fixture(scope="module")
def engine(zoo_models):
    return MergeEngine(zoo_models, base="base")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CONFIGS) + sorted(RANDOMIZED))
def test_engine_matches_file_merge(engine, zoo_models, tmp_path, name):
    cfg = {**CONFIGS, **RANDOMIZED}[name]
    recipe = MergeConfig.model_validate({**cfg, "evomerge": {"seed": 7}})
    merged = state(engine.materialize(recipe))
    out = merge_to_disk(MergeConfig.model_validate({**with_paths(cfg, zoo_models), "evomerge": {"seed": 7}}),
                        tmp_path / name)
    disk = load_file(out / "model.safetensors")
    assert disk.keys() <= merged.keys()
    for k, t in disk.items():
        torch.testing.assert_close(merged[k], t, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    # the written checkpoint is an ordinary HF folder
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "tokenizer.json").exists() and (out / "mergekit_config.yml").exists()
    assert torch.equal(model.state_dict()["model.norm.weight"], disk["model.norm.weight"])


def test_randomized_methods_are_reproducible_per_seed(engine):
    recipe = lambda seed: MergeConfig.model_validate({**RANDOMIZED["dare_ties"], "evomerge": {"seed": seed}})
    a = state(engine.materialize(recipe(1)))
    engine.materialize(MergeConfig.model_validate(CONFIGS["ties"]))  # something else in between
    b = state(engine.materialize(recipe(1)))
    c = state(engine.materialize(recipe(2)))
    key = "model.layers.1.mlp.up_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])


def test_zero_weights_give_back_the_base(engine, zoo_models):
    recipe = MergeConfig.model_validate({"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": m, "parameters": {"weight": 0.0}} for m in ("rev", "sort", "tr")]})
    merged = state(engine.materialize(recipe))
    base = load_file(zoo_models["base"] / "model.safetensors")
    assert all(torch.equal(merged[k], base[k]) for k in base)


def test_subset_of_sources_and_resident_memory(engine, zoo_models):
    recipe = MergeConfig.model_validate({"merge_method": "task_arithmetic", "base_model": "base",
                                         "models": [{"model": "tr", "parameters": {"weight": 1.0}}]})
    merged = state(engine.materialize(recipe))
    tr = load_file(zoo_models["tr"] / "model.safetensors")
    for k in tr:
        torch.testing.assert_close(merged[k], tr[k], rtol=0, atol=1e-6)
    n_params = sum(p.numel() for p in engine.model.parameters())
    assert engine.resident_bytes() == 4 * n_params * 4  # base + three task vectors, float32


@pytest.mark.parametrize("cfg, message", [
    ({"merge_method": "frobnicate", "base_model": "base", "models": [{"model": "rev"}]}, "unknown merge method"),
    ({"merge_method": "ties", "models": [{"model": "rev", "parameters": {"weight": 1}}]}, "needs a base_model"),
    ({"merge_method": "ties", "base_model": "base",
      "models": [{"model": "rev", "parameters": {"weight": 1, "density": 1.5}}]}, "outside (0, 1]"),
    ({"merge_method": "ties", "base_model": "base",
      "models": [{"model": "rev", "parameters": {"weight": 1, "density": 0.0}}]}, "outside (0, 1]"),
    ({"merge_method": "ties", "base_model": "base", "models": [{"model": "rev", "parameters": {"wieght": 1}}]},
     "has no parameter 'wieght'"),
    ({"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "rev"}]}, "has no 'weight'"),
    ({"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5},
      "models": [{"model": "rev"}, {"model": "tr"}]}, "exactly one other model"),
    ({"merge_method": "ties", "base_model": "base", "models": [{"model": "rev", "parameters": {"normalize": True,
                                                                                               "weight": 1}}]},
     "global parameter"),
])
def test_bad_recipes_are_refused_with_a_clear_message(engine, cfg, message):
    with pytest.raises(MergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.materialize(MergeConfig.model_validate(cfg))
