"""Shared fixtures: the real zoo (built once, cached by its spec hash) and small local checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see evomerge/cli.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from evomerge.zoo import ensure_zoo


@pytest.fixture(scope="session")
def zoo():
    """The default zoo, exactly what `evomerge zoo build` makes (built on first use, then cached)."""
    return ensure_zoo()


@pytest.fixture(scope="session")
def zoo_models(zoo):
    """Name -> folder for the base and the experts."""
    return {"base": zoo.base, **zoo.experts}


def make_tiny(arch: str, path, seed: int, vocab: int = 99, **overrides):
    """Save a tiny randomly initialised checkpoint of a transformers architecture."""
    import transformers

    from evomerge.zoo.tokenizer import char_tokenizer

    configs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                         num_attention_heads=4, num_key_value_heads=2)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=3, num_attention_heads=4,
                                                               num_key_value_heads=2)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                         num_attention_heads=4, num_key_value_heads=2)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
        "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                   num_attention_heads=4)),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64)),
    }
    cfg_name, model_name, kw = configs[arch]
    kw = {**kw, **overrides}
    tok = char_tokenizer()
    cfg = getattr(transformers, cfg_name)(vocab_size=vocab, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
