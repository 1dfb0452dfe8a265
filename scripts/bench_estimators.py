"""Fitness estimators compared on whole searches: items scored (every part counted) against the
held-out test mean of the exported model, for the same experiment and seeds.

    python scripts/bench_estimators.py                                   # the demo, seed 0
    python scripts/bench_estimators.py --seeds 0 1 2 3 4 --kinds full adaptive gpirt random
    python scripts/bench_estimators.py --experiment experiments/nsga2_rev_sort.yaml --markdown out.md

``random`` is run at the racing (else the adaptive) run's mean search items per candidate, so they
compare at equal items; ``gpirt`` at 10% of the items. Items are every item scored (calibration,
search, refits, drift, final confirmation, report checks) except the hand recipes scored for the
report, which are the same for every estimator (their count is printed apart). Each run is a real `evomerge search`
(in-process) into runs/bench-estimators/<kind>-s<seed>; an existing finished run is read, not redone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

from evomerge.run import start

SETTINGS = {
    "full": {"kind": "full"},
    "gpirt": {"kind": "gpirt", "budget": 0.1},
    "adaptive": {"kind": "adaptive", "tolerance": 0.02, "max_items": 0.25, "calibration_models": 4,
                 "final_top_k": 3, "report_checks": 3},
    "racing": {"kind": "adaptive", "tolerance": 0.02, "max_items": 0.25, "calibration_models": 4, "racing": True,
               "final_top_k": 3, "report_checks": 3},
    # 16 items per benchmark to start, halving up to 25%: ~130 items per candidate on a 12-candidate
    # generation, the racing run's count
    "successive_halving": {"kind": "successive_halving", "start_items": 16, "max_items": 0.25,
                           "final_top_k": 3, "report_checks": 3},
}
EQUAL_ITEMS = ("racing", "adaptive")  # random subsampling runs at the first of these that ran


def run_one(exp_path: Path, out: Path, kind: str, seed: int, estimator: dict) -> dict:
    run_dir = out / f"{kind}-s{seed}"
    if not (run_dir / "summary.json").exists():
        data = yaml.safe_load(exp_path.read_text())
        data["seed"] = seed
        data["fitness"]["estimator"] = estimator
        data["name"] = f"{data['name']}-{kind}-s{seed}"
        path = out / f"{kind}-s{seed}.yaml"
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**data, "output_dir": str(run_dir)}, sort_keys=False))
        t0 = time.perf_counter()
        start(path, run_dir)
        (run_dir / "wall_s.json").write_text(json.dumps(time.perf_counter() - t0))
    summary = json.loads((run_dir / "summary.json").read_text())
    test = summary["test"].get("best", {})
    names = [k for k in test if k != "error"]
    with open(run_dir / "phase0-ps" / "history.csv") as f:
        candidates = sum(1 for _ in f) - 1
    items = summary["items_scored"]
    return {"kind": kind, "seed": seed, "items": items["total"] - items.get("references", 0),
            "references": items.get("references", 0),
            "search_items": summary["items_scored"]["search"], "candidates": candidates,
            "full_evaluation": summary["items_scored"]["full_evaluation"],
            "test_mean": float(np.mean([test[n] for n in names])) if names else float("nan"),
            "wall_s": json.loads((run_dir / "wall_s.json").read_text()) if (run_dir / "wall_s.json").exists() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", type=Path, default=Path("experiments/demo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--kinds", nargs="+", default=["full", "adaptive", "random", "gpirt"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-estimators"))
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    rows = []
    order = sorted(args.kinds, key=lambda k: (k == "random", k))  # random last: it takes another's items
    for seed in args.seeds:
        done: dict[str, dict] = {}
        for kind in order:
            estimator = dict(SETTINGS.get(kind, {"kind": kind}))
            if kind == "random":
                ref = next((done[k] for k in EQUAL_ITEMS if k in done), None)
                budget = (ref["search_items"] / ref["candidates"] / ref["full_evaluation"]) if ref else 0.1
                estimator = {"kind": "random", "budget": round(budget, 4), "final_top_k": 3, "report_checks": 3}
            done[kind] = run_one(args.experiment, args.out, kind, seed, estimator)
            rows.append(done[kind])
            print(json.dumps(done[kind]), flush=True)
    full = {r["seed"]: r for r in rows if r["kind"] == "full"}
    lines = ["| estimator | seeds | items scored (mean) | items vs full | held-out test mean | "
             "gap to full (mean / worst) |", "|---|---|---|---|---|---|"]
    for kind in order:
        rs = [r for r in rows if r["kind"] == kind]
        gaps = [full[r["seed"]]["test_mean"] - r["test_mean"] for r in rs if r["seed"] in full]
        ratio = np.mean([full[r["seed"]]["items"] / r["items"] for r in rs if r["seed"] in full]) if full else np.nan
        gap_text = f"{np.mean(gaps):+.4f} / {max(gaps, key=abs):+.4f}" if gaps else "-"
        lines.append(f"| {kind} | {len(rs)} | {np.mean([r['items'] for r in rs]):,.0f} | {1 / ratio:.3f} "
                     f"({ratio:.1f}x fewer) | {np.mean([r['test_mean'] for r in rs]):.4f} | {gap_text} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
