"""Recipe -> genome: the inverse of a space's ``decode``, where the space contains the recipe.

A space *contains* a recipe when some genome decodes to it exactly: a PS space, when the recipe is
a merge by the space's method over the same base and sources, each searched parameter a single
number inside its gene's bounds (a per-layer gene then holds that number at every layer), and every
other parameter equal to what the space holds fixed. A DFS space, when the recipe is a layer plan
the space's slots can lay out. ``genome_of`` returns that genome, or None; ``decode(genome_of(r))``
is ``r`` (``same_recipe``), up to the candidate seed of randomized merges (DARE), which a genome
takes from its own values (``genome_seed``).

This is what lets the hand recipes, scored before every search, seed it (``searcher.seed_from_hand_recipes``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import yaml

from evomerge.recipe import LayerPlan, Recipe
from evomerge.spaces.dfs import DFSGenome
from evomerge.spaces.ps import PSGenome


def genome_of(space: PSGenome | DFSGenome, recipe: Recipe) -> np.ndarray | None:
    """The genome of ``space`` that decodes to ``recipe``; None when the space does not contain it."""
    x = _ps_genome(space, recipe) if isinstance(space, PSGenome) else _dfs_genome(space, recipe)
    if x is None or not np.all((x >= space.lower) & (x <= space.upper)):
        return None
    return x + 0.0 if same_recipe(space.decode(x), recipe) else None


def same_recipe(a: Recipe, b: Recipe) -> bool:
    """Whether two recipes build the same model: merges compared by their effective settings (a
    per-model value given globally or per model, a per-layer list of one value or that value), the
    candidate seed of randomized merges left out; layer plans by host, layers and scales."""
    if (a.merge is None) != (b.merge is None) or (a.plan is None) != (b.plan is None):
        return False
    if a.merge is not None and b.merge is not None and _canonical(a.merge) != _canonical(b.merge):
        return False
    if a.plan is not None and b.plan is not None:
        return (a.plan.host, a.plan.layers, a.plan.hop_scales) == (b.plan.host, b.plan.layers, b.plan.hop_scales)
    return True


def _canonical(cfg: Any) -> dict[str, Any]:
    from evomerge.merge.methods import get_method

    data = yaml.safe_load(cfg.to_yaml())
    data.pop("evomerge", None)
    method = get_method(data["merge_method"])
    per_model = set(method.model_params)
    shared = data.pop("parameters", None) or {}
    models = {}
    for entry in data.pop("models", None) or []:  # each parameter as it applies: own, shared, default
        own = entry.get("parameters") or {}
        settings = {p: d for p, d in method.model_params.items() if d is not None}
        settings |= {p: v for p, v in shared.items() if p in per_model} | own
        models[entry["model"]] = {p: _flat(v) for p, v in sorted(settings.items())}
    data["models"] = models
    settings = {p: d for p, d in method.global_params.items() if d is not None}
    data["parameters"] = {p: _flat(v) for p, v in (settings | shared).items() if p not in per_model}
    return data


def _flat(value: Any) -> Any:
    """A setting whose every number is the same (a gradient of one value, filters that all agree,
    with one entry without a filter) as that number; anything else as it is."""
    numbers = _numbers(value)
    if numbers and len(set(numbers)) == 1 and (not isinstance(value, list) or _covers_all(value)):
        return numbers[0]
    return value


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)] if all(_numbers(v) for v in value) else []
    if isinstance(value, dict) and "value" in value:
        return _numbers(value["value"])
    return []


def _covers_all(entries: list[Any]) -> bool:
    """A list of filter entries applies to every tensor only with one entry without a filter."""
    if not any(isinstance(e, dict) for e in entries):
        return True  # a gradient
    return any(isinstance(e, dict) and "filter" not in e for e in entries)


def _ps_genome(space: PSGenome, recipe: Recipe) -> np.ndarray | None:
    if recipe.merge is None or recipe.plan is not None:
        return None
    cfg = recipe.merge
    if cfg.merge_method != space.space.method or cfg.slices or cfg.base_model != space.base:
        return None
    from evomerge.merge.methods import get_method

    method = get_method(space.space.method)
    data = yaml.safe_load(cfg.to_yaml())
    shared = data.get("parameters") or {}
    own = {e["model"]: e.get("parameters") or {} for e in data.get("models") or []}
    x = space.x0.copy()
    for b in space.blocks:
        if b.model == "*":
            value = shared.get(b.param, method.global_params.get(b.param))
        else:
            if b.model not in own:
                return None
            value = own[b.model].get(b.param, shared.get(b.param, method.model_params.get(b.param)))
        value = _flat(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # missing (no default) or not one number
        x[b.start : b.start + b.size] = float(value)
    return x


def _dfs_genome(space: DFSGenome, recipe: Recipe) -> np.ndarray | None:
    """Each hop of the plan in the earliest slot after the previous one that holds its layer;
    included slots at 1, the others at 0; hop scales on the slots (``matrix``: on the transitions)."""
    plan: LayerPlan | None = recipe.plan
    if plan is None or recipe.merge is not None or plan.host != space.pool[0][0]:
        return None
    global_layers = [(m, i) for m, n in space.pool for i in range(n)]
    m_total = len(global_layers)
    inclusion = np.zeros(space.n_inc)
    scales = np.full(space.n_scale, space.space.scale.start)
    t, prev = -1, None
    for (member, idx), s in zip(plan.layers, plan.hop_scales):
        if (member, idx) not in global_layers:
            return None
        j = global_layers.index((member, idx))
        t = next((u for u in range(t + 1, space.n_inc) if u % m_total == j), -1)
        if t < 0:
            return None
        inclusion[t] = 1.0
        if space.space.scale_mode == "hop":
            scales[t] = s
        else:
            scales[(j if prev is None else prev) * m_total + j] = s
        prev = j
    return np.concatenate([inclusion, scales])
