"""Genomes decode to the recipes their genes say: per-layer values, groups, presets, DFS start point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.config import DFSSpace, PSSpace, load_space
from evomerge.merge.engine import MergeEngine
from evomerge.merge.methods import get_method
from evomerge.merge.plan import merge_inputs, tensor_params
from evomerge.spaces import DFSGenome, PSGenome, genome_seed

PRESETS = sorted(Path(__file__).resolve().parent.parent.glob("search_spaces/ps_*.yaml"))


@pytest.fixture(scope="module")
def engine(zoo_models):
    return MergeEngine(zoo_models, base="base")


def resolved(cfg, tensor: str, param: str, num_layers: int = 4) -> list[float]:
    method = get_method(cfg.merge_method)
    per_model, glob = tensor_params(cfg, method, merge_inputs(cfg, method), tensor, num_layers)
    return per_model[param] if param in per_model else [glob[param]]


def test_per_layer_genes_land_on_their_layer_and_group(engine):
    space = PSSpace(method="task_arithmetic", genes={"weight": {"low": 0, "high": 2}}, filters=["other", "attn", "mlp"])
    g = PSGenome(space, "base", ["rev", "sort", "tr"], engine.tensor_names, engine.num_layers)
    assert g.dim == 3 * (1 + 3 * 4)
    x = np.random.default_rng(0).uniform(g.lower, g.upper)
    cfg = g.decode(x).merge
    table = g.layer_table(x)
    for layer in range(4):
        for group, tensor in [("attn", f"model.layers.{layer}.self_attn.q_proj.weight"),
                              ("mlp", f"model.layers.{layer}.mlp.up_proj.weight"),
                              ("rest", f"model.layers.{layer}.input_layernorm.weight")]:
            got = resolved(cfg, tensor, "weight")
            want = [table[(m, "weight", group)][layer] for m in ("rev", "sort", "tr")]
            np.testing.assert_allclose(got, want, rtol=1e-12)
    for tensor in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        np.testing.assert_allclose(resolved(cfg, tensor, "weight"),
                                   [table[(m, "weight", "other")][0] for m in ("rev", "sort", "tr")])


def test_block_and_smooth_granularity(engine):
    block = PSGenome(PSSpace(method="task_arithmetic", genes={"weight": {"low": 0, "high": 1}}, granularity="block:3"),
                     "base", ["rev"], engine.tensor_names, 4)
    assert block.dim == 2
    cfg = block.decode(np.array([0.2, 0.9])).merge
    assert [resolved(cfg, f"model.layers.{i}.mlp.up_proj.weight", "weight")[0] for i in range(4)] == pytest.approx(
        [0.2, 0.2, 0.2, 0.9])
    smooth = PSGenome(PSSpace(method="task_arithmetic", genes={"weight": {"low": 0, "high": 1}}, smooth=2),
                      "base", ["rev"], engine.tensor_names, 4)
    cfg = smooth.decode(np.array([0.0, 0.9])).merge
    assert [resolved(cfg, f"model.layers.{i}.mlp.up_proj.weight", "weight")[0] for i in range(4)] == pytest.approx(
        [0.0, 0.3, 0.6, 0.9])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_decode_to_mergekit_configs_that_materialize(engine, preset):
    space = load_space(str(preset), Path("."))
    sources = ["tr"] if space.method == "slerp" else ["rev", "sort", "tr"]
    g = PSGenome(space, "base", sources, engine.tensor_names, engine.num_layers)
    rng = np.random.default_rng(1)
    for x in [g.x0, rng.uniform(g.lower, g.upper), g.lower, g.upper]:
        cfg = g.decode(x, genome_seed(x, 0)).merge
        engine.materialize(cfg)
        assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    mergekit = pytest.importorskip("mergekit.config")
    mergekit.MergeConfiguration.model_validate(yaml.safe_load(cfg.to_yaml()))  # mergekit accepts our recipe


def test_genome_seed_is_a_function_of_the_genome():
    x = np.array([0.1, 0.2, 0.3])
    assert genome_seed(x, 0) == genome_seed(x.copy(), 0) != genome_seed(x + 1e-12, 0)
    assert genome_seed(x, 0) != genome_seed(x, 1)


def test_dfs_start_point_is_the_host_and_depth_is_bounded(zoo_models):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.dfs_model import build_dfs_model

    space = DFSSpace(repeats=2, max_layers=6)
    g = DFSGenome(space, [("tr", 4), ("rev", 4)])
    assert g.dim == 2 * 16
    plan = g.decode(g.x0).plan
    assert plan.host == "tr" and plan.layers == [("tr", i) for i in range(4)]
    models = {n: AutoModelForCausalLM.from_pretrained(zoo_models[n]) for n in ("tr", "rev")}
    ids = torch.tensor([[1, 50, 30, 12, 13, 14, 40]])
    with torch.no_grad():
        torch.testing.assert_close(build_dfs_model(plan, models)(ids).logits, models["tr"](ids).logits)
    every = g.decode(np.concatenate([np.ones(16), np.ones(16)])).plan
    assert len(every.layers) == 6
    none = g.decode(np.concatenate([np.zeros(16), np.ones(16)])).plan
    assert len(none.layers) == 1


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_source_genomes_reproduce_each_model(engine, zoo_models, preset):
    """start_from_sources: the genome given for a model decodes to that model's weights."""
    from safetensors.torch import load_file

    space = load_space(str(preset), Path("."))
    sources = ["tr"] if space.method == "slerp" else ["rev", "sort", "tr"]
    g = PSGenome(space, "base", sources, engine.tensor_names, engine.num_layers)
    starts = g.source_genomes()
    if space.method not in PSGenome.SOURCE_METHODS:  # slerp, multislerp, sce: no exact single-model genome
        assert starts == {}
        return
    assert set(starts) == {"base", "rev", "sort", "tr"}
    for name, x in starts.items():
        assert np.all((x >= g.lower) & (x <= g.upper))
        engine.materialize(g.decode(x, genome_seed(x, 0)).merge)
        want = load_file(zoo_models[name] / "model.safetensors")
        got = engine.model.state_dict()
        for t, w in want.items():
            torch.testing.assert_close(got[t], w, rtol=0, atol=1e-6, msg=f"{preset.stem}: {name} {t}")


