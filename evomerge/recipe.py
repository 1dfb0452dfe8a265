"""A candidate as plain data: a parameter-space merge (a mergekit config), a layer plan, or both.

``Recipe`` is what a genome decodes to and what a worker receives; ``LayerPlan`` is the data-flow
(DFS) part, with the YAML form that ``evomerge merge`` replays. Nothing here touches tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import yaml

from evomerge.merge.config import MergeConfig


class DFSError(ValueError):
    """A layer plan, genome or pool that cannot be used as asked; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# The plan as plain data


@dataclass
class LayerPlan:
    """A DFS candidate.

    ``host`` provides embeddings, final norm, lm_head and config. ``layers`` are (pool member, layer
    index) in execution order; ``scales[k]`` multiplies the residual stream before it enters
    ``layers[k]`` (1.0 = none; positive, because folding relies on norms ignoring a positive scale).
    ``models`` maps members to checkpoint folders or to merge configs (dicts in the mergekit
    ``models:`` form, merged first: the PS result of PS+DFS); it may stay empty in memory.
    """

    host: str
    layers: list[tuple[str, int]]
    scales: list[float] | None = None
    models: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise DFSError(f"host {self.host!r} must be the name of a pool member")
        if not self.layers:
            raise DFSError("the layer plan is empty; list at least one (member, layer index) hop")
        hops = []
        for k, hop in enumerate(self.layers):
            if not isinstance(hop, (tuple, list)) or len(hop) != 2:
                raise DFSError(f"layers[{k}] = {hop!r}; write each hop as (member, layer index)")
            member, idx = hop
            if not isinstance(member, str) or not member:
                raise DFSError(f"layers[{k}] names member {member!r}; a member is a non-empty name")
            if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or idx < 0:
                raise DFSError(f"layers[{k}] has layer index {idx!r}; it must be an integer >= 0")
            hops.append((member, int(idx)))
        self.layers = hops
        scales = [1.0] * len(hops) if self.scales is None else [float(s) for s in self.scales]
        if len(scales) != len(hops):
            raise DFSError(f"{len(scales)} scales for {len(hops)} layers; give one scale per layer")
        for k, s in enumerate(scales):
            if not math.isfinite(s) or s <= 0:
                raise DFSError(f"scales[{k}] = {s}; scales must be finite and > 0 (folding a scale into "
                               "the weights relies on norms ignoring a positive factor)")
        self.scales = scales
        self.models = dict(self.models)
        if self.models:
            unknown = sorted({self.host, *self.members()} - set(self.models))
            if unknown:
                raise DFSError(f"the plan uses {unknown}, which 'models:' does not list "
                               f"({sorted(self.models)}); add them or fix the names")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def hop_scales(self) -> list[float]:
        """One scale per hop (``scales`` is filled in by the constructor; 1.0 where none was given)."""
        return list(self.scales) if self.scales is not None else [1.0] * len(self.layers)

    def members(self) -> list[str]:
        """The members the plan runs (host first), without repeats."""
        names = [self.host]
        for member, _ in self.layers:
            if member not in names:
                names.append(member)
        return names

    def check(self, num_layers: Mapping[str, int]) -> None:
        """Raise unless every member is known and every layer index exists in its member."""
        for k, (member, idx) in enumerate(self.layers):
            if member not in num_layers:
                raise DFSError(f"layers[{k}] names '{member}', which is not in the pool {sorted(num_layers)}")
            if idx >= num_layers[member]:
                raise DFSError(f"layers[{k}] = ({member}, {idx}) but '{member}' has {num_layers[member]} "
                               f"layers (indices 0..{num_layers[member] - 1})")
        if self.host not in num_layers:
            raise DFSError(f"host '{self.host}' is not in the pool {sorted(num_layers)}")

    def to_dict(self) -> dict:
        return {"layer_plan": {
            "host": self.host,
            "models": {k: (str(v) if isinstance(v, Path) else v) for k, v in self.models.items()},
            "layers": [[m, i, s] for (m, i), s in zip(self.layers, self.hop_scales)],
        }}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerPlan":
        """From ``{"layer_plan": {...}}`` or the inner mapping (host, models, layers)."""
        if not isinstance(data, Mapping):
            raise DFSError(f"a layer plan is a mapping with host, models, layers; got {type(data).__name__}")
        if "layer_plan" in data:
            extra = sorted(set(data) - {"layer_plan"})
            if extra:
                raise DFSError(f"unexpected top-level keys {extra} next to 'layer_plan:'")
            data = data["layer_plan"]
            if not isinstance(data, Mapping):
                raise DFSError("'layer_plan:' must be a mapping with host, models, layers")
        unknown = sorted(set(data) - {"host", "models", "layers"})
        if unknown:
            raise DFSError(f"unknown layer_plan keys {unknown}; expected host, models, layers")
        for key in ("host", "layers"):
            if key not in data:
                raise DFSError(f"layer_plan has no '{key}:'")
        models = data.get("models") or {}
        if not isinstance(models, Mapping):
            raise DFSError("layer_plan 'models:' must map member names to folders or merge configs")
        for name, spec in models.items():
            if not isinstance(spec, (str, Mapping)):
                raise DFSError(f"models['{name}'] = {spec!r}; give a folder / hub id or a merge config mapping")
        layers, scales = [], []
        for k, entry in enumerate(data["layers"] or []):
            if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
                raise DFSError(f"layers[{k}] = {entry!r}; write [member, layer index] or [member, index, scale]")
            layers.append((entry[0], entry[1]))
            scales.append(entry[2] if len(entry) == 3 else 1.0)
        return cls(host=data["host"], layers=layers, scales=scales, models=dict(models))

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "LayerPlan":
        """From YAML text or from a path to a YAML file."""
        if isinstance(text_or_path, Path) or ("\n" not in str(text_or_path) and Path(text_or_path).is_file()):
            text = Path(text_or_path).read_text()
        else:
            text = str(text_or_path)
        data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise DFSError(f"{str(text_or_path)[:80]!r} is neither a YAML file nor YAML text with a "
                           "'layer_plan:' mapping")
        return cls.from_dict(data)


