"""Candidates per minute on 1 and 2 workers: Ray actors against the in-process pool.

CPU part (always): random per-layer task-arithmetic merges of the zoo's three experts (the demo's
genome), scored on the zoo's fitness items, through

- ``LocalPool`` with 1 and with 2 torch threads (the in-process default),
- ``RayPool`` with 1 worker of 1 CPU, 1 worker of 2 CPUs, and 2 workers of 1 CPU each.

On a 2-core machine, 2 workers x 1 thread is the fair comparison against 1 worker x 1 thread (the
ideal speed-up is 2) and against 1 worker x 2 threads (the same cores, used by one process).

Large part (when ``torch.cuda.is_available()``, or with ``--large always``): a bigger random Llama
(base + experts made here, nothing downloaded), its merge and evaluation seconds per candidate and
its GPU memory, in-process and on 1 or 2 Ray workers (2 workers share one GPU at 0.5 each when
there is one GPU).

Each configuration: start the pool (timed: the cost paid once per run), one warm-up candidate per
worker, then ``--candidates`` timed candidates. Utilization is each worker's busy seconds over the
timed window. Prints markdown tables; ``--markdown PATH`` writes them. Ratios, never pass/fail.

    python scripts/bench_scaling.py
    python scripts/bench_scaling.py --candidates 48 --markdown /tmp/scaling.md
    python scripts/bench_scaling.py --large always --large-hidden 256 --large-layers 4   # the GPU path, on CPU
"""

from __future__ import annotations

import os

# Before torch loads (see evomerge/cli.py): spinning OpenMP threads wreck contended CPU work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import psutil
import torch

from evomerge.config import PSSpace, load_space
from evomerge.spaces import PSGenome, genome_seed
from evomerge.workers import LocalPool, Task
from evomerge.workers.ray_pool import RayPool

MeasuredPool = Union[LocalPool, RayPool]  # the pools compared here; both have run() (the Pool protocol has not)

SKILLS = ("rev", "sort", "tr")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    label: str
    workers: int
    threads: int
    start_s: float
    candidates: int
    wall_s: float
    merge_s: float
    eval_s: float
    utilization: list[float] = field(default_factory=list)
    errors: int = 0
    gpu_peak_gib: float | None = None
    others_cores: float = 0.0  # CPU used by other processes on the machine during the timed window
    spread: tuple[float, float] | None = None  # min, max candidates/min over repeats

    @property
    def per_minute(self) -> float:
        return 60.0 * self.candidates / self.wall_s


# ------------------------------------------------------------------------------------- workloads


def zoo_kwargs(items_per_skill: int, device: str = "cpu") -> dict[str, Any]:
    from evomerge.zoo import ensure_zoo

    zoo = ensure_zoo()
    benchmarks = {s: {"type": "items", "name": s, "items": zoo.items(s, "fitness")[:items_per_skill]} for s in SKILLS}
    return {"models": {"base": str(zoo.base), **{s: str(p) for s, p in zoo.experts.items()}}, "base": "base",
            "benchmarks": {"fitness": benchmarks}, "device": device}


