"""The in-memory merge engine: sources resident, one preallocated model, no disk per candidate.

A search materializes thousands of candidates from the same few sources. The engine reads every
source once, keeps the base and the task vectors (source - base, stacked per tensor) on the chosen
device, and writes each candidate into one model that was allocated once. A candidate therefore
costs one pass of tensor arithmetic over resident memory: no loading, no allocation of a model, no
disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.checkpoint import TensorReader, resolve_model_path
from evomerge.merge.config import MergeConfig
from evomerge.merge.methods import FastRng, linear_from_deltas, merge_tensor
from evomerge.merge.plan import MergeError, Sources, _check_architectures, _tensor_names, check_recipe, tensor_params

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def tensor_seed(seed: int, tensor: str) -> int:
    """A seed per (candidate seed, tensor name): the same recipe always draws the same masks,
    whatever the order tensors are merged in or the device they are merged on."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{tensor}".encode()).digest()[:8], "little") >> 1


class MergeEngine:
    """Materialize merge recipes into one resident model.

    ``models`` maps the names recipes use to model folders (or hub ids); ``base`` names the one whose
    weights the task vectors are taken from (every recipe's ``base_model`` must be it).
    """

    def __init__(self, models: Mapping[str, str | Path], base: str, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, allow_pickle: bool = False):
        if base not in models:
            raise MergeError(f"base '{base}' is not among the models {sorted(models)}")
        self.base_name = base
        self.names = [base] + [n for n in models if n != base]
        self.others = self.names[1:]
        self.device = torch.device(device)
        self.sources = Sources.inspect(self.names, allow_pickle,
                                       paths={n: resolve_model_path(p) for n, p in models.items()})
        _check_architectures(self.sources, self.names)
        self.tensor_names = _tensor_names(self.sources, self.names, base)
        self.num_layers = self.sources.num_layers(base)
        dtype = as_dtype(dtype)
        self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            self.sources.paths[base], dtype=dtype).to(self.device).eval()
        self.dtype = dtype or next(self.model.parameters()).dtype
        self._targets = self._target_tensors()
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self._load(allow_pickle)

    def _target_tensors(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict(keep_vars=True)
        prefix = getattr(self.model, "base_model_prefix", "")
        out = {}
        for name in self.tensor_names:
            key = name if name in state else f"{prefix}.{name}"
            if key not in state:
                raise MergeError(f"checkpoint tensor {name} has no counterpart in "
                                 f"{type(self.model).__name__}")
            out[name] = state[key].data
        return out

    @torch.no_grad()
    def _load(self, allow_pickle: bool) -> None:
        readers = {n: TensorReader(self.sources.paths[n], allow_pickle) for n in self.names}
        for name in self.tensor_names:
            base = readers[self.base_name].get(name, self.device)
            self.base[name] = base.to(self.dtype) if base.is_floating_point() else base
            if not base.is_floating_point():
                continue
            stack = torch.empty((len(self.others), *base.shape), dtype=self.dtype, device=self.device)
            for i, n in enumerate(self.others):
                stack[i] = readers[n].get(name, self.device).float() - base.float()
            self.deltas[name] = stack

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.base, self.deltas) for t in d.values())

    @torch.no_grad()
    def materialize(self, recipe: MergeConfig) -> PreTrainedModel:
        """Write the merge described by ``recipe`` into the engine's model and return it."""
        if recipe.slices:
            raise MergeError("the in-memory engine merges 'models:' recipes into the base's architecture; a "
                             "'slices:' merge changes the layers: write it with `evomerge merge` (merge_to_disk)")
        method, inputs = check_recipe(recipe)
        if inputs.base is not None and inputs.base != self.base_name:
            raise MergeError(f"recipe base_model '{inputs.base}' is not the engine's base '{self.base_name}'")
        unknown = [m for m in inputs.inputs if m not in self.names]
        if unknown:
            raise MergeError(f"recipe names models {unknown} that the engine does not hold ({self.names})")
        deltas_in = method.takes_deltas(inputs.base is not None)
        if deltas_in:
            rows = [self.others.index(m) for m in inputs.inputs]
        else:  # linear & co: the base (if an input) is the reference; the others enter as deltas
            rows = [self.others.index(m) for m in inputs.inputs if m != self.base_name]
        whole = rows == list(range(len(self.others)))
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for name in self.tensor_names:
            target = self._targets[name]
            if name not in self.deltas:
                target.copy_(self.base[name])
                continue
            per_model, glob = tensor_params(recipe, method, inputs, name, self.num_layers)
            stack = self.deltas[name] if whole else self.deltas[name].index_select(0, index)
            if not deltas_in and method.name != "linear":  # karcher, passthrough, baseless (nu/multi)slerp
                full = [self.base[name] if m == self.base_name else None for m in inputs.inputs]
                it = iter(stack)
                tensors = torch.stack([f if f is not None else (self.base[name].float() + next(it).float())
                                       .to(self.dtype) for f in full])
                base = self.base[name] if inputs.base is not None else None
                merge_tensor(method, base, tensors, per_model, glob, None, out=target)
            elif deltas_in:
                gen = None
                if method.randomized:
                    gen = FastRng(tensor_seed(recipe.evomerge.seed, name), self.device)
                merge_tensor(method, self.base[name], stack, per_model, glob, gen, out=target)
            else:
                w = dict(zip(inputs.inputs, per_model["weight"]))
                linear_from_deltas(self.base[name], stack, w.get(self.base_name, 0.0),
                                   [w[m] for m in inputs.inputs if m != self.base_name],
                                   bool(glob["normalize"]), out=target)
        return self.model
