"""The calibrations a run has made, on disk, so a resumed run uses exactly the one it had.

``RUN/calibration/initial/`` holds the calibration made before the search; a drift check at
(phase, generation) that recalibrates writes ``RUN/calibration/t<tag>/`` with ``tag = phase *
1_000_000 + generation``. Each folder holds ``<benchmark>.npz`` (the fitted model and anchors) and
``<benchmark>.population.npz`` (the responses it was fitted on), and a ``complete`` marker written
last: a folder without it (a run killed while writing) is never used, and is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from evomerge.estimators.base import EstimatorInputs
from evomerge.irt.calibrate import Population
from evomerge.irt.calibration import Calibration
from evomerge.run_folder import RunFolder

INITIAL = -1  # tag of the calibration made before the search


def tag_of(phase: int, generation: int) -> int:
    """Calibrations are ordered by the (phase, generation) whose drift check made them."""
    return phase * 1_000_000 + generation


@dataclass(frozen=True)
class CalibrationLog:
    run_dir: Path

    def folder(self, tag: int) -> Path:
        return RunFolder(self.run_dir).calibration / (f"t{tag:09d}" if tag >= 0 else "initial")

    def tags(self) -> list[int]:
        """Every complete calibration's tag, oldest first."""
        root = RunFolder(self.run_dir).calibration
        tags = [INITIAL] if (root / "initial" / "complete").exists() else []
        return sorted(tags + [int(p.name[1:]) for p in root.glob("t*") if (p / "complete").exists()])

    def latest(self, before: Optional[int] = None) -> Optional[int]:
        """The newest complete calibration made before ``before`` (a tag): what a generation uses."""
        tags = [t for t in self.tags() if before is None or t < before]
        return max(tags) if tags else None

    def refits(self, phase: int) -> int:
        """Complete recalibrations made by the drift checks of ``phase``."""
        return sum(1 for t in self.tags() if tag_of(phase, 0) <= t < tag_of(phase + 1, 0))

    def initial_responses(self) -> int:
        """Answers scored for the calibration made before the search (0 when there is none)."""
        if INITIAL not in self.tags():
            return 0
        total = 0
        for pop in sorted(self.folder(INITIAL).glob("*.population.npz")):
            with np.load(pop, allow_pickle=False) as z:
                total += int(np.isfinite(z["responses"]).sum())
        return total

    def load(self, tag: int) -> tuple[dict[str, Calibration], dict[str, Population]]:
        d = self.folder(tag)
        cals = {p.name[: -len(".npz")]: Calibration.load(p) for p in sorted(d.glob("*.npz"))
                if ".population" not in p.name}
        pops = {p.name[: -len(".population.npz")]: Population.load(p) for p in sorted(d.glob("*.population.npz"))}
        return cals, pops

    def save(self, tag: int, cals: Mapping[str, Calibration], pops: Mapping[str, Population]) -> None:
        """Write a complete calibration for ``tag`` (the marker last, after every file)."""
        save_calibrations(self.folder(tag), cals, pops)


def score_population(inputs: EstimatorInputs, n_models: int) -> tuple[dict[str, Population], list[str]]:
    """The calibration population (the sources and ``n_models`` random genomes) scored on every fitness
    item: a population per benchmark, and the names of the sources among its members (the parents)."""
    recipes = inputs.calibration_recipes(n_models)
    inputs.say(f"calibrating the fitness estimator ({inputs.spec.kind}): {len(recipes)} models x "
               f"{sum(len(v) for v in inputs.item_ids.values())} items")
    full = inputs.score_all(recipes)
    names = list(recipes)
    pops = {b: Population(names, ids, np.stack([full[n][b] for n in names])) for b, ids in inputs.item_ids.items()}
    return pops, [n for n in names if n.startswith("source:")]


def save_calibrations(folder: Path, cals: Mapping[str, Calibration], pops: Mapping[str, Population]) -> None:
    """``<benchmark>.npz`` and ``<benchmark>.population.npz`` for each benchmark, then ``complete``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "complete").unlink(missing_ok=True)
    for bench, cal in cals.items():
        cal.save(folder / f"{bench}.npz")
        pops[bench].save(folder / f"{bench}.population.npz")
    (folder / "complete").write_text("")
