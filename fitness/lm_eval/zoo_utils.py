"""Multiple-choice items made from the zoo's generation items: the right answer among corrupted ones.

Used by ``zoo_rev_mc.yaml`` (``process_docs: !function zoo_utils.with_choices``) and, through
``mc_item``, by evomerge's built-in multiple-choice evaluator, so both score the very same choices.
Deterministic: the corruptions and the gold position depend on the item alone.
"""

from __future__ import annotations

import hashlib

MAX_WRONG = 3


def _bump_last(s: str) -> str:
    """The string with its last character changed: always a wrong answer, even for "111"."""
    c = s[-1]
    if c.isdigit():
        return s[:-1] + str((int(c) + 1) % 10)
    return s[:-1] + ("a" if c != "a" else "b")


def corruptions(prompt: str, answer: str) -> list[str]:
    """Plausible wrong answers: the input copied, the answer rotated, two characters swapped, ..."""
    digits = prompt.split(":", 1)[1].rstrip("=")
    candidates = [digits, answer[1:] + answer[:1], answer[1::-1] + answer[2:], answer[::-1], _bump_last(answer)]
    wrong: list[str] = []
    for c in candidates:
        if c != answer and c not in wrong:
            wrong.append(c)
    return wrong[:MAX_WRONG]


def mc_item(doc: dict) -> dict:
    """``{"id", "prompt", "choices", "answer": gold index}`` for one zoo item."""
    wrong = corruptions(doc["prompt"], doc["answer"])
    gold = int(hashlib.sha256(doc["id"].encode()).hexdigest(), 16) % (len(wrong) + 1)
    choices = wrong[:gold] + [doc["answer"]] + wrong[gold:]
    return {"id": doc["id"], "prompt": doc["prompt"], "choices": choices, "answer": gold}


def with_choices(dataset):
    """lm-eval ``process_docs``: add ``choices`` and ``gold`` to every document."""

    def add(doc: dict) -> dict:
        item = mc_item(doc)
        return {"choices": item["choices"], "gold": item["answer"]}

    return dataset.map(add)
