"""Search spaces: what each gene of a genome means, and how a genome decodes to a Recipe.

``ps`` holds the parameter space (per-layer merge coefficients, decoding to a mergekit config),
``dfs`` the data-flow space (layer stacking, decoding to a layer plan). ``build_space`` makes the
genome of one phase from plain values: the space's spec, the model names, and the facts about the
tensors a worker reports.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence, Union

import numpy as np

from evomerge.config import DFSSpace, PSSpace
from evomerge.spaces.dfs import DFSGenome
from evomerge.spaces.ps import PSGenome, uniform_genome

Genome = Union[PSGenome, DFSGenome]

__all__ = ["DFSGenome", "Genome", "PSGenome", "genome_seed", "uniform_genome", "build_space"]


def genome_seed(x: np.ndarray, run_seed: int) -> int:
    """The candidate seed of randomized merges (DARE): a function of the genome and the run seed
    only, so a genome always decodes to the same weights, in any run that shares the seed."""
    blob = np.ascontiguousarray(np.asarray(x, dtype=np.float64)).tobytes() + str(run_seed).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")


def build_space(space: PSSpace | DFSSpace, base: str, others: Sequence[str], tensors: list[str], num_layers: int,
                members: Mapping[str, Any], pool_names: Sequence[str] | None = None) -> Genome:
    """The genome of one phase. PS: per-layer coefficients of ``others`` over ``base`` (SLERP merges one
    source into the base). DFS: the pool ``pool_names`` (default: the space's pool, else the base then
    the others), each member with ``num_layers``; ``members`` maps member names to folders or merge
    configs (what an export replays)."""
    if isinstance(space, PSSpace):
        sources = list(others) if space.method != "slerp" else list(others[:1])
        return PSGenome(space, base, sources, tensors, num_layers)
    names = list(pool_names or space.pool or [base, *others])
    for n in names:
        if n not in members:
            raise ValueError(f"DFS pool member '{n}' is not a model of the experiment ({sorted(members)})")
    return DFSGenome(space, [(n, num_layers) for n in names], dict(members))
