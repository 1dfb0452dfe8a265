"""Everything about a search's inputs that can be checked without loading a weight, checked at once.

Why: the workers load every model before the first candidate, which takes minutes on real models, and
an input that cannot work (a truncated .safetensors, a config.json that is not JSON, a base without a
tokenizer, an item file that does not parse, an item budget larger than the benchmark) used to be
found only then, as a traceback naming no file, or as a message about something else. Each check
here reads headers and small files only and raises a one-line ValueError naming the experiment's key
and the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from evomerge.checkpoint import CheckpointError, read_config, tensor_index
from evomerge.config import Experiment
from evomerge.estimator_kinds import IRT_KINDS

# files any one of which makes a tokenizer transformers can load
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_before_weights(exp: Experiment, paths: Mapping[str, Path], exp_dir: Path) -> None:
    """Every model folder (readable, config.json, complete safetensors, the base's tokenizer), every
    item file and lm-eval task, and the estimator's item budget against the benchmarks' sizes."""
    if exp.address is None:  # workers on this machine: its devices are the ones they will use
        check_device_here(exp.device)
    check_model_folders(paths, exp.base_model, exp.allow_pickle)
    sizes = check_benchmark_specs(exp, exp_dir)
    check_item_budget(exp, sizes)


def check_device_here(device: str) -> None:
    """A device this machine has (the name itself was checked with the experiment): ``cuda:3`` on a
    machine with one GPU, or ``cuda`` with a CPU-only torch, would fail in every worker after loading."""
    import torch

    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        index = int(device.split(":")[1]) if ":" in device else 0
        if n == 0:
            raise ValueError(f"device: '{device}', but torch sees no CUDA GPU on this machine; use device: cpu "
                             f"(or auto, which takes a GPU where there is one)")
        if index >= n:
            raise ValueError(f"device: '{device}', but this machine has {n} CUDA GPU(s): cuda:0 .. cuda:{n - 1}")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: 'mps', but torch has no MPS backend here; use device: cpu or auto")


def check_model_folders(paths: Mapping[str, Path], base: str, allow_pickle: bool = False) -> None:
    for name, path in paths.items():
        try:
            check_model_folder(path, allow_pickle, tokenizer=name == base)
        except CheckpointError as err:
            raise ValueError(f"models.{name}: {err}") from None


def check_model_folder(path: Path, allow_pickle: bool = False, tokenizer: bool = False) -> None:
    """A model folder a worker can load: its config, the headers and sizes of its weight files and,
    for the base (whose tokenizer scores every candidate), a tokenizer that loads."""
    read_config(path)
    tensor_index(path, allow_pickle)
    if tokenizer:
        check_tokenizer(path)


def check_tokenizer(path: Path) -> None:
    """A tokenizer in ``path`` that transformers loads; without one transformers falls back to slow
    converters and asks for sentencepiece, which misleads: the file is missing, not a package."""
    if not any((path / f).is_file() for f in TOKENIZER_MARKERS):
        raise CheckpointError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_MARKERS)}); the base "
                              f"model's tokenizer scores every candidate: copy its tokenizer files into the folder")
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # a damaged tokenizer file fails in many ways inside tokenizers / transformers
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: its tokenizer does not load ({type(err).__name__}: {first})") from None


def check_benchmark_specs(exp: Experiment, exp_dir: Path) -> dict[str, int]:
    """Build every item and lm-eval benchmark here, before any model loads, and list its items: a
    missing or broken item file, or an lm-eval task name that lm-eval cannot find, stops the run
    with the key that names it. (Custom functions are loaded by the workers.) Returns the number of
    items of each fitness benchmark built here."""
    from evomerge.evaluate.custom import CustomFitness
    from evomerge.evaluate.registry import make_evaluator

    sizes: dict[str, int] = {}
    sets = [("fitness.objectives", exp.fitness.objectives), ("fitness.test", exp.fitness.test)]
    for where, objectives in sets:
        for i, o in enumerate(objectives):
            if o.benchmark.get("type") not in ("items", "lm_eval"):
                continue
            try:
                evaluator = make_evaluator(o.benchmark, exp_dir)
                assert not isinstance(evaluator, CustomFitness)
                n = len(evaluator.item_ids())
            except (ValueError, KeyError, FileNotFoundError, OSError) as err:
                text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                raise ValueError(f"{where}[{i}] ({o.name}): {text}") from None
            if n == 0:
                raise ValueError(f"{where}[{i}] ({o.name}): the benchmark has no items")
            if where == "fitness.objectives":
                sizes[o.name] = n
    return sizes


def check_item_budget(exp: Experiment, sizes: Mapping[str, int]) -> None:
    """An estimator's item count (``budget``: random and IRT kinds) that every fitness benchmark can
    give, after the item sample; a fraction always fits."""
    spec = exp.fitness.estimator
    if spec.kind != "random" and spec.kind not in IRT_KINDS:
        return
    for name, n in sizes.items():
        sample = spec.item_sample
        have = n if sample is None else (max(1, round(sample * n)) if sample <= 1 else min(n, int(sample)))
        if spec.budget > 1 and spec.budget > have:
            what = f"{have} items" + (" in its item_sample" if sample is not None else "")
            raise ValueError(f"fitness.estimator.budget: {spec.budget:g} items, but benchmark '{name}' has {what}; "
                             f"give a count up to {have} or a fraction in (0, 1]")


def check_writable_dir(path: Path, what: str) -> None:
    """A folder this process may create files in (its nearest existing ancestor, when it does not exist)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write there (permission denied on {probe})")
