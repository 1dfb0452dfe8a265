"""Example fitness functions for the zoo's rev skill (reverse a digit string).

Each is called as ``fn(model, tokenizer, ctx)`` on a candidate held in memory, on ``ctx.device``.
Reference them from an experiment as ``fitness/examples/rev_fitness.py:score`` (or ``:responses``).
"""

from __future__ import annotations

from evomerge.evaluate.base import EvalContext, ItemResponses
from evomerge.evaluate.builtin import ItemsBenchmark
from evomerge.evaluate.generation import exact_match
from evomerge.zoo import ensure_zoo


def score(model, tokenizer, ctx: EvalContext) -> float:
    """One objective: exact-match accuracy on the rev fitness items (a float; higher is better)."""
    items = ensure_zoo().items("rev", "fitness")
    scores = exact_match(model, tokenizer, items, device=ctx.device)
    return sum(scores) / len(scores)


def responses(model, tokenizer, ctx: EvalContext) -> ItemResponses:
    """Per-item scores instead of a number: the search keeps them and IRT estimators can use them.

    Delegating to the built-in evaluator also honours ``ctx.item_ids`` (the items an estimator asks for).
    """
    return ItemsBenchmark("rev", "zoo:rev/fitness").evaluate(model, tokenizer, ctx)
