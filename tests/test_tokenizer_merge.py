"""Tokenizer merging: two vocabularies that differ, merged by token string as mergekit merges them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_mergekit_compat import assert_same, run_both
from transformers import AutoTokenizer

from evomerge.merge.config import MergeConfig
from evomerge.merge.files import merge_to_disk
from evomerge.merge.plan import MergeError

EXTRA = ["<x1>", "AB", "zz"]


def extended(src: Path, out: Path, seed: int) -> Path:
    """``src`` with its char tokenizer extended by a few tokens and new embedding / head rows."""
    shutil.copytree(src, out)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(EXTRA)
    tok.save_pretrained(out)
    n = len(tok.get_vocab())
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = tensors[name]
        tensors[name] = torch.cat([old, 0.02 * torch.randn(n - old.shape[0], old.shape[1], generator=g)]).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = n
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def two_vocabs(zoo_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {"base": zoo_models["base"], "sort": zoo_models["sort"],
            "rev+": extended(zoo_models["rev"], root / "rev_plus", 1)}


def configs(p: dict) -> dict[str, dict]:
    b, rev, sort = str(p["base"]), str(p["rev+"]), str(p["sort"])
    ties = {"merge_method": "ties", "base_model": b,
            "models": [{"model": rev, "parameters": {"weight": 0.7, "density": 0.6}},
                       {"model": sort, "parameters": {"weight": 0.5, "density": 0.8}}]}
    linear = {"merge_method": "linear", "models": [{"model": rev, "parameters": {"weight": 0.6}},
                                                   {"model": b, "parameters": {"weight": 0.4}}]}
    return {
        "union": {**ties, "tokenizer_source": "union"},
        "base": {**ties, "tokenizer_source": "base"},
        "model": {**linear, "base_model": b, "tokenizer_source": rev},
        "block": {**ties, "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
            "<new>": {"source": {"kind": "model_token", "model": rev, "token": "AB"}},
            "zz": {"source": {"kind": "zero"}, "force": True},
            "a": {"source": b, "force": True}}}},
    }


@pytest.mark.parametrize("name", ["union", "base", "model", "block"])
def test_tokenizer_merge_equals_mergekit(two_vocabs, tmp_path, name):
    cfg = configs(two_vocabs)[name]
    ours, theirs = run_both(cfg, tmp_path, name)
    assert_same(ours, theirs, f"tokenizer {name}")
    a_dir, b_dir = tmp_path / f"{name}-evomerge", tmp_path / f"{name}-mergekit"
    a_tok, b_tok = AutoTokenizer.from_pretrained(a_dir), AutoTokenizer.from_pretrained(b_dir)
    assert a_tok.get_vocab() == b_tok.get_vocab()
    assert json.loads((a_dir / "tokenizer.json").read_text()) == json.loads((b_dir / "tokenizer.json").read_text())
    vocab = json.loads((a_dir / "config.json").read_text())["vocab_size"]
    assert vocab == json.loads((b_dir / "config.json").read_text())["vocab_size"]
    assert ours["model.embed_tokens.weight"].shape[0] == vocab
    if name in ("union", "block"):
        assert all(t in a_tok.get_vocab() for t in EXTRA)
        assert vocab == (104 if name == "block" else 102)  # 99 + 3 extra (+ <new>, padded to 8)


def test_union_rows_follow_the_token_strings(two_vocabs, tmp_path):
    out = merge_to_disk(MergeConfig.model_validate(configs(two_vocabs)["union"]), tmp_path / "u")
    merged = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(out)
    plus = load_file(two_vocabs["rev+"] / "model.safetensors")["model.embed_tokens.weight"]
    own = AutoTokenizer.from_pretrained(two_vocabs["rev+"]).get_vocab()
    base = load_file(two_vocabs["base"] / "model.safetensors")["model.embed_tokens.weight"]
    # a token only rev+ has: every model's row is rev+'s, so the merge gives rev+'s row exactly
    torch.testing.assert_close(merged[tok.get_vocab()["AB"]], plus[own["AB"]])
    assert not torch.equal(merged[tok.get_vocab()["7"]], base[tok.get_vocab()["7"]])  # a merged row


def test_different_vocabularies_without_a_tokenizer_merge_are_refused(two_vocabs, tmp_path):
    cfg = configs(two_vocabs)["union"]
    cfg.pop("tokenizer_source")
    with pytest.raises(MergeError,
                       match="vocabulary sizes differ: merge the tokenizers with 'tokenizer_source: union'"):
        merge_to_disk(MergeConfig.model_validate(cfg), tmp_path / "x")
    with pytest.raises(ValueError, match="not both"):
        MergeConfig.model_validate({**cfg, "tokenizer_source": "union", "tokenizer": {"source": "base"}})


def test_union_in_a_frankenmerge_equals_mergekit(two_vocabs, tmp_path):
    """Slices and a tokenizer union together: embeddings from rev+ (first slice), head from sort
    (last slice), whose rows for rev+'s extra tokens mergekit fills with zeros."""
    rev, sort = str(two_vocabs["rev+"]), str(two_vocabs["sort"])
    cfg = {"merge_method": "passthrough", "base_model": str(two_vocabs["base"]), "tokenizer_source": "union",
           "slices": [{"sources": [{"model": rev, "layer_range": [0, 3]}]},
                      {"sources": [{"model": sort, "layer_range": [1, 4]}]}]}
    ours, theirs = run_both(cfg, tmp_path, "franken-union")
    assert_same(ours, theirs, "frankenmerge + union")
    tok = AutoTokenizer.from_pretrained(tmp_path / "franken-union-evomerge")
    assert torch.count_nonzero(ours["lm_head.weight"][tok.get_vocab()["AB"]]) == 0