@dataclass
class Recipe:
    """``merge``: the PS merge of the sources (a mergekit config over source names).
    ``plan``: the DFS layer plan over the pool (which may include the PS result as ``"ps"``)."""

    merge: Optional[MergeConfig] = None
    plan: Optional[LayerPlan] = None

    def to_text(self) -> str:
        """The recipe as YAML (``merge:`` and / or ``layer_plan:``), as the run store keeps it."""
        parts: dict[str, Any] = {}
        if self.merge is not None:
            parts["merge"] = yaml.safe_load(self.merge.to_yaml())
        if self.plan is not None:
            parts["layer_plan"] = self.plan.to_dict()
        return yaml.safe_dump(parts, sort_keys=False)

    @classmethod
    def from_text(cls, text: str) -> "Recipe":
        """The inverse of ``to_text``. (``to_text`` nests the plan's own ``{"layer_plan": ...}`` under
        ``layer_plan:``; ``LayerPlan.from_dict`` takes it with or without that wrapper.)"""
        data = yaml.safe_load(text) or {}
        merge = MergeConfig.model_validate(data["merge"]) if data.get("merge") is not None else None
        plan = LayerPlan.from_dict(data["layer_plan"]) if data.get("layer_plan") else None
        return cls(merge=merge, plan=plan)


def single_model(name: str) -> Recipe:
    """The recipe that reproduces model ``name`` exactly (a linear merge of it alone): how a source
    model is evaluated like any candidate."""
    return Recipe(merge=MergeConfig.model_validate({"merge_method": "linear", "models": [
        {"model": name, "parameters": {"weight": 1.0}}]}))


def hand_recipe(method: str, base: str, others: list[str], weight: Optional[float] = None,
                density: Optional[float] = None, parameters: Optional[Mapping[str, Any]] = None,
                seed: int = 0) -> Recipe:
    """Every model of ``others`` merged into ``base`` by ``method`` with one weight (None: 1/k) and
    density: the recipes people write by hand, e.g. TIES at density 0.5 and weight 1."""
    per_model: dict[str, Any] = {"weight": 1.0 / len(others) if weight is None else weight}
    if density is not None:
        per_model["density"] = density
    models: list[dict[str, Any]] = [{"model": m, "parameters": dict(per_model)} for m in others]
    return Recipe(merge=MergeConfig.model_validate({
        "merge_method": method, "base_model": base, "models": models, "parameters": dict(parameters or {}),
        "evomerge": {"seed": seed}}))


def with_paths(merge: MergeConfig, paths: Mapping[str, Path]) -> dict[str, Any]:
    """A merge config over model names, as a dict over folders (for export and replay)."""
    data = yaml.safe_load(merge.to_yaml())
    data["models"] = [{**m, "model": str(paths[m["model"]])} for m in data["models"]]
    if data.get("base_model"):
        data["base_model"] = str(paths[data["base_model"]])
    return data
