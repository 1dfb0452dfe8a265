"""Any lm-evaluation-harness task, scored per item on a model held in memory.

lm-eval is where real benchmarks live (YAML tasks, prompts, filters, metrics). This adapter runs a
task in-process on the candidate model object (``HFLM(pretrained=model)``: no checkpoint written, no
CLI start-up), asks only for the items the estimator wants (``samples=``), and reads one score per
item from the logged samples.

What is done once per benchmark, not per candidate: the task index, reading the task's YAML,
loading its dataset, and applying the evaluation arguments (``num_fewshot``, ``gen_kwargs``) to the
task. A candidate then costs one ``lm_eval.evaluator.evaluate`` call. We call ``evaluate`` rather
than ``simple_evaluate``: the latter re-applies the same arguments and then collects environment
information (``torch.utils.collect_env`` runs subprocesses, ``git describe``), about half a second
per call that a search would pay on every candidate.

Task YAMLs can name data files as ``zoo:<skill>/<split>`` (resolved in the zoo's cache) or by a path
relative to the YAML's folder; both are rewritten to absolute paths before lm-eval sees them.

Item ids: the document's ``id_field`` when it has one (the zoo's items do, so ids match the built-in
evaluator's), else the document's index in the task's evaluation split. When the benchmark spans
several lm-eval tasks (a list, or a group), ids are prefixed ``<task>/``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from evomerge.evaluate.base import EvalContext, ItemResponses
from evomerge.evaluate.builtin import check_device, select_ids
from evomerge.evaluate.vllm_engine import VllmModel
from evomerge.refs import resolve_items_ref


class LmEvalBenchmark:
    """One or more lm-eval tasks as one benchmark (the Evaluator protocol).

    ``metric`` picks the per-item score (default: the task's first metric; it must be a number in
    [0, 1] per item, as acc, acc_norm and exact_match are), ``filter`` the filter pipeline whose
    output is scored (default: the task's first). ``hflm_kwargs`` go to ``HFLM`` (e.g.
    ``max_length``, ``add_bos_token``); ``task_overrides`` are merged over each task's YAML config.
    """

    def __init__(self, task: str | Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None,
                 name: str | None = None, metric: str | None = None, filter: str | None = None,
                 num_fewshot: int | None = None, gen_kwargs: dict[str, Any] | str | None = None,
                 apply_chat_template: bool | str = False, fewshot_as_multiturn: bool = False,
                 system_instruction: str | None = None, batch_size: int | str = 64, id_field: str | None = "id",
                 fewshot_seed: int = 1234, task_overrides: dict[str, Any] | None = None,
                 hflm_kwargs: dict[str, Any] | None = None, verbose: bool = False):
        tasks = [task] if isinstance(task, str) else list(task)
        if not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"task must be an lm-eval task name or a list of them, got {task!r}")
        paths = ([] if include_path is None else [include_path] if isinstance(include_path, (str, Path))
                 else list(include_path))
        self.include_paths = [Path(p).expanduser().resolve() for p in paths]
        for p in self.include_paths:
            if not p.is_dir():
                raise FileNotFoundError(f"include_path '{p}' is not a folder of lm-eval task YAMLs")
        if "device" in (hflm_kwargs or {}) or "pretrained" in (hflm_kwargs or {}):
            raise ValueError("hflm_kwargs must not set 'device' or 'pretrained': the model object and "
                             "EvalContext.device are passed by the adapter")
        if num_fewshot is not None and num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
        self.tasks = tasks
        self.name = name or "+".join(tasks)
        self.metric = metric
        self.filter = filter
        self.num_fewshot = num_fewshot
        self.gen_kwargs = gen_kwargs
        self.apply_chat_template = apply_chat_template
        self.fewshot_as_multiturn = fewshot_as_multiturn
        self.system_instruction = system_instruction
        self.batch_size = batch_size
        self.id_field = id_field
        self.fewshot_seed = fewshot_seed
        self.task_overrides = dict(task_overrides or {})
        self.hflm_kwargs = dict(hflm_kwargs or {})
        self.verbose = verbose
        self._loaded: dict | None = None  # lm-eval's task dict, loaded on first use
        self._index: dict[str, tuple[str, int]] | None = None  # item id -> (task name, doc index)

    # ---------------------------------------------------------------- loading (once per benchmark)

    def __getstate__(self) -> dict:
        """Ship the settings, not the loaded datasets: a Ray worker loads its own copy."""
        state = self.__dict__.copy()
        state["_loaded"] = state["_index"] = None
        return state

    def _task_dict(self) -> dict:
        if self._loaded is None:
            with _quiet(self.verbose):
                self._loaded = self._load()
            self._index = self._build_index(self._loaded["tasks"])
        return self._loaded

    def _load(self) -> dict:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=self.include_paths or None, include_defaults=False)
        if not all(t in manager.all_tasks for t in self.tasks):
            manager = TaskManager(include_path=self.include_paths or None)  # lm-eval's own tasks (~6 s)
        missing = [t for t in self.tasks if t not in manager.all_tasks]
        if missing:
            where = f" or in {[str(p) for p in self.include_paths]}" if self.include_paths else ""
            raise KeyError(f"lm-eval has no task {missing} among its tasks{where}; check the name, or "
                           f"set include_path to the folder of your task YAMLs")
        specs = [self._task_spec(manager, t) for t in self.tasks]
        loaded = manager.load(specs)
        for task in loaded["tasks"].values():
            self._configure(task)
        return loaded

    def _task_spec(self, manager, name: str) -> str | dict:
        """A YAML task becomes its config dict with data files resolved; groups pass by name."""
        entry = manager.task_index[name]
        if entry.yaml_path is None or getattr(entry.kind, "name", None) != "TASK":
            if self.task_overrides:
                raise ValueError(f"task_overrides apply to YAML tasks; '{name}' is a group, tag or Python task")
            return name
        cfg = _load_yaml(entry.yaml_path)
        cfg.update(copy.deepcopy(self.task_overrides))
        kwargs = cfg.get("dataset_kwargs") or {}
        if "data_files" in kwargs:
            cfg["dataset_kwargs"] = {**kwargs, "data_files": resolve_data_files(kwargs["data_files"],
                                                                                  Path(entry.yaml_path).parent)}
        return cfg

    def _configure(self, task) -> None:
        """What ``simple_evaluate`` does to each task, done once here."""
        if self.gen_kwargs and task.get_config("output_type") == "generate_until":
            gen = self.gen_kwargs
            if isinstance(gen, str):
                from lm_eval.utils import simple_parse_args_string

                gen = simple_parse_args_string(gen)
            task.set_config(key="generation_kwargs", value=dict(gen), update=True)
        if self.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=self.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=self.fewshot_seed)

    def _build_index(self, tasks: dict) -> dict[str, tuple[str, int]]:
        prefix = len(tasks) > 1
        index: dict[str, tuple[str, int]] = {}
        for task_name, task in tasks.items():
            for i, doc in enumerate(task.eval_docs):
                has_id = self.id_field and isinstance(doc, dict) and self.id_field in doc
                key = str(doc[self.id_field]) if has_id else str(i)
                item_id = f"{task_name}/{key}" if prefix else key
                if item_id in index:
                    raise ValueError(f"lm-eval task '{task_name}': item id '{item_id}' occurs twice; set id_field "
                                     f"to a unique document field, or id_field=None to use document indices")
                index[item_id] = (task_name, i)
        if not index:
            raise ValueError(f"benchmark '{self.name}': the lm-eval tasks {self.tasks} have no documents")
        return index

    # ------------------------------------------------------------------------- the Evaluator API

    def _items(self) -> dict[str, tuple[str, int]]:
        """Item id -> (task name, doc index), the tasks loaded on first use."""
        self._task_dict()
        assert self._index is not None
        return self._index

    def item_ids(self) -> list[str]:
        return list(self._items())

    def evaluate(self, model: torch.nn.Module | VllmModel, tokenizer: Any, ctx: EvalContext) -> ItemResponses:
        from lm_eval.evaluator import evaluate

        loaded = self._task_dict()
        device = model.device if isinstance(model, VllmModel) else check_device(model, ctx.device)
        ids = select_ids(list(self._items()), ctx.item_ids, self.name)
        if not ids:
            return ItemResponses(self.name, [], np.zeros(0))
        wanted: dict[str, list[int]] = {}
        for item_id in ids:
            task_name, doc = self._items()[item_id]
            wanted.setdefault(task_name, []).append(doc)
        # lm-eval maps logged doc ids back through the list given, which it assumes sorted.
        samples = {t: sorted(docs) for t, docs in wanted.items()}
        # Only the tasks with selected items (an empty selection would mean "all" to lm-eval), and no
        # groups: scores are read per item, and a group missing unselected children cannot aggregate.
        task_dict = {"tasks": {t: loaded["tasks"][t] for t in samples}, "groups": {}, "group_map": {}}
        with _quiet(self.verbose):
            lm = self._lm(model, tokenizer, device)
            results = evaluate(lm=lm, task_dict=task_dict, samples=samples, log_samples=True, bootstrap_iters=0,
                               apply_chat_template=self.apply_chat_template,
                               fewshot_as_multiturn=self.fewshot_as_multiturn,
                               system_instruction=self.system_instruction)
        by_doc = {t: self._item_scores(t, results["samples"][t], set(docs)) for t, docs in samples.items()}
        scores = [by_doc[task][doc] for task, doc in (self._items()[i] for i in ids)]
        return ItemResponses(self.name, ids, np.asarray(scores, dtype=np.float64))

    def _lm(self, model: torch.nn.Module | VllmModel, tokenizer: Any, device: torch.device) -> Any:
        """lm-eval's model over the candidate: ``HFLM`` on the transformers model, or
        :class:`~evomerge.evaluate.lm_eval_engine.EngineLM` on the worker's resident vLLM engine
        (which takes ``max_length``, ``max_gen_toks`` and ``add_bos_token`` of ``hflm_kwargs``)."""
        if isinstance(model, VllmModel):
            from evomerge.evaluate.lm_eval_engine import EngineLM

            unused = sorted(set(self.hflm_kwargs) - {"max_length", "max_gen_toks", "add_bos_token"})
            if unused:
                raise ValueError(f"benchmark '{self.name}': hflm_kwargs {unused} apply to the HF backend only; "
                                 f"the vLLM backend takes max_length, max_gen_toks and add_bos_token")
            return EngineLM(model, tokenizer, **self.hflm_kwargs)
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=str(device),
                    **self.hflm_kwargs)

    def _item_scores(self, task_name: str, logged: list[dict], expected: set[int]) -> dict[int, float]:
        """doc index -> score, from the logged samples of one filter, checked item by item."""
        filters = list(dict.fromkeys(s["filter"] for s in logged))
        chosen = self.filter or filters[0]
        if chosen not in filters:
            raise KeyError(f"lm-eval task '{task_name}' has no filter '{chosen}'; its filters are {filters}")
        rows = [s for s in logged if s["filter"] == chosen]
        metrics = rows[0]["metrics"]
        metric = self.metric or metrics[0]
        if metric not in metrics:
            raise KeyError(f"lm-eval task '{task_name}' reports no per-item metric '{metric}'; it reports {metrics}")
        out: dict[int, float] = {}
        for s in rows:
            value = s[metric]
            if isinstance(value, (bool, np.bool_)):
                value = float(value)
            if not isinstance(value, (int, float, np.number)) or not 0.0 <= float(value) <= 1.0 or math.isnan(value):
                raise ValueError(f"lm-eval task '{task_name}', doc {s['doc_id']}: metric '{metric}' gave {value!r}, "
                                 f"not a score in [0, 1]; choose a per-item metric such as acc or exact_match")
            out[int(s["doc_id"])] = float(value)
        if set(out) != expected:
            raise RuntimeError(f"lm-eval task '{task_name}' logged docs {sorted(set(out) ^ expected)[:5]} that differ "
                               f"from the {len(expected)} asked for")
        return out


def resolve_data_files(data_files: Any, yaml_dir: Path) -> Any:
    """``zoo:<skill>/<split>`` -> the zoo's file; a relative path that exists next to the YAML -> absolute.

    Anything else (absolute paths, globs, URLs, hub files) is left for ``datasets`` to interpret.
    """
    if isinstance(data_files, dict):
        return {k: resolve_data_files(v, yaml_dir) for k, v in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [resolve_data_files(v, yaml_dir) for v in data_files]
    if isinstance(data_files, str):
        if data_files.startswith("zoo:"):
            return str(resolve_items_ref(data_files))
        local = yaml_dir / data_files
        if not Path(data_files).is_absolute() and local.exists():
            return str(local.resolve())
    return data_files


def _load_yaml(path: str | Path) -> dict:
    """A task YAML with its ``include``s merged and ``!function`` tags resolved, as lm-eval reads it."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # lm-eval < 0.4.10 kept it in utils
        from lm_eval.utils import load_yaml_config

        return load_yaml_config(yaml_path=str(path), mode="full")
    return load_yaml(path, resolve_func=True)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """lm-eval logs several lines per call (e.g. that the model is not a string); a search makes
    thousands of calls. Raise its logger's level for the call's duration, then put it back."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)
