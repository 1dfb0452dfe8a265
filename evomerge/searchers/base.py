"""One ask/tell interface for every search driver: genomes in a box, objectives maximized.

The interface speaks of genomes and objectives, not populations, so that a non-evolutionary
searcher (gradient-based, Bayesian) fits it too. The base class owns everything that is the same
for all engines, so that each engine is a few small hooks:

- bounds and objectives checked where they enter; genomes clipped into the box on the way out;
- failed candidates (NaN objectives) turned into a finite "worst" loss (`fill_failed`);
- the asked-but-not-told genomes (``pending``), and their re-issue after a resume;
- the best genome / Pareto front over everything told;
- the state bytes (`state.pack`): spec + the common part + the engine's own state.

Pending genomes and resume. ``state_dict()`` may be called at any time. It saves the pending
genomes together with the engine, and after ``from_state`` the next ``ask()`` calls hand the pending
genomes out again, in their original order, before anything new. So a driver that re-asks after a
resume sees exactly what an uninterrupted run had in flight (it can look the finished ones up in
its run store instead of evaluating them again), and the engine continues bit-identically as long
as the tells come in the same order as in the uninterrupted run.

Generational searchers (``steady_state = False``: cmaes, pymoo) hand out one generation per
``ask()``; asking again before the tell returns the same generation; the tell must cover all of it,
in any order. Steady-state searchers (``steady_state = True``: nevergrad, random) may be asked
repeatedly before any tell (``ask(n)``), and told one candidate at a time, in any order.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from evomerge.searchers.names import searcher_class
from evomerge.searchers.state import FORMAT, decode_array, encode_array, pack, unpack


@dataclass(frozen=True)
class SearcherSpec:
    """Everything needed to build a searcher from scratch: plain, JSON-able, validated."""

    name: str
    lower: np.ndarray
    upper: np.ndarray
    x0: np.ndarray | None = None
    n_obj: int = 1
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    #: genomes the first population must hold besides x0 (e.g. the source models, the hand recipes the
    #: space contains), evaluated first; searchers with ``takes_starts`` only
    starts: Sequence[np.ndarray] = ()

    def __post_init__(self) -> None:
        lower = np.array(self.lower, dtype=np.float64, copy=True)
        upper = np.array(self.upper, dtype=np.float64, copy=True)
        if lower.ndim != 1 or upper.ndim != 1 or lower.shape != upper.shape or lower.size == 0:
            raise ValueError(f"lower and upper must be 1-D arrays of the same non-zero length, got shapes "
                             f"{lower.shape} and {upper.shape}")
        if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
            raise ValueError("lower and upper must be finite: every gene needs a bounded range")
        bad = np.flatnonzero(~(lower < upper))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"gene {i}: lower {lower[i]} must be < upper {upper[i]} "
                             f"(fix the bounds of the search space)")
        x0 = None if self.x0 is None else _in_box("x0", self.x0, lower, upper)
        starts = tuple(_in_box(f"starts[{j}]", s, lower, upper) for j, s in enumerate(self.starts))
        if isinstance(self.n_obj, bool) or not isinstance(self.n_obj, (int, np.integer)) or self.n_obj < 1:
            raise ValueError(f"n_obj must be an integer >= 1, got {self.n_obj!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        try:
            options = json.loads(json.dumps(dict(self.options), default=_numpy_to_plain))
        except (TypeError, ValueError) as e:
            raise ValueError(f"searcher options must be plain JSON values (numbers, strings, lists, dicts): "
                             f"{e}") from None
        for arr in (lower, upper) + ((x0,) if x0 is not None else ()) + starts:
            arr.setflags(write=False)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        object.__setattr__(self, "x0", x0)
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "n_obj", int(self.n_obj))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "options", options)

    @property
    def dim(self) -> int:
        return int(self.lower.size)

    @property
    def centre(self) -> np.ndarray:
        return (self.lower + self.upper) / 2

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "lower": self.lower.tolist(), "upper": self.upper.tolist(),
                "x0": None if self.x0 is None else self.x0.tolist(), "n_obj": self.n_obj, "seed": self.seed,
                "options": self.options, "starts": [s.tolist() for s in self.starts]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearcherSpec":
        return cls(d["name"], np.array(d["lower"]), np.array(d["upper"]),
                   None if d["x0"] is None else np.array(d["x0"]), d["n_obj"], d["seed"], d["options"],
                   [np.array(s) for s in d.get("starts", [])])


def _in_box(what: str, x: Any, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """A float64 copy of genome ``x``, checked to be one genome inside [lower, upper]."""
    x = np.array(x, dtype=np.float64, copy=True)
    if x.shape != lower.shape:
        raise ValueError(f"{what} has shape {x.shape}, the genome has {lower.shape}")
    out = np.flatnonzero(~((x >= lower) & (x <= upper)))
    if out.size:
        i = int(out[0])
        raise ValueError(f"{what}[{i}] = {x[i]} lies outside [{lower[i]}, {upper[i]}]; "
                         f"give {what} inside the bounds")
    return x


def _numpy_to_plain(x: Any) -> Any:
    """numpy scalars and arrays in options become their plain JSON equivalents; anything else fails."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not a JSON value")


