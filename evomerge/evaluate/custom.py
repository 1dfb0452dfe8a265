"""User fitness functions: ``path/to/file.py:fn`` or ``module:fn``, called as ``fn(model, tokenizer, ctx)``.

The contract (see ``fitness/README.md``): the function receives the candidate model (in memory, on
``ctx.device``), its tokenizer and the :class:`EvalContext`, and returns one of

- a number: one objective, named after the fitness;
- a dict ``{objective name: number}``: several objectives (for NSGA-II);
- an :class:`ItemResponses` or a list of them: per-item scores; each benchmark's mean becomes an
  objective named after it, and the responses are kept (run store, IRT).

Higher is better. Every value must be finite. Two kinds of failure are kept apart on purpose:

- a bad *reference* (file missing, no such function, not callable, wrong arguments) is a config
  error: :func:`load_fitness` raises :class:`BadFitnessReference` before any model is loaded;
- a function that raises or returns something outside the contract on one candidate is that
  candidate's failure: :meth:`CustomFitness.run` returns a :class:`FitnessResult` carrying the
  error and the traceback, and the search goes on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evomerge.evaluate.base import EvalContext, ItemResponses


class BadFitnessReference(ValueError):
    """A fitness reference that cannot be loaded; the message says what to change."""


@dataclass
class FitnessResult:
    """One candidate's fitness: named objectives (higher is better) and any per-item responses.

    ``error`` (with ``traceback``) is set instead when the evaluation failed; objectives are then
    empty, and the search records the candidate as failed rather than stopping.
    """

    objectives: dict[str, float] = field(default_factory=dict)
    responses: list[ItemResponses] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, error: str, tb: str | None = None) -> "FitnessResult":
        return cls(error=error, traceback=tb)


class FitnessContractError(TypeError):
    """A fitness function's return value is outside the contract."""


# ---------------------------------------------------------------------------------------- loading


def split_reference(ref: str) -> tuple[str, str]:
    """``'a/b.py:fn'`` -> ``('a/b.py', 'fn')``; the last colon separates, so ``C:\\x.py:fn`` works."""
    if not isinstance(ref, str) or ":" not in ref:
        raise BadFitnessReference(f"fitness reference {ref!r} must look like 'path/to/file.py:function' "
                                  f"or 'package.module:function'")
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise BadFitnessReference(f"fitness reference {ref!r} names no {'function' if target else 'file or module'}; "
                                  f"write 'path/to/file.py:function' or 'package.module:function'")
    return target, attr


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_module_from_file(path: Path, ref: str):
    if not path.is_file():
        raise BadFitnessReference(f"fitness reference '{ref}': no file {path}")
    # A name unique per file, so two fitness files called score.py do not replace each other.
    name = f"evomerge_fitness_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BadFitnessReference(f"fitness reference '{ref}': {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise BadFitnessReference(f"fitness reference '{ref}': importing {path} failed: "
                                  f"{type(e).__name__}: {e}") from e
    return module


def _load_module(target: str, ref: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and target.startswith(e.name):
            raise BadFitnessReference(f"fitness reference '{ref}': no module '{target}' on the Python path; "
                                      f"install it, add its folder to PYTHONPATH, or write the file path "
                                      f"('path/to/file.py:function')") from e
        raise BadFitnessReference(f"fitness reference '{ref}': importing '{target}' failed: {e}") from e
    except Exception as e:
        raise BadFitnessReference(f"fitness reference '{ref}': importing '{target}' failed: "
                                  f"{type(e).__name__}: {e}") from e


def load_fitness(ref: str, base_dir: str | Path | None = None, kwargs: dict[str, Any] | None = None) -> Callable:
    """Import the function a reference names and check it can be called as ``fn(model, tokenizer, ctx, **kwargs)``.

    A relative file path is taken from ``base_dir`` (default: the current folder); ``base_dir`` is
    where the experiment file lives, so a config keeps working from any working directory.
    """
    target, attr = split_reference(ref)
    if _is_file_target(target):
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or ".") / path
        module = _load_module_from_file(path.resolve(), ref)
    else:
        module = _load_module(target, ref)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
                             and v.__module__ == module.__name__)
            raise BadFitnessReference(f"fitness reference '{ref}': '{target}' has no '{attr}'; "
                                      f"the functions it defines are {defined}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadFitnessReference(f"fitness reference '{ref}': '{attr}' is a {type(obj).__name__}, not a function")
    try:
        inspect.signature(obj).bind(None, None, None, **(kwargs or {}))
    except TypeError as e:
        raise BadFitnessReference(f"fitness reference '{ref}': '{attr}' cannot be called as "
                                  f"{attr}(model, tokenizer, ctx{', **kwargs' if kwargs else ''}) ({e})") from None
    except ValueError:  # builtins without a signature: find out when called
        pass
    return obj


# ---------------------------------------------------------------------------------- normalising


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)):
        raise FitnessContractError(f"{what} is a {type(value).__name__} ({value!r:.80}), not a number")
    value = float(value)
    if not math.isfinite(value):
        raise FitnessContractError(f"{what} is {value}, not a finite number")
    return value


