"""A small supervised training loop for the zoo: prompt -> answer, loss on the answer tokens only."""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import torch

Sampler = Callable[[random.Random, int], list[tuple[str, str]]]


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``prompt answer <eos>`` and the index of the first answer token."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; fusion needs one to end answers")
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + a, len(p)


def pad_batch(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels (-100 outside the answer, the HF convention)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, a) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.as_tensor(s)
        mask[i, : len(s)] = 1
        labels[i, a: len(s)] = torch.as_tensor(s[a:])
    return ids, mask, labels


def optimizer(model: torch.nn.Module, lr: float, weight_decay: float, steps: int,
              warmup: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9 / 0.98) with a linear warm-up over ``warmup`` steps, then a cosine decay to 0
    at ``steps``: the schedule of the zoo's training and of fusion."""
    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def encode_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``<s> prompt answer </s>`` with labels masked (-100) outside the answer."""
    enc = [encode_pair(tokenizer, prompt, answer) for prompt, answer in pairs]
    return pad_batch([s for s, _ in enc], [a for _, a in enc], tokenizer.pad_token_id)


def train(
    model: torch.nn.Module,
    tokenizer,
    sampler: Sampler,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: int = 20,
    weight_decay: float = 0.0,
    log: Callable[[int, float], None] | None = None,
) -> float:
    """Train in place with AdamW and a cosine schedule; returns the mean loss of the last 50 steps."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt, sched = optimizer(model, lr, weight_decay, steps, warmup)
    model.train()
    recent: list[float] = []
    for step in range(steps):
        ids, mask, lab = encode_batch(tokenizer, sampler(rng, batch_size))
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if log is not None:
            log(step, loss.item())
    model.eval()
    return sum(recent) / max(1, len(recent))
