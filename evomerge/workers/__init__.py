"""Merge workers and the pools that run them: in this process (``LocalPool``) or as Ray actors
(``RayPool``), behind one ``Pool`` protocol."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from evomerge.workers.pool import LocalPool, Pool, Task, run_tasks
from evomerge.workers.worker import CandidateResult, Worker

__all__ = ["CandidateResult", "LocalPool", "Pool", "Task", "Worker", "open_pool", "run_tasks"]


def open_pool(worker_kwargs: Mapping[str, Any], workers: int = 1, address: Optional[str] = None,
              gpus_per_worker: float = 0.0) -> Pool:
    """One worker in this process, or Ray actors when more are asked for or a cluster is named
    (Ray is imported only then)."""
    if workers > 1 or address:
        from evomerge.workers.ray_pool import RayPool

        return RayPool(worker_kwargs, workers=workers, address=address, gpus_per_worker=gpus_per_worker)
    return LocalPool(worker_kwargs)
