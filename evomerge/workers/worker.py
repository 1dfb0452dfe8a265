"""A merge worker: owns one device, keeps the sources resident, turns recipes into item responses.

It receives recipes (small), never weights. The same class runs in-process (one worker, the
default on a laptop) and inside a Ray actor (``evomerge.workers.ray_pool``); it never writes to the run
store: it returns results and the driver records them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedModel

from evomerge.evaluate.base import EvalContext, ItemResponses
from evomerge.evaluate.registry import make_evaluator, run_fitness
from evomerge.evaluate.vllm_engine import VllmModel, VllmSettings, resolve_backend
from evomerge.merge.config import MergeConfig
from evomerge.merge.dfs_export import dfs_tensors
from evomerge.merge.dfs_model import build_dfs_model
from evomerge.merge.dfs_slots import identity_layer, layer_prefix, padded, slot_folder
from evomerge.merge.engine import MergeEngine, as_dtype
from evomerge.recipe import Recipe


@dataclass
class CandidateResult:
    """What one evaluation produced. ``objectives`` are the raw means over the items evaluated (or a
    custom function's values); the driver's estimator turns responses into benchmark estimates."""

    objectives: dict[str, float] = field(default_factory=dict)
    responses: list[ItemResponses] = field(default_factory=list)
    merge_seconds: float = 0.0
    push_seconds: float = 0.0  # weights into the vLLM engine (the merge streams into it: merge excluded)
    eval_seconds: float = 0.0
    worker: str = ""
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Worker:
    """Sources resident on one device; ``evaluate(recipe)`` merges in memory and scores.

    ``benchmarks`` maps a set name ("fitness", "test") to objective name -> evaluator spec.
    """

    def __init__(self, models: Mapping[str, str | Path], base: str, benchmarks: Mapping[str, Mapping[str, dict]],
                 base_dir: str | Path | None = None, device: str = "auto", dtype: str | None = None,
                 allow_pickle: bool = False, threads: int | None = None, name: str | None = None,
                 memory: Mapping[str, Any] | str | None = None, evaluation: Mapping[str, Any] | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{self.device}"
        self.backend = resolve_backend((evaluation or {}).get("backend", "hf"))
        # the engine resolves each model once (a hub id is fetched there): read paths and dtype from it;
        # with vLLM the candidate lives in the vLLM engine, so the merge engine holds no model of its own
        self.engine = MergeEngine(models, base, self.device, as_dtype(dtype), allow_pickle, memory=memory,
                                  hold_model=self.backend == "hf")
        self.tokenizer = AutoTokenizer.from_pretrained(self.engine.sources.paths[base])
        self.evaluators = {s: {n: make_evaluator(spec, base_dir) for n, spec in specs.items()}
                           for s, specs in benchmarks.items()}
        self._pool: dict[str, PreTrainedModel] = {}
        self._recipe: Recipe | None = None  # the candidate in the vLLM engine (for hf_model on demand)
        self.vllm: VllmModel | None = None
        if self.backend == "vllm":
            settings = VllmSettings(**{"dtype": None, **(evaluation or {}).get("vllm", {})})
            if threads and self.device.type == "cpu" and settings.cpu_threads_bind is None:
                # a Ray actor given `threads` CPUs: vLLM's own binding would pin every engine on the node
                # to the same cores; unbound, its OpenMP threads follow OMP_NUM_THREADS like the merge's
                settings.cpu_threads_bind = "nobind"
            self._vllm_settings = settings
            self._dfs_slots = (evaluation or {}).get("dfs_slots")
            self._slots = self.engine.num_layers  # layers of the running engine
            self._slot_dir: tempfile.TemporaryDirectory[str] | None = None
            self._identity_layer: tuple[str, dict[str, torch.Tensor]] | None = None
            self.vllm = self._start_vllm(self.engine.sources.paths[base])

    def _start_vllm(self, folder: str | Path, **extra: Any) -> VllmModel:
        settings = self._vllm_settings
        if extra:
            settings = dataclasses.replace(settings, extra={**settings.extra, **extra})
        return VllmModel(folder, as_dtype(settings.dtype) or self.engine.dtype, settings, self.device,
                         hf_model=self._hf_candidate)

    def set_pool_member(self, name: str, merge: MergeConfig | None = None) -> None:
        """Make ``name`` available to layer plans: a source (sharing what the engine holds, see
        ``MergeEngine.source_model``) or a PS merge (the engine's model itself after materializing
        ``merge``, handed over: held once, not copied)."""
        if merge is not None:
            self.engine.materialize(merge)
            self._pool[name] = self.engine.detach_model().eval()
        elif name not in self._pool:
            self._pool[name] = self.engine.source_model(name, next(iter(self._pool.values()), None))

    def _hf_candidate(self) -> torch.nn.Module:
        """The vLLM engine's current candidate as a transformers model (a custom function asked)."""
        if self._recipe is None:
            raise RuntimeError("no candidate has been loaded yet")
        return self._model(self._recipe)

    def _deepen(self, layers: int) -> None:
        """Make the vLLM engine hold at least ``layers`` layer slots (a layer plan longer than the host):
        restart it once with ``dfs_slots`` slots (default twice the host's depth) from dummy weights;
        every candidate after that fills them, unused slots as identity layers."""
        if layers <= self._slots:
            return
        assert self.vllm is not None
        depth = max(layers, int(self._dfs_slots or 2 * self.engine.num_layers))
        self.vllm.close()
        self._slot_dir = tempfile.TemporaryDirectory(prefix="evomerge-slots-")
        folder = slot_folder(self.engine.sources.paths[self.engine.base_name], depth, self._slot_dir.name)
        self.vllm = self._start_vllm(folder, load_format="dummy")
        self._slots = depth

    def _identity(self) -> tuple[str, dict[str, torch.Tensor]]:
        """The layer prefix and an identity layer (the base's layer 0, residual writes zero), built once."""
        if self._identity_layer is None:
            prefix = layer_prefix(self.engine.tensor_names)
            layer0 = {n[len(prefix) + 2:]: self.engine.base_tensor(n) for n in self.engine.tensor_names
                      if n.startswith(prefix + "0.")}
            self._identity_layer = (prefix, identity_layer(layer0))
        return self._identity_layer

    def _load_vllm(self, recipe: Recipe, result: CandidateResult) -> VllmModel:
        """Stream the candidate into the vLLM engine, timing the merge and the push apart: a PS merge
        tensor by tensor from the merge engine, a layer plan in its folded (exported) form."""
        tensors: Iterator[tuple[str, torch.Tensor]]
        if recipe.plan is not None:
            for member in recipe.plan.members():
                if member not in self._pool:
                    self.set_pool_member(member)
            self._deepen(len(recipe.plan))
            tensors, used = dfs_tensors(recipe.plan, self._pool), len(recipe.plan)
        elif recipe.merge is not None:
            tensors, used = self.engine.stream(recipe.merge), self.engine.num_layers
        else:
            raise ValueError("a recipe needs a merge config, a layer plan, or both")
        if used < self._slots:
            prefix, identity = self._identity()
            tensors = padded(tensors, used, self._slots, prefix, identity)
        merging = [0.0]

        def timed(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            while True:
                t = time.perf_counter()
                item = next(tensors, None)
                merging[0] += time.perf_counter() - t
                if item is None:
                    return
                yield item

        t0 = time.perf_counter()
        self._recipe = recipe
        assert self.vllm is not None
        self.vllm.load(timed(tensors))
        result.merge_seconds = merging[0]
        result.push_seconds = time.perf_counter() - t0 - merging[0]
        return self.vllm

    def _model(self, recipe: Recipe) -> torch.nn.Module:
        if recipe.plan is not None:
            for member in recipe.plan.members():
                if member not in self._pool:
                    self.set_pool_member(member)
            return build_dfs_model(recipe.plan, self._pool)
        if recipe.merge is None:
            raise ValueError("a recipe needs a merge config, a layer plan, or both")
        return self.engine.materialize(recipe.merge)

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, recipe: Recipe, item_ids: Mapping[str, Optional[list[str]]] | None = None,
                 which: str = "fitness", seed: int = 0, benchmarks: Optional[Sequence[str]] = None) -> CandidateResult:
        """Merge and score on benchmark set ``which``; ``item_ids[name]`` selects items (None: all);
        ``benchmarks`` restricts which benchmarks run (None: all of the set).

        A failure anywhere (merge, evaluation, a custom function) becomes a failed result carrying
        the error, so the search records it and goes on.
        """
        result = CandidateResult(worker=self.name)
        try:
            t0 = time.perf_counter()
            model: torch.nn.Module | VllmModel
            if self.vllm is not None:
                model = self._load_vllm(recipe, result)
            else:
                model = self._model(recipe)
                result.merge_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            for name, evaluator in self.evaluators[which].items():
                if benchmarks is not None and name not in benchmarks:
                    continue
                ids = (item_ids or {}).get(name)
                ctx = EvalContext(device=self.device, item_ids=ids, seed=seed)
                fit = run_fitness(evaluator, model, self.tokenizer, ctx)
                if not fit.ok:
                    result.error = f"{name}: {fit.error}\n{fit.traceback or ''}".strip()
                    break
                if len(fit.objectives) == 1 and fit.responses:
                    result.objectives[name] = next(iter(fit.objectives.values()))
                else:
                    result.objectives.update(fit.objectives)
                result.responses += fit.responses
            result.eval_seconds = time.perf_counter() - t1
        except Exception as err:  # noqa: BLE001 - recorded as a failed candidate, not a crash
            result.error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}"
        return result

    def item_ids(self, which: str = "fitness") -> dict[str, list[str] | None]:
        """Every item of each benchmark (None for custom functions, which choose their own)."""
        return {n: (e.item_ids() if hasattr(e, "item_ids") else None) for n, e in self.evaluators[which].items()}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "device": str(self.device), "resident_bytes": self.engine.resident_bytes(),
                "tensors": self.engine.tensor_names, "num_layers": self.engine.num_layers,
                "memory": self.engine.memory_info(), "backend": self.backend,
                "vllm": None if self.vllm is None else {
                    "kv_cache_bytes": self.vllm.kv_cache_bytes, "slots": self._slots,
                    "max_model_len": self.vllm.max_model_len}}

