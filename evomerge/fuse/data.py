"""Fusion data: prompt/response pairs from item files or any JSONL, and their encoding for one tokenizer.

Every model sees the same pairs; each tokenises them its own way (``<bos> prompt answer <eos>``, the
answer encoded on its own as the zoo's training loop does), and the loss covers the answer tokens
only, where the skills are.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import torch

from evomerge.evaluate.builtin import read_items_file

Pair = tuple[str, str]


def load_pairs(path: Path, limit: int | None, seed: int, prompt_key: str = "prompt",
               answer_key: str = "answer") -> list[Pair]:
    """Up to ``limit`` pairs drawn at random (seeded) from a JSONL file.

    Item files are ordered by length, so the first ``limit`` rows would all be the shortest items:
    a seeded sample keeps the mixture's difficulty.
    """
    rows = read_items_file(path)
    pairs = []
    for n, row in enumerate(rows, 1):
        prompt, answer = row.get(prompt_key), row.get(answer_key)
        if not isinstance(prompt, str) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{path}: row {n} has no string '{prompt_key}' and '{answer_key}' (keys: {sorted(row)}); "
                             f"set prompt_key / answer_key to the fields that hold them")
        pairs.append((prompt, str(answer)))
    if limit is not None and limit < len(pairs):
        pairs = random.Random(f"{seed}-{path}").sample(pairs, limit)
    return pairs


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


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
