"""The run store: one SQLite file per run, everything a run needs to survive SIGKILL and resume exactly.

Tables
- ``meta``: key -> JSON (experiment, seed, versions, created, ...).
- ``evaluations``: one row per distinct genome, keyed by `genome_hash`: genome, recipe, objectives
  (a vector, or named values), fitness (the scalar a single-objective search maximizes), the
  candidate's seed, per-item responses (zlib-compressed JSON), seconds, worker, error, generation,
  status, attempts.
- ``generations``: the genome hashes asked in each generation, whether it was told, best so far.
- ``searcher_state``: the latest searcher state blob, written in the SAME transaction that marks its
  generation told: after a crash either the tell happened with its state, or neither did.

Why SQLite in WAL mode: each commit is atomic and, once ``commit`` returns, survives a SIGKILL of the
process (the WAL is in the OS's hands); readers (a report, a plot) read a consistent snapshot while
the driver writes, without blocking it. ``synchronous=FULL`` also fsyncs the WAL at every commit, so
a commit survives power loss or an OS crash too. Its cost (one fsync per commit, ~ms) is nothing next
to the evaluation of an LLM candidate (seconds), so durability wins over NORMAL here.

One writer (the search driver) per file; any number of readers (``RunStore(path, readonly=True)``).
A connection belongs to the process (and thread) that opened it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    hash        TEXT PRIMARY KEY,
    genome      TEXT NOT NULL,
    recipe      TEXT,
    objectives  TEXT,
    fitness     REAL,
    seed        INTEGER,
    responses   BLOB,
    seconds     REAL,
    worker      TEXT,
    error       TEXT,
    generation  INTEGER,
    status      TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 1,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_generation ON evaluations (generation);
CREATE TABLE IF NOT EXISTS generations (
    idx        INTEGER PRIMARY KEY,
    asked      TEXT NOT NULL,
    told       INTEGER NOT NULL DEFAULT 0 CHECK (told IN (0, 1)),
    best       TEXT,
    best_hash  TEXT,
    asked_at   REAL NOT NULL,
    told_at    REAL
);
CREATE TABLE IF NOT EXISTS searcher_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  INTEGER NOT NULL,
    state       BLOB NOT NULL,
    updated_at  REAL NOT NULL
);
"""


def canonical_genome(genome: Any) -> np.ndarray:
    """The genome as the run store sees it: 1-D float64, finite, -0.0 written as 0.0."""
    g = np.array(genome, dtype=np.float64).reshape(-1)
    if g.size == 0:
        raise ValueError("a genome must have at least one gene")
    if not np.all(np.isfinite(g)):
        bad = np.flatnonzero(~np.isfinite(g)).tolist()
        raise ValueError(f"genome has non-finite genes at {bad}: genomes are finite floats")
    return g + 0.0


def genome_hash(genome: Any) -> str:
    """sha256 of the canonical genome's little-endian float64 bytes.

    Exact, not rounded: a resumed searcher re-asks bit-identical genomes, so exact identity is what a
    resume needs, and two genomes that differ in the last bit are different candidates (a DARE seed
    or a layer plan may hang on them). The same genome (any dtype that holds the same values, either
    sign of zero) always hashes the same.
    """
    return hashlib.sha256(canonical_genome(genome).astype("<f8").tobytes()).hexdigest()