def random_family(root: Path, hidden: int, layers: int, dtype: torch.dtype, experts: int = 3,
                  seed: int = 0) -> dict[str, str]:
    """A random Llama base and ``experts`` perturbed copies (fine-tunes in miniature), saved here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    heads = max(1, hidden // 128)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64 or 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    # transformers wraps .to with functools.wraps(Module.to), so mypy reads it unbound (self = the dtype)
    base = LlamaForCausalLM(cfg).to(dtype)  # type: ignore[arg-type]
    paths = {}
    for i, name in enumerate(["base"] + [f"expert{k}" for k in range(experts)]):
        model = base
        if i:
            model = copy.deepcopy(base)
            with torch.no_grad():
                for p, q in zip(model.parameters(), base.parameters()):
                    p.copy_(q.float() + 0.01 * q.float().std() * torch.randn_like(q, dtype=torch.float32))
        out = root / name
        model.save_pretrained(out)
        tok.save_pretrained(out)
        paths[name] = str(out)
    return paths


def digit_items(n: int, seed: int = 0) -> list[dict]:
    """Reverse-a-digit-string items (the zoo's prompt format), made here so no zoo is needed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
        rows.append({"id": f"rev-{i}", "prompt": f"R:{s}=", "answer": s[::-1]})
    return rows


def random_tasks(info: dict[str, Any], sources: list[str], n: int, seed: int = 0) -> list[Task]:
    """``n`` random genomes of the demo's space (per-layer task arithmetic), decoded to recipes."""
    space = load_space("ps_task_arithmetic_layers", REPO)
    assert isinstance(space, PSSpace)  # the preset is a parameter-space one
    genome = PSGenome(space, "base", sources, info["tensors"],
                      info["num_layers"])
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(n):
        g = rng.uniform(genome.lower, genome.upper)
        s = genome_seed(g, seed)
        tasks.append(Task(genome.decode(g, s), None, "fitness", s))
    return tasks


# ------------------------------------------------------------------------------------- measuring


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_seconds() -> float:
    """CPU seconds of this process and its descendants (an embedded Ray and its actors)."""
    total = 0.0
    me = psutil.Process()
    for p in [me] + me.children(recursive=True):
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


def measure(label: str, make: Callable[[], MeasuredPool], threads: int, n: int,
            tasks_for: Callable[[MeasuredPool], list[Task]],
            gpu: bool = False) -> Row:
    t0 = time.perf_counter()
    pool = make()
    start_s = time.perf_counter() - t0
    try:
        if gpu and isinstance(pool, LocalPool):
            torch.cuda.reset_peak_memory_stats()
        tasks = tasks_for(pool)
        warm = pool.size
        list(pool.run(tasks[:warm]))  # first candidate per worker: lazy allocations, caches
        if isinstance(pool, LocalPool):
            torch.set_num_threads(threads)  # process-wide: set by the Worker, but others ran since
        before = pool.utilization()
        busy0, own0 = _busy_seconds(), _own_seconds()
        t1 = time.perf_counter()
        results = [r for _, r in pool.run(tasks[warm:warm + n])]
        wall = time.perf_counter() - t1
        others = max(0.0, (_busy_seconds() - busy0) - (_own_seconds() - own0)) / wall
        after = pool.utilization()
        util = [(after[w]["busy_s"] - before.get(w, {"busy_s": 0.0})["busy_s"]) / wall for w in after]
        peak = None
        if gpu:
            if isinstance(pool, RayPool):
                peak = max(s.get("cuda_max_allocated_bytes", 0) for s in pool.stats()) / 2**30
            else:
                peak = torch.cuda.max_memory_allocated() / 2**30
        ok = [r for r in results if r.ok]
        return Row(label, pool.size, threads, start_s, len(results), wall,
                   statistics.mean(r.merge_seconds for r in ok) if ok else float("nan"),
                   statistics.mean(r.eval_seconds for r in ok) if ok else float("nan"),
                   util, len(results) - len(ok), peak, others)
    finally:
        pool.close()


def info_and_sources(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Tensor names and depth from the checkpoints' headers (no weights loaded), and the sources."""
    from evomerge.merge.plan import Sources

    base = kwargs["base"]
    names = [base] + [m for m in kwargs["models"] if m != base]
    sources = Sources.inspect(names, paths={n: Path(p) for n, p in kwargs["models"].items()})
    return {"tensors": list(sources.index[base]), "num_layers": sources.num_layers(base)}, names[1:]


def summarize(runs: list[Row]) -> list[Row]:
    """One row per configuration: the run with the median speed, with the spread over repeats."""
    groups: dict[tuple, list[Row]] = {}
    for r in runs:
        groups.setdefault((r.label, r.workers, r.threads), []).append(r)
    out = []
    for rows in groups.values():
        rows = sorted(rows, key=lambda r: r.per_minute)
        mid = rows[(len(rows) - 1) // 2]
        mid.spread = (rows[0].per_minute, rows[-1].per_minute) if len(rows) > 1 else None
        out.append(mid)
    return out


def cpu_rows(n: int, items_per_skill: int, repeat: int) -> list[Row]:
    kw = zoo_kwargs(items_per_skill)
    info, sources = info_and_sources(kw)
    tasks = random_tasks(info, sources, n + 2)
    get = lambda pool: tasks  # noqa: E731 - the same candidates for every configuration
    configs: list[tuple[str, int, Callable[[], MeasuredPool]]] = [
        ("LocalPool (in-process)", 1, lambda: LocalPool({**kw, "threads": 1})),
        ("LocalPool (in-process)", 2, lambda: LocalPool({**kw, "threads": 2})),
        ("RayPool", 1, lambda: RayPool(kw, workers=1, cpus_per_worker=1)),
        ("RayPool", 2, lambda: RayPool(kw, workers=1, cpus_per_worker=2)),
        ("RayPool", 1, lambda: RayPool(kw, workers=2, cpus_per_worker=1)),
    ]
    runs = []
    for _ in range(repeat):  # round robin, so that a burst of load elsewhere hits every configuration
        for label, threads, make in configs:
            runs.append(measure(label, make, threads, n, get))
            print(_row_line(runs[-1]), flush=True)
    return summarize(runs)


def large_rows(n: int, hidden: int, layers: int, items: int) -> list[Row]:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        t0 = time.perf_counter()
        paths = random_family(Path(tmp), hidden, layers, torch.bfloat16 if gpu else torch.float32)
        print(f"made a random Llama family (hidden {hidden}, {layers} layers) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        kw = {"models": paths, "base": "base", "device": device, "dtype": "bfloat16" if gpu else None,
              "benchmarks": {"fitness": {"rev": {"type": "items", "name": "rev", "items": digit_items(items)}}}}
        info, sources = info_and_sources(kw)
        tasks = random_tasks(info, sources, n + 2)
        get = lambda pool: tasks  # noqa: E731
        n_gpus = torch.cuda.device_count()
        share = 1.0 if n_gpus >= 2 else 0.5
        one = 1 if gpu else len(os.sched_getaffinity(0))  # threads of a lone worker: all cores without a GPU
        configs: list[tuple[str, int, Callable[[], MeasuredPool]]] = [
                   ("LocalPool (in-process)", one, lambda: LocalPool({**kw, "threads": one})),
                   ("RayPool", one,
                    lambda: RayPool(kw, workers=1, gpus_per_worker=1 if gpu else 0, cpus_per_worker=one)),
                   (f"RayPool{f', {share:g} GPU each' if gpu else ''}", 1 if gpu else max(1, one // 2),
                    lambda: RayPool(kw, workers=2, gpus_per_worker=share if gpu else 0))]
        rows = []
        for label, threads, make in configs:
            rows.append(measure(label, make, threads, n, get, gpu=gpu))
            print(_row_line(rows[-1]), flush=True)
        return rows


# ------------------------------------------------------------------------------------- reporting


def _row_line(r: Row) -> str:
    return (f"{r.label}, {r.workers} worker(s) x {r.threads} thread(s): {r.per_minute:.1f} candidates/min "
            f"(start {r.start_s:.1f} s, merge {r.merge_s:.3f} s, eval {r.eval_s:.3f} s, "
            f"other processes {r.others_cores:.2f} cores)")


def table(rows: list[Row], gpu: bool = False) -> str:
    head = ("| pool | workers x threads | start (s) | candidates | wall (s) | candidates/min (min-max) | "
            "merge s/cand | eval s/cand | utilization per worker | other processes (cores) |"
            + (" GPU peak (GiB) |" if gpu else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        util = ", ".join(f"{u:.0%}" for u in r.utilization)
        spread = f" ({r.spread[0]:.1f}-{r.spread[1]:.1f})" if r.spread else ""
        line = (f"| {r.label} | {r.workers} x {r.threads} | {r.start_s:.1f} | {r.candidates}"
                f"{f' ({r.errors} failed)' if r.errors else ''} | {r.wall_s:.1f} | {r.per_minute:.1f}{spread} | "
                f"{r.merge_s:.3f} | {r.eval_s:.3f} | {util} | {r.others_cores:.2f} |")
        if gpu:
            line += f" {r.gpu_peak_gib:.2f} |" if r.gpu_peak_gib is not None else " - |"
        lines.append(line)
    return "\n".join(lines)


def speedups(rows: list[Row]) -> str:
    two = next(r for r in rows if r.label.startswith("RayPool") and r.workers == 2)
    lines = []
    for r in rows:
        if r is two:
            continue
        s = two.per_minute / r.per_minute
        lines.append(f"- 2 Ray workers x {two.threads} vs {r.label} {r.workers} x {r.threads}: speed-up {s:.2f}, "
                     f"efficiency {s / 2:.0%}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=24, help="timed candidates per configuration")
    ap.add_argument("--items", type=int, default=600, help="fitness items per skill (the zoo has 600)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the CPU configurations (median shown)")
    ap.add_argument("--large", choices=("auto", "always", "never"), default="auto",
                    help="the larger random Llama: auto = only on a GPU")
    ap.add_argument("--large-hidden", type=int, default=2048)
    ap.add_argument("--large-layers", type=int, default=16)
    ap.add_argument("--large-items", type=int, default=256)
    ap.add_argument("--skip-cpu", action="store_true", help="only the large part")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for key in ("candidates", "items", "repeat", "large_hidden", "large_layers", "large_items"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")

    load = os.getloadavg()
    parts = [f"# evomerge scaling: {platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}", "",
             f"Load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min).", ""]
    if not args.skip_cpu:
        rows = cpu_rows(args.candidates, args.items, args.repeat)
        parts += [f"## Zoo (CPU): {args.candidates} random candidates of the demo's genome, "
                  f"{args.items} x {len(SKILLS)} fitness items each; median of {args.repeat} round(s)", "",
                  table(rows), "", speedups(rows), "",
                  "Other processes: CPU used by everything else on the machine during the timed window "
                  "(in cores); on a shared machine it moves the numbers more than anything measured here.", ""]
    if args.large == "always" or (args.large == "auto" and torch.cuda.is_available()):
        rows = large_rows(args.candidates, args.large_hidden, args.large_layers, args.large_items)
        parts += [f"## Random Llama, hidden {args.large_hidden}, {args.large_layers} layers, 3 experts "
                  f"({'GPU' if torch.cuda.is_available() else 'CPU'}), {args.large_items} items", "",
                  table(rows, gpu=torch.cuda.is_available()), "", speedups(rows), ""]
    load = os.getloadavg()
    parts.append(f"Load average at end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.")
    text = "\n".join(parts)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
