"""A candidate, decoded from a genome: a parameter-space merge, a layer plan, or both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from evomerge.merge.config import MergeConfig

if TYPE_CHECKING:
    from evomerge.dfs import LayerPlan


@dataclass
class Recipe:
    """``merge``: the PS merge of the sources (a mergekit config over source names).
    ``plan``: the DFS layer plan over the pool (which may include the PS result as ``"ps"``)."""

    merge: Optional[MergeConfig] = None
    plan: Optional["LayerPlan"] = None
