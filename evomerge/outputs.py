"""What a finished run leaves behind: checkpoints, recipes, history, plots, the report and summary.

Checkpoints are written by replaying the recipe from the files on disk (``evomerge merge``'s own
code path), so the exported recipe is proven to reproduce the exported weights. Everything here
takes plain values (results, the experiment's settings, test scores), never the job that made them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from evomerge import report
from evomerge.config import Experiment, Reference
from evomerge.estimators.calibrations import CalibrationLog
from evomerge.merge.config import MergeConfig
from evomerge.merge.dfs_export import merge_plan_to_disk
from evomerge.merge.files import merge_to_disk
from evomerge.merge.plan_to_mergekit import LLAMA_WRITES, WRITES_BY_MODEL_TYPE, plan_to_mergekit
from evomerge.objectives import Objectives
from evomerge.outdir import atomic_dir, write_file
from evomerge.recipe import Recipe, hand_recipe, single_model, with_paths
from evomerge.run_folder import RunFolder, drift_log, final_confirmed, full_scores
from evomerge.runstore import Evaluation, RunStore


@dataclass
class PhaseResult:
    """What a phase returns: its chosen evaluation(s) (one for a single objective, the chosen Pareto
    models otherwise), their recipes, the phase's genome, its run store and the estimator's report."""

    index: int
    kind: str
    best: list[Evaluation]
    recipes: list[Recipe] = field(default_factory=list)
    genome: Any = None
    store_path: Optional[Path] = None
    estimator_report: str = ""
    full_fitness: float = float("nan")  # of best[0], on every fitness item where known (else its estimate)
    exported_hand_recipe: Optional[str] = None  # a hand recipe that scored higher and was exported instead


def export_recipe(recipe: Recipe, out: Path, paths: Mapping[str, Path], allow_pickle: bool = False,
                  out_dtype: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the candidate as an HF checkpoint with tokenizer, plus its replayable recipe beside it
    (``OUT.mergekit.yml`` and / or ``OUT.layer_plan.yml``). The checkpoint is written into a temporary
    sibling and renamed into place, the recipes after it, each atomically; a recipe file of an older
    export that this one does not write is removed. A non-empty ``out`` is replaced only with ``overwrite``."""
    siblings: dict[str, str] = {}
    if recipe.plan is None and recipe.merge is None:
        raise ValueError("a recipe needs a merge config, a layer plan, or both")
    with atomic_dir(out, overwrite) as tmp:
        if recipe.plan is not None:
            siblings["layer_plan.yml"] = recipe.plan.to_yaml()
            merge_plan_to_disk(recipe.plan, tmp, allow_pickle=allow_pickle)
            if all(isinstance(recipe.plan.models.get(m), str) for m in recipe.plan.members()):
                # the same plan for mergekit: a passthrough slices: config with the scales folded in (members
                # that are merges of their own, as in PS+DFS, have no folder mergekit could read)
                model_type = json.loads((tmp / "config.json").read_text()).get("model_type", "")
                writes = WRITES_BY_MODEL_TYPE.get(model_type, LLAMA_WRITES)
                config = plan_to_mergekit(recipe.plan.to_dict(), residual_writes=writes)
                siblings["mergekit.yml"] = yaml.safe_dump(config, sort_keys=False)
        else:
            assert recipe.merge is not None
            data = with_paths(recipe.merge, paths)
            if out_dtype:
                data["out_dtype"] = out_dtype
            cfg = MergeConfig.model_validate(data)
            siblings["mergekit.yml"] = cfg.to_yaml()
            merge_to_disk(cfg, tmp, allow_pickle=allow_pickle)
    for suffix in RECIPE_SUFFIXES:
        path = out.parent / f"{out.name}.{suffix}"
        if suffix in siblings:
            write_file(path, siblings[suffix])
        elif path.exists():
            path.unlink()  # an older export's recipe of the other kind: it no longer describes out
    return out


RECIPE_SUFFIXES = ("mergekit.yml", "layer_plan.yml")


def reference_recipes(base: str, others: list[str], hand: Sequence[Reference]) -> dict[str, Recipe]:
    """Every source model as it is, then the hand recipes (the uniform merge, TIES at density 0.5...)."""
    refs = {m: single_model(m) for m in [base, *others]}
    refs.update({r.name: hand_recipe(r.method, base, others, r.weight, r.density, r.parameters) for r in hand})
    return refs


