"""From a merge configuration to one job per output tensor: which source tensors, which base, at
which gradient position, with which parameter scopes. Both forms of a mergekit YAML end here.

mergekit 0.1.5 (``plan.py``, ``config.ConfigReader``) turns ``models:`` into a single slice over
every listed model's full layer range (the base appended when it is not listed) and plans slices
layer by layer: output layer ``i`` of a slice of ``n`` layers reads layer ``start + i`` of every
source and gradients at ``t = i / (n - 1)`` (1 for a one-layer slice); the tensors before the layers
(embeddings) come from the first slice's sources, those after them (final norm, head) from the last
slice's, both at ``t = 0``. Parameters resolve slice source > slice > top level; per-model ones are
matched against the *source* tensor's name, shared ones against the output's. The same rules here,
so a frankenmerge that repeats layers gives mergekit's tensors and layer map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from evomerge.merge.config import MergeConfig, OutputSlice, SliceSource
from evomerge.merge.params import layer_index

_LAYER_SPAN = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(?=\.|$)")
_PRE = ("embed", "wte", "wpe", "word_embeddings")

Scope = Mapping[str, Any]  # parameter name -> setting (scalar, gradient or filter list)


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: read ``sources[m]`` (a tensor name) from each model ``m`` in ``order``."""

    name: str
    order: tuple[str, ...]  # the slice's source models, in its order (mergekit's model_order)
    sources: dict[str, str]  # model -> its tensor name
    base: str | None
    t: float
    model_scopes: dict[str, tuple[Scope, ...]] = field(default_factory=dict)  # highest precedence first
    shared_scopes: tuple[Scope, ...] = ()
    layer: int | None = None  # output layer index
    source_layers: dict[str, int] = field(default_factory=dict)

    def inputs(self, takes_deltas: bool) -> list[str]:
        """The stacked models: every source but the base for task vectors, every source otherwise."""
        return [m for m in self.order if not (takes_deltas and m == self.base)]


def with_layer(tensor: str, index: int) -> str:
    """``tensor`` with its decoder-layer index replaced by ``index``."""
    return _LAYER_SPAN.sub(lambda m: f"{m.group(1)}{index}", tensor, count=1)


def as_slices(config: MergeConfig, num_layers: dict[str, int]) -> list[OutputSlice]:
    """The config as slices: ``models:`` becomes one slice over every model's full layer range,
    the base appended when it is not listed (mergekit's normalize_config)."""
    if config.slices:
        return list(config.slices)
    sources = [SliceSource(model=m.model, layer_range=(0, num_layers[m.model]), parameters=m.parameters)
               for m in config.models]
    base = config.base_model
    if base and base not in {m.model for m in config.models}:
        sources.append(SliceSource(model=base, layer_range=(0, num_layers[base])))
    return [OutputSlice.model_construct(sources=sources, base_model=None, residual_weight=None, parameters={})]


def slice_base(config: MergeConfig, sl: OutputSlice) -> str | None:
    return sl.base_model or config.base_model


def layer_map(config: MergeConfig, num_layers: dict[str, int]) -> list[dict[str, int]]:
    """For each output layer, the source layer each model of its slice contributes."""
    out = []
    for sl in as_slices(config, num_layers):
        for i in range(sl.num_layers):
            out.append({s.model: s.layer_range[0] + i for s in sl.sources})
    return out


def _scopes(config: MergeConfig, sl: OutputSlice) -> tuple[dict[str, tuple[Scope, ...]], tuple[Scope, ...]]:
    shared: tuple[Scope, ...] = (sl.parameters or {}, config.parameters)
    per_model: dict[str, tuple[Scope, ...]] = {s.model: (s.parameters or {}, *shared) for s in sl.sources}
    return per_model, shared


def plan_jobs(config: MergeConfig, tensors: dict[str, list[str]], num_layers: dict[str, int]) -> list[TensorJob]:
    """Every output tensor's job, in mergekit's order: before the layers, the layers, after them.

    ``tensors[m]`` lists model ``m``'s tensor names (its checkpoint index); a tensor outside the
    decoder layers counts as "before" when it is an embedding (embed / wte / wpe), else "after".
    """
    slices = as_slices(config, num_layers)
    first, last = slices[0], slices[-1]
    ref = first.sources[0].model
    outside = [n for n in tensors[ref] if layer_index(n) is None]
    jobs: list[TensorJob] = []

    def whole(name: str, sl: OutputSlice) -> TensorJob:
        per_model, shared = _scopes(config, sl)
        order = tuple(s.model for s in sl.sources)
        return TensorJob(name, order, {m: name for m in order}, slice_base(config, sl), 0.0, per_model, shared)

    jobs += [whole(n, first) for n in outside if any(p in n for p in _PRE)]
    out_layer = 0
    for sl in slices:
        per_model, shared = _scopes(config, sl)
        order = tuple(s.model for s in sl.sources)
        n = sl.num_layers
        for i in range(n):
            lead = sl.sources[0]
            src_layer = {s.model: s.layer_range[0] + i for s in sl.sources}
            names = [t for t in tensors[lead.model] if layer_index(t) == src_layer[lead.model]]
            for t_name in names:
                jobs.append(TensorJob(
                    name=with_layer(t_name, out_layer), order=order,
                    sources={m: with_layer(t_name, src_layer[m]) for m in order},
                    base=slice_base(config, sl), t=i / (n - 1) if n > 1 else 1.0,
                    model_scopes=per_model, shared_scopes=shared, layer=out_layer, source_layers=src_layer))
            out_layer += 1
    jobs += [whole(n, last) for n in outside if not any(p in n for p in _PRE)]
    return jobs


def output_reference(config: MergeConfig) -> str:
    """Whose config (and tokenizer, by default) the output takes: the base model, else the first
    source of the first slice (mergekit takes "the first referenced model", an unordered set)."""
    if config.base_model:
        return config.base_model
    return config.slices[0].sources[0].model if config.slices else config.models[0].model


def output_num_layers(config: MergeConfig, num_layers: dict[str, int]) -> int:
    return sum(sl.num_layers for sl in as_slices(config, num_layers))


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def output_config(config: MergeConfig, ref_cfg: dict[str, Any], source_cfgs: dict[str, dict[str, Any]],
                  num_layers: dict[str, int]) -> dict[str, Any]:
    """The reference config with the merged layer count, and per-layer lists (``layer_types``
    and any other list as long as the layer count) following the layer map: output layer ``i``
    takes the entry of the source layer its slice's first source contributes."""
    cfg = dict(ref_cfg)
    if not config.slices:
        return cfg
    total = output_num_layers(config, num_layers)
    key = next((k for k in LAYER_COUNT_KEYS if k in cfg), "num_hidden_layers")
    old = int(cfg.get(key, 0))
    cfg[key] = total
    leads = []
    for sl in config.slices:
        lead = sl.sources[0]
        leads += [(lead.model, lead.layer_range[0] + i) for i in range(sl.num_layers)]
    for k, v in ref_cfg.items():
        if isinstance(v, list) and len(v) == old and old > 0 and k != "architectures":
            per_source = {m: source_cfgs[m].get(k) for m, _ in leads}
            lists = {m: x for m, x in per_source.items() if isinstance(x, list) and len(x) == num_layers[m]}
            if len(lists) == len(per_source):
                cfg[k] = [lists[m][j] for m, j in leads]
    return cfg
