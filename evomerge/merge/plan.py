"""From a merge configuration to per-tensor work, validated against checkpoint headers only.

Shared by the in-memory engine and the file merger, so both resolve parameters identically.
Everything that can be wrong with a config is checked here, before any weight is read: the method,
its parameters, a base where one is needed, architectures, tensor names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.checkpoint import TensorInfo, read_config, resolve_model_path, tensor_index
from evomerge.merge.config import MergeConfig
from evomerge.merge.methods import MergeMethod, get_method
from evomerge.merge.params import evaluate_setting, layer_index, layer_t


class MergeError(ValueError):
    """A merge that cannot be done as configured; the message says what to change."""


@dataclass
class Sources:
    """What is known of the models before loading them: paths, configs, tensor headers."""

    paths: dict[str, Path]
    configs: dict[str, dict]
    index: dict[str, dict[str, TensorInfo]]

    @classmethod
    def inspect(cls, names: list[str], allow_pickle: bool = False,
                paths: dict[str, Path] | None = None) -> "Sources":
        paths = dict(paths or {})
        for n in names:
            if n not in paths:
                paths[n] = resolve_model_path(n)
        return cls(paths, {n: read_config(paths[n]) for n in names},
                   {n: tensor_index(paths[n], allow_pickle) for n in names})

    def num_layers(self, name: str) -> int:
        cfg = self.configs[name]
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                return int(cfg[key])
        found = {layer_index(t) for t in self.index[name]} - {None}
        return max(found) + 1 if found else 0


@dataclass(frozen=True)
class MergeInputs:
    """Which models a tensor merge takes, in order, and which one is the base."""

    base: str | None
    inputs: list[str]  # the models whose tensors (or deltas) are stacked, in stack order


def merge_inputs(config: MergeConfig, method: MergeMethod) -> MergeInputs:
    """mergekit's rule: deltas come from every listed model but the base; a method that takes
    tensors (linear) takes every listed model and the base too when it is not listed."""
    listed = [m.model for m in config.models]
    base = config.base_model
    if method.inputs != "tensors":
        return MergeInputs(base, [m for m in listed if m != base])
    return MergeInputs(base, listed + ([base] if base and base not in listed else []))


def tensor_params(config: MergeConfig, method: MergeMethod, inputs: MergeInputs, tensor: str,
                  num_layers: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per-model and global parameter values for one tensor (gradients and filters resolved).

    Precedence as in mergekit: a model's own ``parameters`` first, then the top-level ones (which
    thereby give a default for every model), then the method's default.
    """
    t = layer_t(tensor, num_layers)
    entries = {m.model: m.parameters for m in config.models}
    per_model: dict[str, list[float]] = {}
    for p, default in method.model_params.items():
        values = []
        for m in inputs.inputs:
            value = None
            for scope in (entries.get(m) or {}, config.parameters):
                if p in scope:
                    value = evaluate_setting(scope[p], tensor, t)
                    if value is not None:
                        break
            if value is None:
                if default is None:
                    raise MergeError(f"model '{m}' has no '{p}' for tensor {tensor}: set parameters.{p} "
                                     f"on the model or at the top level (method {method.name} requires it)")
                value = default
            values.append(float(value))
        if p == "density":
            for m, v in zip(inputs.inputs, values):
                if not 0.0 < v <= 1.0:
                    raise MergeError(f"density {v:g} for model '{m}' at tensor {tensor} is outside (0, 1]; "
                                     "density is the fraction of each task vector kept")
        per_model[p] = values
    glob = {}
    for p, default in method.global_params.items():
        value = evaluate_setting(config.parameters[p], tensor, t) if p in config.parameters else None
        glob[p] = default if value is None else value
    return per_model, glob


def check_config(config: MergeConfig, sources: Sources) -> tuple[MergeMethod, MergeInputs]:
    """Raise MergeError for anything that would fail or silently mislead later."""
    method, inputs = check_recipe(config)
    _check_architectures(sources, config.model_names())
    ref = config.base_model or inputs.inputs[0]
    for name in _tensor_names(sources, config.model_names(), ref):
        tensor_params(config, method, inputs, name, sources.num_layers(ref))
    return method, inputs


def check_recipe(config: MergeConfig) -> tuple[MergeMethod, MergeInputs]:
    """The checks that need no checkpoint: method, base, parameter names, model count."""
    try:
        method = get_method(config.merge_method)
    except ValueError as err:
        raise MergeError(str(err)) from None
    if method.needs_base and not config.base_model:
        raise MergeError(f"merge_method '{method.name}' needs a base_model (the model the task vectors "
                         "are taken from); add 'base_model: PATH'")
    known = set(method.model_params) | set(method.global_params)
    for where, params in [("parameters", config.parameters)] + [
            (f"models[{i}].parameters", m.parameters) for i, m in enumerate(config.models)]:
        for p in params:
            if p not in known:
                raise MergeError(f"{where}.{p}: '{method.name}' has no parameter '{p}'; "
                                 f"its parameters are {sorted(known)}")
    for m in config.models:
        for p in m.parameters:
            if p in method.global_params and p not in method.model_params:
                raise MergeError(f"'{p}' is a global parameter of {method.name}; move it from the "
                                 f"parameters of model '{m.model}' to the top-level 'parameters:'")
    inputs = merge_inputs(config, method)
    if not inputs.inputs:
        raise MergeError("no model to merge besides the base; list at least one other model")
    check_count(method, len(inputs.inputs), "")
    return method, inputs


def check_count(method: MergeMethod, n: int, where: str) -> None:
    """mergekit's input contract: how many models a method merges (besides the base, for the
    methods that take task vectors)."""
    if method.accepts(n):
        return
    hint = ""
    if method.name == "passthrough":
        hint = "; passthrough copies one model per tensor (use slices: for layers of several; drop base_model)"
    raise MergeError(f"{method.name} merges {method.count_phrase()}{where}; got {n}{hint}")


def _check_architectures(sources: Sources, names: list[str]) -> None:
    ref = names[0]
    arch = lambda n: (sources.configs[n].get("model_type"), tuple(sources.configs[n].get("architectures") or ()))
    for n in names[1:]:
        if arch(n) != arch(ref):
            raise MergeError(f"architectures differ: '{ref}' is {arch(ref)} but '{n}' is {arch(n)}; "
                             "parameter merging needs one architecture (see `evomerge fuse` for "
                             "models of different architectures)")


def _tensor_names(sources: Sources, names: list[str], ref: str) -> list[str]:
    """The reference model's tensor names, after checking every model has them with one shape."""
    ref_index = sources.index[ref]
    for n in names:
        idx = sources.index[n]
        missing = sorted(set(ref_index) - set(idx))
        extra = sorted(set(idx) - set(ref_index))
        if missing or extra:
            raise MergeError(f"'{n}' and '{ref}' have different tensors: missing in '{n}': "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}; only in '{n}': "
                             f"{extra[:5]}{'...' if len(extra) > 5 else ''}")
        for t, info in ref_index.items():
            if idx[t].shape != info.shape:
                hint = ""
                if "embed" in t or "lm_head" in t or "wte" in t:
                    hint = (" (vocabulary sizes differ: evomerge does not truncate or permute "
                            "vocabularies; resize the embeddings of both to one tokenizer first)")
                raise MergeError(f"tensor {t} has shape {idx[t].shape} in '{n}' but {info.shape} in "
                                 f"'{ref}'{hint}")
    return list(ref_index)