def _check_responses(r: ItemResponses, what: str) -> None:
    if len(r.item_ids) == 0:
        raise FitnessContractError(f"{what} ('{r.benchmark}') has no items")
    bad = ~np.isfinite(r.scores) | (r.scores < 0) | (r.scores > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise FitnessContractError(f"{what} ('{r.benchmark}'): item '{r.item_ids[i]}' has score {r.scores[i]}; "
                                   f"item scores must be in [0, 1]")


def normalise_result(value: Any, name: str) -> FitnessResult:
    """Turn whatever the contract allows into a :class:`FitnessResult`; anything else raises
    :class:`FitnessContractError` naming what was returned."""
    if isinstance(value, ItemResponses):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, ItemResponses) for v in value):
        objectives: dict[str, float] = {}
        for r in value:
            _check_responses(r, "returned ItemResponses")
            if r.benchmark in objectives:
                raise FitnessContractError(f"two returned ItemResponses are both named '{r.benchmark}'; "
                                           f"give each benchmark its own name")
            objectives[r.benchmark] = r.mean()
        return FitnessResult(objectives, list(value))
    if isinstance(value, dict):
        if not value:
            raise FitnessContractError("returned an empty dict; return at least one objective")
        objectives = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise FitnessContractError(f"objective names must be strings, got {k!r}")
            objectives[k] = _finite_number(v, f"objective '{k}'")
        return FitnessResult(objectives)
    if value is None:
        raise FitnessContractError("returned None; return a number, a dict of numbers or ItemResponses "
                                   "(is a `return` missing?)")
    return FitnessResult({name: _finite_number(value, "the returned value")})


# ----------------------------------------------------------------------------------------- fitness


class CustomFitness:
    """A user's fitness function, loaded (and checked) at construction, run per candidate."""

    def __init__(self, fn: str, name: str | None = None, base_dir: str | Path | None = None,
                 kwargs: dict[str, Any] | None = None):
        self.ref = fn
        self.base_dir = None if base_dir is None else str(base_dir)
        self.kwargs = dict(kwargs or {})
        self.fn = load_fitness(fn, base_dir, self.kwargs)
        self.name = name or split_reference(fn)[1]

    def __reduce__(self):
        """Pickle the reference, not the function: a Ray worker imports the file itself."""
        return (CustomFitness, (self.ref, self.name, self.base_dir, self.kwargs))

    def run(self, model: torch.nn.Module, tokenizer: Any, ctx: EvalContext) -> FitnessResult:
        """Call the function on one candidate; a failure becomes a failed result, not an exception."""
        try:
            value = self.fn(model, tokenizer, ctx, **self.kwargs)
        except Exception as e:
            return FitnessResult.failed(f"{self.ref} raised {type(e).__name__}: {e}", traceback.format_exc())
        try:
            return normalise_result(value, self.name)
        except FitnessContractError as e:
            return FitnessResult.failed(f"{self.ref} {e}", traceback.format_exc())
