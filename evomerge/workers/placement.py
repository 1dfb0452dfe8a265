"""Where Ray workers go: each actor's CPUs, GPUs and device, decided from the cluster's nodes, or a
refusal that says what the cluster has and what to change (a pure function of ``ray.nodes()``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence


class ClusterTooSmall(ValueError):
    """The cluster cannot host the workers asked for; the message says what it has and what to change."""


@dataclass(frozen=True)
class Placement:
    """What each worker actor asks Ray for, and the device and threads it uses."""

    workers: int
    cpus: int
    gpus: float
    device: str

    def describe(self) -> str:
        return f"{self.cpus} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")


def describe_nodes(nodes: Sequence[Mapping[str, Any]]) -> str:
    """One line per alive node: its address and its CPU / GPU / custom resources."""
    parts = []
    for n in nodes:
        if not n.get("Alive", True):
            continue
        res = n.get("Resources", {})
        extra = sorted(k for k in res if k not in ("CPU", "GPU", "memory", "object_store_memory")
                       and not k.startswith("node:") and not k.startswith("accelerator_type"))
        text = f"{n.get('NodeManagerAddress', '?')}: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
        parts.append(text + (f" ({', '.join(extra)})" if extra else ""))
    return "; ".join(parts) or "no alive node"


def plan_placement(nodes: Sequence[Mapping[str, Any]], workers: int, gpus_per_worker: float = 0.0,
                   cpus_per_worker: Optional[int] = None, device: str = "auto") -> Placement:
    """Decide each actor's resources from the cluster's nodes (``ray.nodes()``), or refuse.

    - ``device: cpu`` gives CPU workers; ``gpus_per_worker > 0`` GPU workers (fractions share a GPU).
    - ``gpus_per_worker == 0`` with ``device`` auto / cuda on a cluster that has GPUs spreads the
      workers over them: one GPU each, or an equal share when there are more workers than GPUs.
    - CPU threads per worker, unless given: the most CPUs each that still places every worker (the
      cluster's CPUs shared out, at most a node's worth); GPU workers take 1 CPU.

    Raises :class:`ClusterTooSmall` (a ``ValueError``) naming the nodes when the workers do not fit.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not isinstance(gpus_per_worker, (int, float)) or not 0 <= gpus_per_worker:
        raise ValueError(f"gpus_per_worker must be a number >= 0 (fractions share a GPU), got {gpus_per_worker!r}")
    if cpus_per_worker is not None and (isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, int)
                                        or cpus_per_worker < 1):
        raise ValueError(f"cpus_per_worker must be an integer >= 1, got {cpus_per_worker!r}")
    alive = [n for n in nodes if n.get("Alive", True)]
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in alive]
    gpus = [float(n.get("Resources", {}).get("GPU", 0)) for n in alive]
    where = describe_nodes(alive)
    if device == "cpu" and gpus_per_worker > 0:
        raise ValueError(f"device 'cpu' with gpus_per_worker={gpus_per_worker:g} asks for GPUs it would not use; "
                         "set device: auto (or cuda), or gpus_per_worker: 0")
    want_gpu = gpus_per_worker > 0 or (device != "cpu" and sum(gpus) > 0)
    if (device.startswith("cuda") or gpus_per_worker > 0) and sum(gpus) == 0:
        raise ClusterTooSmall(f"device '{device}' / gpus_per_worker={gpus_per_worker:g} needs GPUs, but the Ray "
                              f"cluster has none ({where}); use device: cpu, or join a cluster with GPUs (--address)")
    gpw = float(gpus_per_worker)
    if want_gpu and gpw == 0:
        total = sum(gpus)
        gpw = 1.0 if workers <= total else 1.0 / math.ceil(workers / total)
    if gpw > 1 and gpw != int(gpw):
        raise ValueError(f"gpus_per_worker={gpw:g}: above 1 it must be a whole number of GPUs")
    def capacity(cpw: int) -> int:
        fits = [math.floor(c / cpw + 1e-9) for c in cpus]
        if gpw > 0:
            fits = [min(f, math.floor(g / gpw + 1e-9)) for f, g in zip(fits, gpus)]
        return sum(fits)

    if cpus_per_worker:
        cpw = cpus_per_worker
    elif want_gpu:
        cpw = 1
    else:  # the most CPUs each that still fits every worker (a node's CPUs are not split across nodes)
        cpw = max(1, min(int(max(cpus, default=0)), int(sum(cpus)) // workers))
        while cpw > 1 and capacity(cpw) < workers:
            cpw -= 1
    hosted = capacity(cpw)
    if hosted < workers:
        hint = f"use --workers {hosted}" if hosted else "add nodes"
        hint += ", or ask less per worker (--gpus-per-worker, fractions share a GPU)" if gpw else ""
        raise ClusterTooSmall(f"the Ray cluster can host {hosted} worker(s) of {cpw} CPU"
                              f"{f' + {gpw:g} GPU' if gpw else ''} each, not {workers}: its nodes are {where}; "
                              f"{hint}")
    return Placement(workers, cpw, gpw, "cuda" if gpw > 0 else ("cpu" if device == "auto" else device))
