"""The zoo's synthetic skills: pure functions from a digit string to an answer, and item files.

Every item is ``<marker>:<digits>=`` followed by the answer. Skills share their input alphabet and
prompt shape (only the marker tells them apart), so experts fine-tuned from one base interfere with
each other when merged, which is what gives a merge search something to find. Difficulty grows
with the string length, which gives item response theory a ladder to model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CIPHER = dict(zip("0123456789", "qwertyuiop"))


def reverse(s: str) -> str:
    return s[::-1]


def sort_digits(s: str) -> str:
    return "".join(sorted(s))


def cipher(s: str) -> str:
    return "".join(CIPHER.get(c, c) for c in s)


def copy(s: str) -> str:
    return s


def reverse_cipher(s: str) -> str:
    return cipher(reverse(s))


@dataclass(frozen=True)
class Skill:
    """A named string transformation with its prompt marker and input alphabet."""

    name: str
    marker: str
    fn: Callable[[str], str]
    alphabet: str = "0123456789"

    def prompt(self, s: str) -> str:
        return f"{self.marker}:{s}="

    def item(self, s: str) -> tuple[str, str]:
        return self.prompt(s), self.fn(s)


SKILLS: dict[str, Skill] = {
    "copy": Skill("copy", "C", copy),
    "copyl": Skill("copyl", "L", copy, alphabet="abcdefghijklmnopqrstuvwxyz"),
    "rev": Skill("rev", "R", reverse),
    "sort": Skill("sort", "S", sort_digits),
    "tr": Skill("tr", "T", cipher),
    # The cross-skill target: reversal written in the substitution language (needs rev and tr).
    "revtr": Skill("revtr", "X", reverse_cipher),
}


def random_string(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    return "".join(rng.choice(alphabet) for _ in range(n))


def make_items(
    skill: Skill, splits: dict[str, int], lengths: tuple[int, int], seed: int
) -> dict[str, list[dict]]:
    """Draw disjoint item sets (no input string in two splits), balanced over lengths.

    Items are spread evenly over the lengths lo..hi so that every rung of the difficulty ladder is
    populated; where a length has fewer distinct strings than asked, the split takes what exists.
    """
    rng = random.Random(f"{seed}-{skill.name}")
    lo, hi = lengths
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, count in splits.items():
        items: list[dict] = []
        per_len = {n: count // (hi - lo + 1) + (1 if i < count % (hi - lo + 1) else 0)
                   for i, n in enumerate(range(lo, hi + 1))}
        for n, k in per_len.items():
            tries = 0
            made = 0
            while made < k and tries < 50 * k:
                tries += 1
                s = random_string(rng, skill.alphabet, n, n)
                if s in seen:
                    continue
                seen.add(s)
                prompt, answer = skill.item(s)
                items.append({"id": f"{skill.name}-{split}-{len(items):05d}", "skill": skill.name,
                              "prompt": prompt, "answer": answer, "length": n})
                made += 1
        out[split] = items
    return out


def more_items(skill: Skill, split: str, count: int, lengths: tuple[int, int], seed: int,
               exclude: set[str]) -> list[dict]:
    """``count`` further items of ``skill`` whose prompts are not in ``exclude`` (the zoo's own splits),
    spread evenly over the lengths; where a short length runs out of strings, the longer ones take
    its share. For a benchmark far larger than the zoo's splits (the large-benchmark variant of the
    estimator benchmark), which the zoo can make at no cost."""
    rng = random.Random(f"{seed}-{skill.name}-{split}")
    lo, hi = lengths
    seen = set(exclude)
    items: list[dict] = []
    left = count
    for i, n in enumerate(range(lo, hi + 1)):
        want = -(-left // (hi - n + 1))  # an even share of what is still to draw
        made = tries = 0
        while made < want and tries < 50 * want:
            tries += 1
            prompt, answer = skill.item(random_string(rng, skill.alphabet, n, n))
            if prompt in seen:
                continue
            seen.add(prompt)
            items.append({"id": f"{skill.name}-{split}-{len(items):05d}", "skill": skill.name,
                          "prompt": prompt, "answer": answer, "length": n})
            made += 1
        left -= made
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
