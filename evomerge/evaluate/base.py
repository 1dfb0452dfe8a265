"""What every evaluator returns and receives: item responses, and the context of one evaluation.

Item responses (one score per benchmark item) rather than a single number are what item response
theory needs, what the run store keeps, and what lets a resumed search skip finished work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
import torch


@dataclass
class ItemResponses:
    """Scores in [0, 1] for the items of one benchmark that were evaluated, in ``item_ids`` order."""

    benchmark: str
    item_ids: list[str]
    scores: np.ndarray  # float64, shape (len(item_ids),)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.shape != (len(self.item_ids),):
            raise ValueError(f"{self.benchmark}: {len(self.item_ids)} item ids but scores of shape {self.scores.shape}")

    def mean(self) -> float:
        return float(self.scores.mean()) if len(self.scores) else float("nan")

    def to_json(self) -> dict:
        return {"benchmark": self.benchmark, "item_ids": self.item_ids, "scores": self.scores.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "ItemResponses":
        return cls(d["benchmark"], list(d["item_ids"]), np.asarray(d["scores"], dtype=np.float64))


@dataclass
class EvalContext:
    """Where and on what an evaluation runs: the worker's device, the items to score, a seed."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    item_ids: Sequence[str] | None = None  # None: every item of the benchmark
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Evaluator(Protocol):
    """A benchmark: a fixed list of items, scored per item on a model held in memory."""

    name: str

    def item_ids(self) -> list[str]:
        """Every item of the benchmark, in a fixed order."""

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, ctx: EvalContext) -> ItemResponses:
        """Score ``ctx.item_ids`` (all items when None) on ``model``."""
