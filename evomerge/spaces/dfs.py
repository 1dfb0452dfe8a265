"""The data-flow space (DFS, after Sakana's EvoMerge): genomes of inclusion and scale genes -> layer plans.

The layers of all pool members are laid out in order (M in all) and repeated r times; an inclusion
gene per slot (T = M x r) says whether the slot runs, a scale per hop (or an M x M matrix of
transition scales) multiplies the residual stream before it. Decoding is a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from evomerge.config import DFSSpace
from evomerge.recipe import DFSError, LayerPlan, Recipe

SCALE_MODES = ("matrix", "hop")


def dfs_gene_count(num_layers: int, repeats: int, scale_mode: str) -> tuple[int, int]:
    """(inclusion genes, scale genes) for M = ``num_layers`` pooled layers repeated ``repeats`` times."""
    if num_layers < 1 or repeats < 1:
        raise DFSError(f"num_layers={num_layers}, repeats={repeats}; both must be >= 1")
    if scale_mode not in SCALE_MODES:
        raise DFSError(f"scale_mode '{scale_mode}' is not one of {SCALE_MODES}")
    slots = num_layers * repeats
    return slots, num_layers * num_layers if scale_mode == "matrix" else slots


def decode_dfs(inclusion: np.ndarray, scales: np.ndarray, pool: Sequence[tuple[str, int]], repeats: int,
               scale_mode: str, max_layers: int, min_layers: int = 1) -> LayerPlan:
    """Decode a DFS genome into a plan; the host is the first pool member.

    Slots: the layers of all pool members in order (M global layers), repeated ``repeats`` times
    (T = M * repeats). Slot t holds global layer t % M and is included when ``inclusion[t] > 0.5``.
    Depth rule: with fewer than ``min_layers`` included, the excluded slots with the highest genes
    are added; with more than ``max_layers``, only the ``max_layers`` highest genes are kept (ties:
    the earlier slot). Either way the kept slots run in slot order, so an empty genome gives the one
    slot with the highest gene.

    Scales, applied to the stream entering each kept layer: ``"hop"``: one gene per slot, the kept
    slot's own gene. ``"matrix"``: W = ``scales`` as M x M; the hop from global layer i (the previous
    kept layer) to global layer j uses W[i, j]; the first kept layer, entered from the embeddings,
    uses the diagonal W[j, j] (the same gene as a j -> j hop, which only arises when j is the sole
    layer kept in consecutive repeats).
    """
    pool = [(str(m), int(n)) for m, n in pool]
    if not pool:
        raise DFSError("the pool is empty; give (member, number of layers) pairs")
    for m, n in pool:
        if n < 1:
            raise DFSError(f"pool member '{m}' has {n} layers; every member needs at least one")
    names = [m for m, _ in pool]
    if len(set(names)) != len(names):
        raise DFSError(f"pool members {names} repeat a name; names must be unique")
    n_incl, n_scale = dfs_gene_count(sum(n for _, n in pool), repeats, scale_mode)
    global_layers = [(m, i) for m, n in pool for i in range(n)]
    m_total = len(global_layers)
    inclusion = np.asarray(inclusion, dtype=np.float64).reshape(-1)
    scales = np.asarray(scales, dtype=np.float64).reshape(-1)
    if inclusion.size != n_incl:
        raise DFSError(f"{inclusion.size} inclusion genes; M={m_total} layers x r={repeats} needs {n_incl}")
    if scales.size != n_scale:
        raise DFSError(f"{scales.size} scale genes; scale_mode '{scale_mode}' with M={m_total}, "
                       f"r={repeats} needs {n_scale}")
    if not (np.isfinite(inclusion).all() and np.isfinite(scales).all()):
        raise DFSError("the genome has NaN or infinite genes; check the searcher's output and bounds")
    if not 1 <= min_layers <= max_layers:
        raise DFSError(f"min_layers={min_layers}, max_layers={max_layers}; need 1 <= min_layers <= max_layers")
    kept = _select_slots(inclusion, min_layers, max_layers)
    layers, hop_scales = [], []
    prev = None
    for t in kept:
        j = t % m_total
        layers.append(global_layers[j])
        if scale_mode == "hop":
            hop_scales.append(float(scales[t]))
        else:
            i = j if prev is None else prev
            hop_scales.append(float(scales[i * m_total + j]))
        prev = j
    return LayerPlan(host=pool[0][0], layers=layers, scales=hop_scales)


def _select_slots(genes: np.ndarray, min_layers: int, max_layers: int) -> list[int]:
    """Indices of the kept slots, in slot order (see ``decode_dfs`` for the rule)."""
    by_gene = sorted(range(genes.size), key=lambda t: (-genes[t], t))  # highest first, earlier on ties
    included = [t for t in range(genes.size) if genes[t] > 0.5]
    if len(included) > max_layers:
        return sorted(by_gene[:max_layers])
    if len(included) < min_layers:
        extra = [t for t in by_gene if genes[t] <= 0.5][: min_layers - len(included)]
        return sorted(included + extra)
    return included


@dataclass
class DFSGenome:
    """EvoMerge's data-flow space over a pool of same-architecture models.

    ``pool`` lists (member, number of layers) in layout order; the first member is the host
    (embeddings, final norm, head). The start point x0 is the host itself: its own layers in the
    first repeat switched on (0.75), everything else off (0.25), every scale at its init.
    """

    space: DFSSpace
    pool: list[tuple[str, int]]
    members: dict[str, Any] = field(default_factory=dict)  # member -> folder or merge-config dict (export)
    names: list[str] = field(init=False)
    lower: np.ndarray = field(init=False)
    upper: np.ndarray = field(init=False)
    x0: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        total = sum(n for _, n in self.pool)
        self.n_inc, self.n_scale = dfs_gene_count(total, self.space.repeats, self.space.scale_mode)
        self.names = [f"include.{i}" for i in range(self.n_inc)] + [f"scale.{i}" for i in range(self.n_scale)]
        s = self.space.scale
        self.lower = np.array([0.0] * self.n_inc + [s.low] * self.n_scale)
        self.upper = np.array([1.0] * self.n_inc + [s.high] * self.n_scale)
        host_layers = self.pool[0][1]
        inc = np.full(self.n_inc, 0.25)
        inc[:host_layers] = 0.75
        self.x0 = np.concatenate([inc, np.full(self.n_scale, s.start)])

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def max_layers(self) -> int:
        return self.space.max_layers or 2 * self.pool[0][1]

    def decode(self, x: np.ndarray, seed: int = 0) -> Recipe:
        x = np.clip(np.asarray(x, dtype=np.float64), self.lower, self.upper)
        plan = decode_dfs(x[: self.n_inc], x[self.n_inc :], self.pool, self.space.repeats, self.space.scale_mode,
                          self.max_layers, self.space.min_layers)
        plan.models = {m: self.members[m] for m in plan.members() if m in self.members}
        return Recipe(plan=plan)
