"""Experiment tracking (optional, off by default): TensorBoard, Weights & Biases, MLflow.

After each told generation the tracker logs scalars read back from the phase's run store (best so
far, generation best and median, each objective's generation best, items scored, throughput, the
estimator's error where a drift check measured one). Reading from the store, not from the loop,
keeps the loop free of tracking and makes a resume log exactly the generations not logged yet: the
last generation logged and the tracked run's id are kept in the run store's meta, so a resumed run
continues the same W&B / MLflow run (and the same TensorBoard folder) instead of starting another.

Steps are global over the run's phases (phase 1's first generation follows phase 0's last), so a
PS+DFS run reads as one curve; tags carry the phase (``phase0/best``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

import numpy as np

from evomerge.run_folder import TRACKING_LOGGED as LOGGED
from evomerge.run_folder import TRACKING_RUN_IDS as RUN_ID
from evomerge.run_folder import RunFolder, drift_log
from evomerge.runstore import RunStore


class Sink(Protocol):
    def log(self, values: Mapping[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.run_id = str(log_dir)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, spec: Mapping[str, Any], run_dir: Path, run_id: Optional[str], name: str) -> None:
        import wandb

        self.run = wandb.init(project=spec["project"], entity=spec.get("entity"), mode=spec.get("mode", "online"),
                              dir=str(run_dir), id=run_id, resume="allow", name=name, reinit=True)
        self.run_id = self.run.id

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    def __init__(self, spec: Mapping[str, Any], run_id: Optional[str], name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=spec["tracking_uri"])
        if run_id is None:
            exp_name = spec.get("experiment") or name
            found = self.client.get_experiment_by_name(exp_name)
            exp_id = found.experiment_id if found else self.client.create_experiment(exp_name)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.run_id = run_id

    def log(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "."), float(v), now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def generation_scalars(store: RunStore, generation: int, phase: int) -> dict[str, float]:
    """The scalars of told generation ``generation``, from the store alone."""
    evs = store.evaluations()
    mine = [e for e in evs if e.generation == generation]
    upto = [e for e in evs if e.generation is not None and e.generation <= generation]
    fit = [e.fitness for e in mine if e.ok and e.fitness is not None]
    so_far = [e.fitness for e in upto if e.ok and e.fitness is not None]
    p = f"phase{phase}/"
    out: dict[str, float] = {p + "generation": float(generation), p + "candidates": float(len(upto)),
                             p + "failed": float(sum(not e.ok for e in upto))}
    if so_far:
        out[p + "best"] = max(so_far)
    if fit:
        out[p + "generation_best"] = max(fit)
        out[p + "generation_median"] = float(np.median(fit))
    named: dict[str, list[float]] = {}
    for e in mine:
        if e.ok and isinstance(e.objectives, dict):
            for k, v in e.objectives.items():
                named.setdefault(k, []).append(v)
    out.update({f"{p}objective/{k}": max(v) for k, v in named.items()})
    out[p + "items_scored"] = float(sum(len(r.get("scores", ())) for e in upto for r in e.responses or ()))
    gen = next((g for g in store.generations() if g.index == generation), None)
    if gen is not None and gen.told_at and mine:
        span = gen.told_at - min(e.created_at - (e.seconds or 0.0) for e in mine)
        if span > 0:
            out[p + "candidates_per_min"] = 60.0 * len(mine) / span
    drift = next((d for d in drift_log(store) if d.get("generation") == generation), None)
    if drift and drift.get("error"):
        out.update({f"{p}estimator_error/{b}": float(x) for b, x in drift["error"].items()})
        out[p + "estimator_error/mean"] = float(np.mean(list(drift["error"].values())))
    return {k: v for k, v in out.items() if math.isfinite(v)}


class Tracker:
    """The run's sinks; ``on_progress(phase, store, generation)`` is the loop's progress callback."""

    def __init__(self, sinks: dict[str, Sink], run_dir: Path) -> None:
        self.sinks = sinks
        self.run_dir = run_dir
        self._offsets: dict[int, int] = {}

    def _offset(self, phase: int) -> int:
        """Global step of the phase's generation 0: the generations told by earlier phases."""
        if phase not in self._offsets:
            total = 0
            for i, _, path in RunFolder(self.run_dir).phase_stores():
                if i < phase:
                    with RunStore(path, readonly=True) as s:
                        total += sum(g.told for g in s.generations())
            self._offsets[phase] = total
        return self._offsets[phase]

    def on_progress(self, phase: int, store: RunStore, generation: int) -> None:
        """Log every told generation below ``generation`` (the next one) not logged yet."""
        if not self.sinks:
            return
        ids = {n: getattr(s, "run_id", None) for n, s in self.sinks.items()}
        if store.get_meta(RUN_ID) != ids:
            store.set_meta(RUN_ID, ids)
        last = store.get_meta(LOGGED, -1)
        for g in range(last + 1, generation):
            values = generation_scalars(store, g, phase)
            for sink in self.sinks.values():
                sink.log(values, self._offset(phase) + g)
            store.set_meta(LOGGED, g)

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()


def known_run_ids(run_dir: Path) -> dict[str, str]:
    """Tracked-run ids kept in the run's stores (a resume continues those runs)."""
    ids: dict[str, str] = {}
    for _, _, path in RunFolder(run_dir).phase_stores():
        with RunStore(path, readonly=True) as s:
            ids.update({k: v for k, v in (s.get_meta(RUN_ID) or {}).items() if v})
    return ids


def open_tracker(spec: Any, run_dir: Path, name: str) -> Tracker:
    """The sinks ``spec`` (the experiment's ``tracking:``, or None) asks for; none by default."""
    sinks: dict[str, Sink] = {}
    if spec is None:
        return Tracker(sinks, run_dir)
    ids = known_run_ids(run_dir)
    if spec.tensorboard:
        log_dir = Path(spec.tensorboard)
        sinks["tensorboard"] = TensorBoardSink(log_dir if log_dir.is_absolute() else run_dir / log_dir)
    if spec.wandb is not None:
        sinks["wandb"] = WandbSink(spec.wandb.model_dump(), run_dir, ids.get("wandb"), name)
    if spec.mlflow is not None:
        sinks["mlflow"] = MlflowSink(spec.mlflow.model_dump(), ids.get("mlflow"), name)
    return Tracker(sinks, run_dir)