def check_options(name: str, options: dict[str, Any], allowed: dict[str, str]) -> None:
    """Unknown option names fail loudly (a typo must not silently fall back to a default)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listing = "; ".join(f"{k}: {v}" for k, v in sorted(allowed.items())) or "none"
        raise ValueError(f"{name}: unknown option(s) {unknown}. Accepted options: {listing}")


def fill_failed(losses: np.ndarray, worst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace failed entries (NaN) of a (n, n_obj) loss matrix by a finite loss worse than any seen.

    ``worst`` holds, per objective, the largest finite loss seen so far (NaN if none yet). A failed
    candidate gets ``worst + max(1, |worst|)`` (1.0 when nothing finite was seen): strictly worse than
    every real result so far, yet finite and on the objective's scale, because model-based engines
    (nevergrad's) and crowding distances (pymoo's) do badly with infinities. Returns the filled losses
    and the updated ``worst``.
    """
    losses = np.array(losses, dtype=np.float64, copy=True)
    finite = np.where(np.isnan(losses), -np.inf, losses)
    batch_worst = finite.max(axis=0) if len(losses) else np.full(losses.shape[1], -np.inf)
    worst = np.where(np.isnan(worst), batch_worst, np.fmax(worst, batch_worst))
    worst = np.where(np.isneginf(worst), np.nan, worst)
    penalty = np.where(np.isnan(worst), 1.0, worst + np.maximum(1.0, np.abs(worst)))
    rows, cols = np.nonzero(np.isnan(losses))
    losses[rows, cols] = penalty[cols]
    return losses, worst


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """a Pareto-dominates b for maximized objectives."""
    return bool(np.all(a >= b) and np.any(a > b))


