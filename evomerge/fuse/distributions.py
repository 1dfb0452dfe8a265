"""Sources' next-token distributions, mapped onto the target's tokens, and their fusion.

Computed once before training, as FuseLLM does: each source reads every training pair in its own
tokenisation; its top-k next-token probabilities at each position are carried to the target's
positions that have read the same text (``align.same_prefix_positions``) and to the target's
vocabulary (``align.vocab_map``). Where no source position has read the same text (inside a source
token that spans several target tokens), the reference token stands in, one-hot, as in FuseLLM.

Stored compactly: per source, ``[N, T, k]`` target ids (int16 when the vocabulary allows) and
probabilities (float16), and one cross-entropy per pair. Fusion is then cheap tensor work per batch:

- ``mince``: per pair, the distribution of the source with the lowest cross-entropy against the
  reference answer (FuseLLM's MinCE);
- ``weighted``: a per-pair weighted average over sources, by fixed weights or by softmax(-CE / T)
  (FuseLLM's AvgCE).

The cross-entropy is the summed negative log-likelihood of the answer, -log p(answer | prompt), in
nats: unlike FuseLLM's mean per token, it does not depend on how finely a tokenizer cuts the answer,
so sources with different vocabularies are compared on the same quantity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from evomerge.fuse.align import same_prefix_positions, token_surfaces, vocab_map
from evomerge.fuse.data import Pair, encode_pair, pad_batch, pad_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class SourceDistributions:
    """One source's distributions over the training pairs, in the target's tokens and positions.

    Row ``t`` of a pair is the distribution of the target token at ``t + 1`` (what the model predicts
    after reading tokens ``0..t``); rows that predict no answer token are empty (all zero).
    """

    indices: torch.Tensor  # [N, T, k] target token ids
    probs: torch.Tensor  # [N, T, k] float16, summing to ~1 on answer rows
    ce: torch.Tensor  # [N] float32, -log p(answer | prompt) under the source, nats
    coverage: float  # share of answer rows holding the source's own distribution (the rest: one-hot)

    def to_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "probs": self.probs, "ce": self.ce, "coverage": self.coverage}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SourceDistributions":
        return cls(d["indices"], d["probs"], d["ce"], float(d["coverage"]))


def coalesce(indices: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the probabilities of repeated ids along the last axis (one slot per distinct id, zeros after).

    Two source tokens can land on one target token (``33`` and ``3`` both on ``3``), and a weighted
    fusion puts several sources' supports side by side; a distribution with repeated ids would get
    its entropy, hence its KL, wrong.
    """
    idx, order = indices.sort(dim=-1)
    p = probs.gather(-1, order)
    first = torch.ones_like(idx, dtype=torch.bool)
    first[..., 1:] = idx[..., 1:] != idx[..., :-1]
    slot = first.long().cumsum(-1) - 1
    out_p = torch.zeros_like(p).scatter_add_(-1, slot, p)
    out_idx = torch.zeros_like(idx).scatter_(-1, slot, idx)
    return out_idx, out_p


def normalise(probs: torch.Tensor) -> torch.Tensor:
    """Top-k probabilities rescaled to sum to 1 per row (empty rows stay zero)."""
    probs = probs.float()
    total = probs.sum(-1, keepdim=True)
    return torch.where(total > 0, probs / total.clamp_min(1e-12), probs)


