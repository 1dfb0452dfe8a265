"""Layer plans in memory: a model that runs a plan over a pool of models, sharing their layer modules.

A DFS candidate runs a sequence of transformer layers taken from a pool of same-architecture models,
multiplying the residual stream by a scale before each hop (see ``evomerge.recipe.LayerPlan``).
``build_dfs_model`` makes such a model without copying a weight: every module off the layer list is
the host's own, and the layer list holds light wrappers (``ScaledLayer``) around the pool's layers.

The model runs the plan in its *folded* form, the form it is exported in (``evomerge.merge.dfs_export``)
and pushed into a vLLM engine: the stream is never multiplied; instead hop k's residual writes
(attention output and MLP down projection, biases included) are divided by the cumulative scale
c_k = s_0 * ... * s_k. In a pre-norm model the two are the same function up to the norms' eps, which
is not scale-free: a stream scaled small (an early hop scaling the embeddings) moved SmolLM2's
mean log-prob by 5.9e-4. Running the folded form makes what is searched what is saved; the only
remaining difference to the export is where the division rounds (outputs here, weights there).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from evomerge.recipe import DFSError, LayerPlan

_OUTPUT_COLLECTOR: Any
try:  # transformers >= 5 records hidden states / attentions with hooks feeding this context variable
    from transformers.utils.output_capturing import _active_collector as _OUTPUT_COLLECTOR
except ImportError:  # pragma: no cover - older transformers
    _OUTPUT_COLLECTOR = None

# Config entries that hold one value per layer and must follow the layers to their new depth.
PER_LAYER_CONFIG_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers")

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
                   "add this layer family to evomerge.merge.dfs_model.RESIDUAL_WRITES")


def cumulative_scales(scales: Sequence[float]) -> list[float]:
    """c_k = s_0 * ... * s_k: what layer k's residual writes are divided by in the folded form."""
    out, c = [], 1.0
    for s in scales:
        c *= s
        out.append(c)
    return out



def layer_list_path(model: Any) -> str:
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
    layers = model.get_submodule(layer_list_path(model))
    assert isinstance(layers, nn.ModuleList)
    return layers


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


def plan_config(plan: LayerPlan, models: Mapping[str, PreTrainedModel]) -> Any:
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


def _divide_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on a residual write: its output over the divisor of the hop running it (if any)."""
    divisor = getattr(module, "_evomerge_divisor", 1.0)
    return output / divisor if divisor != 1.0 else None


class ScaledLayer(nn.Module):
    """One hop of a plan in folded form: runs a shared decoder layer as if it sat at depth ``position``,
    its residual writes divided by ``divisor`` (the cumulative scale of the plan up to this hop).

    The writes of a shared layer are divided by a forward hook installed once on each write module;
    it divides only while a wrapper has set that module's divisor for the call (calls run one after
    another, as a forward pass does), so the source models are unchanged between calls.

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

    def __init__(self, layer: nn.Module, divisor: float, position: int):
        super().__init__()
        self.layer = layer
        self.divisor = float(divisor)
        self.position = int(position)
        self._indexed = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        self._writes = [layer.get_submodule(w) for w in residual_writes(layer)]
        for w in self._writes:
            if not getattr(w, "_evomerge_fold_hook", False):
                w.register_forward_hook(_divide_output)
                setattr(w, "_evomerge_fold_hook", True)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        saved = [m.layer_idx for m in self._indexed]
        for m in self._indexed:
            setattr(m, "layer_idx", self.position)
        for w in self._writes:
            setattr(w, "_evomerge_divisor", self.divisor)
        token = _OUTPUT_COLLECTOR.set(None) if _OUTPUT_COLLECTOR is not None else None
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            if token is not None:
                _OUTPUT_COLLECTOR.reset(token)
            for w in self._writes:
                setattr(w, "_evomerge_divisor", 1.0)
            for m, idx in zip(self._indexed, saved):
                setattr(m, "layer_idx", idx)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self._modules.get("layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def extra_repr(self) -> str:
        return f"divisor={self.divisor}, position={self.position}"


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
    hops = nn.ModuleList(ScaledLayer(sources[m][i], c, k)
                         for k, ((m, i), c) in enumerate(zip(plan.layers, cumulative_scales(plan.hop_scales))))
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


def _graft(shell: Any, host: Any, path: list[str], layers: nn.ModuleList) -> None:
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
            setattr(module, "_output_capturing_hooks_installed", True)
    for hop in hops:
        install(hop, "hidden_states", 0)


