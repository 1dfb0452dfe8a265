"""Data-flow-space (DFS) merging: layer plans, their genomes, in-memory models and plain exports.

After Sakana's EvoMerge (Akiba et al. 2024): a DFS candidate runs a sequence of transformer layers
taken from a pool of same-architecture models, multiplying the residual stream by a scale before each
hop. This module holds the whole path of such a candidate:

- ``LayerPlan``: the candidate as plain data (host, (member, layer) hops, scales), with a YAML form
  that ``evomerge merge`` replays (``merge_plan_to_disk``).
- ``decode_dfs``: genome (inclusion genes + scale genes) -> plan, a pure function.
- ``build_dfs_model``: a model that *shares* the pool's layer modules (no weight copied) and applies
  the scales with a light wrapper, so a search evaluates a candidate without allocating weights.
- ``export_dfs``: a plain Hugging Face checkpoint (duplicated layers) with the scales *folded* into
  the layers' residual writes, loadable without ``trust_remote_code``.

Why folding is exact: in a pre-norm transformer every read of the residual stream goes through
RMSNorm / LayerNorm, which ignore a positive scale. Multiplying the stream by s before hop k is
therefore the same as dividing the residual writes (attention output and MLP down projection, with
their biases) of hop k and of every later hop by s: layer k's writes are divided by the cumulative
product c_k = s_0 * ... * s_k, and the exported stream equals the in-memory stream divided by c_k.
The final norm removes the remaining factor. Only the norms' eps breaks the invariance, which is
negligible unless the stream is tiny (random-init models; see references.md).
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.checkpoint import copy_tokenizer, resolve_model_path, write_sharded

try:  # transformers >= 5 records hidden states / attentions with hooks feeding this context variable
    from transformers.utils.output_capturing import _active_collector as _OUTPUT_COLLECTOR
except ImportError:  # pragma: no cover - older transformers
    _OUTPUT_COLLECTOR = None

# Residual writes per layer family: (attention output projection, MLP output projection), as module
# names relative to one decoder layer. Folding divides their weights and biases.
RESIDUAL_WRITES: tuple[tuple[str, str], ...] = (
    ("self_attn.o_proj", "mlp.down_proj"),  # Llama, Mistral, Qwen2, Gemma, Phi-3, ...
    ("attn.c_proj", "mlp.c_proj"),          # GPT-2
    ("self_attn.dense", "mlp.fc2"),         # Phi (parallel attention + MLP, one shared LayerNorm)
)
# Norms applied to a sublayer's output before it is added to the stream (Gemma 2/3 "sandwich" norms):
# their output does not scale with the writes above, so folding as done here would be wrong.
POST_SUBLAYER_NORMS = ("post_feedforward_layernorm", "post_attention_norm", "post_ffw_norm")
# Config entries that hold one value per layer and must follow the layers to their new depth.
PER_LAYER_CONFIG_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers")

SCALE_MODES = ("matrix", "hop")


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
            "layers": [[m, i, s] for (m, i), s in zip(self.layers, self.scales)],
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


# --------------------------------------------------------------------------------------------------
# Genomes -> plans


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


# --------------------------------------------------------------------------------------------------
# The pool: finding layer lists and checking compatibility


def layer_list_path(model: nn.Module) -> str:
    """Dotted name of the model's decoder-layer ModuleList (``model.layers``, ``transformer.h``...).

    Found as the one ModuleList whose length is the config's layer count, so no architecture table
    is needed to run a plan.
    """
    n = model.config.num_hidden_layers
    found = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == n and len({type(x) for x in mod}) == 1]
    if len(found) != 1:
        raise DFSError(f"{type(model).__name__}: expected exactly one ModuleList of {n} decoder layers, "
                       f"found {found or 'none'}; this architecture is not supported by DFS yet")
    return found[0]


def _layer_list(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(layer_list_path(model))


def check_pool(plan: LayerPlan, models: Mapping[str, PreTrainedModel]) -> None:
    """Raise unless the plan's members are in ``models`` and share one architecture."""
    missing = [m for m in plan.members() if m not in models]
    if missing:
        raise DFSError(f"the plan uses {missing}, which are not among the models given ({sorted(models)})")
    plan.check({name: models[name].config.num_hidden_layers for name in plan.members()})
    host = models[plan.host]
    for name in plan.members():
        model = models[name]
        if type(model) is not type(host):
            raise DFSError(f"'{name}' is a {type(model).__name__} but host '{plan.host}' is a "
                           f"{type(host).__name__}; a plan mixes layers of one architecture only")
        for key in ("hidden_size", "num_attention_heads", "vocab_size"):
            a, b = getattr(model.config, key, None), getattr(host.config, key, None)
            if a != b:
                raise DFSError(f"'{name}' has {key}={a} but host '{plan.host}' has {b}; pool members must match")
        if model.config._attn_implementation != host.config._attn_implementation:
            raise DFSError(f"'{name}' uses attention '{model.config._attn_implementation}' but the host uses "
                           f"'{host.config._attn_implementation}'; load all members with the same attn_implementation")
        if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
            raise DFSError(f"'{name}' scales attention by its layer index (scale_attn_by_inverse_layer_idx); "
                           "a layer moved to a new depth would change behaviour, which DFS does not support")
        if layer_list_path(model) != layer_list_path(host):
            raise DFSError(f"'{name}' keeps its layers at {layer_list_path(model)}, the host at "
                           f"{layer_list_path(host)}")


