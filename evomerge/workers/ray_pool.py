"""Workers as Ray actors: the ``Pool`` of ``evomerge.workers.pool`` spread over GPUs, CPU cores or a cluster.

Each actor wraps one :class:`~evomerge.workers.worker.Worker`: it owns a device (a GPU, a fraction of one, or
a few CPU threads), loads the sources once and then receives :class:`~evomerge.workers.pool.Task` s (a
recipe and item ids, a few KB), never weights. The driver keeps the ask/tell loop and the run store;
actors only return results.

Why the pool looks the way it does:

- Start-up (Python, torch, loading the sources: ~9 s per actor on the zoo, minutes for a 7B model)
  is paid once per run: actors live as long as the pool.
- No idle devices: each actor holds up to ``depth`` (2) tasks, so while the driver records a result,
  tells the searcher and asks the next genome, the actor is already merging its next candidate.
  Results are handed back as they finish, in any order. ``submit`` / ``next_done`` / ``free_slots``
  let a steady-state searcher ask a new genome the moment a worker frees up.
- Faults cost one candidate at most: a worker that dies (SIGKILL, out of memory, a node lost) is
  replaced by a fresh actor, and the task it was running is retried elsewhere, up to
  ``max_retries`` times, then returned as a failed result carrying the error. Tasks that were only
  queued on the dead actor are re-queued without being charged. Every task yields exactly one
  result. (A failing merge or fitness function is not a fault: ``Worker.evaluate`` already turns it
  into a failed result, which is final.)
- Calls that change a worker's state (``broadcast("set_pool_member", ...)``) are replayed in the
  constructor of a replacement, so a new actor is indistinguishable from the one it replaces.

Without an address the pool starts an embedded Ray sized to this machine and shuts it down on
``close()``; with ``address`` ("auto", "HOST:PORT", "ray://HOST:10001") it joins that cluster and
leaves it running. Ray is imported only when a pool is made.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

from evomerge.workers.placement import ClusterTooSmall, describe_nodes, plan_placement
from evomerge.workers.pool import Task
from evomerge.workers.worker import CandidateResult, Worker

#: Worker methods that only read; every other broadcast is replayed on a replacement actor.
QUERIES = frozenset({"info", "item_ids"})
#: Driver environment variables a worker needs to find the same files and stay offline.
PASS_THROUGH_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                    "EVOMERGE_HOME", "TOKENIZERS_PARALLELISM")
#: Object store of an embedded Ray: tasks and results are KBs, so a small store leaves /dev/shm free.
EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20
LOST_REPLY_GRACE_S = 5.0  # how long a dead actor's finished-but-unreported results may take to arrive
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_text(what: str, err: BaseException) -> str:
    """A Ray error as one readable message for a run store (Ray colours its tracebacks)."""
    return f"{what}: {type(err).__name__}: {_ANSI.sub('', str(err)).strip()}"



class WorkerStartError(RuntimeError):
    """A worker actor failed in its constructor (a model that cannot be loaded, out of memory, ...)."""


# ---------------------------------------------------------------------------------------------- actor


class WorkerActor:
    """The body of one Ray actor: a :class:`Worker`, named by its Ray node and actor ids.

    ``replay`` holds the state-changing broadcasts made before this actor was created (a replacement
    applies them before it reports ready)."""

    def __init__(self, worker_kwargs: Mapping[str, Any], threads: int, device: str,
                 replay: Sequence[tuple[str, tuple, dict]] = ()):
        import ray

        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        actor_id = ctx.get_actor_id()
        if actor_id is None:
            raise RuntimeError("WorkerActor runs only as a Ray actor (ray.remote(WorkerActor)), not in a driver")
        self.actor_id = actor_id
        # cuda[3]: the GPU Ray gave this actor (it sets CUDA_VISIBLE_DEVICES), so reports say which.
        label = f"cuda[{os.environ.get('CUDA_VISIBLE_DEVICES', '')}]" if device == "cuda" else device
        name = f"ray-{self.node_id[:8]}-{self.actor_id[:8]}:{socket.gethostname()}:{os.getpid()}:{label}"
        self.worker = Worker(**{**worker_kwargs, "device": device, "threads": threads, "name": name})
        for method, args, kwargs in replay:
            getattr(self.worker, method)(*args, **kwargs)

    def ready(self) -> dict[str, Any]:
        return {"name": self.worker.name, "pid": os.getpid(), "node_id": self.node_id, "actor_id": self.actor_id,
                "host": socket.gethostname(), "device": str(self.worker.device)}

    def evaluate(self, task: Task) -> tuple[CandidateResult, float]:
        """The result and the seconds this actor was busy with it (for ``utilization``)."""
        start = time.perf_counter()
        result = self.worker.evaluate(task.recipe, task.item_ids, task.which, task.seed, task.benchmarks)
        return result, time.perf_counter() - start

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)

    def stats(self) -> dict[str, Any]:
        """Process memory and, on a GPU, peak and current allocated bytes (for benchmarks)."""
        import psutil
        import torch

        out: dict[str, Any] = {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss}
        if self.worker.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.worker.device)
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.worker.device)
        return out


# ----------------------------------------------------------------------------------------------- pool


@dataclass(eq=False)
class _Slot:
    """One actor as the driver sees it."""

    actor: Any
    ready_ref: Any
    info: dict[str, Any] = field(default_factory=dict)  # from WorkerActor.ready()
    inflight: list[int] = field(default_factory=list)  # tickets, in submission (= execution) order
    busy_s: float = 0.0
    since: Optional[float] = None  # driver clock when it reported ready
    until: Optional[float] = None  # driver clock when it died or the pool closed
    alive: bool = True

    @property
    def ready(self) -> bool:
        return self.alive and self.since is not None

    @property
    def name(self) -> str:
        return self.info.get("name", "")


class RayPool:
    """``workers`` Ray actors, each a :class:`Worker` built from ``worker_kwargs`` (as for ``LocalPool``).

    Generational use: ``for i, result in pool.run(tasks)``. Steady-state use: ``submit(task)`` returns a
    ticket, ``next_done()`` the next (ticket, result) to finish, ``free_slots()`` how many more tasks
    would start without waiting. ``max_retries``: how many times a task whose worker died is tried
    again. ``depth``: tasks held by each actor at once. ``start_timeout_s``: how long to wait for the
    actors to start (loading the sources) before giving up with what the cluster has.
    """

    def __init__(self, worker_kwargs: Mapping[str, Any], workers: int = 2, address: Optional[str] = None,
                 gpus_per_worker: float = 0.0, cpus_per_worker: Optional[int] = None, max_retries: int = 2,
                 depth: int = 2, start_timeout_s: float = 900.0, max_start_failures: int = 3, quiet: bool = True):
        for key, value, low in (("workers", workers, 1), ("max_retries", max_retries, 0), ("depth", depth, 1),
                                ("max_start_failures", max_start_failures, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be > 0 seconds, got {start_timeout_s!r}")
        if address is not None and (not isinstance(address, str) or not address.strip()
                                    or (address != "auto" and ":" not in address)):
            raise ValueError(f"address {address!r} is not a Ray address: give 'auto' (the cluster this machine "
                             f"belongs to), 'HOST:PORT' (the head's GCS port, 6379 by default) or "
                             f"'ray://HOST:10001'; leave it out for an embedded Ray on this machine")
        self.worker_kwargs = dict(worker_kwargs)
        self.max_retries = max_retries
        self.depth = depth
        self.max_start_failures = max_start_failures
        self._closed = False
        self._owns_ray = False
        self._slots: list[_Slot] = []
        self._replay: list[tuple[str, tuple, dict]] = []
        self._tasks: dict[int, Task] = {}
        self._attempts: dict[int, int] = {}
        self._avoid: dict[int, _Slot] = {}
        self._queue: deque[int] = deque()
        self._running: dict[Any, tuple[int, _Slot]] = {}  # ObjectRef -> (ticket, slot)
        self._starting: dict[Any, _Slot] = {}  # ready ObjectRef -> slot, for replacements
        self._done: deque[tuple[int, CandidateResult]] = deque()
        self._discard: set[int] = set()
        self._next_ticket = 0
        self._start_failures = 0  # replacements in a row that died before they were ready
        self.restarts = 0  # replacement actors started so far
        import ray

        self._ray = ray
        self._connect(address, quiet)
        try:
            self.placement = plan_placement(ray.nodes(), workers, gpus_per_worker, cpus_per_worker,
                                            str(self.worker_kwargs.get("device", "auto")))
            self._actor_class = ray.remote(WorkerActor)
            self._env = self._worker_env(self.placement.cpus)
            for _ in range(workers):
                self._slots.append(self._spawn())
            self._await_start(start_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- Ray and actors -------------------------------------------------------------------------
    def _connect(self, address: Optional[str], quiet: bool) -> None:
        """Join ``address``, reuse a Ray this process already started, or start an embedded one."""
        ray = self._ray
        if ray.is_initialized():
            return
        level = logging.WARNING if quiet else logging.INFO
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        old = auth_log.level
        if quiet:  # Ray warns about its token authentication on every start; keep the console for the search
            auth_log.setLevel(logging.ERROR)
        try:
            if address is None:
                # "local", not None: None would join a cluster started by `ray start` on this machine.
                ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                         logging_level=level, log_to_driver=not quiet,
                         object_store_memory=EMBEDDED_OBJECT_STORE_BYTES)
            else:
                try:
                    ray.init(address=address, logging_level=level, log_to_driver=not quiet)
                except ConnectionError as err:
                    if "auth" in f"{err} {err.__cause__}".lower():
                        raise ValueError(
                            f"the Ray cluster at {address} requires token authentication: run evomerge with "
                            f"RAY_AUTH_MODE=token in its environment and the cluster's token in ~/.ray/auth_token "
                            f"(or RAY_AUTH_TOKEN); see docs/cluster.md") from err
                    raise
        finally:
            auth_log.setLevel(old)
        self._owns_ray = True

    @staticmethod
    def _worker_env(threads: int) -> dict[str, str]:
        """Passive OpenMP (spinning threads make contended CPU work 20-100x slower; see cli.py) and one
        OpenMP thread per CPU the worker was given."""
        env = {k: os.environ[k] for k in PASS_THROUGH_ENV if k in os.environ}
        env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def _spawn(self) -> _Slot:
        p = self.placement
        actor = self._actor_class.options(
            num_cpus=p.cpus, num_gpus=p.gpus, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD",
            runtime_env={"env_vars": self._env},
        ).remote(self.worker_kwargs, p.cpus, p.device, list(self._replay))
        # ray's ActorHandle stub types methods as plain callables, without their .remote
        return _Slot(actor, actor.ready.remote())  # type: ignore[attr-defined]

    def _await_start(self, timeout_s: float) -> None:
        ray = self._ray
        pending = {s.ready_ref: s for s in self._slots}
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ClusterTooSmall(
                    f"{len(pending)} of {len(self._slots)} worker(s) did not start within {timeout_s:g} s "
                    f"({self.placement.describe()} each); the cluster's nodes: {describe_nodes(ray.nodes())}; "
                    f"free now: {ray.available_resources()}. Another job may hold the resources, or loading "
                    f"the models takes longer (raise start_timeout_s)")
            slot = pending.pop(ready[0])
            try:
                slot.info = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                raise WorkerStartError(_error_text("a worker failed to start", err)) from None
            slot.since = time.perf_counter()

    def _on_ready(self, ref: Any) -> None:
        slot = self._starting[ref]
        try:
            slot.info = self._ray.get(ref)
        except self._ray.exceptions.RayError as err:
            self._lost(slot, _error_text("a replacement worker failed to start", err))
            return
        del self._starting[ref]
        slot.since = time.perf_counter()
        self._start_failures = 0
        self._dispatch()

    def _lost(self, slot: _Slot, message: str) -> None:
        """``slot``'s actor is dead: keep results it returned before dying, charge the task it was
        running, re-queue the ones only queued there (not their fault), and replace it."""
        if not slot.alive:
            return
        ray = self._ray
        slot.alive = False
        slot.until = time.perf_counter()
        if slot.since is None:  # it died before it was ready: a start-up failure
            self._start_failures += 1
            self._starting.pop(slot.ready_ref, None)
        refs = {t: r for r, (t, s) in self._running.items() if s is slot}
        for r in refs.values():
            del self._running[r]
        tickets, slot.inflight = slot.inflight, []
        while tickets and tickets[0] in refs:  # an actor runs its tasks in order: the first unfinished is the culprit
            ref = refs[tickets[0]]
            # The death can be reported before the reply of a task the actor finished just before it
            # died; once the actor is dead Ray settles every ref of it (a value or an error) promptly.
            if not ray.wait([ref], timeout=LOST_REPLY_GRACE_S)[0]:
                break
            try:
                result, busy = ray.get(ref)
            except ray.exceptions.RayError:
                break
            slot.busy_s += busy
            self._finish(tickets.pop(0), result)
        self._queue.extendleft(reversed(tickets[1:]))
        if tickets:
            self._charge(tickets[0], slot, message)
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self._start_failures > self.max_start_failures:
            if not any(s.alive for s in self._slots):
                raise WorkerStartError(f"workers keep dying at start-up ({self._start_failures} in a row) and none "
                                       f"is left; the last error: {message}")
            return  # carry on with the workers that live
        new = self._spawn()
        self._slots.append(new)
        self._starting[new.ready_ref] = new
        self.restarts += 1

    def _charge(self, ticket: int, slot: _Slot, message: str) -> None:
        """One more failed try of ``ticket``: retry it first thing (elsewhere if possible), or give up."""
        self._attempts[ticket] += 1
        self._avoid[ticket] = slot
        if self._attempts[ticket] > self.max_retries:
            tries = self._attempts[ticket]
            self._finish(ticket, CandidateResult(worker=slot.name, error=(
                f"failed on a worker {tries} time(s), not retried further (max_retries={self.max_retries}); "
                f"last: {message}")))
        else:
            self._queue.appendleft(ticket)

    def _finish(self, ticket: int, result: CandidateResult) -> None:
        self._tasks.pop(ticket, None)
        self._attempts.pop(ticket, None)
        self._avoid.pop(ticket, None)
        if ticket in self._discard:
            self._discard.discard(ticket)
        else:
            self._done.append((ticket, result))

    def _dispatch(self) -> None:
        """Hand queued tasks to ready actors with room, the least loaded first (replacements that
        finished starting count as ready at once)."""
        if self._starting:
            started, _ = self._ray.wait(list(self._starting), num_returns=len(self._starting), timeout=0)
            for ref in started:
                if ref in self._starting:
                    self._on_ready(ref)
        while self._queue:
            open_ = [s for s in self._slots if s.ready and len(s.inflight) < self.depth]
            if not open_:
                return
            ticket = self._queue.popleft()
            avoid = self._avoid.get(ticket)
            slot = min(open_, key=lambda s: (s is avoid and len(open_) > 1, len(s.inflight)))
            ref = slot.actor.evaluate.remote(self._tasks[ticket])
            self._running[ref] = (ticket, slot)
            slot.inflight.append(ticket)

    def _collect(self, ref: Any) -> None:
        ray = self._ray
        ticket, slot = self._running[ref]
        try:
            result, busy = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self._lost(slot, _error_text(f"worker {slot.name} died", err))
        except ray.exceptions.RayError as err:  # an exception escaped the actor method; the actor lives
            del self._running[ref]
            slot.inflight.remove(ticket)
            self._charge(ticket, slot, _error_text(f"an exception escaped worker {slot.name}", err))
        else:
            del self._running[ref]
            slot.inflight.remove(ticket)
            slot.busy_s += busy
            self._finish(ticket, result)
        self._dispatch()

    # -- the Pool protocol ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Workers alive (a replacement counts once it is started)."""
        return sum(s.alive for s in self._slots)

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call a ``Worker`` method on every live worker; one answer per worker that answered.

        State-changing calls (anything but ``QUERIES``) are remembered and replayed on replacements."""
        self._check_open()
        if method.startswith("_") or not callable(getattr(Worker, method, None)):
            raise ValueError(f"broadcast: Worker has no public method {method!r}")
        ray = self._ray
        targets = [s for s in self._slots if s.alive]
        refs = [s.actor.call.remote(method, *args, **kwargs) for s in targets]
        if method not in QUERIES:
            self._replay.append((method, args, kwargs))
        answers = []
        for slot, ref in zip(targets, refs):
            try:
                answers.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                self._lost(slot, _error_text(f"worker {slot.name} died", err))  # its replacement replays this call
            # any other error is the method's own: it propagates, as it would in a LocalPool
        if not answers:
            raise RuntimeError(f"broadcast({method!r}): no worker answered (all died); see the Ray logs")
        self._dispatch()
        return answers

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[int, CandidateResult]]:
        """Evaluate ``tasks``, yielding (index in ``tasks``, result) as each finishes, each exactly once.

        Results of tasks submitted separately (``submit``) that finish meanwhile are kept for
        ``next_done``. Leaving the loop early drops the remaining tasks' results."""
        tickets = [self.submit(t) for t in tasks]
        index = {t: i for i, t in enumerate(tickets)}
        remaining = set(tickets)
        others: list[tuple[int, CandidateResult]] = []
        try:
            while remaining:
                done = self.next_done()
                assert done is not None  # no timeout: next_done waits until a task finishes
                ticket, result = done
                if ticket in remaining:
                    remaining.discard(ticket)
                    yield index[ticket], result
                else:
                    others.append((ticket, result))
        finally:
            self._done.extendleft(reversed(others))
            for t in remaining:
                self._cancel(t)

    def utilization(self) -> dict[str, dict[str, float]]:
        """Per worker that started: seconds spent evaluating, and seconds since it started (until it
        died or the pool closed)."""
        now = time.perf_counter()
        return {s.name: {"busy_s": s.busy_s, "wall_s": (s.until or now) - s.since}
                for s in self._slots if s.since is not None}

    def close(self) -> None:
        """Stop the actors, and the embedded Ray if this pool started it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        ray = self._ray if hasattr(self, "_ray") else None
        now = time.perf_counter()
        for s in self._slots:
            if s.alive:
                s.alive = False
                s.until = now
                try:
                    if ray is not None:
                        ray.kill(s.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - a dead actor or a lost connection: nothing to stop
                    pass
        if ray is not None and self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- steady state ---------------------------------------------------------------------------
    def submit(self, task: Task) -> int:
        """Queue ``task``; it starts as soon as a worker has room. Returns its ticket."""
        self._check_open()
        if not isinstance(task, Task):
            raise TypeError(f"submit() takes an evomerge.workers.Task, got {type(task).__name__}")
        ticket = self._next_ticket
        self._next_ticket += 1
        self._tasks[ticket] = task
        self._attempts[ticket] = 0
        self._queue.append(ticket)
        self._dispatch()
        return ticket

    def next_done(self, timeout: Optional[float] = None) -> Optional[tuple[int, CandidateResult]]:
        """The next (ticket, result) to finish; None if ``timeout`` seconds pass first.

        Raises ``LookupError`` when nothing is submitted and unfinished."""
        self._check_open()
        ray = self._ray
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            if not self._running and not self._queue:
                raise LookupError("next_done(): no task is pending; submit() one first")
            waiting = list(self._running) + list(self._starting)
            if not waiting:
                raise WorkerStartError("tasks are queued but no worker is alive or starting")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(waiting, num_returns=1, timeout=left)
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            if ready[0] in self._starting:
                self._on_ready(ready[0])
            else:
                self._collect(ready[0])
        return self._done.popleft()

    def pending(self) -> int:
        """Tasks submitted and not yet returned by ``next_done`` (queued, running, or finished)."""
        return len(self._tasks) + len(self._done) - len(self._discard)

    def free_slots(self) -> int:
        """Tasks that would start at once if submitted now: room on ready workers minus the queue."""
        room = sum(self.depth - len(s.inflight) for s in self._slots if s.ready)
        return max(0, room - len(self._queue))

    def idle_workers(self) -> int:
        """Ready workers with nothing to do."""
        return sum(1 for s in self._slots if s.ready and not s.inflight)

    def workers(self) -> list[dict[str, Any]]:
        """Every actor this pool started: name, pid, node id, host, device, alive."""
        return [{**s.info, "alive": s.alive} for s in self._slots]

    def stats(self) -> list[dict[str, Any]]:
        """``WorkerActor.stats()`` of each ready worker (memory; GPU peak bytes)."""
        self._check_open()
        return self._ray.get([s.actor.stats.remote() for s in self._slots if s.ready])

    def _cancel(self, ticket: int) -> None:
        if ticket in self._queue:
            self._queue.remove(ticket)
            self._tasks.pop(ticket, None)
            self._attempts.pop(ticket, None)
            self._avoid.pop(ticket, None)
        elif ticket in self._tasks:
            self._discard.add(ticket)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RayPool is closed; make a new one")