def items_scored(run_dir: Path, phases: Sequence[PhaseResult], full_items: int, references: int,
                 checked: int, sample_items: int | None = None) -> dict[str, int]:
    """Every fitness item the run scored, by what it was for, so that runs compare by one number.

    ``full_items``: the items of one full evaluation (every item benchmark); ``references``: the
    recipes scored on every item for the report (hand recipes and sources); ``checked``: the items of
    the benchmark check before the search; ``sample_items``: the items of the estimator's item sample (default:
    every item), what a drift check scores. Calibration counts the population scored before the search;
    refits score no item (they refit on answers already counted, so the part is 0 and
    ``refit_count`` says how many there were); final: the candidates scored on every item to confirm
    the final choice; report: those scored on every item only to measure the estimator's error."""
    log = CalibrationLog(run_dir)
    calibration = log.initial_responses()
    search = drift = final = report = refits = 0
    for ph in phases:
        assert ph.store_path is not None
        with RunStore(ph.store_path, readonly=True) as store:
            search += sum(len(r["item_ids"]) for e in store.evaluations() for r in (e.responses or []))
            drift += len(drift_log(store)) * (sample_items or full_items)
            chosen_among = set(final_confirmed(store))
            for h, s in full_scores(store).items():
                items = sum(x["items"] for x in s.values())
                final += items if h in chosen_among else 0
                report += 0 if h in chosen_among else items
        refits += log.refits(ph.index)
    parts = {"calibration": calibration, "search": search, "refits": 0, "drift": drift, "final": final,
             "report": report, "references": references * full_items, "checks": checked}
    return {"total": sum(parts.values()), **parts, "refit_count": refits, "full_evaluation": full_items,
            "item_sample": sample_items or full_items}


def write_outputs(run_dir: Path, exp: Experiment, phases: list[PhaseResult], objectives: Objectives,
                  chosen: Mapping[str, Recipe], test: Mapping[str, Mapping[str, Any]],
                  util: Mapping[str, Mapping[str, float]], console: Console,
                  hand: Mapping[str, Mapping[str, Any]] | None = None,
                  items: Mapping[str, int] | None = None, memory: Sequence[Mapping[str, Any]] = ()) -> Path:
    """test_results.json, summary.json, each phase's history and plots, report.md; the test table printed."""
    final = phases[-1]
    folder = RunFolder(run_dir)
    folder.test_results.write_text(json.dumps(test, indent=1))
    sections = [_phase_section(run_dir, ph, objectives, exp.fitness.estimator.kind != "full", exp.export.figures,
                               dict(zip(chosen, final.best)) if ph is final else {}) for ph in phases]
    summary = {
        "experiment": exp.name,
        "chosen": {n: {"fitness": ev.fitness, "objectives": ev.objectives, "genome_hash": ev.genome_hash}
                   for n, ev in zip(chosen, final.best)},
        "test": test,
        "worker_utilization": {w: u["busy_s"] / max(u["wall_s"], 1e-9) for w, u in util.items()},
        "hand_recipes_fitness": {n: h.get("fitness") for n, h in (hand or {}).items()},
        "exported_hand_recipe": final.exported_hand_recipe,
        "items_scored": dict(items or {}),
        "memory": [dict(m) for m in memory],
    }
    folder.summary.write_text(json.dumps(summary, indent=1, default=float))
    _write_report(run_dir, exp, sections, test, util, chosen, final, hand or {}, memory)
    _print_test(console, exp, test, run_dir)
    return run_dir


