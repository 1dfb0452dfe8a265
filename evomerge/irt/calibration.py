"""A fitted calibration: everything the IRT estimators need, as one file a run can hold.

Plain data (numpy arrays, lists, a JSON-able dict of validation figures) so that the search, the
fitness folder and the report can read it without refitting. One ``.npz`` holds the arrays and a
JSON header; it loads without pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.irt.anchors import Anchors, resolve_budget
from evomerge.irt.fit import ItemParams, Prior

FORMAT = "evomerge-irt-calibration"
VERSION = 1


@dataclass
class Calibration:
    """Item parameters of one benchmark, fitted on a calibration population, plus what the
    estimators derive from them: anchors and the gp-IRT lambda per budget, the models' abilities
    (the parents' among them, for mp-IRT) and the cross-validated errors that chose D."""

    benchmark: str
    item_ids: list[str]
    items: ItemParams
    prior: Prior  # empirical N(mean, cov) of the calibration models' abilities
    model_names: list[str]
    thetas: np.ndarray  # (M, D)
    responses: np.ndarray  # (M, N) calibration responses, NaN = not evaluated
    parents: list[str]  # the models whose abilities mp-IRT mixes (the merge's sources)
    anchors: dict[int, Anchors]  # item count -> anchors
    gp_lambda: dict[int, float]  # item count -> lambda of gp-IRT
    groups: list[str] | None = None  # e.g. skill per item, for stratified baselines and anchors
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        N, M = len(self.item_ids), len(self.model_names)
        if len(set(self.item_ids)) != N:
            raise ValueError("item ids repeat; every benchmark item needs its own id")
        if len(self.items) != N:
            raise ValueError(f"{N} item ids but item parameters for {len(self.items)} items")
        if self.thetas.shape != (M, self.items.dim):
            raise ValueError(f"{M} models of dimension {self.items.dim} but abilities of shape {self.thetas.shape}")
        if self.responses.shape != (M, N):
            raise ValueError(f"responses of shape {self.responses.shape}, expected ({M}, {N})")
        missing = [p for p in self.parents if p not in self.model_names]
        if missing:
            raise ValueError(f"parents {missing} are not calibration models ({self.model_names[:8]}...)")
        if self.groups is not None and len(self.groups) != N:
            raise ValueError(f"{len(self.groups)} group labels for {N} items")

    @property
    def dim(self) -> int:
        return self.items.dim

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def position(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}

    def budget(self, budget: float | int) -> int:
        return resolve_budget(budget, self.num_items)

    def anchors_for(self, budget: float | int) -> Anchors:
        n = self.budget(budget)
        if n not in self.anchors:
            raise KeyError(f"no anchors for {n} items; this calibration has budgets {sorted(self.anchors)} "
                           "(calibrate again with that budget among `budgets`)")
        return self.anchors[n]

    def lambda_for(self, budget: float | int) -> float:
        n = self.budget(budget)
        if n not in self.gp_lambda:
            raise KeyError(f"no gp-IRT lambda for {n} items; this calibration has {sorted(self.gp_lambda)}")
        return self.gp_lambda[n]

    def theta_of(self, names: list[str]) -> np.ndarray:
        where = {n: i for i, n in enumerate(self.model_names)}
        unknown = [n for n in names if n not in where]
        if unknown:
            raise KeyError(f"models {unknown} are not in this calibration; known: {self.model_names[:8]}...")
        return self.thetas[[where[n] for n in names]]

    # ---- one file -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: a calibration is saved as .npz; give a path ending in .npz")
        budgets = sorted(self.anchors)
        header = {
            "format": FORMAT, "version": VERSION, "benchmark": self.benchmark, "item_ids": self.item_ids,
            "groups": self.groups, "model_names": self.model_names, "parents": self.parents,
            "budgets": budgets, "gp_lambda": {str(k): v for k, v in self.gp_lambda.items()},
            "validation": self.validation,
        }
        # Any values: numpy's stub would match a dict of arrays against savez_compressed's allow_pickle
        arrays: dict[str, Any] = {"a": self.items.a, "b": self.items.b, "prior_mean": self.prior.mean,
                                  "prior_cov": self.prior.cov, "thetas": self.thetas, "responses": self.responses}
        for n in budgets:
            arrays[f"anchor_index_{n}"] = self.anchors[n].index
            arrays[f"anchor_weight_{n}"] = self.anchors[n].weight
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, header=np.array(json.dumps(header)), **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z:
                raise ValueError(f"{path} is not an evomerge IRT calibration (no header)")
            h = json.loads(str(z["header"]))
            if h.get("format") != FORMAT or h.get("version") != VERSION:
                raise ValueError(f"{path}: format {h.get('format')} v{h.get('version')}, expected {FORMAT} v{VERSION}")
            anchors = {int(n): Anchors(z[f"anchor_index_{n}"], z[f"anchor_weight_{n}"]) for n in h["budgets"]}
            return cls(
                benchmark=h["benchmark"], item_ids=list(h["item_ids"]), items=ItemParams(z["a"], z["b"]),
                prior=Prior(z["prior_mean"], z["prior_cov"]), model_names=list(h["model_names"]),
                thetas=z["thetas"], responses=z["responses"], parents=list(h["parents"]), anchors=anchors,
                gp_lambda={int(k): float(v) for k, v in h["gp_lambda"].items()}, groups=h["groups"],
                validation=h["validation"])
