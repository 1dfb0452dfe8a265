"""Tokenizer merging as mergekit 0.1.5 does it: one output vocabulary, embedding rows by token string.

``tokenizer_source: base | union | <model>`` (or the ``tokenizer: {source, tokens,
pad_to_multiple_of}`` block) chooses the output tokenizer: the base's (tokens past the config's
``vocab_size`` stripped), the union of every model's (the base's, then each other model's tokens it
lacks, then the added tokens), or one model's. Each model's embedding / head rows are then moved to
the output ids of their token strings (``permutations``); a row for a token a model lacks is
filled as mergekit fills it (``vocab_rows``): from the only model that has it, else from the base,
else the mean over the models that have it, a zero row when none has it, or what ``tokens:`` says
(a model, a token of a model, zero; ``force`` overrides rows that exist). Rows added by
``pad_to_multiple_of`` are the mean of the real rows. Written anew after mergekit's
``tokenizer/build.py`` and ``tokenizer/embed.py``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

VOCAB_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out")


class ZeroEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """The row of ``token`` (or ``token_id``) in ``model``'s own vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source gives exactly one of token_id or token")
        return self


class TokenEmbedding(BaseModel):
    """``tokens: {TOKEN: {source, force}}``: where the token's row comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False


class TokenizerBlock(BaseModel):
    """mergekit's ``tokenizer:`` block (its defaults: source union)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None


@dataclass
class TokenizerInfo:
    tokenizer: Any  # a transformers fast tokenizer
    permutations: dict[str, dict[int, int]]  # model -> output id -> its own id (-1: it lacks the token)
    original_vocabs: dict[str, dict[str, int]]


def is_vocab_tensor(name: str, shape: Sequence[int], vocab_size: int) -> bool:
    """Whether a tensor is indexed by token on its first axis (embeddings, untied head)."""
    return len(shape) >= 1 and shape[0] == vocab_size and any(v in name for v in VOCAB_NAMES)


