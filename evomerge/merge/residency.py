"""Where a merge engine keeps the base and the task vectors: a residency policy, chosen per run.

A worker needs, for every candidate, the base and the N task vectors of each tensor and one model to
write the candidate into. Holding all of it on the device costs (N + 2) x the model size there.
The policies trade that memory for copies:

- ``device``: everything resident on the device (the fastest; (N + 2) x model size on the device).
- ``host``: base and task vectors in host memory (pinned where CUDA exists); each tensor is copied to
  a small double-buffered staging area on the device while the previous one is merged (a side CUDA
  stream), so the device holds the candidate plus two tensors' worth of inputs. On a CPU device the
  host *is* the device: there is nothing to stream, and ``host`` holds the same memory as ``device``
  (the inputs in process memory, read in place); it is accepted so that one experiment file runs
  on both kinds of machine.
- ``disk``: base and task vectors in a delta cache of safetensors files on local disk
  (:mod:`evomerge.merge.delta_cache`), memory-mapped: the pages live in the kernel's page cache,
  shared by every worker process on the node, so a worker's private (anonymous) memory is the
  candidate model alone. On CUDA the mapped tensors are streamed like ``host``.
- ``auto``: the fastest of these whose footprint fits the budget, a fraction of the device's memory
  (the rest is left for evaluation: KV cache, activations); the choice and the reason are stated in
  the engine's ``memory_info()`` and so in the worker's ``info()``.

Everything here is arithmetic on checkpoint headers: the choice and its errors come before any weight
is read, so a search that cannot fit fails at once, naming the setting to change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoint import parse_size
from evomerge.merge.plan import MergeError

POLICIES = ("auto", "device", "host", "disk")
DEFAULT_BUDGET = 0.75  # fraction of the device's memory the merge may use; the rest is for evaluation
DEFAULT_CACHE = Path(os.environ.get("EVOMERGE_DELTA_CACHE", Path.home() / ".cache" / "evomerge" / "deltas"))


class MemorySettingError(MergeError):
    """A memory setting that cannot work on this machine; the message names the setting to change."""


@dataclass(frozen=True)
class MemorySettings:
    """The experiment's ``memory`` / ``memory_budget`` / ``delta_dtype`` / ``delta_cache`` keys."""

    policy: str = "auto"
    budget: float | int | str = DEFAULT_BUDGET  # fraction of device memory (<= 1) or a size: 2e10, "20GB"
    delta_dtype: str | None = None  # default: the model's dtype
    cache_dir: str | Path | None = None  # for "disk"; default ~/.cache/evomerge/deltas

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise MemorySettingError(f"memory: '{self.policy}' is not one of {list(POLICIES)}")
        budget_fraction_or_bytes(self.budget)

    @classmethod
    def of(cls, value: MemorySettings | Mapping[str, Any] | str | None) -> MemorySettings:
        if value is None:
            return cls()
        if isinstance(value, MemorySettings):
            return value
        if isinstance(value, str):
            return cls(policy=value)
        return cls(**{k: v for k, v in value.items() if v is not None})

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else DEFAULT_CACHE


def budget_fraction_or_bytes(budget: float | str) -> tuple[str, float]:
    """("fraction", f) for a number in (0, 1], ("bytes", n) for a larger number or a size string."""
    if isinstance(budget, bool):
        raise MemorySettingError(f"memory_budget: {budget!r} is neither a fraction of the device's memory "
                                 "(0 < f <= 1) nor a size such as '20GB'")
    if isinstance(budget, str):
        try:
            n = float(budget) if budget.replace(".", "", 1).isdigit() else parse_size(budget)
        except ValueError:
            raise MemorySettingError(f"memory_budget: '{budget}' is not a fraction (0 < f <= 1) or a size "
                                     "such as '20GB' / '500MiB'") from None
        return budget_fraction_or_bytes(n)
    if budget <= 0:
        raise MemorySettingError(f"memory_budget: {budget} must be positive (a fraction <= 1 or bytes)")
    return ("fraction", float(budget)) if budget <= 1 else ("bytes", float(budget))


