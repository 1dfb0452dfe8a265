"""Example fitness with two named objectives, for a multi-objective search (NSGA-II).

``score`` returns ``{"rev": accuracy on reversal, "tr": accuracy on the cipher}``: the zoo's rev and
tr experts each own one of them, so a merge trades one against the other along a Pareto front.
"""

from __future__ import annotations

from evomerge.evaluate.base import EvalContext
from evomerge.evaluate.generation import exact_match
from evomerge.zoo import ensure_zoo


def score(model, tokenizer, ctx: EvalContext, n_items: int = 300) -> dict[str, float]:
    """Exact-match accuracy per skill on the first ``n_items`` fitness items of each.

    Extra keyword arguments come from the spec: ``{"type": "custom", "fn": ..., "kwargs": {"n_items": 100}}``.
    """
    zoo = ensure_zoo()
    out = {}
    for skill in ("rev", "tr"):
        items = zoo.items(skill, "fitness")[:n_items]
        scores = exact_match(model, tokenizer, items, device=ctx.device)
        out[skill] = sum(scores) / len(scores)
    return out
