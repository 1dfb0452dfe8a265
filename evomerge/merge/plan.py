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
from evomerge.merge.slices import TensorJob, plan_jobs
from evomerge.merge.tokenizer import VOCAB_NAMES


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
        found = {i for i in (layer_index(t) for t in self.index[name]) if i is not None}
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
    """Per-model and global parameter values for one tensor of a ``models:`` merge (gradients and
    filters resolved). Precedence as in mergekit: a model's own ``parameters`` first, then the
    top-level ones (which thereby give a default for every model), then the method's default."""
    entries = {m.model: m.parameters for m in config.models}
    job = TensorJob(tensor, tuple(inputs.inputs), {m: tensor for m in inputs.inputs}, inputs.base,
                    layer_t(tensor, num_layers), {m: (entries.get(m) or {}, config.parameters) for m in inputs.inputs},
                    (config.parameters,))
    return job_params(method, job, inputs.inputs)


def job_params(method: MergeMethod, job: TensorJob, inputs: list[str]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Parameter values for one output tensor: per-model ones from the model's scopes (slice source
    > slice > top level), read against the model's own source tensor name; shared ones from the
    slice and top level, read against the output tensor name; then the method's default."""
    per_model: dict[str, list[float]] = {}
    for p, default in method.model_params.items():
        values = []
        for m in inputs:
            value = None
            for scope in job.model_scopes.get(m, ()):
                if p in scope:
                    value = evaluate_setting(scope[p], job.sources[m], job.t)
                    if value is not None:
                        break
            if value is None:
                if default is None:
                    raise MergeError(f"model '{m}' has no '{p}' for tensor {job.name}: set parameters.{p} "
                                     f"on the model or at the top level (method {method.name} requires it)")
                value = default
            values.append(float(value))
        if p == "density":
            for m, v in zip(inputs, values):
                if not 0.0 < v <= 1.0:
                    raise MergeError(f"density {v:g} for model '{m}' at tensor {job.name} is outside (0, 1]; "
                                     "density is the fraction of each task vector kept")
        per_model[p] = values
    glob = {}
    for p, default in method.global_params.items():
        value = None
        for scope in job.shared_scopes:
            if p in scope:
                value = evaluate_setting(scope[p], job.name, job.t)
                if value is not None:
                    break
        glob[p] = default if value is None else value
    return per_model, glob


def check_config(config: MergeConfig, sources: Sources) -> tuple[MergeMethod, MergeInputs]:
    """Raise MergeError for anything that would fail or silently mislead later."""
    method, inputs = check_recipe(config)
    _check_architectures(sources, config.model_names())
    if config.slices:
        for job in check_jobs(config, method, sources):
            job_params(method, job, job.inputs(method.takes_deltas(job.base is not None)))
        return method, inputs
    ref = config.base_model or inputs.inputs[0]
    aligned = config.tokenizer_settings()[0] is not None
    for name in _tensor_names(sources, config.model_names(), ref, aligned):
        tensor_params(config, method, inputs, name, sources.num_layers(ref))
    return method, inputs


def check_jobs(config: MergeConfig, method: MergeMethod, sources: Sources) -> list[TensorJob]:
    """The jobs of a ``slices:`` merge, after checking layer ranges and that every source tensor
    exists with one shape across the models merged into it."""
    num_layers = {m: sources.num_layers(m) for m in config.model_names()}
    for i, sl in enumerate(config.slices or []):
        for s in sl.sources:
            if s.layer_range[1] > num_layers[s.model]:
                n = num_layers[s.model]
                raise MergeError(f"slices[{i}]: layer_range {list(s.layer_range)} of '{s.model}' goes past its "
                                 f"{n} layers (ranges are [start, end), end <= {n})")
    jobs = plan_jobs(config, {m: list(sources.index[m]) for m in config.model_names()}, num_layers)
    for job in jobs:
        shapes = {}
        for m in job.order:
            info = sources.index[m].get(job.sources[m])
            if info is None:
                raise MergeError(f"'{m}' has no tensor {job.sources[m]} (needed for output {job.name})")
            shapes[m] = info.shape
        if len(set(shapes.values())) > 1:
            vocab = any(v in job.name for v in VOCAB_NAMES)
            if vocab and config.tokenizer_settings()[0] is not None and len({s[1:] for s in shapes.values()}) == 1:
                continue
            raise MergeError(f"output {job.name}: source tensors differ in shape {shapes}{VOCAB_HINT if vocab else ''}")
    return jobs