def plan_config(plan: LayerPlan, models: Mapping[str, PreTrainedModel]):
    """The host's config at the plan's depth, with per-layer entries taken from each hop's source layer
    (a sliding-window layer stays sliding wherever it lands)."""
    cfg = copy.deepcopy(models[plan.host].config)
    cfg.num_hidden_layers = len(plan)  # GPT-2's attribute_map turns this into n_layer
    for key in PER_LAYER_CONFIG_KEYS:
        if isinstance(getattr(cfg, key, None), list):
            per_member = {m: getattr(models[m].config, key) for m in plan.members()}
            setattr(cfg, key, [per_member[m][i] for m, i in plan.layers])
    hetero = [m for m in plan.members() if getattr(models[m].config, "is_heterogeneous", False)]
    if hetero:
        raise DFSError(f"{hetero} have heterogeneous configs (per_layer_config), which DFS does not remap yet")
    return cfg


# --------------------------------------------------------------------------------------------------
# In memory: shared layers, scales in a wrapper


class ScaledLayer(nn.Module):
    """One hop of a plan: multiplies the stream by ``scale`` and runs a shared decoder layer as if it
    sat at depth ``position``.

    HF attention modules read and write the KV cache at their own ``layer_idx``. A layer used twice,
    or at a new depth, must use the slot of its position in the plan instead, so for the duration of
    the call the wrapper sets ``layer_idx`` on every submodule that has one (the attention module,
    and the layer itself where it keeps one) and restores the original values afterwards. The source
    models are untouched between calls; calls run one after another, as a forward pass does.
    Attributes the host model reads from a layer (``attention_type``...) pass through to it.

    Output recording (``output_hidden_states``): hooks that the sources may carry on their own layers
    are silenced during the call, and the DFS model records one hidden state per hop on the wrapper
    instead (see ``_record_hidden_states_on_hops``). Attention weights are not recorded.
    """

    def __init__(self, layer: nn.Module, scale: float, position: int):
        super().__init__()
        self.layer = layer
        self.scale = float(scale)
        self.position = int(position)
        self._indexed = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        saved = [m.layer_idx for m in self._indexed]
        for m in self._indexed:
            m.layer_idx = self.position
        token = _OUTPUT_COLLECTOR.set(None) if _OUTPUT_COLLECTOR is not None else None
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            if token is not None:
                _OUTPUT_COLLECTOR.reset(token)
            for m, idx in zip(self._indexed, saved):
                m.layer_idx = idx

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self._modules.get("layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, position={self.position}"


def build_dfs_model(plan: LayerPlan, models: Mapping[str, PreTrainedModel]) -> PreTrainedModel:
    """A causal LM running ``plan`` over ``models``, sharing their modules: no weight is copied.

    The model is an instance of the host's class, built empty (meta device) from the host's config at
    the plan's depth; every module off the path to the layer list (embeddings, final norm, lm_head,
    rotary embedding) is the host's own object, and the layer list holds ``ScaledLayer`` wrappers
    around the sources' layers. The usual forward (input_ids / attention_mask / position_ids /
    cache) and generation work; the model's cache has one slot per hop.
    """
    check_pool(plan, models)
    host = models[plan.host]
    path = layer_list_path(host)
    cfg = plan_config(plan, models)
    with torch.device("meta"):
        shell = type(host)(cfg)
    sources = {m: _layer_list(models[m]) for m in plan.members()}
    hops = nn.ModuleList(ScaledLayer(sources[m][i], s, k)
                         for k, ((m, i), s) in enumerate(zip(plan.layers, plan.scales)))
    _graft(shell, host, path.split("."), hops)
    leftover = [n for n, t in [*shell.named_parameters(), *shell.named_buffers()] if t.is_meta]
    if leftover:
        raise DFSError(f"{type(host).__name__}: tensors {leftover[:5]} are not shared from the host; "
                       "this architecture keeps weights where DFS does not look")
    _record_hidden_states_on_hops(shell, path, hops)
    if getattr(host, "generation_config", None) is not None:
        shell.generation_config = copy.deepcopy(host.generation_config)
    shell.train(host.training)
    return shell


def _graft(shell: nn.Module, host: nn.Module, path: list[str], layers: nn.ModuleList) -> None:
    """Give ``shell`` the host's modules, parameters and buffers everywhere except at ``path``,
    where the layer list goes."""
    for name, param in list(shell._parameters.items()):
        shell._parameters[name] = host._parameters[name]
    for name in list(shell._buffers):
        shell._buffers[name] = host._buffers[name]
    for name in list(shell._modules):
        if name != path[0]:
            shell._modules[name] = host._modules[name]
        elif len(path) == 1:
            shell._modules[name] = layers
        else:
            _graft(shell._modules[name], host._modules[name], path[1:], layers)


def _record_hidden_states_on_hops(shell: nn.Module, path: str, hops: nn.ModuleList) -> None:
    """Make ``output_hidden_states`` report one state per hop, without hooking the sources.

    transformers >= 5 records hidden states with forward hooks that it installs, on first request, on
    every decoder-layer instance under the model. Under a DFS model those instances are the sources'
    own (shared) layers: a layer used twice would be hooked twice and record twice, and the hooks
    would stay on the source models. So the DFS model's own modules on the path to the layer list
    are marked as already hooked, and the recording hook goes on each hop's wrapper instead (the
    wrapper silences any hook inside the shared layer). With a transformers that records
    differently, nothing is done here.
    """
    from transformers.utils import output_capturing

    install = getattr(output_capturing, "install_output_capuring_hook", None) or getattr(
        output_capturing, "install_output_capturing_hook", None)
    if install is None:
        return
    parts = path.split(".")
    for depth in range(len(parts)):
        module = shell.get_submodule(".".join(parts[:depth]))
        if isinstance(module, PreTrainedModel):
            module._output_capturing_hooks_installed = True
    for hop in hops:
        install(hop, "hidden_states", 0)


# --------------------------------------------------------------------------------------------------
# Export: a plain checkpoint with the scales folded in


def residual_writes(layer: nn.Module) -> tuple[str, str]:
    """The names (relative to the layer) of the modules whose outputs are added to the stream."""
    names = {n for n, _ in layer.named_modules()}
    sandwich = [n for n in names if n.split(".")[-1] in POST_SUBLAYER_NORMS]
    if sandwich:
        raise DFSError(f"{type(layer).__name__} normalises sublayer outputs ({sandwich}); folding DFS scales "
                       "into such layers is not supported")
    for pair in RESIDUAL_WRITES:
        if all(p in names for p in pair):
            return pair
    raise DFSError(f"{type(layer).__name__}: cannot find its residual writes (known: {RESIDUAL_WRITES}); "
                   "add this layer family to evomerge.dfs.RESIDUAL_WRITES")


def cumulative_scales(scales: Sequence[float]) -> list[float]:
    """c_k = s_0 * ... * s_k: what layer k's residual writes are divided by in the export."""
    out, c = [], 1.0
    for s in scales:
        c *= s
        out.append(c)
    return out


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
    for k, ((member, idx), c) in enumerate(zip(plan.layers, cumulative_scales(plan.scales))):
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
        models = {m: AutoModelForCausalLM.from_pretrained(f, dtype="auto").to(device).eval()
                  for m, f in folders.items()}
        export_dfs(plan, models, out, tokenizer_from=folders[plan.host], max_shard_size=max_shard_size)
    return Path(out)
