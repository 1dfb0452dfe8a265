"""The parameter space (PS): per-layer merge coefficients for each source -> a mergekit config.

A searcher sees only ``lower``, ``upper`` and ``x0``; ``decode`` turns a genome into a Recipe. The
parameter space decodes into a mergekit-style config whose per-layer values are mergekit
gradients (a list of L values for L layers evaluates exactly to value i at layer i) and whose tensor
groups are mergekit filters, so the recipe of a PS result is itself a mergekit YAML. The data-flow
space (DFS) is in ``evomerge.spaces.dfs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.config import PSSpace
from evomerge.merge.config import MergeConfig
from evomerge.merge.params import layer_index
from evomerge.recipe import Recipe

FILTER_TOKENS = {"attn": "attn", "mlp": "mlp"}  # substrings of Llama / Mistral / Qwen / Gemma / GPT-2 / Phi names


@dataclass
class GeneBlock:
    """Consecutive genes for one (model, parameter, tensor group)."""

    model: str
    param: str
    group: str  # "all" | "attn" | "mlp" | "rest" | "other"
    start: int
    size: int


@dataclass
class PSGenome:
    """Per-layer merge coefficients for each non-base source."""

    space: PSSpace
    base: str
    sources: list[str]
    tensor_names: list[str]
    num_layers: int
    blocks: list[GeneBlock] = field(init=False)
    names: list[str] = field(init=False)
    lower: np.ndarray = field(init=False)
    upper: np.ndarray = field(init=False)
    x0: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.blocks = []
        names: list[str] = []
        lo: list[float] = []
        hi: list[float] = []
        x0: list[float] = []
        per_group = self._genes_per_group()
        from evomerge.merge.methods import get_method

        per_model = get_method(self.space.method).model_params
        for model in self.sources + ["*"]:  # "*": the method's global parameters (slerp's t, lambda)
            for param, gene in self.space.genes.items():
                if (model == "*") == (param in per_model):
                    continue
                for group in self.groups:
                    n = 1 if group == "other" else per_group
                    self.blocks.append(GeneBlock(model, param, group, len(names), n))
                    names += [f"{model}.{param}.{group}.{i}" for i in range(n)]
                    lo += [gene.low] * n
                    hi += [gene.high] * n
                    x0 += [gene.start] * n
        self.names = names
        self.lower, self.upper, self.x0 = np.array(lo), np.array(hi), np.array(x0)

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def groups(self) -> list[str]:
        f = self.space.filters
        split = [g for g in ("attn", "mlp") if g in f]
        return (["other"] if "other" in f else []) + split + (["rest"] if split or "other" in f else ["all"])

    def _genes_per_group(self) -> int:
        g = self.space.granularity
        if self.space.smooth:
            return self.space.smooth
        if g == "global":
            return 1
        if g == "layer":
            return self.num_layers
        k = int(g.split(":")[1])
        return -(-self.num_layers // k)

    def _layer_values(self, genes: np.ndarray) -> list[float] | float:
        """A group's genes as a mergekit setting: a scalar, a per-layer list, or smooth anchors."""
        if self.space.smooth or len(genes) == 1 and self.space.granularity == "global":
            return [float(v) for v in genes] if len(genes) > 1 else float(genes[0])
        if self.space.granularity.startswith("block:"):
            k = int(self.space.granularity.split(":")[1])
            genes = np.repeat(genes, k)[: self.num_layers]
        return [float(v) for v in genes]

    def decode(self, x: np.ndarray, seed: int = 0) -> Recipe:
        x = np.clip(np.asarray(x, dtype=np.float64), self.lower, self.upper)
        other_names = [t for t in self.tensor_names if layer_index(t) is None]
        settings: dict[str, dict[str, Any]] = {m: {} for m in self.sources + ["*"]}
        for model in settings:
            params = settings[model]
            for param in self.space.genes:
                entries = []
                for b in (b for b in self.blocks if b.model == model and b.param == param):
                    genes = x[b.start : b.start + b.size]
                    if b.group == "other":
                        entries += [{"filter": t, "value": float(genes[0])} for t in other_names]
                        continue
                    value = self._layer_values(genes)
                    if b.group in FILTER_TOKENS:
                        entries.append({"filter": FILTER_TOKENS[b.group], "value": value})
                    else:
                        entries.append({"value": value})
                if entries:
                    params[param] = entries[0]["value"] if len(entries) == 1 and "filter" not in entries[0] else entries
        models: list[dict[str, Any]] = [{"model": m, "parameters": settings[m]} for m in self.sources]
        if self.space.method == "slerp":  # mergekit's slerp lists the base among the models
            models = [{"model": self.base}] + models
        cfg = MergeConfig.model_validate({
            "merge_method": self.space.method, "base_model": self.base, "models": models,
            "parameters": {**self.space.fixed, **settings["*"]}, "evomerge": {"seed": seed}})
        return Recipe(merge=cfg)

    # Gene values that make a merge reproduce one model exactly: that model's weight 1, the others'
    # 0, nothing pruned, no lambda scaling. Methods where a single full-weight delta is the model.
    SOURCE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                      "breadcrumbs_ties", "della", "della_linear")

    def source_genomes(self) -> dict[str, np.ndarray]:
        """A genome per model (the base and every source) that decodes to that model itself, for
        seeding a population; empty where the method or the bounds cannot express one exactly."""
        needed = {"density": 1.0, "gamma": 0.0, "lambda": 1.0}
        if self.space.method not in self.SOURCE_METHODS or any(
                p in needed and v != needed[p] for p, v in self.space.fixed.items()):
            return {}
        out = {}
        for target in [self.base] + self.sources:
            if self.space.method == "linear" and target == self.base:
                continue  # linear merges the sources only; the base is not one of its models
            x = self.x0.copy()
            for b in self.blocks:
                value = {"weight": float(b.model == target), **needed}.get(b.param)
                if b.param == "epsilon":
                    continue  # DELLA's epsilon does nothing at density 1
                if value is None or not (self.lower[b.start] <= value <= self.upper[b.start]):
                    return {}
                x[b.start : b.start + b.size] = value
            out[target] = x
        return out

    def layer_table(self, x: np.ndarray) -> dict[tuple[str, str, str], list[float]]:
        """(model, parameter, group) -> value at each layer (one value for 'other'): for heatmaps."""
        x = np.clip(np.asarray(x, dtype=np.float64), self.lower, self.upper)
        out = {}
        for b in self.blocks:
            genes = x[b.start : b.start + b.size]
            if b.group == "other":
                out[(b.model, b.param, b.group)] = [float(genes[0])]
                continue
            value = self._layer_values(genes)
            if isinstance(value, float):
                out[(b.model, b.param, b.group)] = [value] * self.num_layers
            elif self.space.smooth:
                n = self.num_layers
                ts = [i / (n - 1) if n > 1 else 1.0 for i in range(n)]
                out[(b.model, b.param, b.group)] = [float(np.interp(t * (len(value) - 1), range(len(value)), value))
                                                    for t in ts]
            else:
                out[(b.model, b.param, b.group)] = value
        return out


def uniform_genome(space: PSGenome, value: float) -> np.ndarray:
    """Every gene of every parameter at ``value`` for weights (others at their start): e.g. the
    uniform task-arithmetic merge with weight 1/k, the baseline a search must beat."""
    x = space.x0.copy()
    for b in space.blocks:
        if b.param == "weight":
            x[b.start : b.start + b.size] = value
    return x
