"""What a finished run leaves behind: checkpoints, recipes, history, plots, and the report.

Checkpoints are written by replaying the recipe from the files on disk (``evomerge merge``'s own
code path), so the exported recipe is proven to reproduce the exported weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from evomerge import report
from evomerge.merge.config import MergeConfig
from evomerge.pool import Task
from evomerge.recipe import Recipe
from evomerge.runstore import RunStore

if TYPE_CHECKING:
    from evomerge.search import Driver, PhaseResult


def export_recipe(driver: "Driver", recipe: Recipe, out: Path) -> Path:
    """Write the candidate as an HF checkpoint with tokenizer, plus its replayable recipe."""
    from evomerge.search import _with_paths

    if out.exists():
        shutil.rmtree(out)
    if recipe.plan is not None:
        from evomerge.dfs import merge_plan_to_disk

        (out.parent / f"{out.name}.layer_plan.yml").write_text(recipe.plan.to_yaml())
        merge_plan_to_disk(out.parent / f"{out.name}.layer_plan.yml", out, allow_pickle=driver.exp.allow_pickle)
        return out
    from evomerge.merge.files import merge_to_disk

    data = _with_paths(recipe.merge, driver.paths)
    if driver.exp.export.dtype:
        data["out_dtype"] = driver.exp.export.dtype
    cfg = MergeConfig.model_validate(data)
    (out.parent / f"{out.name}.mergekit.yml").write_text(cfg.to_yaml())
    merge_to_disk(cfg, out, allow_pickle=driver.exp.allow_pickle)
    return out


def reference_recipes(driver: "Driver") -> dict[str, Recipe]:
    """Every source model as it is, and the uniform task-arithmetic merge (weight 1/k each)."""
    base, others = driver.exp.base_model, driver.others
    single = lambda m: MergeConfig.model_validate({"merge_method": "linear", "models": [
        {"model": m, "parameters": {"weight": 1.0}}]})
    refs = {m: Recipe(merge=single(m)) for m in [base] + others}
    refs["uniform merge"] = Recipe(merge=MergeConfig.model_validate({
        "merge_method": "task_arithmetic", "base_model": base,
        "models": [{"model": m, "parameters": {"weight": 1.0 / len(others)}} for m in others]}))
    return refs


def test_evaluation(driver: "Driver", chosen: dict[str, Recipe]) -> dict[str, dict[str, float]]:
    """Full evaluation on the held-out test benchmarks, which the search never saw."""
    if not driver.exp.fitness.test:
        return {}
    recipes = {**chosen, **reference_recipes(driver)}
    names = list(recipes)
    out: dict[str, dict[str, float]] = {}
    for i, result in driver.pool.run([Task(recipes[n], None, "test", 0) for n in names]):
        out[names[i]] = result.objectives if result.ok else {"error": result.error}
    return {n: out[n] for n in names}


def finish_run(driver: "Driver", phases: list["PhaseResult"]) -> Path:
    run_dir = driver.run_dir
    final = phases[-1]
    chosen = {}
    for j, (ev, recipe) in enumerate(zip(final.best, final.recipes)):
        name = "best" if len(final.best) == 1 else f"pareto-{j + 1}"
        export_recipe(driver, recipe, run_dir / name)
        chosen[name] = recipe
    earlier = {f"phase {ph.index} best ({ph.kind})": ph.recipes[0] for ph in phases[:-1]}
    driver.console.print("evaluating the chosen model(s) and the references on the held-out test split...")
    test = test_evaluation(driver, {**chosen, **earlier})
    (run_dir / "test_results.json").write_text(json.dumps(test, indent=1))
    sections = []
    for ph in phases:
        sections.append(_phase_section(driver, ph))
    util = driver.pool.utilization()
    summary = {
        "experiment": driver.exp.name,
        "chosen": {n: {"fitness": ev.fitness, "objectives": ev.objectives, "genome_hash": ev.genome_hash}
                   for n, ev in zip(chosen, final.best)},
        "test": test,
        "worker_utilization": {w: u["busy_s"] / max(u["wall_s"], 1e-9) for w, u in util.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    _write_report(driver, phases, sections, test, util, chosen)
    _print_test(driver, test)
    return run_dir


def _phase_section(driver: "Driver", ph: "PhaseResult") -> str:
    store = RunStore(ph.store_path)
    rows = store.history()
    phase_dir = ph.store_path.parent
    report.write_history_csv(rows, phase_dir / "history.csv")
    lines = [f"## Phase {ph.index}: {ph.kind}", "",
             f"{len(rows)} candidates evaluated ({sum(r['status'] != 'ok' for r in rows)} failed), "
             f"{max((r['generation'] for r in rows), default=-1) + 1} generations. History: "
             f"`{(phase_dir / 'history.csv').relative_to(driver.run_dir)}`.", ""]
    fit = report.plot_fitness(rows, phase_dir / "fitness.png", f"phase {ph.index} ({ph.kind})")
    lines.append(f"![fitness]({fit.relative_to(driver.run_dir)})")
    if driver.n_obj > 1:
        par = report.plot_pareto(rows, [f"obj_{n}" for n in driver.names], phase_dir / "pareto.png")
        lines.append(f"![pareto]({par.relative_to(driver.run_dir)})")
    best = ph.best[0]
    genome = np.array(best.genome)
    if ph.kind == "ps":
        heat = report.plot_heatmap(ph.genome.layer_table(genome), phase_dir / "coefficients.png",
                                   "best candidate: searched coefficients")
        lines.append(f"![coefficients]({heat.relative_to(driver.run_dir)})")
    else:
        plan = ph.recipes[0].plan
        lay = report.plot_layer_plan(plan.layers, plan.scales or [1.0] * len(plan.layers),
                                     phase_dir / "layer_plan.png", "layer plan of the best candidate")
        lines.append(f"![layer plan]({lay.relative_to(driver.run_dir)})")
    obj = ", ".join(f"{k} {v:.3f}" for k, v in best.objectives.items())
    kind = "estimated " if driver.exp.fitness.estimator.kind != "full" else ""
    lines += ["", f"Best candidate: {kind}fitness {best.fitness:.4f} ({obj}), generation {best.generation}."]
    confirmed = (store.get_meta("full_scores", {}) or {}).get(best.genome_hash)
    if confirmed:
        full = {b: x["accuracy"] for b, x in confirmed.items()}
        lines[-1] += (f" On every fitness item: fitness {driver.fitness({**best.objectives, **full}):.4f} ("
                      + ", ".join(f"{b} {v:.3f}" for b, v in full.items()) + ").")
    extra = driver.estimator_report(store, ph.genome, best)
    store.close()
    return "\n".join(lines + ([extra] if extra else []))


def _write_report(driver, phases, sections, test, util, chosen) -> None:
    names = [n for o in driver.exp.fitness.test for n in o.names]
    lines = [f"# evomerge run: {driver.exp.name}", "",
             f"Models: {', '.join(f'{k} ({v})' for k, v in driver.exp.models.items())}; base `{driver.exp.base_model}`. "
             f"Searcher `{driver.exp.searcher.name}`, seed {driver.exp.seed}, estimator "
             f"`{driver.exp.fitness.estimator.kind}`.", ""]
    if test:
        ok = {k: v for k, v in test.items() if "error" not in v}
        lines += ["## Held-out test accuracy", "",
                  "Full evaluation on the test split, which the search never saw.", "",
                  report.markdown_table(ok, names, mean_of=names), ""]
    lines += sections
    lines += ["", "## Workers", "", "| worker | busy s | wall s | busy / wall |", "|---|---|---|---|"]
    for w, u in util.items():
        lines.append(f"| {w} | {u['busy_s']:.1f} | {u['wall_s']:.1f} | {u['busy_s'] / max(u['wall_s'], 1e-9):.2f} |")
    lines += ["", "## Outputs", ""]
    for n in chosen:
        lines.append(f"- `{n}/`: Hugging Face checkpoint with tokenizer; recipe beside it "
                     f"(`{n}.mergekit.yml` or `{n}.layer_plan.yml`, replay with `evomerge merge`).")
    (driver.run_dir / "report.md").write_text("\n".join(lines) + "\n")


def _print_test(driver, test) -> None:
    from rich.table import Table

    if not test:
        return
    names = [n for o in driver.exp.fitness.test for n in o.names]
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
    driver.console.print(table)
    driver.console.print(f"report: {driver.run_dir / 'report.md'}")
