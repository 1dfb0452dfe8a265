"""Fusion data: prompt/response pairs from item files or any JSONL, and their encoding for one tokenizer.

Every model sees the same pairs; each tokenises them its own way (``<bos> prompt answer <eos>``, the
answer encoded on its own: ``encode_pair`` / ``pad_batch``, shared with the zoo's training loop), and
the loss covers the answer tokens only, where the skills are.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from evomerge.evaluate.builtin import read_items_file
from evomerge.zoo.train import encode_pair, pad_batch  # noqa: F401 - the encoding fusion shares with the zoo

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


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
