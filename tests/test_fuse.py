"""Heterogeneous merging by distribution fusion: alignment, fusion strategies, training, resume, config.

Real objects throughout: the zoo's character tokenizer and Llama models, the heterogeneous GPT-2 /
byte-level BPE expert (built once, cached), real training runs of a few dozen steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

from evomerge.fuse import (
    ce_weights,
    coalesce,
    dtw_align,
    fuse_mince,
    fuse_weighted,
    fusion_loss,
    load_fuse_experiment,
    run_fuse,
    same_prefix_positions,
    source_distributions,
    token_surfaces,
    vocab_map,
)
from evomerge.fuse.align import special_marker
from evomerge.fuse.data import encode_pair, load_pairs, pad_batch
from evomerge.refs import resolve_items_ref
from evomerge.zoo.hetero import duplicate, ensure_hetero_expert, hetero_items_path
from evomerge.zoo.skills import read_jsonl
from evomerge.zoo.tokenizer import char_tokenizer


@pytest.fixture(scope="session")
def hetero(zoo) -> Path:
    """The GPT-2 / BPE expert's folder (built on first use, about a minute, then cached)."""
    return ensure_hetero_expert(zoo)


def answer_nll(model, tok, items: list[dict]) -> float:
    """Mean -log p(answer | prompt) over items, in nats: the loss a fused target should lower."""
    enc = [encode_pair(tok, it["prompt"], it["answer"]) for it in items]
    ids, mask, labels = pad_batch([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0] * (labels[:, 1:] != -100)
    return float(nll.sum(-1).mean())


# ------------------------------------------------------------------------------------ the expert


def test_hetero_expert_is_a_different_model_that_knows_a_new_skill(zoo, hetero):
    model, tok = AutoModelForCausalLM.from_pretrained(hetero), AutoTokenizer.from_pretrained(hetero)
    assert isinstance(model, GPT2LMHeadModel)
    assert tok.tokenize("D:38=3388") == ["D", ":", "3", "8", "=", "33", "88"]  # BPE merges doubled digits
    assert tok.convert_tokens_to_string(tok.tokenize("L:a b=a b")) == "L:a b=a b"  # byte level round trip
    test = read_jsonl(hetero_items_path(hetero, "dup", "test"))
    assert {it["prompt"][:2] for it in test} == {"D:"} and all(it["answer"] == duplicate(it["prompt"][2:-1])
                                                                for it in test)
    train_prompts = {it["prompt"] for it in read_jsonl(hetero_items_path(hetero, "dup", "train"))}
    assert not train_prompts & {it["prompt"] for it in test}
    from evomerge.evaluate.generation import exact_match

    sample = test[::6]  # 100 items
    expert = sum(exact_match(model, tok, sample)) / len(sample)
    base = AutoModelForCausalLM.from_pretrained(zoo.base)
    zoo_base = sum(exact_match(base, AutoTokenizer.from_pretrained(zoo.base), sample)) / len(sample)
    assert expert >= 0.8 and zoo_base <= 0.05, (expert, zoo_base)


# ------------------------------------------------------------------------------------ alignment


def test_identical_tokenizers_align_as_identity():
    tok = char_tokenizer()
    surf = token_surfaces(tok)
    assert vocab_map(surf, surf) == list(range(len(surf)))
    seq = [surf[i] for i in tok("R:3829=")["input_ids"]]
    assert same_prefix_positions(seq, seq) == list(range(len(seq)))
    a_to_b, b_to_a = dtw_align(seq, seq)
    assert a_to_b == [[i] for i in range(len(seq))] == b_to_a


def test_dtw_pairs_a_merged_token_with_its_characters():
    a_to_b, b_to_a = dtw_align(["x", "ab", "y"], ["x", "a", "b", "y"])
    assert a_to_b == [[0], [1, 2], [3]]  # one-to-many
    assert b_to_a == [[0], [1], [1], [2]]  # many-to-one
    # repetitive text ties on edit distance; character positions decide
    a_to_b, _ = dtw_align(["33", "33"], ["3", "3", "3", "3"])
    assert a_to_b == [[0, 1], [2, 3]]


def test_char_vs_bpe_alignment_on_real_tokenizers(hetero):
    char, bpe = char_tokenizer(), AutoTokenizer.from_pretrained(hetero)
    cs, bs = token_surfaces(char), token_surfaces(bpe)
    c_seq = [cs[i] for i in encode_pair(char, "D:38=", "3388")[0]]
    b_seq = [bs[i] for i in encode_pair(bpe, "D:38=", "3388")[0]]
    assert c_seq == [special_marker("bos"), "D", ":", "3", "8", "=", "3", "3", "8", "8", special_marker("eos")]
    assert b_seq == [special_marker("bos"), "D", ":", "3", "8", "=", "33", "88", special_marker("eos")]
    c_to_b, b_to_c = dtw_align(c_seq, b_seq)
    assert c_to_b[6] == c_to_b[7] == [6] and c_to_b[8] == c_to_b[9] == [7]  # many-to-one: '3','3' <- '33'
    assert b_to_c[6] == [6, 7] and b_to_c[7] == [8, 9]  # one-to-many
    where = same_prefix_positions(c_seq, b_seq)
    # after the first '3' of '33' the BPE model has read no token boundary: no distribution there
    assert where == [0, 1, 2, 3, 4, 5, None, 6, None, 7, 8]
    # the BPE expert as target, characters as source: the last character carries the same prefix
    assert same_prefix_positions(b_seq, c_seq) == [0, 1, 2, 3, 4, 5, 7, 9, 10]
    # vocabularies: a merged token goes to its first character; specials go by role
    vm = vocab_map(bs, cs)
    assert [cs[vm[bpe.convert_tokens_to_ids(t)]] for t in ("33", "88", "D")] == ["3", "8", "D"]
    assert vm[bpe.eos_token_id] == char.eos_token_id and vm[bpe.bos_token_id] == char.bos_token_id
    back = vocab_map(cs, bs)
    assert back[char.convert_tokens_to_ids("3")] == bpe.convert_tokens_to_ids("3")


def test_vocab_map_prefers_the_nearest_then_the_longest_common_prefix():
    target = ["3", "8", "a", "b", "ab", "x", special_marker("eos")]
    got = vocab_map(["38", "ab", "xyz", "83", special_marker("eos")], target)
    assert [target[i] for i in got] == ["3", "ab", "x", "8", special_marker("eos")]


# ------------------------------------------------------------------------------------ fusion


def test_mince_takes_the_lower_ce_source_per_sequence():
    idx = torch.stack([torch.full((2, 3, 2), 1), torch.full((2, 3, 2), 2)])  # [S=2, B=2, T=3, k=2]
    idx[..., 1] += 10
    p = torch.tensor([0.6, 0.2]).expand(2, 2, 3, 2).clone()
    ce = torch.tensor([[1.0, 5.0], [3.0, 2.0]])  # pair 0: source 0 is better; pair 1: source 1
    fidx, fp = fuse_mince(idx, p, ce)
    assert fidx[0].unique().tolist() == [1, 11] and fidx[1].unique().tolist() == [2, 12]
    assert torch.allclose(fp.sum(-1), torch.ones(2, 3)) and torch.allclose(fp[0, 0], torch.tensor([0.75, 0.25]))


def test_weighted_fusion_is_a_distribution_and_the_weighted_average():
    g = torch.Generator().manual_seed(0)
    s, b, t, k, v = 3, 4, 5, 6, 20
    idx = torch.randint(0, v, (s, b, t, k), generator=g)
    p = torch.rand((s, b, t, k), generator=g)
    ce = torch.rand((s, b), generator=g) * 5
    for weights in (ce_weights(ce), torch.tensor([0.5, 0.3, 0.2])):
        fidx, fp = fuse_weighted(idx, p, weights)
        assert torch.allclose(fp.sum(-1), torch.ones(b, t), atol=1e-6)
        dense = torch.zeros(b, t, v).scatter_add_(-1, fidx, fp)
        w = weights if weights.dim() == 2 else weights[:, None].expand(s, b)
        expect = sum(w[i][:, None, None]
                     * torch.zeros(b, t, v).scatter_add_(-1, idx[i], p[i] / p[i].sum(-1, keepdim=True))
                     for i in range(s))
        assert torch.allclose(dense, expect, atol=1e-6)
        live = fp > 0  # each id at most once among the slots that hold mass
        same = (fidx.unsqueeze(-1) == fidx.unsqueeze(-2)) & live.unsqueeze(-1) & live.unsqueeze(-2)
        assert same.sum(-1).max() <= 1
    assert torch.allclose(ce_weights(ce).sum(0), torch.ones(b))
    assert (ce_weights(ce).argmax(0) == ce.argmin(0)).all()


def test_coalesce_sums_repeated_ids():
    idx, p = coalesce(torch.tensor([[5, 3, 5, 0]]), torch.tensor([[0.2, 0.3, 0.4, 0.0]]))
    got = {int(i): round(float(q), 6) for i, q in zip(idx[0], p[0]) if q > 0}
    assert got == {3: 0.3, 5: 0.6}


def test_loss_is_plain_ce_at_lambda_1_and_kl_vanishes_on_the_models_own_distribution(zoo):
    model, tok = AutoModelForCausalLM.from_pretrained(zoo.experts["rev"]), AutoTokenizer.from_pretrained(zoo.base)
    items = read_jsonl(zoo.items_path("rev", "test"))[:16]
    enc = [encode_pair(tok, it["prompt"], it["answer"]) for it in items]
    ids, mask, labels = pad_batch([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        own = torch.softmax(out.logits.float(), -1)
        full = torch.arange(own.shape[-1]).expand_as(own)
        loss, ce, kl = fusion_loss(out.logits, labels, full, own, lam=1.0)
        assert math.isclose(loss.item(), out.loss.item(), rel_tol=1e-5) and math.isnan(kl)
        _, _, kl = fusion_loss(out.logits, labels, full, own, lam=0.5)
        assert abs(kl) < 1e-5
        shifted = torch.roll(own, 1, dims=-1)  # another distribution: KL clearly positive
        _, _, kl = fusion_loss(out.logits, labels, full, shifted, lam=0.5)
        assert kl > 1.0


# ------------------------------------------------------------------------------------ runs


def write_experiment(folder: Path, **overrides) -> Path:
    exp = {"name": "t", "seed": 0, "sources": {"base": "zoo:base", "dup": "hetero:dup"}, "target": "base",
           "data": [{"path": "hetero:dup/train", "limit": 384}, {"path": "zoo:rev/train", "limit": 128}],
           "fusion": {"strategy": "mince", "top_k": 5},
           "train": {"steps": 40, "batch_size": 32, "lr": 2e-3, "lambda": 0.0, "checkpoint_every": 10},
           "threads": 1}
    for key, value in overrides.items():
        exp[key] = {**exp[key], **value} if isinstance(value, dict) and isinstance(exp.get(key), dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fuse.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_pure_fusion_teaches_a_target_outside_the_sources_the_new_skill_and_the_output_loads(tmp_path, zoo, hetero):
    """lambda = 0: no reference loss, only the fused distributions (the reference enters only where no
    source position has read the same text); the target, the zoo's tr expert given as a folder, is not
    a source. Its loss on held-out items of the new skill falls."""
    target = zoo.experts["tr"]
    run = run_fuse(write_experiment(tmp_path, target=str(target)), output_dir=tmp_path / "run")
    test = read_jsonl(hetero_items_path(hetero, "dup", "test"))[::10]
    target_tok = AutoTokenizer.from_pretrained(target)
    before = answer_nll(AutoModelForCausalLM.from_pretrained(target), target_tok, test)
    fused = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert isinstance(fused, LlamaForCausalLM) and tok.get_vocab() == target_tok.get_vocab()
    after = answer_nll(fused, tok, test)
    print(f"dup test answer NLL: before {before:.2f}, after {after:.2f} nats")
    assert after < 0.5 * before, (before, after)
    report = json.loads((run / "report.json").read_text())
    assert report["coverage"]["base"] == 1.0 and 0.3 < report["coverage"]["dup"] < 1.0
    assert report["target"] == str(target)
    assert (run / "items" / "dup" / "fitness.jsonl").exists()


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path):
    path = write_experiment(tmp_path, train={"steps": 30, "lambda": 0.5})
    whole = run_fuse(path, output_dir=tmp_path / "whole")

    class Kill(Exception):
        pass

    def kill_at_20(step, row):
        if step == 20:
            raise Kill

    with pytest.raises(Kill):
        run_fuse(path, output_dir=tmp_path / "killed", on_step=kill_at_20)
    assert not (tmp_path / "killed" / "model").exists()
    resumed = run_fuse(path, output_dir=tmp_path / "killed")
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((resumed / "report.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 31))
    with pytest.raises(ValueError, match="different fusion experiment"):
        run_fuse(write_experiment(tmp_path / "other", train={"steps": 31}), output_dir=tmp_path / "whole")


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, message", [
    ({"sources": {"base": "zoo:base", "x": "zoo:nope"}}, r"sources\.x: the zoo has no model 'nope'"),
    ({"sources": {"base": "zoo:base", "x": "/no/such/folder"}}, r"sources\.x: '/no/such/folder' is not a model folder"),
    ({"target": "tr"}, r"target 'tr' is neither a source \(base, dup\) nor a model folder"),
    ({"train": {"lambda": 1.5}}, r"lambda 1\.5 is outside \[0, 1\]"),
    ({"fusion": {"strategy": "weighted", "weights": {"base": 1, "gpt": 1}}}, r"unknown sources \['gpt'\]"),
    ({"fusion": {"strategy": "median"}}, r"mince.*weighted"),
    ({"data": [{"path": "no/such.jsonl"}]}, r"data\[0\]\.path: item file 'no/such.jsonl' does not exist"),
    ({"eval": ["zoo:rev"]}, r"eval\[0\]: 'zoo:rev' must look like 'zoo:<skill>/<split>'"),
])
def test_config_errors_name_the_bad_value(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_fuse_experiment(write_experiment(tmp_path, **overrides))


def test_target_may_be_a_folder_outside_the_sources(tmp_path, zoo):
    exp = load_fuse_experiment(write_experiment(tmp_path, target=str(zoo.experts["tr"])))
    assert exp.target_ref == str(zoo.experts["tr"])


def test_data_refs_resolve_and_sample(hetero):
    path = resolve_items_ref("hetero:dup/train")
    assert path == hetero_items_path(hetero, "dup", "train")
    a, b = load_pairs(path, 50, seed=0), load_pairs(path, 50, seed=0)
    assert a == b and len({len(p) for p, _ in a}) > 1  # a seeded sample across lengths, not the first rows
    with pytest.raises(ValueError, match="no heterogeneous skill 'nope'"):
        resolve_items_ref("hetero:nope/train")


def test_source_distributions_carry_the_experts_prediction_to_the_target_positions(hetero):
    """The GPT-2 expert's next-token probabilities land on the character positions that have read the
    same text, mapped to characters; positions inside a BPE token fall back to the reference."""
    char, bpe = char_tokenizer(), AutoTokenizer.from_pretrained(hetero)
    model = AutoModelForCausalLM.from_pretrained(hetero)
    pair = ("D:38=", "3388")
    t_ids, t_start = encode_pair(char, *pair)
    d = source_distributions(model, bpe, char, [pair], [t_ids], [t_start], len(t_ids), top_k=5)
    s_ids, _ = encode_pair(bpe, *pair)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([s_ids])).logits[0].float(), -1)
    p88 = float(probs[6, bpe.convert_tokens_to_ids("88")])  # after "...=33" the expert predicts "88"
    row = {char.convert_ids_to_tokens(int(i)): float(p) for i, p in zip(d.indices[0, 7], d.probs[0, 7]) if p > 0}
    assert max(row, key=row.get) == "8" and abs(row["8"] - p88) < 2e-3 and p88 > 0.5
    inside = {int(i): float(p) for i, p in zip(d.indices[0, 6], d.probs[0, 6]) if p > 0}
    assert inside == {char.convert_tokens_to_ids("3"): 1.0}  # after the first '3' of '33': the reference
    p_eos = float(probs[7, bpe.eos_token_id])
    row = {int(i): float(p) for i, p in zip(d.indices[0, 9], d.probs[0, 9]) if p > 0}
    assert abs(row[char.eos_token_id] - p_eos) < 2e-3  # EOS maps to EOS
    assert d.probs[0, :5].sum() == 0  # prompt rows predict no answer token: empty
    ce = -math.log(float(probs[5, bpe.convert_tokens_to_ids("33")])) - math.log(p88) - math.log(p_eos)
    assert abs(float(d.ce[0]) - ce) < 1e-3 and d.coverage == 3 / 5
