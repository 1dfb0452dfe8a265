"""Merging works for any decoder-only architecture whose layers are numbered in tensor names."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import MergeEngine
from evomerge.merge.files import merge_to_disk
from evomerge.merge.params import layer_index
from evomerge.merge.plan import MergeError


def fine_tuned(src, dst, seed: int, scale: float = 0.02):
    """A copy of ``src`` with every weight nudged, as a fine-tune would."""
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi", "gpt2"])
def test_merge_any_decoder_architecture(tmp_path, arch):
    base = make_tiny(arch, tmp_path / "base", seed=0)
    a, b = fine_tuned(base, tmp_path / "a", 1), fine_tuned(base, tmp_path / "b", 2)
    names = load_file(base / "model.safetensors").keys()
    assert {layer_index(n) for n in names} >= {0, 1, 2}
    cfg = {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.6},
           "models": [{"model": "a", "parameters": {"weight": [0.2, 1.0]}},
                      {"model": "b", "parameters": {"weight": 0.5}}]}
    engine = MergeEngine({"base": base, "a": a, "b": b}, base="base")
    merged = {k: v.clone() for k, v in engine.materialize(MergeConfig.model_validate(cfg)).state_dict().items()}
    paths = {"base": str(base), "a": str(a), "b": str(b)}
    out = merge_to_disk(MergeConfig.model_validate({**cfg, "base_model": paths["base"], "models": [
        {**m, "model": paths[m["model"]]} for m in cfg["models"]]}), tmp_path / "out")
    disk = load_file(out / "model.safetensors")
    prefix = engine.model.base_model_prefix
    for k, t in disk.items():
        torch.testing.assert_close(merged.get(k, merged.get(f"{prefix}.{k}")), t)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(model(ids).logits).all()
    base_sd = load_file(base / "model.safetensors")
    assert any(not torch.equal(base_sd[k], disk[k]) for k in disk)


def test_architecture_mismatch_is_refused(tmp_path):
    llama = make_tiny("llama", tmp_path / "llama", 0)
    gpt2 = make_tiny("gpt2", tmp_path / "gpt2", 0)
    cfg = MergeConfig.model_validate({"merge_method": "task_arithmetic", "base_model": str(llama),
                                      "models": [{"model": str(gpt2), "parameters": {"weight": 1}}]})
    with pytest.raises(MergeError, match="architectures differ.*evomerge fuse"):
        merge_to_disk(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocabulary_mismatch_is_refused_with_a_hint(tmp_path):
    a = make_tiny("llama", tmp_path / "a", 0, vocab=99)
    b = make_tiny("llama", tmp_path / "b", 1, vocab=103)
    cfg = MergeConfig.model_validate({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1}}, {"model": str(b), "parameters": {"weight": 1}}]})
    with pytest.raises(MergeError, match="vocabulary sizes differ"):
        merge_to_disk(cfg, tmp_path / "out")


def test_missing_tensors_are_named(tmp_path):
    a = make_tiny("llama", tmp_path / "a", 0)
    b = make_tiny("llama", tmp_path / "b", 1, num_hidden_layers=2)
    with pytest.raises(MergeError, match="different tensors.*model.layers.2"):
        MergeEngine({"a": a, "b": b}, base="a")


def test_pickled_weights_need_an_explicit_flag(tmp_path):
    a = make_tiny("llama", tmp_path / "a", 0)
    b = fine_tuned(a, tmp_path / "b", 1)
    sd = load_file(b / "model.safetensors")
    (b / "model.safetensors").unlink()
    torch.save(sd, b / "pytorch_model.bin")
    cfg = MergeConfig.model_validate({"merge_method": "task_arithmetic", "base_model": str(a),
                                      "models": [{"model": str(b), "parameters": {"weight": 1.0}}]})
    with pytest.raises(ValueError, match="pickled weights.*--allow-pickle"):
        merge_to_disk(cfg, tmp_path / "out")
    out = merge_to_disk(cfg, tmp_path / "out", allow_pickle=True)
    merged = load_file(out / "model.safetensors")
    torch.testing.assert_close(merged["model.norm.weight"], sd["model.norm.weight"])


def test_sharded_output_loads(tmp_path):
    a = make_tiny("llama", tmp_path / "a", 0)
    b = fine_tuned(a, tmp_path / "b", 1)
    cfg = MergeConfig.model_validate({"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": str(a), "parameters": {"weight": 1}}, {"model": str(b), "parameters": {"weight": 1}}]})
    out = merge_to_disk(cfg, tmp_path / "out", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
