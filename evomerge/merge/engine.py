"""The in-memory merge engine: sources resident, one preallocated model, no disk per candidate.

A search materializes thousands of candidates from the same few sources. The engine reads every
source once, keeps the base and the task vectors (source - base, stacked per tensor) where its
residency policy says (:mod:`evomerge.merge.residency`: on the device, in host memory streamed to the
device, or in a memory-mapped delta cache on disk shared by the node's workers), and writes each
candidate into one model that was allocated once. A candidate therefore costs one pass of tensor
arithmetic over the held inputs: no loading, no allocation of a model. Every policy feeds the same
per-tensor call into ``merge_tensor`` with the same values, so a recipe gives the same bits under all.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from evomerge.checkpoint import TensorReader, note_weights_loading, resolve_model_path
from evomerge.merge.config import MergeConfig
from evomerge.merge.delta_cache import DeltaCache, open_cache, task_vectors
from evomerge.merge.methods import FastRng, linear_from_deltas, merge_tensor
from evomerge.merge.plan import MergeError, Sources, _check_architectures, _tensor_names, check_recipe, tensor_params
from evomerge.merge.residency import Footprint, MemorySettings, choose_policy, process_memory
from evomerge.merge.sharing import share_model

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
    weights the task vectors are taken from (every recipe's ``base_model`` must be it). ``memory``
    (a policy name, a mapping of :class:`MemorySettings` fields, or one) says where the base and the
    task vectors are held; the choice is checked against the budget before any weight is read.
    """

    def __init__(self, models: Mapping[str, str | Path], base: str, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, allow_pickle: bool = False,
                 memory: MemorySettings | Mapping[str, Any] | str | None = None,
                 on_cache_tensor: Callable[[str], None] | None = None, hold_model: bool = True):
        if base not in models:
            raise MergeError(f"base '{base}' is not among the models {sorted(models)}")
        self.base_name = base
        self.names = [base] + [n for n in models if n != base]
        self.others = self.names[1:]
        self.device = torch.device(device)
        self.settings = MemorySettings.of(memory)
        self.sources = Sources.inspect(self.names, allow_pickle,
                                       paths={n: resolve_model_path(p) for n, p in models.items()})
        _check_architectures(self.sources, self.names)
        self.tensor_names = _tensor_names(self.sources, self.names, base)
        self.num_layers = self.sources.num_layers(base)
        self.dtype = as_dtype(dtype) or _checkpoint_dtype(self.sources.configs[base], self.sources.index[base])
        self.delta_dtype = as_dtype(self.settings.delta_dtype) or self.dtype
        index = self.sources.index[base]
        floating = {n for n in self.tensor_names if _is_float(index[n].dtype)}
        self.footprint = Footprint.of({n: index[n].shape for n in self.tensor_names}, floating, len(self.others),
                                      _elem(self.dtype), _elem(self.delta_dtype))
        self.choice = choose_policy(self.settings, self.footprint, self.device)  # before any weight is read
        self.policy = self.choice.policy
        # the inputs stay where the policy says; on a CPU every policy merges from them in place
        self._home = self.device if self.policy == "device" else torch.device("cpu")
        self._stream = self._home.type != self.device.type
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.cache: DeltaCache | None = None
        if self.policy == "disk":
            self.cache = open_cache(self.settings.cache_root, base, self.others, self.sources.paths,
                                    self.tensor_names, self.dtype, self.delta_dtype,
                                    self.footprint.shared_bytes("disk"), allow_pickle, on_cache_tensor)
        else:
            self._load(allow_pickle)
        # without hold_model (an evaluation backend that keeps its own weights: vLLM) the model is built
        # only if something asks for it (materialize, source_model)
        self._targets: dict[str, torch.Tensor] = {}
        self.model: PreTrainedModel | None = self._new_model() if hold_model else None
        self._staging: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._peak_transient = 0

    def _new_model(self) -> PreTrainedModel:
        """The model candidates are written into (its weights start as the base's)."""
        note_weights_loading(f"model {self.sources.paths[self.base_name]}")
        loaded = AutoModelForCausalLM.from_pretrained(self.sources.paths[self.base_name], dtype=self.dtype)
        model: PreTrainedModel = loaded.to(self.device).eval()  # type: ignore[arg-type]
        self._targets = self._target_tensors(model)
        return model

    def _target_tensors(self, model: PreTrainedModel) -> dict[str, torch.Tensor]:
        state = model.state_dict(keep_vars=True)
        prefix = getattr(model, "base_model_prefix", "")
        out = {}
        for name in self.tensor_names:
            key = name if name in state else f"{prefix}.{name}"
            if key not in state:
                raise MergeError(f"checkpoint tensor {name} has no counterpart in "
                                 f"{type(model).__name__}")
            out[name] = state[key].data
        return out

    @torch.no_grad()
    def _load(self, allow_pickle: bool) -> None:
        readers = {n: TensorReader(self.sources.paths[n], allow_pickle) for n in self.names}
        pin = self.policy == "host" and self.device.type == "cuda"
        for name in self.tensor_names:
            base, stack = task_vectors(readers, self.base_name, self.others, name, self.dtype, self.delta_dtype,
                                       self._home)
            self.base[name] = base.pin_memory() if pin else base
            if stack is not None:
                self.deltas[name] = stack.pin_memory() if pin else stack

    def _held(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One tensor's base and task-vector stack where the policy holds them."""
        if self.cache is not None:
            return self.cache.inputs(name)
        return self.base[name], self.deltas.get(name)

    def _inputs(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, base, stack) on the merge device, tensor by tensor. Held elsewhere (host / disk on
        a GPU), tensor i + 1 is copied on a side stream into one of two staging slots while tensor i
        is merged on the compute stream (double buffering); events order slot reuse."""
        if not self._stream:
            for name in self.tensor_names:
                yield (name, *self._held(name))
            return
        if not self._staging:
            self._staging = [self._staging_slot() for _ in range(2)]
        copier = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        free = [torch.cuda.Event(), torch.cuda.Event()]
        ready = [torch.cuda.Event(), torch.cuda.Event()]
        names = self.tensor_names

        def issue(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            base, stack = self._held(names[i])
            if stack is None:  # integer buffers: tiny, copied in order
                return base.to(self.device), None
            slot_base, slot_stack = self._staging[i % 2]
            b = slot_base[: base.numel()].view(base.shape)
            s = slot_stack[: stack.numel()].view(stack.shape)
            with torch.cuda.stream(copier):
                copier.wait_event(free[i % 2])
                b.copy_(base, non_blocking=True)
                s.copy_(stack, non_blocking=True)
                ready[i % 2].record(copier)
            return b, s

        pending = issue(0)
        for i, name in enumerate(names):
            current = pending
            if i + 1 < len(names):
                pending = issue(i + 1)
            compute.wait_event(ready[i % 2])
            yield (name, *current)
            free[i % 2].record(compute)
        compute.wait_stream(copier)

    def _staging_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.sources.index[self.base_name]
        largest = max((math.prod(index[n].shape) for n in self.tensor_names if _is_float(index[n].dtype)),
                      default=0)
        return (torch.empty(largest, dtype=self.dtype, device=self.device),
                torch.empty(largest * len(self.others), dtype=self.delta_dtype, device=self.device))

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base's tensor ``name`` as the engine holds it (on the CPU under every policy but device)."""
        return self._held(name)[0]

    def resident_bytes(self) -> int:
        """Bytes of the base and the task vectors held (wherever the policy holds them)."""
        if self.cache is not None:
            return self.cache.nbytes
        return sum(t.numel() * t.element_size() for d in (self.base, self.deltas) for t in d.values())

    def memory_info(self) -> dict[str, Any]:
        """The policy, why it was chosen, and the bytes this engine holds on the device, in private
        host memory and in page cache shared with the node's other workers, with the peaks."""
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
        model = nbytes({t.data_ptr(): t for t in self._targets.values()}.values())
        held = self.resident_bytes() if self.cache is None else 0
        staging = nbytes([t for slot in self._staging for t in slot])
        on_device = model + staging + (held if self._home == self.device else 0)
        host = held if self._home != self.device else 0
        info: dict[str, Any] = {
            "policy": self.policy, "reason": self.choice.reason, "budget_bytes": self.choice.budget_bytes,
            "dtype": str(self.dtype).replace("torch.", ""),
            "delta_dtype": str(self.delta_dtype).replace("torch.", ""),
            "device_bytes": on_device, "host_bytes": host,
            "shared_bytes": self.cache.nbytes if self.cache is not None else 0,
            "peak_device_bytes": on_device + self._peak_transient,
            "cache": str(self.cache.folder) if self.cache is not None else None,
        }
        if self.device.type == "cuda":
            info["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        info.update(process_memory())
        return info

    def detach_model(self) -> PreTrainedModel:
        """Hand the current candidate over (e.g. a PS merge joining a DFS pool) without copying it;
        the engine allocates a fresh model only if it is asked to materialize again."""
        model = self.model if self.model is not None else self._new_model()
        self.model, self._targets = None, {}  # keep no reference: the new owner decides its lifetime
        return model

    @torch.no_grad()
    def source_model(self, name: str, template: PreTrainedModel | None = None) -> PreTrainedModel:
        """Source ``name`` as a frozen model (a DFS pool member) that shares memory already held
        instead of loading a copy: the base's weights are the engine's own inputs where they sit on
        the merge device (any policy on a CPU, ``device`` on a GPU); another source on a CPU maps
        its checkpoint in place (page cache, shared with the node's workers) when its dtype is the
        model's. Only what cannot be shared (a GPU copy, a dtype conversion) is allocated.
        ``template`` gives the module structure when the engine's own model was handed away."""
        template = self.model if self.model is not None else template
        if template is None:
            template = self.model = self._new_model()  # nothing to copy the structure from: allocate
        if name == self.base_name and self._home == self.device:
            tensors = {n: self._held(n)[0] for n in self.tensor_names}
        else:
            reader = TensorReader(self.sources.paths[name], allow_pickle=True)  # headers were checked already
            tensors = {}
            for n in self.tensor_names:
                t = reader.get(n)
                tensors[n] = t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)
        keys = self._state_keys(template)
        return share_model(template, {keys[n]: t for n, t in tensors.items()}).eval()

    def _state_keys(self, model: torch.nn.Module) -> dict[str, str]:
        state = model.state_dict(keep_vars=True)
        prefix = getattr(model, "base_model_prefix", "")
        return {n: n if n in state else f"{prefix}.{n}" for n in self.tensor_names}

    @torch.no_grad()
    def materialize(self, recipe: MergeConfig) -> PreTrainedModel:
        """Write the merge described by ``recipe`` into the engine's model and return it."""
        model = self.model if self.model is not None else self._new_model()
        self.model = model
        for _ in self._merged(recipe, lambda name, base: self._targets[name]):
            pass
        return model

    def stream(self, recipe: MergeConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """The merge of ``recipe`` tensor by tensor, as (checkpoint name, tensor), without the model.

        Each tensor is written into a buffer of its own that the consumer copies and drops before
        asking for the next (a vLLM engine's weight reload): the worker then holds one merged tensor
        at a time, not a second full candidate. The values are ``materialize``'s, bit for bit.
        """
        return self._merged(recipe, lambda name, base: torch.empty_like(base))

    @torch.no_grad()
    def _merged(self, recipe: MergeConfig,
                out: Callable[[str, torch.Tensor], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Merge tensor by tensor into ``out(name, base)``, yielding each (name, tensor) once written."""
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
        for name, base, deltas in self._inputs():
            target = out(name, base)
            if deltas is None:
                target.copy_(base)
                yield name, target
                continue
            per_model, glob = tensor_params(recipe, method, inputs, name, self.num_layers)
            stack = deltas if whole else deltas.index_select(0, index)
            if not whole:
                self._peak_transient = max(self._peak_transient, stack.numel() * stack.element_size())
            if not deltas_in and method.name != "linear":  # karcher, passthrough, baseless (nu/multi)slerp
                full = [base if m == self.base_name else None for m in inputs.inputs]
                it = iter(stack)
                tensors = torch.stack([f if f is not None else (base.float() + next(it).float()).to(self.dtype)
                                       for f in full])
                self._peak_transient = max(self._peak_transient, tensors.numel() * tensors.element_size())
                merge_tensor(method, base if inputs.base is not None else None, tensors, per_model, glob, None,
                             out=target)
            elif deltas_in:
                gen = None
                if method.randomized:
                    gen = FastRng(tensor_seed(recipe.evomerge.seed, name), self.device)
                merge_tensor(method, base, stack, per_model, glob, gen, out=target)
            else:
                w = dict(zip(inputs.inputs, per_model["weight"]))
                linear_from_deltas(base, stack, w.get(self.base_name, 0.0),
                                   [w[m] for m in inputs.inputs if m != self.base_name],
                                   bool(glob["normalize"]), out=target)
            yield name, target


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _checkpoint_dtype(config: Mapping[str, Any], index: Mapping[str, Any]) -> torch.dtype:
    """The dtype ``from_pretrained`` gives the model when none is asked for: the config's, else the
    first floating tensor's."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    for info in index.values():
        if _is_float(info.dtype):
            return HEADER_DTYPES.get(info.dtype.upper(), torch.float32)
    return torch.float32


HEADER_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _is_float(header_dtype: str) -> bool:
    """A safetensors header dtype (F32, BF16, F8_E4M3, ...) or a pickled one (torch.float32)."""
    d = header_dtype.upper()
    return d.startswith(("F", "BF")) or "FLOAT" in d