def _param_scopes(config: MergeConfig) -> list[tuple[str, dict, str | None]]:
    """Every place a parameter can be set: (where, settings, model when per-model only)."""
    out: list[tuple[str, dict, str | None]] = [("parameters", config.parameters, None)]
    out += [(f"models[{i}].parameters", m.parameters, m.model) for i, m in enumerate(config.models)]
    for i, sl in enumerate(config.slices or []):
        out.append((f"slices[{i}].parameters", sl.parameters, None))
        out += [(f"slices[{i}].sources[{j}].parameters", s.parameters, s.model) for j, s in enumerate(sl.sources)]
    return out


def check_recipe(config: MergeConfig) -> tuple[MergeMethod, MergeInputs]:
    """The checks that need no checkpoint: method, base, parameter names, model count."""
    try:
        method = get_method(config.merge_method)
    except ValueError as err:
        raise MergeError(str(err)) from None
    known = set(method.model_params) | set(method.global_params)
    for where, params, model in _param_scopes(config):
        for p in params:
            if p not in known:
                raise MergeError(f"{where}.{p}: '{method.name}' has no parameter '{p}'; "
                                 f"its parameters are {sorted(known)}")
            if model is not None and p in method.global_params and p not in method.model_params:
                raise MergeError(f"'{p}' is a global parameter of {method.name}; move it from the "
                                 f"parameters of model '{model}' to the top-level 'parameters:'")
    if config.slices:
        for i, sl in enumerate(config.slices):
            base = sl.base_model or config.base_model
            names = [s.model for s in sl.sources]
            if method.needs_base and not base:
                raise MergeError(f"merge_method '{method.name}' needs a base_model (the model the task vectors "
                                 f"are taken from); add 'base_model: PATH' (top level or in slices[{i}])")
            if base and method.inputs != "tensors" and base not in names:
                raise MergeError(f"slices[{i}]: base_model '{base}' is not among the slice's sources {names}; "
                                 f"add {{model: {base}, layer_range: [...]}} to its sources (mergekit requires it)")
            n = len([m for m in names if not (method.inputs != "tensors" and m == base)])
            check_count(method, n, f" in slices[{i}]")
        return method, MergeInputs(config.base_model, [])
    if method.needs_base and not config.base_model:
        raise MergeError(f"merge_method '{method.name}' needs a base_model (the model the task vectors "
                         "are taken from); add 'base_model: PATH'")
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


VOCAB_HINT = (" (vocabulary sizes differ: merge the tokenizers with 'tokenizer_source: union' (or base, or a "
              "model), or a 'tokenizer: {source: ...}' block, so rows are matched by token string)")


def _tensor_names(sources: Sources, names: list[str], ref: str, vocab_aligned: bool = False) -> list[str]:
    """The reference model's tensor names, after checking every model has them with one shape
    (vocabulary-indexed tensors excepted when a tokenizer merge aligns them: ``vocab_aligned``)."""
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
                vocab = any(v in t for v in VOCAB_NAMES)
                if vocab and vocab_aligned and idx[t].shape[1:] == info.shape[1:]:
                    continue
                hint = VOCAB_HINT if vocab else ""
                raise MergeError(f"tensor {t} has shape {idx[t].shape} in '{n}' but {info.shape} in "
                                 f"'{ref}'{hint}")
    return list(ref_index)