def _as_objectives(obj: Any) -> np.ndarray | dict[str, float] | None:
    """A vector (searcher order) or named values (a mapping); an empty mapping means none."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return {str(k): float(v) for k, v in obj.items()} or None
    return np.array(obj, dtype=np.float64).reshape(-1)


def _objective_values(obj: np.ndarray | dict[str, float] | None) -> np.ndarray:
    if obj is None:
        return np.zeros(0)
    return np.array(list(obj.values()) if isinstance(obj, dict) else obj, dtype=np.float64)


def _usable(objectives: np.ndarray | dict[str, float] | None, fitness: float | None) -> bool:
    """What an 'ok' evaluation must have: objectives, all finite, and a finite fitness if any."""
    return (objectives is not None and bool(np.all(np.isfinite(_objective_values(objectives))))
            and (fitness is None or math.isfinite(fitness)))


def _nan_to_null(v: float) -> float | None:
    return None if math.isnan(v) else v


def _objectives_to_json(obj: np.ndarray | dict[str, float] | None) -> str | None:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return json.dumps({k: _nan_to_null(v) for k, v in obj.items()})
    return json.dumps([_nan_to_null(v) for v in obj.tolist()])


def _objectives_from_json(text: str | None) -> np.ndarray | dict[str, float] | None:
    if text is None:
        return None
    value = json.loads(text)
    if isinstance(value, dict):
        return {k: np.nan if v is None else float(v) for k, v in value.items()}
    return np.array([np.nan if v is None else v for v in value], dtype=np.float64)


def _pack_responses(responses: Any) -> bytes | None:
    if responses is None:
        return None
    return zlib.compress(json.dumps(responses, separators=(",", ":"), allow_nan=False).encode(), 6)


def _unpack_responses(blob: bytes | None) -> Any:
    return None if blob is None else json.loads(zlib.decompress(blob))


@dataclass
class Evaluation:
    """One evaluated candidate.

    ``objectives`` (maximized) are a vector in the searcher's order or named values (a dict, kept in
    its order); they come back from the store as they went in. ``fitness`` is the scalar a
    single-objective search maximizes (e.g. a weighted mean of named objectives); ``seed`` the
    candidate's own randomness (DARE masks), so it can be rebuilt. ``responses`` is any JSON value,
    typically a list of ``ItemResponses.to_json()`` (kept compressed; thousands of items are fine).
    ``rowid`` is the store's insertion order (None until read back from a store).
    """

    genome: np.ndarray
    objectives: np.ndarray | dict[str, float] | None
    recipe: str | None = None
    responses: Any = None
    seconds: float | None = None
    worker: str | None = None
    error: str | None = None
    generation: int | None = None
    status: str = "ok"
    attempts: int = 1
    created_at: float = field(default_factory=time.time)
    fitness: float | None = None
    seed: int | None = None
    rowid: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.genome = canonical_genome(self.genome)
        self.objectives = _as_objectives(self.objectives)
        self.fitness = None if self.fitness is None else float(self.fitness)
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "ok" and not _usable(self.objectives, self.fitness):
            raise ValueError(f"an 'ok' evaluation needs finite objectives and a finite fitness (got objectives "
                             f"{self.objectives}, fitness {self.fitness}); record a failure with status='failed'")

    @classmethod
    def of(cls, genome: Any, objectives: Any = None, fitness: float | None = None, error: str | None = None,
           **fields: Any) -> "Evaluation":
        """An evaluation whose status follows from its content: 'failed' when there is an error, no
        objectives, a non-finite objective or a non-finite fitness; 'ok' otherwise."""
        obj = _as_objectives(objectives)
        failed = error is not None or not _usable(obj, fitness)
        return cls(genome, obj, fitness=fitness, error=error, status="failed" if failed else "ok", **fields)

    @property
    def hash(self) -> str:
        return genome_hash(self.genome)

    @property
    def genome_hash(self) -> str:
        return self.hash

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Generation:
    index: int
    asked: list[str]
    told: bool
    best: list[float] | dict[str, float] | None
    best_hash: str | None
    asked_at: float
    told_at: float | None


class RunStore:
    """One run's SQLite file (created if missing). See the module docstring for the guarantees."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False, export_state: bool = True,
                 timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.export_state = export_state and not readonly
        if readonly and not self.path.exists():
            raise FileNotFoundError(f"no run store at {self.path}")
        if not readonly and not self.path.exists():
            _create(self.path, timeout)
        try:
            self._open(timeout)
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and "no such table" not in str(err):
                raise  # locked, I/O: not the file's content
            raise RunStoreDamaged(f"{self.path}: the run store is damaged ({err}); it is never treated as a new "
                                  f"run: restore the file from a backup, or start the run again in another "
                                  f"folder") from None
        version = self.get_meta("schema_version")
        if version != SCHEMA_VERSION:
            self._db.close()
            raise RuntimeError(f"{self.path}: run store schema {version!r}, this evomerge reads {SCHEMA_VERSION}")

    def _open(self, timeout: float) -> None:
        """Connect to an existing store; one without its meta table (emptied, not a store) raises."""
        if self.readonly:
            uri = "file:" + urllib.request.pathname2url(str(self.path.resolve())) + "?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        else:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        try:
            self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if self.readonly:
                return
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); "
                                   f"put the run on a local filesystem")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._write():  # tables added by a later schema of the same version
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
        except BaseException:
            self._db.close()
            raise

    genome_hash = staticmethod(genome_hash)

    # ---- plumbing -------------------------------------------------------------------------------
    def _write(self) -> "_Transaction":
        if self.readonly:
            raise PermissionError(f"{self.path} was opened read-only")
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def state_file(self) -> Path:
        """Where the latest searcher state is exported for humans and tools (beside the db)."""
        return self.path.with_name(self.path.name + ".searcher-state")

    # ---- meta -----------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self._write():
            self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                             (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta ORDER BY key")}

    # ---- evaluations ----------------------------------------------------------------------------
    def lookup(self, genome: Any) -> Evaluation | None:
        """The stored evaluation of this exact genome (ok or failed), or None."""
        h = genome_hash(genome)
        row = self._db.execute(f"SELECT {_EVAL_COLUMNS} FROM evaluations WHERE hash=?", (h,)).fetchone()
        return None if row is None else _evaluation(row)

    def record(self, evaluation: Evaluation) -> bool:
        """Store an evaluation; returns whether the store changed.

        Idempotent on the genome hash: a genome recorded 'ok' is final, later records of it are
        ignored (so a resumed run never double counts). A genome recorded 'failed' is replaced by a
        new record (a retry), with ``attempts`` counting the tries.
        """
        if not isinstance(evaluation, Evaluation):
            raise TypeError(f"record() takes an Evaluation, got {type(evaluation).__name__}")
        e = evaluation
        h = e.hash
        fitness = None if e.fitness is None or math.isnan(e.fitness) else e.fitness
        values = (json.dumps(e.genome.tolist()), e.recipe, _objectives_to_json(e.objectives), fitness, e.seed,
                  _pack_responses(e.responses), e.seconds, e.worker, e.error, e.generation, e.status, e.created_at)
        with self._write():
            row = self._db.execute("SELECT status, attempts FROM evaluations WHERE hash=?", (h,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO evaluations (hash, genome, recipe, objectives, fitness, seed, "
                                 "responses, seconds, worker, error, generation, status, created_at, attempts) "
                                 "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                 (h, *values, e.attempts))
                return True
            if row[0] == "ok":
                return False
            self._db.execute("UPDATE evaluations SET genome=?, recipe=?, objectives=?, fitness=?, seed=?, "
                             "responses=?, seconds=?, worker=?, error=?, generation=?, status=?, created_at=?, "
                             "attempts=? WHERE hash=?",
                             (*values, row[1] + 1, h))
            return True

    def evaluations(self, status: str | None = None, responses: bool = True) -> list[Evaluation]:
        """Every stored evaluation (optionally only 'ok' or 'failed'), in the order first recorded;
        ``responses=False`` leaves the item responses out (None), which is most of the reading."""
        columns = _EVAL_COLUMNS if responses else _EVAL_COLUMNS.replace("responses", "NULL")
        return [_evaluation(r) for r in self._select_evaluations(columns, status)]

    def item_counts(self, after_rowid: int = 0) -> dict[int, int]:
        """rowid -> items scored (the length of every stored response) for evaluations after
        ``after_rowid``: a status refresh reads only the new ones."""
        rows = self._db.execute("SELECT rowid, responses FROM evaluations WHERE rowid > ? ORDER BY rowid",
                                (after_rowid,)).fetchall()
        return {int(r): sum(len(x.get("scores", ())) for x in _unpack_responses(b) or () if isinstance(x, dict))
                for r, b in rows}

    def count(self, status: str | None = None) -> int:
        self._check_status(status)
        if status is None:
            return self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM evaluations WHERE status=?", (status,)).fetchone()[0]

    def history(self) -> list[dict[str, Any]]:
        """One flat row per evaluation, in the order recorded, for CSV files and plots.

        Columns: hash, generation, status, attempts, seconds, worker, created_at, error, seed, fitness,
        best_fitness (running max over 'ok' rows), obj_<name or index> (NaN for a failed row),
        best_<name or index> (running max per objective over 'ok' rows), gene_0..gene_{d-1}.
        """
        cols = ("hash, generation, status, attempts, seconds, worker, created_at, error, seed, fitness, objectives, "
                "genome")
        raw = self._select_evaluations(cols, None)
        objs = [_objectives_from_json(r[10]) for r in raw]
        keys: list[str] = []  # objective column names, in first-seen order; failed rows may have none
        for o in objs:
            for k in (o.keys() if isinstance(o, dict) else map(str, range(0 if o is None else len(o)))):
                if k not in keys:
                    keys.append(k)
        best = dict.fromkeys(keys, np.nan)
        best_fitness = np.nan
        rows = []
        for row_, o in zip(raw, objs):
            h, gen, status, attempts, secs, worker, created, error, seed, fitness, _, genome_text = row_
            named = o if isinstance(o, dict) else {str(i): v for i, v in enumerate([] if o is None else o)}
            values = {k: float(named.get(k, np.nan)) for k in keys}
            fitness = np.nan if fitness is None else float(fitness)
            if status == "ok":
                best = {k: float(np.fmax(best[k], values[k])) for k in keys}
                best_fitness = float(np.fmax(best_fitness, fitness))
            row: dict[str, Any] = {"hash": h, "generation": gen, "status": status, "attempts": attempts,
                                   "seconds": secs, "worker": worker, "created_at": created, "error": error,
                                   "seed": seed, "fitness": fitness, "best_fitness": best_fitness}
            row.update({f"obj_{k}": v for k, v in values.items()})
            row.update({f"best_{k}": v for k, v in best.items()})
            row.update({f"gene_{i}": v for i, v in enumerate(json.loads(genome_text))})
            rows.append(row)
        return rows

    def count_from(self, generation: int) -> int:
        """Evaluations recorded for generation ``generation`` or later (the batch in flight when a run
        stopped before its tell)."""
        return int(self._db.execute("SELECT COUNT(*) FROM evaluations WHERE generation >= ?",
                                    (int(generation),)).fetchone()[0])

    def best_fitness(self) -> float | None:
        """The highest fitness among 'ok' evaluations (None before any has a fitness)."""
        return self._db.execute("SELECT MAX(fitness) FROM evaluations WHERE status='ok'").fetchone()[0]

    # ---- generations and the searcher state -----------------------------------------------------
    def begin_generation(self, index: int, genomes: Sequence[Any]) -> None:
        """Note the genomes asked in generation ``index`` (before evaluating them).

        Calling it again with the same genomes is a no-op (a resumed run re-asks the same
        generation). Different genomes for an open generation mean the searcher state and the store
        disagree, which must not pass silently.
        """
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"generation index must be an integer >= 0, got {index!r}")
        hashes = [genome_hash(g) for g in genomes]
        if not hashes:
            raise ValueError(f"generation {index}: no genomes")
        with self._write():
            row = self._db.execute("SELECT asked, told FROM generations WHERE idx=?", (int(index),)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO generations (idx, asked, told, asked_at) VALUES (?, ?, 0, ?)",
                                 (int(index), json.dumps(hashes), time.time()))
                return
            if row[1]:
                raise ValueError(f"generation {index} was already told; resume from the state after it "
                                 f"(last_state()) and begin generation {self._next_index()}")
            if json.loads(row[0]) != hashes:
                raise ValueError(f"generation {index} was begun with other genomes: the searcher does not match "
                                 f"this run store (different seed, options, or state?)")

    def commit_tell(self, index: int, searcher_state: bytes, best: Sequence[float] | Mapping[str, float] | None = None,
                    best_hash: str | None = None) -> None:
        """Mark generation ``index`` told and store the searcher state after the tell, atomically.

        Every asked genome must have its evaluation recorded first: a tell whose evaluations are not
        in the store could not be replayed after a crash.
        """
        if not isinstance(searcher_state, (bytes, bytearray, memoryview)):
            raise TypeError(f"searcher_state must be bytes (Searcher.state_dict()), "
                            f"got {type(searcher_state).__name__}")
        best_json = None if best is None else _objectives_to_json(_as_objectives(best))
        with self._write():
            row = self._db.execute("SELECT asked, told FROM generations WHERE idx=?", (int(index),)).fetchone()
            if row is None:
                raise ValueError(f"generation {index} was never begun; call begin_generation({index}, genomes) first")
            if row[1]:
                raise ValueError(f"generation {index} is already told")
            asked = sorted(set(json.loads(row[0])))
            found = {r[0] for r in self._db.execute(
                f"SELECT hash FROM evaluations WHERE hash IN ({','.join('?' * len(asked))})", asked)}
            missing = [h for h in asked if h not in found]
            if missing:
                raise ValueError(f"generation {index}: {len(missing)} asked genome(s) have no recorded evaluation "
                                 f"(e.g. {missing[0][:12]}); record() them before commit_tell()")
            now = time.time()
            self._db.execute("UPDATE generations SET told=1, best=?, best_hash=?, told_at=? WHERE idx=?",
                             (best_json, best_hash, now, int(index)))
            self._db.execute("INSERT INTO searcher_state (id, generation, state, updated_at) VALUES (1, ?, ?, ?) "
                             "ON CONFLICT(id) DO UPDATE SET generation=excluded.generation, state=excluded.state, "
                             "updated_at=excluded.updated_at", (int(index), bytes(searcher_state), now))
        if self.export_state:
            write_atomic(self.state_file, bytes(searcher_state))

    def last_state(self) -> tuple[int, bytes] | None:
        """(generation index, searcher state) of the last committed tell, or None before any."""
        row = self._db.execute("SELECT generation, state FROM searcher_state WHERE id=1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def generations(self) -> list[Generation]:
        return [Generation(i, json.loads(a), bool(t), None if b is None else json.loads(b), bh, at, tt)
                for i, a, t, b, bh, at, tt in self._db.execute(
                    "SELECT idx, asked, told, best, best_hash, asked_at, told_at FROM generations ORDER BY idx")]

    def _next_index(self) -> int:
        last = self.last_state()
        return 0 if last is None else last[0] + 1

    # ---- helpers --------------------------------------------------------------------------------
    def integrity_check(self) -> str:
        """SQLite's own check of the file ('ok' when sound)."""
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def journal_mode(self) -> str:
        return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def _select_evaluations(self, columns: str, status: str | None) -> Iterable[tuple]:
        self._check_status(status)
        if status is None:
            return self._db.execute(f"SELECT {columns} FROM evaluations ORDER BY rowid").fetchall()
        sql = f"SELECT {columns} FROM evaluations WHERE status=? ORDER BY rowid"
        return self._db.execute(sql, (status,)).fetchall()

    @staticmethod
    def _check_status(status: str | None) -> None:
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES} or None, got {status!r}")


class RunStoreDamaged(ValueError):
    """A run store file that cannot be read as one (truncated, emptied, overwritten)."""


def _create(path: Path, timeout: float) -> None:
    """A new, empty store at ``path``, made beside it and renamed into place: a ``run.sqlite`` that
    exists is always a whole store, so an empty or schema-less one is damage, never a new run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    os.close(fd)
    try:
        db = sqlite3.connect(tmp, timeout=timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
            db.execute("INSERT INTO meta VALUES ('created_at', ?)", (json.dumps(time.time()),))
            db.execute("COMMIT")
        finally:
            db.close()  # checkpoints the WAL into the file and removes it
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    _fsync_dir(path.parent)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): takes the write lock up front, so two writers
    queue on busy_timeout instead of failing with a deadlock when a read upgrades to a write."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


_EVAL_COLUMNS = ("genome, objectives, recipe, responses, seconds, worker, error, generation, status, attempts, "
                 "created_at, fitness, seed, rowid")


def _evaluation(row: tuple) -> Evaluation:
    genome, obj, recipe, responses, seconds, worker, error, generation, status, attempts, created, fitness, seed, \
        rowid = row
    return Evaluation(np.array(json.loads(genome), dtype=np.float64), _objectives_from_json(obj), recipe,
                      _unpack_responses(responses), seconds, worker, error, generation, status, attempts, created,
                      fitness, seed, rowid)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one:
    temp file in the same directory, fsync, rename over, fsync the directory (so the rename lasts)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` last (its directory entry on disk)."""
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
