"""Any evaluated candidate of a run, from its folder alone: choose it (rank, hash, Pareto) and export it.

The run store keeps each candidate's recipe as text (``merge:`` and / or ``layer_plan:`` over the
experiment's model names); the frozen ``experiment.yaml`` names the models, resolved with
``evomerge.refs`` as the run resolved them. So ``evomerge export`` needs no worker and no searcher,
and works while the search goes on (the store is opened read-only) or long after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from evomerge import outputs
from evomerge.objectives import named, pareto_mask
from evomerge.outdir import atomic_dir, write_file
from evomerge.recipe import Recipe
from evomerge.refs import resolve_model_ref
from evomerge.run_folder import RunFolder
from evomerge.runstore import Evaluation, RunStore


def model_paths(run_dir: Path) -> dict[str, Path]:
    data, exp_dir = RunFolder(run_dir).frozen()
    return {name: resolve_model_ref(ref, exp_dir) for name, ref in data["models"].items()}


def phase_store(run_dir: Path, phase: Optional[int] = None) -> Path:
    """The run store of ``phase`` (default: the last phase begun)."""
    stores = RunFolder(run_dir).phase_stores()
    if not stores:
        raise ValueError(f"{run_dir} has no phase with a run store yet (the search has not begun)")
    if phase is None:
        return stores[-1][2]
    found = [p for i, _, p in stores if i == phase]
    if not found:
        raise ValueError(f"phase {phase} has no run store in {run_dir}; phases begun: {[i for i, _, _ in stores]}")
    return found[0]


def ranked(evaluations: list[Evaluation]) -> list[Evaluation]:
    """Successful evaluations, best fitness first (the earliest among equals), as status and report rank."""
    ok = [e for e in evaluations if e.ok and e.fitness is not None]
    return sorted(ok, key=lambda e: (-float(e.fitness or 0.0), e.rowid or 0))


def choose(evaluations: list[Evaluation], rank: Optional[int] = None, hash_prefix: Optional[str] = None,
           pareto: bool = False) -> list[Evaluation]:
    """The candidates asked for: the ``rank``-th best (1 = best), the one whose genome hash starts with
    ``hash_prefix``, or every Pareto-optimal one over the named objectives (best fitness first)."""
    if sum(x is not None and x is not False for x in (rank, hash_prefix, pareto or None)) != 1:
        raise ValueError("give exactly one of --rank K, --hash H, --pareto")
    order = ranked(evaluations)
    if not order:
        raise ValueError("no successful evaluation in this run store yet")
    if rank is not None:
        if not 1 <= rank <= len(order):
            raise ValueError(f"--rank {rank}: the store holds {len(order)} successful candidates; "
                             f"choose 1..{len(order)}")
        return [order[rank - 1]]
    if hash_prefix is not None:
        hits = [e for e in evaluations if e.genome_hash.startswith(hash_prefix.lower())]
        if len(hits) != 1:
            raise ValueError(f"--hash {hash_prefix}: {len(hits)} candidates match; give a longer prefix"
                             if hits else f"--hash {hash_prefix}: no candidate has a genome hash starting so")
        if not hits[0].ok:
            raise ValueError(f"candidate {hash_prefix} failed ({hits[0].error}); there is nothing to export")
        return hits
    names = sorted(set.intersection(*(set(named(e)) for e in order)))
    points = np.array([[named(e)[n] for n in names] for e in order])
    return [e for e, keep in zip(order, pareto_mask(points)) if keep]


def export_candidates(run_dir: str | Path, out: str | Path, rank: Optional[int] = None,
                      hash_prefix: Optional[str] = None, pareto: bool = False,
                      phase: Optional[int] = None, overwrite: bool = False) -> list[Path]:
    """Export the chosen candidate(s) as HF checkpoints with tokenizer, the recipe beside each
    (``OUT.mergekit.yml`` or ``OUT.layer_plan.yml``) and ``OUT.candidate.json`` (hash, fitness,
    objectives, generation). ``--pareto`` writes ``OUT/pareto-1`` ... in order of fitness, all into a
    temporary folder renamed to OUT at the end. A non-empty OUT is replaced only with ``overwrite``."""
    run_dir, out = Path(run_dir), Path(out)
    data, _ = RunFolder(run_dir).frozen()
    with RunStore(phase_store(run_dir, phase), readonly=True) as store:
        picks = choose(store.evaluations(), rank, hash_prefix, pareto)
    missing = [ev.genome_hash[:12] for ev in picks if ev.recipe is None]
    if missing:
        raise ValueError(f"candidate(s) {', '.join(missing)} have no stored recipe")
    paths = model_paths(run_dir)
    if not pareto:
        _export_one(picks[0], out, paths, data, run_dir, overwrite)
        return [out]
    with atomic_dir(out, overwrite) as tmp:
        for j, ev in enumerate(picks):
            _export_one(ev, tmp / f"pareto-{j + 1}", paths, data, run_dir, overwrite=False)
    return [out / f"pareto-{j + 1}" for j in range(len(picks))]


def _export_one(ev: Evaluation, target: Path, paths: dict[str, Path], data: dict[str, Any], run_dir: Path,
                overwrite: bool) -> None:
    """One candidate: its checkpoint (atomically, see ``outputs.export_recipe``), recipe and candidate.json."""
    assert ev.recipe is not None
    dtype = (data.get("export") or {}).get("dtype")
    outputs.export_recipe(Recipe.from_text(ev.recipe), target, paths, bool(data.get("allow_pickle")), dtype,
                          overwrite=overwrite)
    info = {"genome_hash": ev.genome_hash, "fitness": ev.fitness, "objectives": named(ev),
            "generation": ev.generation, "run": str(run_dir)}
    write_file(target.parent / f"{target.name}.candidate.json", json.dumps(info, indent=1))
