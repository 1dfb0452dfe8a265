"""A small supervised training loop for the zoo: prompt -> answer, loss on the answer tokens only."""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch

Sampler = Callable[[random.Random, int], list[tuple[str, str]]]


def encode_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``<s> prompt answer </s>`` with labels masked (-100) outside the answer."""
    seqs, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.as_tensor(s)
        lab[i, : len(l)] = torch.as_tensor(l)
        mask[i, : len(s)] = 1
    return ids, mask, lab


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
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
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