def update_front(front: list[tuple[np.ndarray, np.ndarray]], genome: np.ndarray,
                 objectives: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The non-dominated set after adding one told candidate (maximized; NaN = failed, never enters).

    A candidate equal in every objective to a member does not enter (first found wins), so for one
    objective the front is the single best, ties going to the earliest.
    """
    if np.any(np.isnan(objectives)):
        return front
    if any(np.all(f >= objectives) for _, f in front):
        return front
    kept = [(g, f) for g, f in front if not dominates(objectives, f)]
    return kept + [(genome, objectives)]


class Searcher(ABC):
    """Ask/tell search over a box; see the module docstring for the contract."""

    #: True if asks may be repeated before tells and tells may come one by one, out of order.
    steady_state: ClassVar[bool] = False
    #: Whether more than one objective is supported.
    multi_objective: ClassVar[bool] = True
    #: Whether a starting population (``spec.starts``) is supported.
    takes_starts: ClassVar[bool] = False

    spec: SearcherSpec
    _pending: list[np.ndarray]
    _pending_keys: list[int]  # a stable id per pending genome, so positions can shift
    _next_key: int
    _reissue: list[int]  # keys of pending genomes to hand out again after a resume
    _front: list[tuple[np.ndarray, np.ndarray]]
    _worst: np.ndarray
    _n_told: int

    @classmethod
    def several_objectives(cls, name: str, options: Mapping[str, Any]) -> bool:
        """Whether searcher ``name`` with ``options`` is told every objective (a Pareto search) rather
        than the scalar fitness: ``multi_objective: true`` in the options of a searcher that can do
        either (random, nevergrad); pymoo decides by its algorithm."""
        several = bool(options.get("multi_objective", False))
        if several and not cls.multi_objective:
            raise ValueError(f"{name} optimizes a single objective (multi_objective: true asks for a Pareto search); "
                             f"use 'nsga2' (or another multi-objective searcher) for several objectives")
        return several

    def __init__(self, spec: SearcherSpec) -> None:
        if spec.n_obj > 1 and not self.multi_objective:
            raise ValueError(f"{spec.name} optimizes a single objective, got n_obj={spec.n_obj}; "
                             f"use 'nsga2' (or another multi-objective searcher) for several objectives")
        if spec.starts and not self.takes_starts:
            raise ValueError(f"{spec.name} takes no starting genomes (starts); give it x0 only")
        self._init_common(spec)
        self._start()

    # ---- public interface ------------------------------------------------------------------------
    @property
    def n_obj(self) -> int:
        return self.spec.n_obj

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pending(self) -> list[np.ndarray]:
        """Genomes asked and not yet told (copies)."""
        return [g.copy() for g in self._pending]

    @property
    def selection_size(self) -> int | None:
        """How many the searcher keeps from a generation together with its ``incumbents`` (the cut a
        racing estimator races against: CMA-ES's mu parents, NSGA-II's population), None when it has
        no such cut (steady-state searchers, algorithms whose survival is not a plain cut)."""
        return None

    @property
    def incumbents(self) -> list[np.ndarray]:
        """Genomes already told that compete with the next generation for the ``selection_size`` places
        (NSGA-II: its current population, as in (mu + lambda) survival); none for CMA-ES, whose
        parents come from the generation alone."""
        return []

    @property
    def n_told(self) -> int:
        return self._n_told

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        """The next genomes to evaluate (at least one).

        Generational searchers return a whole generation (``n`` must be None); asking again before
        the tell returns the same generation.
        Steady-state searchers return ``n`` genomes (default: their batch size), re-issuing pending
        genomes restored by `from_state` first.
        """
        if not self.steady_state:
            if n is not None:
                raise ValueError(f"{self.name} is generational: ask() returns one whole generation; "
                                 f"call it without n")
            if not self._pending:
                self._add_pending(self._ask(None))
            return self.pending
        n = self._default_batch() if n is None else n
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"ask(n): n must be an integer >= 1, got {n!r}")
        out: list[np.ndarray] = []
        while self._reissue and len(out) < n:
            out.append(self._pending[self._position(self._reissue.pop(0))].copy())
        if len(out) < n:
            fresh = self._add_pending(self._ask(n - len(out)))
            out.extend(g.copy() for g in fresh)
        return out

    def tell(self, genomes: Sequence[np.ndarray], objectives: np.ndarray) -> None:
        """Report objectives (maximized; NaN = failed) of asked genomes, shape (len(genomes), n_obj)."""
        genomes = [np.asarray(g, dtype=np.float64) for g in genomes]
        if not genomes:
            raise ValueError("tell() needs at least one genome")
        obj = np.array(objectives, dtype=np.float64, copy=True)
        if obj.ndim == 1 and self.n_obj == 1:
            obj = obj[:, None]
        if obj.shape != (len(genomes), self.n_obj):
            raise ValueError(f"objectives must have shape ({len(genomes)}, {self.n_obj}) = (genomes, n_obj), "
                             f"got {obj.shape}")
        if np.any(np.isposinf(obj)):
            raise ValueError("an objective is +inf; objectives are maximized scores, report a failure as NaN instead")
        obj[np.isneginf(obj)] = np.nan
        failed_rows = np.any(np.isnan(obj), axis=1)
        obj[failed_rows] = np.nan  # one failed objective fails the candidate
        positions = self._match_pending(genomes)
        if not self.steady_state and len(positions) != len(self._pending):
            raise ValueError(f"{self.name} is generational: tell all {len(self._pending)} genomes of the "
                             f"generation at once (got {len(positions)})")
        losses, self._worst = fill_failed(-obj, self._worst)
        self._tell(positions, losses)
        for p, o in zip(positions, obj):
            self._front = update_front(self._front, self._pending[p].copy(), o.copy())
        keys = [self._pending_keys[p] for p in positions]
        for p in sorted(positions, reverse=True):
            del self._pending[p]
            del self._pending_keys[p]
        self._reissue = [k for k in self._reissue if k not in keys]
        self._n_told += len(genomes)

    def best(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(genome, objectives) of the best candidate told so far (single objective), None before any."""
        if self.n_obj != 1:
            raise ValueError(f"{self.name} has {self.n_obj} objectives: there is no single best, "
                             f"use pareto_front()")
        return (self._front[0][0].copy(), self._front[0][1].copy()) if self._front else None

    def pareto_front(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Non-dominated (genome, objectives) over everything told, failed candidates excluded."""
        return [(g.copy(), f.copy()) for g, f in self._front]

    def state_dict(self) -> bytes:
        """Bytes from which `from_state` rebuilds this searcher exactly, pending genomes and RNG included."""
        engine_meta, payload = self._dump()
        header = {
            "format": FORMAT,
            "spec": self.spec.to_json(),
            "common": {
                "pending": [encode_array(g) for g in self._pending],
                "front": [[encode_array(g), encode_array(f)] for g, f in self._front],
                "worst": encode_array(self._worst),
                "n_told": self._n_told,
            },
            "engine": engine_meta,
        }
        return pack(header, payload)

    @classmethod
    def from_state(cls, blob: bytes) -> "Searcher":
        """Rebuild a searcher from `state_dict()` bytes; called on `Searcher` it picks the right class."""
        header, payload = unpack(blob)
        spec = SearcherSpec.from_json(header["spec"])
        klass = searcher_class(spec.name)
        if cls is not Searcher and not issubclass(klass, cls):
            raise TypeError(f"this state belongs to a {klass.__name__} ({spec.name!r}), not a {cls.__name__}")
        obj = klass.__new__(klass)
        obj._init_common(spec)
        common = header["common"]
        obj._pending = [decode_array(a) for a in common["pending"]]
        obj._pending_keys = list(range(len(obj._pending)))
        obj._next_key = len(obj._pending)
        obj._reissue = list(range(len(obj._pending))) if klass.steady_state else []
        obj._front = [(decode_array(g), decode_array(f)) for g, f in common["front"]]
        obj._worst = decode_array(common["worst"])
        obj._n_told = int(common["n_told"])
        obj._load(header["engine"], payload)
        return obj

    # ---- engine hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _start(self) -> None:
        """Build the engine from ``self.spec`` (called once, for a fresh searcher)."""

    @abstractmethod
    def _ask(self, n: int | None) -> list[np.ndarray]:
        """New genomes from the engine (n is None for generational engines). The engine keeps whatever
        it needs to tell them later, in the same order (positions are appended to ``pending``)."""

    @abstractmethod
    def _tell(self, positions: list[int], losses: np.ndarray) -> None:
        """Tell the engine the losses (minimized, failures filled) of the pending genomes at
        ``positions`` (indices into the pending list, in the order told). Generational engines get
        every position; they reorder as they need."""

    @abstractmethod
    def _dump(self) -> tuple[dict[str, Any], bytes]:
        """The engine's state: JSON-able meta and an opaque payload (b"" when the meta says it all)."""

    @abstractmethod
    def _load(self, meta: dict[str, Any], payload: bytes) -> None:
        """Restore the engine from `_dump` output (the common part is already restored)."""

    def _default_batch(self) -> int:
        """How many genomes a steady-state ask() returns when no n is given."""
        return 1

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _init_common(self, spec: SearcherSpec) -> None:
        self.spec = spec
        self._pending = []
        self._pending_keys = []
        self._next_key = 0
        self._reissue = []
        self._front = []
        self._worst = np.full(spec.n_obj, np.nan)
        self._n_told = 0

    def _add_pending(self, raw: list[np.ndarray]) -> list[np.ndarray]:
        if not raw:
            raise RuntimeError(f"{self.name}: the engine returned no genome to evaluate")
        added = []
        for g in raw:
            g = np.asarray(g, dtype=np.float64).reshape(-1)
            if g.shape != (self.spec.dim,):
                raise RuntimeError(f"{self.name}: the engine returned a genome of shape {g.shape}, "
                                   f"expected ({self.spec.dim},)")
            g = np.clip(g, self.spec.lower, self.spec.upper)
            g = g + 0.0  # canonical zero: -0.0 becomes 0.0, as in the run store's hash
            self._pending.append(g)
            self._pending_keys.append(self._next_key)
            self._next_key += 1
            added.append(g)
        return added

    def _position(self, key: int) -> int:
        return self._pending_keys.index(key)

    def _match_pending(self, genomes: list[np.ndarray]) -> list[int]:
        """Pending positions of told genomes, matched by exact float64 value (duplicates one to one)."""
        free: dict[bytes, list[int]] = {}
        for i, g in enumerate(self._pending):
            free.setdefault((g + 0.0).tobytes(), []).append(i)
        positions = []
        for g in genomes:
            if g.shape != (self.spec.dim,):
                raise ValueError(f"told a genome of shape {g.shape}, expected ({self.spec.dim},)")
            slots = free.get((g + 0.0).tobytes())
            if not slots:
                raise ValueError(f"{self.name}: told a genome that is not pending (never asked, already told, or "
                                 f"modified after ask): {np.array2string(g, precision=4, threshold=8)}")
            positions.append(slots.pop(0))
        return positions


def unique_points(points: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The genomes without exact repeats, in order (float64 copies)."""
    out: list[np.ndarray] = []
    for p in points:
        if not any(np.array_equal(p, q) for q in out):
            out.append(np.array(p, dtype=np.float64))
    return out


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)
