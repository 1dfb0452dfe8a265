"""Layer plans as plain checkpoints: duplicated layers, hop scales folded into the residual writes.

Why folding is exact: in a pre-norm transformer every read of the residual stream goes through
RMSNorm / LayerNorm, which ignore a positive scale. Multiplying the stream by s before hop k is
therefore the same as dividing the residual writes (attention output and MLP down projection, with
their biases) of hop k and of every later hop by s: layer k's writes are divided by the cumulative
product c_k = s_0 * ... * s_k, and the exported stream equals the in-memory stream divided by c_k.
The final norm removes the remaining factor. Only the norms' eps breaks the invariance, which is
negligible unless the stream is tiny (random-init models; see references.md). The export loads in
transformers (and vLLM) without ``trust_remote_code``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.checkpoint import copy_tokenizer, note_weights_loading, resolve_model_path, write_sharded
from evomerge.merge.dfs_model import (
    RESIDUAL_WRITES,
    _layer_list,
    check_pool,
    cumulative_scales,
    layer_list_path,
    plan_config,
    residual_writes,
)
from evomerge.recipe import DFSError, LayerPlan


def dfs_tensors(plan: LayerPlan, models: Mapping[str, PreTrainedModel]) -> Iterator[tuple[str, torch.Tensor]]:
    """The exported checkpoint's tensors, one at a time: the host's non-layer tensors, then each hop's
    layer renamed to its position, residual writes divided by the cumulative scale (in float32, cast
    back to the tensor's dtype). Every tensor is a fresh CPU copy (safetensors refuses shared ones)."""
    check_pool(plan, models)
    host = models[plan.host]
    prefix = layer_list_path(host) + "."
    seen: set[int] = set()
    for name, t in host.state_dict().items():
        if name.startswith(prefix) or t.data_ptr() in seen:  # layers below; tied weights once
            continue
        seen.add(t.data_ptr())
        yield name, t.detach().to("cpu", copy=True)
    for k, ((member, idx), c) in enumerate(zip(plan.layers, cumulative_scales(plan.hop_scales))):
        layer = _layer_list(models[member])[idx]
        writes = tuple(w + "." for w in residual_writes(layer))
        for name, t in layer.state_dict().items():
            t = t.detach()
            if c != 1.0 and name.startswith(writes) and t.is_floating_point():
                out = (t.float() / c).to(t.dtype).cpu()
            else:
                out = t.to("cpu", copy=True)
            yield f"{prefix}{k}.{name}", out


def export_dfs(plan: LayerPlan, models: Mapping[str, PreTrainedModel], out: str | Path,
               tokenizer_from: str | Path | None = None, max_shard_size: str | int = "5GB") -> Path:
    """Write ``plan`` as a plain HF checkpoint: duplicated layers, folded scales, the host's config at
    the plan's depth, the tokenizer (from ``tokenizer_from``, else the host's folder when known) and
    the plan itself as ``layer_plan.yml`` so the export can be replayed."""
    out = Path(out)
    check_pool(plan, models)
    host = models[plan.host]
    write_sharded(dfs_tensors(plan, models), out, max_shard_size)
    cfg = plan_config(plan, models)
    cfg.architectures = [type(host).__name__]
    cfg.dtype = next(host.parameters()).dtype
    cfg.save_pretrained(out)
    tok = Path(tokenizer_from) if tokenizer_from is not None else _host_folder(plan, host)
    if tok is not None:
        copy_tokenizer(tok, out)
    if not (out / "generation_config.json").exists() and getattr(host, "generation_config", None) is not None:
        host.generation_config.save_pretrained(out)
    (out / "layer_plan.yml").write_text(_recorded(plan, models).to_yaml())
    return out


def _host_folder(plan: LayerPlan, host: PreTrainedModel) -> Path | None:
    for ref in (plan.models.get(plan.host), getattr(host, "name_or_path", None)):
        if isinstance(ref, (str, Path)) and ref and Path(ref).is_dir():
            return Path(ref)
    return None


def _recorded(plan: LayerPlan, models: Mapping[str, PreTrainedModel]) -> LayerPlan:
    """The plan with a source for every member: its own ``models`` entry, else the folder the member
    was loaded from (left out when unknown)."""
    sources = dict(plan.models)
    for m in plan.members():
        ref = getattr(models[m], "name_or_path", None)
        if m not in sources and ref and Path(ref).is_dir():
            sources[m] = str(Path(ref).resolve())
    if not all(m in sources for m in plan.members()):
        sources = {}
    return LayerPlan(plan.host, plan.layers, plan.scales, sources)


# --------------------------------------------------------------------------------------------------
# Replay: a plan YAML -> a checkpoint


def load_plan(plan: LayerPlan | Mapping[str, Any] | str | Path) -> LayerPlan:
    if isinstance(plan, LayerPlan):
        return plan
    if isinstance(plan, Mapping):
        return LayerPlan.from_dict(plan)
    path = Path(plan)
    if not path.is_file():
        raise DFSError(f"layer plan file '{plan}' does not exist")
    return LayerPlan.from_yaml(path)


def merge_plan_to_disk(plan: LayerPlan | Mapping[str, Any] | str | Path, out: str | Path, *,
                       allow_pickle: bool = False, device: str = "cpu",
                       max_shard_size: str | int = "5GB") -> Path:
    """Replay a layer plan (``layer_plan:`` YAML path, its parsed dict, or a ``LayerPlan``) into ``out``.

    Members given as folders / hub ids are loaded as they are; a member given as a merge config is
    first merged with ``merge_to_disk`` into a temporary folder (the same weights ``evomerge merge``
    of that config writes). Then the members the plan uses are loaded (in their stored dtype) and
    exported with ``export_dfs``. Every member the plan runs is resident at once.
    """
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.files import merge_to_disk

    plan = load_plan(plan)
    if not plan.models:
        raise DFSError("the layer plan has no 'models:'; map every member to a folder or a merge config")
    with tempfile.TemporaryDirectory(prefix="evomerge-dfs-") as tmp:
        folders: dict[str, Path] = {}
        for member in plan.members():
            spec = plan.models[member]
            if isinstance(spec, Mapping):
                cfg = MergeConfig.model_validate(dict(spec))
                folders[member] = merge_to_disk(cfg, Path(tmp) / member, allow_pickle=allow_pickle,
                                                device=device, max_shard_size=max_shard_size)
            else:
                folders[member] = resolve_model_path(spec)
        note_weights_loading(f"layer plan pool {sorted(folders)}")
        models: dict[str, Any] = {m: AutoModelForCausalLM.from_pretrained(f, dtype="auto") for m, f in folders.items()}
        models = {m: model.to(device).eval() for m, model in models.items()}
        export_dfs(plan, models, out, tokenizer_from=folders[plan.host], max_shard_size=max_shard_size)
    return Path(out)


__all__ = ["RESIDUAL_WRITES", "cumulative_scales", "dfs_tensors", "export_dfs", "merge_plan_to_disk", "residual_writes"]
