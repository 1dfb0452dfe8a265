"""What a run's results depend on, as named parts, so that ``resume`` can say what changed.

A run scores candidates of a search space on benchmark items with merges of model files, under a
seed, a searcher and an estimator. Each of these is one part of the fingerprint: short values are
kept as they are (the seed), the others as a short hash of their content: the model folders (every
file's name and size, the modification time of weight files, the content of the small ones), the
item files (the items themselves, wherever they were read from), custom fitness files, the search
spaces as loaded (preset files included), the settings of the searcher, the estimator, the
objectives, the references, the precision and the evaluation. Where the work runs (workers, address, memory), the
device, the output settings and the trackers are left out: a resume may change them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from evomerge.config import DFSSpace, Experiment, PSSpace

#: files smaller than this are fingerprinted by content; larger ones (weights) by size and mtime
SMALL_FILE = 1 << 20


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_signature(folder: Path) -> str:
    """A model folder's identity without reading its weights: names, sizes, weights' mtimes, small files' bytes."""
    parts = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        st = f.stat()
        small = st.st_size <= SMALL_FILE
        content = hashlib.sha256(f.read_bytes()).hexdigest() if small else st.st_mtime_ns
        parts.append([str(f.relative_to(folder)), st.st_size, content])
    return _digest(parts)


def item_signatures(exp: Experiment, exp_dir: Path) -> dict[str, str]:
    """The items of every item benchmark (fitness and test) and the file of every custom fitness
    function, by content: a file edited in place changes its part though the experiment names the
    same path."""
    from evomerge.evaluate.builtin import ItemsBenchmark
    from evomerge.evaluate.registry import make_evaluator

    out = {}
    for which, objectives in (("fitness", exp.fitness.objectives), ("test", exp.fitness.test)):
        for o in objectives:
            if o.benchmark.get("type") == "items":
                bench = make_evaluator(o.benchmark, exp_dir)
                assert isinstance(bench, ItemsBenchmark)
                out[f"items of {which} '{o.name}'"] = _digest([repr(it) for it in bench.items])
            elif o.benchmark.get("type") == "custom":  # a function in a file: the file's text
                target = str(o.benchmark.get("fn", "")).rpartition(":")[0]
                path = Path(target).expanduser()
                path = path if path.is_absolute() else exp_dir / path
                if target.endswith(".py") and path.is_file():
                    out[f"fitness function of {which} '{o.name}'"] = _digest(path.read_text())
    return out


def fingerprint(exp: Experiment, exp_dir: Path, spaces: list[PSSpace | DFSSpace],
                model_paths: Mapping[str, Path]) -> dict[str, str]:
    """The run's fingerprint: part name -> value or short hash."""
    parts: dict[str, str] = {"seed": str(exp.seed), "base_model": exp.base_model}
    for name, path in sorted(model_paths.items()):
        parts[f"models.{name}"] = f"{exp.models[name]} @ {path} #{model_signature(path)}"
    parts["search space"] = _digest([s.model_dump(mode="json") for s in spaces])
    parts["budget"] = str([p.budget for p in exp.phases or []])
    parts["searcher"] = _digest(exp.searcher.model_dump(mode="json"))
    parts["fitness.objectives"] = _digest([o.model_dump(mode="json") for o in exp.fitness.objectives])
    parts["fitness.test"] = _digest([o.model_dump(mode="json") for o in exp.fitness.test])
    parts["fitness.estimator"] = _digest(exp.fitness.estimator.model_dump(mode="json"))
    parts["references"] = _digest([r.model_dump(mode="json") for r in exp.references])
    parts["precision"] = f"dtype {exp.dtype}, delta_dtype {exp.delta_dtype}"
    parts["evaluation"] = _digest(exp.evaluation.model_dump(mode="json"))
    parts.update(item_signatures(exp, exp_dir))
    return parts


def changes(recorded: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """What differs, one phrase per part: the values where they are short, the part's name otherwise."""
    out = []
    for key in list(recorded) + [k for k in now if k not in recorded]:
        before, after = recorded.get(key), now.get(key)
        if before == after:
            continue
        if before is None or after is None:
            out.append(f"{key} ({'added' if before is None else 'removed'})")
        elif key in ("seed", "base_model", "budget", "precision"):
            out.append(f"{key} ({before} -> {after})")
        elif key.startswith("models.") and before.split(" #")[0] != after.split(" #")[0]:
            out.append(f"{key} ({before.split(' #')[0]} -> {after.split(' #')[0]})")
        elif key.startswith("models."):
            out.append(f"{key} (its files changed)")
        else:
            out.append(key)
    return out