def fuse_mince(indices: torch.Tensor, probs: torch.Tensor, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MinCE: per pair, the distribution of the source with the lowest cross-entropy.

    ``indices`` / ``probs``: ``[S, B, T, k]``; ``ce``: ``[S, B]``. Returns ``[B, T, k]``.
    """
    best = ce.argmin(dim=0)  # [B]
    pick = best[None, :, None, None].expand(1, *indices.shape[1:])
    return indices.gather(0, pick)[0].long(), normalise(probs.gather(0, pick)[0])


def ce_weights(ce: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """AvgCE weights: softmax over sources of -CE / temperature, per pair (``[S, B]``)."""
    return torch.softmax(-ce.float() / temperature, dim=0)


def fuse_weighted(indices: torch.Tensor, probs: torch.Tensor,
                  weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average of the sources' distributions; ``weights`` ``[S]`` or ``[S, B]``, normalised here.

    Returns ``[B, T, S * k]``: the union of the supports, repeated ids summed.
    """
    s, b, t, k = indices.shape
    w = weights.float()
    w = (w[:, None] if w.dim() == 1 else w).expand(s, b)
    w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
    p = normalise(probs) * w[:, :, None, None]
    idx = indices.long().permute(1, 2, 0, 3).reshape(b, t, s * k)
    p = p.permute(1, 2, 0, 3).reshape(b, t, s * k)
    return coalesce(idx, p)


def index_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max else torch.int32


@torch.no_grad()
def source_distributions(model: PreTrainedModel, source_tok: Any, target_tok: Any, pairs: Sequence[Pair],
                         target_seqs: Sequence[Sequence[int]], target_starts: Sequence[int], width: int,
                         top_k: int, batch_size: int = 128, device: str | torch.device = "cpu",
                         on_batch: Callable[[int], None] | None = None) -> SourceDistributions:
    """Run one source over every pair and carry its top-k distributions to the target's tokens.

    ``target_seqs`` / ``target_starts``: the pairs in the target's tokenisation (see ``encode_pair``);
    ``width``: the padded length T of the stored tensors.
    """
    src_surf, tgt_surf = token_surfaces(source_tok), token_surfaces(target_tok)
    n_logits = model.get_output_embeddings().weight.shape[0]
    vmap = torch.full((max(n_logits, len(src_surf)),), -1, dtype=torch.long)
    vmap[: len(src_surf)] = torch.as_tensor(vocab_map(src_surf, tgt_surf))
    n = len(pairs)
    out_idx = torch.zeros((n, width, top_k), dtype=index_dtype(len(tgt_surf)))
    out_p = torch.zeros((n, width, top_k), dtype=torch.float16)
    out_ce = torch.zeros(n, dtype=torch.float32)
    covered = total = 0
    model.eval()
    for lo in range(0, n, batch_size):
        enc = [encode_pair(source_tok, *pr) for pr in pairs[lo: lo + batch_size]]
        ids, mask, labels = pad_batch([e[0] for e in enc], [e[1] for e in enc], pad_id(source_tok))
        # on the model's device: only the answers' NLL and the top-k ([B, Ts, k]) come back, not [B, Ts, V]
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        labels = labels.to(logp.device)
        nll = -logp[:, :-1].gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
        out_ce[lo: lo + len(enc)] = (nll * (labels[:, 1:] != -100)).sum(-1).cpu()
        top_lp, top_ids = (x.cpu() for x in logp.topk(min(top_k, logp.shape[-1]), dim=-1))  # source vocabulary
        mapped = vmap[top_ids]
        probs = torch.where(mapped >= 0, top_lp.exp(), torch.zeros_like(top_lp))
        mapped_idx, mapped_p = coalesce(mapped.clamp_min(0), probs)
        for row, (src_seq, _) in enumerate(enc):
            i = lo + row
            tgt_seq, t_start = target_seqs[i], target_starts[i]
            where = same_prefix_positions([tgt_surf[t] for t in tgt_seq], [src_surf[s] for s in src_seq])
            for t in range(t_start - 1, len(tgt_seq) - 1):  # rows that predict an answer token
                j = where[t]
                total += 1
                if j is not None and j < len(src_seq) - 1:
                    out_idx[i, t, : mapped_idx.shape[-1]] = mapped_idx[row, j].to(out_idx.dtype)
                    out_p[i, t, : mapped_p.shape[-1]] = mapped_p[row, j].half()
                    covered += 1
                else:
                    out_idx[i, t, 0] = tgt_seq[t + 1]
                    out_p[i, t, 0] = 1.0
        if on_batch is not None:
            on_batch(len(enc))
    return SourceDistributions(out_idx, out_p, out_ce, covered / max(1, total))
