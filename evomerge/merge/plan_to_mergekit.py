"""A DFS layer plan as a mergekit ``slices:`` YAML: searched layer stacking handed to mergekit.

A layer plan (``LayerPlan.to_dict()`` in ``evomerge.recipe``: host, hops (member, layer, scale), member
folders) is exported by evomerge as a plain checkpoint whose residual writes of hop k (attention
output and MLP down projection, weights and biases) are divided by the cumulative scale
c_k = s_0 * ... * s_k. mergekit's ``passthrough`` says the same thing: one slice per run of hops,
``layer_range`` the member's layers, and a per-model ``scale`` of 1 / c_k filtered to those two
modules (a filter is a substring of the tensor name, so it takes the bias with the weight).

Two details make the mergekit output equal evomerge's export:
- mergekit takes the tensors before the layers (embeddings) from the first slice's model and those
  after them (final norm, lm_head) from the last slice's. The plan's host provides them whatever
  its first and last hops are, so the config opens and closes with an empty slice of the host
  (``layer_range: [0, 0]``: no layer, only those tensors).
- ``base_model`` is the host, so the output's config (and tokenizer) are the host's; passthrough
  ignores it for the weights.
What mergekit does not do: per-layer config lists (``layer_types``) stay the host's, where
evomerge's export remaps them to the hops; for models without such lists (Llama, Mistral, GPT-2,
Qwen2 without sliding windows) the two configs agree but for that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evomerge.merge.dfs_export import RESIDUAL_WRITES

LLAMA_WRITES = RESIDUAL_WRITES[0]  # Llama, Mistral, Qwen2, Phi-3, ...
WRITES_BY_MODEL_TYPE = {"gpt2": RESIDUAL_WRITES[1], "phi": RESIDUAL_WRITES[2]}


def _plan_body(plan: Mapping[str, Any]) -> Mapping[str, Any]:
    body = plan.get("layer_plan", plan)
    for key in ("host", "layers"):
        if key not in body:
            raise ValueError(f"the layer plan has no '{key}:'; pass LayerPlan.to_dict() (host, models, layers)")
    return body


def _hops(body: Mapping[str, Any]) -> list[tuple[str, int, float]]:
    hops = []
    for k, entry in enumerate(body["layers"]):
        if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
            raise ValueError(f"layers[{k}] = {entry!r}; expected [member, layer index] or [member, index, scale]")
        scale = float(entry[2]) if len(entry) == 3 else 1.0
        if not scale > 0:
            raise ValueError(f"layers[{k}] has scale {scale}; scales must be > 0")
        hops.append((str(entry[0]), int(entry[1]), scale))
    if not hops:
        raise ValueError("the layer plan has no layers")
    return hops


def _folders(body: Mapping[str, Any], members: Sequence[str], paths: Mapping[str, str | Path] | None) -> dict[str, str]:
    """A folder (or hub id) per member: ``paths`` first, else the plan's own ``models:`` entry."""
    known = dict(body.get("models") or {})
    out = {}
    for m in members:
        ref = (paths or {}).get(m, known.get(m))
        if ref is None:
            raise ValueError(f"no folder for member '{m}': give it in paths= or in the plan's models:")
        if isinstance(ref, Mapping):
            raise ValueError(f"member '{m}' is a merge config, which mergekit cannot read as a model; merge it to "
                             f"a folder first (evomerge merge) and pass paths={{'{m}': FOLDER}}")
        out[m] = str(ref)
    return out


def plan_to_mergekit(plan: Mapping[str, Any], paths: Mapping[str, str | Path] | None = None, *,
                     residual_writes: Sequence[str] = LLAMA_WRITES, dtype: str | None = None) -> dict[str, Any]:
    """The mergekit config (a plain dict; ``yaml.safe_dump`` it) that rebuilds ``plan``.

    ``plan`` is ``LayerPlan.to_dict()`` (or its inner mapping); ``paths`` maps members to folders
    where the plan's ``models:`` lacks them or holds merge configs. ``residual_writes`` names the
    modules the scales fold into (evomerge.merge.dfs_export.RESIDUAL_WRITES has the other families: GPT-2's
    ``attn.c_proj`` / ``mlp.c_proj``). Consecutive hops of one member over consecutive layers with
    the same cumulative scale share one slice.
    """
    body = _plan_body(plan)
    host = str(body["host"])
    hops = _hops(body)
    members = [host] + [m for i, (m, _, _) in enumerate(hops) if m != host and m not in [h[0] for h in hops[:i]]]
    folders = _folders(body, members, paths)
    runs: list[list[Any]] = []  # [member, start, end, cumulative scale]
    c = 1.0
    for member, idx, s in hops:
        c *= s
        last = runs[-1] if runs else None
        if last is not None and last[0] == member and last[2] == idx and last[3] == c:
            last[2] = idx + 1
        else:
            runs.append([member, idx, idx + 1, c])
    host_edge = {"sources": [{"model": folders[host], "layer_range": [0, 0]}]}
    slices: list[dict[str, Any]] = [host_edge]
    for member, start, end, cum in runs:
        sl: dict[str, Any] = {"sources": [{"model": folders[member], "layer_range": [start, end]}]}
        if cum != 1.0:
            sl["sources"][0]["parameters"] = {"scale": [{"filter": w, "value": 1.0 / cum} for w in residual_writes]}
        slices.append(sl)
    slices.append(host_edge)
    config: dict[str, Any] = {"merge_method": "passthrough", "base_model": folders[host], "slices": slices}
    if dtype is not None:
        config["dtype"] = dtype
    return config