def device_capacity(device: torch.device) -> int:
    """Bytes the device has for us: a GPU's total memory, or the host's available memory on a CPU
    (MemAvailable: on a shared machine the memory others use is not ours to plan with)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return host_available()


def host_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class Footprint:
    """Sizes, from the checkpoint headers, of what a worker must hold for N sources."""

    model_bytes: int  # the candidate model (also: the base, in the model's dtype)
    delta_bytes: int  # the N task vectors, in the delta dtype
    largest_bytes: int  # one tensor's base + N deltas: a staging slot of the streaming policies

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]], floating: set[str], n_sources: int,
           model_elem: int, delta_elem: int) -> Footprint:
        numel = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
        model = sum(numel.values()) * model_elem
        deltas = sum(numel[n] for n in floating) * delta_elem * n_sources
        largest = max([numel[n] * (model_elem + n_sources * delta_elem) for n in floating] or [0])
        return cls(model, deltas, largest)

    def device_bytes(self, policy: str, device: torch.device) -> int:
        """What ``policy`` holds on ``device`` (engine-allocated, steady state)."""
        if policy == "device" or (policy == "host" and device.type == "cpu"):
            return 2 * self.model_bytes + self.delta_bytes
        if device.type == "cpu":  # disk on a CPU: the candidate; the inputs are shared page cache
            return self.model_bytes
        return self.model_bytes + 2 * self.largest_bytes  # candidate + double-buffered staging

    def host_bytes(self, policy: str, device: torch.device) -> int:
        """Private host memory beyond the device's (pinned inputs of ``host`` on an accelerator)."""
        return self.model_bytes + self.delta_bytes if policy == "host" and device.type != "cpu" else 0

    def shared_bytes(self, policy: str) -> int:
        """Page cache shared by all workers on a node (the delta cache of ``disk``)."""
        return self.model_bytes + self.delta_bytes if policy == "disk" else 0


@dataclass(frozen=True)
class Choice:
    policy: str
    reason: str
    budget_bytes: int


def choose_policy(settings: MemorySettings, footprint: Footprint, device: torch.device,
                  capacity: int | None = None) -> Choice:
    """The policy to run, or a MemorySettingError naming the setting to change.

    ``auto`` takes the first of device, host, disk that fits the budget (on a CPU, ``host`` is the
    same as ``device`` and is skipped). An explicit policy is checked against the budget too, so a
    search that would run out of memory at its first candidate stops before it starts.
    """
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemorySettingError(f"device '{device}' needs CUDA, which this machine does not have "
                                 f"(memory: {settings.policy}); set device: cpu (or auto)")
    capacity = device_capacity(device) if capacity is None else capacity
    kind, value = budget_fraction_or_bytes(settings.budget)
    budget = int(value * capacity) if kind == "fraction" else int(value)
    gb = lambda b: f"{b / 2**30:.2f} GiB"
    what = f"{'GPU' if device.type == 'cuda' else 'host'} memory"
    smallest = min(footprint.device_bytes(p, device) for p in ("device", "host", "disk"))
    if budget < smallest:
        raise MemorySettingError(
            f"memory_budget {settings.budget!r} ({gb(budget)} of {gb(capacity)} {what}) cannot hold one "
            f"candidate: the smallest policy needs {gb(smallest)} (the model is {gb(footprint.model_bytes)}); "
            "raise memory_budget, use a smaller dtype, or use fewer sources")
    if settings.policy != "auto":
        need = footprint.device_bytes(settings.policy, device)
        if need > budget:
            fits = [p for p in ("device", "host", "disk") if footprint.device_bytes(p, device) <= budget]
            raise MemorySettingError(
                f"memory: {settings.policy} needs {gb(need)} on {device} but memory_budget "
                f"{settings.budget!r} allows {gb(budget)}; set memory: {fits[0] if fits else 'disk'} "
                "(or auto), or raise memory_budget")
        return Choice(settings.policy, f"set by the experiment (needs {gb(need)} of a {gb(budget)} budget)",
                      budget)
    order = ("device", "disk") if device.type == "cpu" else ("device", "host", "disk")
    for policy in order:
        need = footprint.device_bytes(policy, device)
        host_need = footprint.host_bytes(policy, device)
        if need <= budget and (host_need == 0 or host_need <= host_available()):
            return Choice(policy, f"auto: the fastest policy within the budget ({gb(need)} of {gb(budget)} "
                                  f"= {settings.budget!r} of {gb(capacity)} {what})", budget)
    raise MemorySettingError(f"memory: auto found no policy within memory_budget {settings.budget!r} "
                             f"({gb(budget)}); raise memory_budget")  # pragma: no cover - smallest fits


def process_memory() -> dict[str, int]:
    """This process's resident memory by kind (Linux /proc; empty elsewhere): anonymous (private to
    the process), file-backed (page cache, shared with other processes mapping the same files), and
    the peak resident set."""
    keys = {"RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes", "VmHWM": "peak_rss_bytes",
            "VmRSS": "rss_bytes"}
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in keys:
                out[keys[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out