@pytest.mark.parametrize("preset", ["ps_sce_layers", "ps_multislerp_layers"])
def test_new_method_presets_run_under_cma_es_and_equal_mergekit(engine, zoo_models, tmp_path, preset):
    """A CMA-ES population over the preset decodes to recipes the engine merges as mergekit does."""
    cma = pytest.importorskip("cmaes")
    from merge_configs import with_paths
    from safetensors.torch import load_file

    space = load_space(str(Path(__file__).resolve().parent.parent / "search_spaces" / f"{preset}.yaml"), Path("."))
    g = PSGenome(space, "base", ["rev", "sort", "tr"], engine.tensor_names, engine.num_layers)
    assert g.dim == {"ps_sce_layers": 3 * 4, "ps_multislerp_layers": 3 * (4 + 1)}[preset]
    opt = cma.CMA(mean=g.x0, sigma=0.2, bounds=np.stack([g.lower, g.upper], axis=1), seed=3, population_size=4)
    xs = [opt.ask() for _ in range(opt.population_size)]
    opt.tell([(x, float(np.sum(x))) for x in xs])  # any fitness: the loop runs
    cfg = g.decode(xs[0]).merge
    merged = {k: v.detach().clone() for k, v in engine.materialize(cfg).state_dict().items()}
    mergekit = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration

    data = with_paths(yaml.safe_load(cfg.to_yaml()), zoo_models)
    data.pop("evomerge", None)
    mergekit.run_merge(MergeConfiguration.model_validate(data), str(tmp_path / "mk"),
                       mergekit.MergeOptions(quiet=True, write_model_card=False))
    for k, t in load_file(tmp_path / "mk" / "model.safetensors").items():
        torch.testing.assert_close(merged[k], t, rtol=1e-5, atol=1e-6, msg=k)