def _load(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


def stripped_tokenizer(path: Path, vocab_size: int | None) -> Any:
    """The model's tokenizer without tokens whose id is >= the config's vocab_size (BPE only)."""
    import tokenizers

    tok = _load(path)
    size = vocab_size or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ValueError(f"the tokenizer of {path} has tokens past vocab_size {size} and is of type "
                         f"{data['model']['type']}; only BPE tokenizers can be stripped for a tokenizer merge")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def union_tokenizer(base_tok: Any, toks: Mapping[str, Any], vocab_sizes: Mapping[str, int | None]) -> Any:
    """The base's tokenizer plus every other token of the models (in model order), then the added
    tokens (first settings win)."""
    from transformers import AutoTokenizer

    vocab: dict[str, int] = {}
    added: dict[str, Any] = {}
    for model, tok in toks.items():
        size = vocab_sizes.get(model) or tok.vocab_size
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in added_names and t not in vocab:
                vocab[t] = len(vocab)
        for i, info in decoder.items():
            if i < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the base tokenizer is not changed
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in vocab:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_tokenizer(base: str, models: Sequence[str], source: str, paths: Mapping[str, Path],
                    vocab_sizes: Mapping[str, int | None], add_tokens: Sequence[str] = ()) -> TokenizerInfo:
    """The output tokenizer and each model's permutation into it. ``base`` is the base model (else
    the first model); ``source`` is "base", "union" or a model name."""
    toks = {base: stripped_tokenizer(paths[base], vocab_sizes.get(base))}
    for m in models:
        if m not in toks:
            toks[m] = _load(paths[m])
    if source == "base":
        out = toks[base]
    elif source == "union":
        out = union_tokenizer(toks[base], toks, vocab_sizes)
    else:
        out = _load(paths[source]) if source in paths else _load(Path(source))
    existing = set(out.get_vocab())
    for t in add_tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab_out = out.get_vocab()
    permutations = {}
    for m in models:
        own = toks.get(m, toks[base]).get_vocab()
        size = vocab_sizes.get(m) or len(own)
        p = {}
        for t, new in vocab_out.items():
            if t not in own:
                p[new] = -1
            elif own[t] < size:
                p[new] = own[t]
        permutations[m] = p
    return TokenizerInfo(out, permutations, {m: t.get_vocab() for m, t in toks.items()})


def output_vocab_size(info: TokenizerInfo, pad_to_multiple_of: int | None) -> int:
    n = len(info.tokenizer.get_vocab())
    if pad_to_multiple_of and n % pad_to_multiple_of:
        n = (n // pad_to_multiple_of + 1) * pad_to_multiple_of
    return n


def _sources(info: TokenizerInfo, models: list[str], base: str | None,
             tokens: dict[str, TokenEmbedding]) -> set[str]:
    """mergekit's assign_embedding_sources: fills ``tokens`` with a source for every token some
    model lacks (in place) and returns the tokens whose row is the mean over the models having it."""
    average = set()
    for t, i in info.tokenizer.get_vocab().items():
        if t in tokens:
            continue
        has = [info.permutations[m].get(i, -1) >= 0 for m in models]
        n = sum(has)
        if n == 1:
            tokens[t] = TokenEmbedding(source=models[has.index(True)])
        elif n == 0:
            tokens[t] = TokenEmbedding(source=ZeroEmbedding(kind="zero"))
        elif base in models and info.permutations[base].get(i, -1) >= 0:
            tokens[t] = TokenEmbedding(source=base)
        else:
            average.add(t)
    return average


def vocab_rows(info: TokenizerInfo, tensors: Mapping[str, torch.Tensor], base: str | None,
               tokens: Mapping[str, TokenEmbedding] | None, pad_to_multiple_of: int | None) -> dict[str, torch.Tensor]:
    """Each model's token-indexed tensor (vocabulary on axis 0) laid out in the output vocabulary."""
    models = list(tensors)
    vocab = info.tokenizer.get_vocab()
    size = output_vocab_size(info, pad_to_multiple_of)
    first = tensors[models[0]]
    row_shape = first.shape[1:]
    dtype = first.dtype
    for x in tensors.values():
        dtype = torch.promote_types(dtype, x.dtype)
    cfgs = dict(tokens or {})
    average = _sources(info, models, base, cfgs)
    perm = info.permutations
    defaults: dict[str, torch.Tensor] = {}
    for t, i in vocab.items():
        cfg = cfgs.get(t)
        if not (cfg and cfg.force) and all(perm[m].get(i, -1) >= 0 for m in models):
            continue
        row = torch.zeros(row_shape, dtype=dtype, device=first.device)
        if t in average:
            count = 0
            for m in models:
                if perm[m].get(i, -1) >= 0:
                    row = row + tensors[m][perm[m][i]]
                    count += 1
            row /= count
        elif cfg is not None:
            row = _configured_row(info, tensors, t, i, cfg)
        else:
            continue
        defaults[t] = row
    out = {}
    for m in models:
        p = perm[m]
        rows = torch.zeros((size, *row_shape), dtype=dtype, device=first.device)
        for t, i in vocab.items():
            force = t in cfgs and cfgs[t].force
            if p.get(i, -1) >= 0 and not force:
                rows[i] = tensors[m][p[i]]
            elif t in defaults:
                rows[i] = defaults[t]
        if size > len(vocab):
            rows[len(vocab):] = rows[: len(vocab)].mean(dim=0)
        out[m] = rows
    return out


def _configured_row(info: TokenizerInfo, tensors: Mapping[str, torch.Tensor], token: str, token_id: int,
                    cfg: TokenEmbedding) -> torch.Tensor:
    src = cfg.source
    if isinstance(src, ZeroEmbedding) or src is None:
        x = next(iter(tensors.values()))
        return x.new_zeros(x.shape[1:])
    model = src.model if isinstance(src, ModelTokenEmbedding) else src
    if model not in tensors:
        raise ValueError(f"token {token!r} takes its row from '{model}', which is not merged into this tensor")
    if isinstance(src, ModelTokenEmbedding):
        idx = src.token_id
        if idx is None:
            own = info.original_vocabs.get(model, {})
            if src.token not in own:
                raise ValueError(f"token {src.token!r} is not in the vocabulary of '{model}'")
            idx = own[src.token]
        if not 0 <= idx < tensors[model].shape[0]:
            raise ValueError(f"token id {idx} is out of range for '{model}' ({tensors[model].shape[0]} rows)")
        return tensors[model][idx]
    p = info.permutations[model]
    if p.get(token_id, -1) < 0:
        raise ValueError(f"token {token!r} is not in the vocabulary of '{model}'")
    return tensors[model][p[token_id]]