def reference_points(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The sources (``sources.json``) and hand recipes (``hand_recipes.json``) as scored on the
    fitness split at the start of the run: {name: {"fitness", "objectives"}}, failures left out."""
    out: dict[str, dict[str, Any]] = {}
    folder = RunFolder(run_dir)
    for path in (folder.sources, folder.hand_recipes):
        out.update({k: v for k, v in folder.read_json(path, {}).items() if v.get("fitness") is not None})
    return out


def _source_names(run_dir: Path) -> list[str]:
    folder = RunFolder(run_dir)
    return list(folder.read_json(folder.sources, {}))


def _phase_section(run_dir: Path, ph: PhaseResult, objectives: Objectives, estimated: bool, fmt: str = "png",
                   exported: Mapping[str, Evaluation] | None = None) -> str:
    assert ph.store_path is not None
    with RunStore(ph.store_path, readonly=True) as store:
        rows = store.history()
    phase_dir = ph.store_path.parent
    refs = reference_points(run_dir)
    report.write_history_csv(rows, phase_dir / "history.csv")
    lines = [f"## Phase {ph.index}: {ph.kind}", "",
             f"{len(rows)} candidates evaluated ({sum(r['status'] != 'ok' for r in rows)} failed), "
             f"{max((r['generation'] for r in rows), default=-1) + 1} generations. History: "
             f"`{(phase_dir / 'history.csv').relative_to(run_dir)}`.", ""]
    fit = report.plot_fitness(rows, phase_dir / f"fitness.{fmt}", f"phase {ph.index} ({ph.kind})",
                              {n: r["fitness"] for n, r in refs.items()} if ph.index == 0 else None,
                              _source_names(run_dir))
    lines.append(f"![fitness]({fit.relative_to(run_dir)})")
    if objectives.n_obj > 1:
        par = report.plot_pareto(rows, [f"obj_{n}" for n in objectives.names], phase_dir / f"pareto.{fmt}",
                                 {n: r["objectives"] for n, r in refs.items()},
                                 {n: dict(e.objectives) for n, e in (exported or {}).items()
                                  if isinstance(e.objectives, dict)}, _source_names(run_dir))
        lines.append(f"![pareto]({par.relative_to(run_dir)})")
    best = ph.best[0]
    if ph.kind == "ps":
        heat = report.plot_heatmap(ph.genome.layer_table(np.array(best.genome)), phase_dir / f"coefficients.{fmt}",
                                   "best candidate: searched coefficients")
        lines.append(f"![coefficients]({heat.relative_to(run_dir)})")
    else:
        plan = ph.recipes[0].plan
        assert plan is not None, "a DFS phase's recipes are layer plans"
        lay = report.plot_layer_plan(plan.layers, plan.hop_scales,
                                     phase_dir / f"layer_plan.{fmt}", "layer plan of the best candidate")
        lines.append(f"![layer plan]({lay.relative_to(run_dir)})")
    named = best.objectives if isinstance(best.objectives, dict) else {}
    obj = ", ".join(f"{k} {v:.3f}" for k, v in named.items())
    kind = "estimated " if estimated else ""
    lines += ["", f"Best candidate: {kind}fitness {best.fitness:.4f} ({obj}), generation {best.generation}."]
    if ph.estimator_report:  # kept beside the store: a re-rendered report (no workers) shows it again
        (phase_dir / "estimator_report.md").write_text(ph.estimator_report)
    return "\n".join(lines + (["", ph.estimator_report] if ph.estimator_report else []))


def _write_report(run_dir: Path, exp: Experiment, sections: list[str], test: Mapping[str, Mapping[str, Any]],
                  util: Mapping[str, Mapping[str, float]], chosen: Mapping[str, Recipe], final: PhaseResult,
                  hand: Mapping[str, Mapping[str, Any]], memory: Sequence[Mapping[str, Any]] = (),
                  notes: Sequence[str] = ()) -> None:
    names = [n for o in exp.fitness.test for n in o.names]
    lines = [f"# evomerge run: {exp.name}", "",
             f"Models: {', '.join(f'{k} ({v})' for k, v in exp.models.items())}; base `{exp.base_model}`. "
             f"Searcher `{exp.searcher.name}`, seed {exp.seed}, estimator "
             f"`{exp.fitness.estimator.kind}`.", "", *[f"> {n}" for n in notes], *([""] if notes else [])]
    if test:
        ok = {k: v for k, v in test.items() if "error" not in v}
        lines += ["## Held-out test accuracy", "",
                  "Full evaluation on the test split, which the search never saw.", "",
                  report.markdown_table({k: dict(v) for k, v in ok.items()}, names, mean_of=names), ""]
    if hand:
        lines += ["## Hand recipes on the fitness split", "",
                  "What the search had to beat, scored on every fitness item: "
                  + "; ".join(f"{n} {h['fitness']:.4f}" if h.get("fitness") is not None else f"{n} failed"
                              for n, h in hand.items())
                  + f". The search's best: {final.full_fitness:.4f}"
                  + (f"; the hand recipe '{final.exported_hand_recipe}' scored higher and is exported as best."
                     if final.exported_hand_recipe else "."), ""]
    lines += sections
    lines += ["", "## Workers", "", "| worker | busy s | wall s | busy / wall |", "|---|---|---|---|"]
    for w, u in util.items():
        lines.append(f"| {w} | {u['busy_s']:.1f} | {u['wall_s']:.1f} | {u['busy_s'] / max(u['wall_s'], 1e-9):.2f} |")
    if memory:
        gib = lambda m, k: f"{m.get(k, 0) / 2**30:.2f}"
        lines += ["", "## Memory per worker", "",
                  "Bytes the merge engine holds (policy `memory:`; shared: the disk policy's delta cache, mapped "
                  "once per node) and the process's resident set, in GiB.", "",
                  "| worker | policy | device | host | shared | peak device | peak RSS | why this policy |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in memory:
            lines.append(f"| {m.get('worker', '')} | {m.get('policy', '')} | {gib(m, 'device_bytes')} | "
                         f"{gib(m, 'host_bytes')} | {gib(m, 'shared_bytes')} | {gib(m, 'peak_device_bytes')} | "
                         f"{gib(m, 'peak_rss_bytes')} | {m.get('reason', '')} |")
    lines += ["", "## Outputs", ""]
    for n in chosen:
        lines.append(f"- `{n}/`: Hugging Face checkpoint with tokenizer; recipe beside it "
                     f"(`{n}.mergekit.yml` or `{n}.layer_plan.yml`, replay with `evomerge merge`).")
    RunFolder(run_dir).report.write_text("\n".join(lines) + "\n")


def _print_test(console: Console, exp: Experiment, test: Mapping[str, Mapping[str, Any]], run_dir: Path) -> None:
    if not test:
        return
    names = [n for o in exp.fitness.test for n in o.names]
    table = Table(title="held-out test accuracy")
    table.add_column("model")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("mean", justify="right")
    for m, acc in test.items():
        if "error" in acc:
            table.add_row(m, *["error"] * (len(names) + 1))
            continue
        vals = [acc.get(n, math.nan) for n in names]
        table.add_row(m, *[f"{v:.3f}" for v in vals], f"{np.mean(vals):.3f}")
    console.print(table)
    console.print(f"report: {run_dir / 'report.md'}")
