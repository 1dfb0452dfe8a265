"""One worker on the smol zoo: the time split per candidate (merge vs evaluation), the engine's resident
bytes and the process's peak RSS, and the hand recipes' scores, with the experiment's own benchmarks.

The worker is the search's (``evomerge.workers.Worker``: sources resident, one preallocated model, merge in
memory, then the chat-aware items evaluator). Recipes: task arithmetic at 1/N (the report's uniform merge)
and at weight 1, TIES and DARE-TIES at density 0.5 and weight 1 (the hand recipes people use).
Usage: python scripts/bench_smol_candidate.py [experiments/smol_ps.yaml] [--split fitness|test] [--threads 2]
       [--only 'weight 1' ...]
"""

from __future__ import annotations

import argparse
import os
import resource
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from evomerge.config import load_experiment  # noqa: E402
from evomerge.merge.config import MergeConfig  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.run import resolve_models  # noqa: E402
from evomerge.workers import Worker  # noqa: E402


def hand_recipes(base: str, experts: list[str]) -> dict[str, dict]:
    n = len(experts)

    def ta(method: str, weight: float, **params) -> dict:
        return {"merge_method": method, "base_model": base, "parameters": {"normalize": False}
                if method != "task_arithmetic" else {},
                "models": [{"model": e, "parameters": {"weight": weight, **params}} for e in experts]}

    return {f"task_arithmetic 1/{n} (uniform)": ta("task_arithmetic", 1 / n),
            "task_arithmetic weight 1": ta("task_arithmetic", 1.0),
            "ties density 0.5 weight 1": ta("ties", 1.0, density=0.5),
            "dare_ties density 0.5 weight 1": ta("dare_ties", 1.0, density=0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default="experiments/smol_ps.yaml")
    ap.add_argument("--split", default="test", choices=["fitness", "test"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of the recipes to run (default: all)")
    args = ap.parse_args()
    path = Path(args.experiment)
    exp = load_experiment(path)
    models = resolve_models(exp, path.resolve().parent)
    specs = {"fitness": {o.name: o.benchmark for o in exp.fitness.objectives},
             "test": {o.name: o.benchmark for o in exp.fitness.test}}
    worker = Worker({k: str(v) for k, v in models.items()}, exp.base_model, specs, base_dir=path.resolve().parent,
                    device="cpu", threads=args.threads)
    experts = [m for m in models if m != exp.base_model]
    print(f"engine resident bytes: {worker.engine.resident_bytes() / 2**20:.0f} MiB "
          f"(base + {len(experts)} task vectors, {worker.engine.dtype})")
    rows = []
    for name, cfg in hand_recipes(exp.base_model, experts).items():
        if args.only and not any(o in name for o in args.only):
            continue
        r = worker.evaluate(Recipe(merge=MergeConfig.model_validate(cfg)), which=args.split, seed=0)
        if r.error:
            raise SystemExit(f"{name}: {r.error}")
        mean = sum(r.objectives.values()) / len(r.objectives)
        rows.append((name, r.objectives, mean, r.merge_seconds, r.eval_seconds))
        print(f"  {name:<34} " + " ".join(f"{k} {v:.3f}" for k, v in r.objectives.items())
              + f"  mean {mean:.3f}   merge {r.merge_seconds:.2f} s  eval {r.eval_seconds:.1f} s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    print(f"peak RSS of this worker process: {peak:.0f} MiB; split: {args.split}")


if __name__ == "__main__":
    main()
