"""``evomerge report RUN_DIR``: report.md and the plots again, from the run folder alone.

For a finished run this re-draws what the run wrote (e.g. as SVG). For a run that was killed and
never resumed it draws what the stores hold so far. No worker is started: what needs a model
evaluation (the held-out test of a run that never got there, an estimator's check against full
evaluations) is taken from the files the run wrote when it did it, and otherwise left out, and the
report says so. The phase's choice is the store's (the best, or the Pareto choice), as the run makes
it with the ``full`` estimator; summary.json is written only by the run itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from rich.console import Console

from evomerge import outputs
from evomerge.config import experiment_from_data
from evomerge.outputs import PhaseResult
from evomerge.recipe import Recipe
from evomerge.run import objectives_of
from evomerge.run_folder import GENES, RunFolder
from evomerge.runstore import RunStore
from evomerge.status import phase_status


class GeneTable:
    """A PS genome's per-layer table from its gene names (``model.param.group.i``, kept in the store's
    meta): what the heatmap needs, without building the space from the models' tensors."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def layer_table(self, x: np.ndarray) -> dict[tuple[str, str, str], list[float]]:
        out: dict[tuple[str, str, str], list[float]] = {}
        for name, value in zip(self.names, np.asarray(x, dtype=np.float64).tolist()):
            model, param, group, _ = name.rsplit(".", 3)
            out.setdefault((model, param, group), []).append(float(value))
        return out


def rerender(run_dir: str | Path, fmt: str = "png", console: Optional[Console] = None) -> Path:
    """Write RUN/report.md and each phase's history and plots in ``fmt`` (png or svg); returns the report."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"--format {fmt!r}: choose png or svg")
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    data, exp_dir = folder.frozen()
    exp = experiment_from_data(data, folder.experiment, exp_dir)
    exp.export.figures = fmt  # type: ignore[assignment]
    objectives = objectives_of(exp)
    budgets = folder.budgets()
    summary = folder.read_json(folder.summary)
    notes: list[str] = [] if summary else [
        "Re-rendered from the run store of a run that has not finished (running, or killed and never resumed): "
        "the choice below is the best so far; the held-out test and the exports are left out (they need a model "
        "evaluation: `evomerge resume` finishes the run, `evomerge export` writes any candidate now)."]
    phases: list[PhaseResult] = []
    util: dict[str, dict[str, float]] = {}
    for index, kind, path in folder.phase_stores():
        with RunStore(path, readonly=True) as store:
            ok = [e for e in store.evaluations("ok")]
            st = phase_status(store, index, kind, budgets[index] if index < len(budgets) else 0, 0.0)
            genes = store.get_meta(GENES) or []
        if not ok:
            notes.append(f"Phase {index} ({kind}) has no successful candidate yet; it is left out.")
            continue
        wall = (st["last_activity_at"] or 0.0) - (st["started_at"] or 0.0)
        for w, u in st["workers"].items():
            util[f"{w} (phase {index})"] = {"busy_s": u["busy_s"], "wall_s": wall}
        best = objectives.choose(ok)
        saved = path.parent / "estimator_report.md"
        estimator_report = saved.read_text() if saved.exists() else ""
        if not estimator_report and exp.fitness.estimator.kind != "full":
            notes.append(f"Phase {index}: the estimator's check against full evaluations is left out (it needs a "
                         "model evaluation, which the run does when it finishes).")
        recipes = [Recipe.from_text(e.recipe) for e in best if e.recipe]
        phases.append(PhaseResult(index, kind, best, recipes, GeneTable(genes), path, estimator_report,
                                  float(best[0].fitness or float("nan"))))
    if not phases:
        raise ValueError(f"{run_dir}: no phase has a successful candidate yet; nothing to report")
    final = phases[-1]
    final.exported_hand_recipe = (summary or {}).get("exported_hand_recipe")
    chosen = {("best" if len(final.best) == 1 else f"pareto-{j + 1}"): r for j, r in enumerate(final.recipes)}
    test = folder.read_json(folder.test_results, {})
    hand = folder.read_json(folder.hand_recipes, {})
    sections = [outputs._phase_section(run_dir, ph, objectives, exp.fitness.estimator.kind != "full", fmt,
                                       dict(zip(chosen, final.best)) if ph is final else {}) for ph in phases]
    outputs._write_report(run_dir, exp, sections, test, util, chosen if summary else {}, final, hand,
                          (summary or {}).get("memory", []), notes)
    return folder.report
