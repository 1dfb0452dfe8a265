"""The run folder, owned in one place: its layout, the run stores' shared meta keys, its state, its lock.

A run folder (``runs/<name>``) holds the frozen ``experiment.yaml`` and the ``fingerprint.json`` of
what its results depend on (written together, when the checks that need no weights have passed),
the reference scores (``hand_recipes.json``, ``sources.json``), calibrations (``calibration/``), one
folder per phase with its run store (``phase<k>-<kind>/run.sqlite``), and at the end the exports
(``best/``, ``pareto-N/`` and their recipes), ``test_results.json``, ``summary.json`` and
``report.md``. Every module that reads or writes one of these asks this object for the path, so the
layout is written down once.

A folder becomes a *run* only when its search begins (a phase store holds a generation or an
evaluation): before that, what a failed or killed start left behind never blocks a corrected
``evomerge search``. One process at a time works in a folder (``lock``); readers (status, export,
report) take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from evomerge.runstore import RunStore, write_atomic

# run-store meta keys shared between modules (written by one, read by another)
GENES = "genes"  # a phase's gene names (run), read by the report of a killed run
DRIFT = "drift"  # the estimator's drift checks [{generation, error: {benchmark: x}, ...}]
FULL_SCORES = "full_scores"  # genome hash -> {benchmark: {"items", ...}} scored on every item
FINAL_CONFIRMED = "final_confirmed"  # hashes the final choice confirmed on every item
ESTIMATOR_CHECK = "estimator_check"  # the report's check of the estimator against full evaluations
RACE = "race"  # a racing generation's state between rounds
TRACKING_LOGGED = "tracking_logged"  # the last generation logged to the trackers
TRACKING_RUN_IDS = "tracking_run_ids"  # {backend: tracked run id}


def drift_log(store: RunStore) -> list[dict[str, Any]]:
    return list(store.get_meta(DRIFT, []) or [])


def full_scores(store: RunStore) -> dict[str, dict[str, Any]]:
    return dict(store.get_meta(FULL_SCORES, {}) or {})


def final_confirmed(store: RunStore) -> list[str]:
    return list(store.get_meta(FINAL_CONFIRMED, []) or [])


class RunInUse(ValueError):
    """Another process holds the run folder's lock."""


_HELD: set[int] = set()  # lock file descriptors this process holds


def _close_in_child() -> None:
    """A forked child (a multiprocessing worker, an engine process) closes its copy of the lock, so the
    lock lives and dies with the process that took it, not with an orphaned child."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


@dataclass(frozen=True)
class RunFolder:
    """One run folder: paths by name, its frozen experiment, whether its search began, its lock."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- layout ---------------------------------------------------------------------------------
    @property
    def experiment(self) -> Path:
        return self.root / "experiment.yaml"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def hand_recipes(self) -> Path:
        return self.root / "hand_recipes.json"

    @property
    def sources(self) -> Path:
        return self.root / "sources.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def test_results(self) -> Path:
        return self.root / "test_results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    def phase_dir(self, index: int, kind: str) -> Path:
        return self.root / f"phase{index}-{kind}"

    def phase_stores(self) -> list[tuple[int, str, Path]]:
        """(index, kind, run store path) of every phase begun so far, in order."""
        out = []
        for d in self.root.glob("phase*-*"):
            head, _, kind = d.name.partition("-")
            if head[5:].isdigit() and (d / "run.sqlite").exists():
                out.append((int(head[5:]), kind, d / "run.sqlite"))
        return sorted(out)

    def read_json(self, path: Path, default: Any = None) -> Any:
        """A JSON file of the folder (``default`` when it is missing); a broken one names the file."""
        if not path.exists():
            return default
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); the run folder is damaged") from None

    # -- the frozen experiment ------------------------------------------------------------------
    def frozen(self) -> tuple[dict[str, Any], Path]:
        """The frozen experiment's data and the folder its relative references are resolved from."""
        if not self.experiment.exists():
            raise ValueError(f"{self.root} holds no run (no experiment.yaml); start one with `evomerge search`")
        data = yaml.safe_load(self.experiment.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{self.experiment}: not an experiment (a mapping of name, models, ...)")
        return data, Path(data.pop("_experiment_dir", self.root))

    def budgets(self) -> list[int]:
        """Each phase's budget of candidates, from the frozen experiment (not validated again: a status
        must work with whatever the run was started with)."""
        data, _ = self.frozen()
        if data.get("phases"):
            return [int(p["budget"]) for p in data["phases"]]
        return [int((data.get("budget") or {}).get("evaluations", 0))]

    def recorded_fingerprint(self) -> dict[str, str] | None:
        """The fingerprint the run recorded when it started (None for a run older than fingerprints)."""
        found = self.read_json(self.fingerprint)
        return None if found is None else {str(k): str(v) for k, v in found.items()}

    def record_fingerprint(self, fingerprint: dict[str, str]) -> None:
        """Write what the run's results depend on (``evomerge.fingerprint``), read back by resume."""
        write_atomic(self.fingerprint, json.dumps(fingerprint, indent=1, sort_keys=True).encode())

    def freeze(self, data: dict[str, Any], fingerprint: dict[str, str]) -> None:
        """Write the experiment and its fingerprint (the fingerprint first: an experiment.yaml is never
        without one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.record_fingerprint(fingerprint)
        write_atomic(self.experiment, yaml.safe_dump(data, sort_keys=False).encode())

    # -- state ----------------------------------------------------------------------------------
    def began(self) -> bool:
        """Whether the search began here: a phase store holds a generation or an evaluation. Each
        store is opened read-only, so a damaged one is refused naming its file."""
        for _, _, path in self.phase_stores():
            with RunStore(path, readonly=True) as store:
                if store.count() or store.generations():
                    return True
        return False

    def owned(self) -> list[Path]:
        """What a run writes in the folder (all that ``clear`` removes; anything else is left alone)."""
        names = [self.experiment, self.fingerprint, self.hand_recipes, self.sources, self.summary,
                 self.test_results, self.report, self.calibration]
        found = [p for p in names if p.exists()]
        for pattern in ("phase*-*", "best", "best.*", "pareto-*"):
            found += sorted(self.root.glob(pattern))
        return found

    def clear(self) -> list[Path]:
        """Remove what a run wrote here (``owned``), leaving the lock and foreign files; what it removed."""
        gone = self.owned()
        for p in gone:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        return gone

    # -- one process per folder -----------------------------------------------------------------
    def holder(self) -> str | None:
        """The pid of the process working in the folder, None when none is (a killed one holds nothing).
        A shared lock held for an instant; a ``lock`` that meets it tries again."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process (``flock``: the kernel releases it when the process dies,
        however it dies), with our pid written in the lock file; refused at once if another holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for attempt in range(5):  # a reader's ``holder`` holds it for an instant only
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.02)
            else:
                pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise RunInUse(f"{self.root} is in use by evomerge process {pid} (a search or resume); wait for "
                               f"it to end or stop it (kill {pid}); `evomerge status {self.root}` shows where it "
                               f"stands") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _HELD.add(fd)
            yield
        finally:
            _HELD.discard(fd)
            os.close(fd)  # releases the lock
