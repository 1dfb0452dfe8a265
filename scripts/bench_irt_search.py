"""End to end: the same CMA-ES search with full evaluation and with an IRT estimator.

Same experiment, seed and number of candidates; prints the held-out test accuracy each search's
best model reaches and how many item evaluations each spent (calibration and drift checks
included for the IRT search). Target: within 0.02 of the full search with >= 8x fewer items.

    python scripts/bench_irt_search.py                       # experiments/demo.yaml, gp-IRT at 10%
    python scripts/bench_irt_search.py --kind gmpirt --budget 0.05 --markdown docs/bench_irt_search.md
    python scripts/bench_irt_search.py --seeds 0 1 2 --reuse-calibration   # calibrate once, search thrice
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from evomerge.run import start
from evomerge.runstore import RunStore


def items_spent(run_dir: Path) -> dict[str, int]:
    """Item evaluations of a run: the search's candidates, the calibration population, drift checks."""
    search = final = drift = 0
    for db in sorted(run_dir.glob("phase*/run.sqlite")):
        store = RunStore(db, readonly=True)
        search += sum(sum(len(r["item_ids"]) for r in (e.responses or [])) for e in store.evaluations())
        drift += len(store.get_meta("drift", []) or [])
        # the final choice among the top estimates and the report's estimator check, on every item
        final += sum(x["items"] for scores in (store.get_meta("full_scores", {}) or {}).values()
                     for x in scores.values())
        store.close()
    calibration = full_items = 0  # the initial calibration population: models x every fitness item
    for pop in sorted((run_dir / "calibration" / "initial").glob("*.population.npz")):
        with np.load(pop) as z:
            calibration += int(z["responses"].size)
            full_items += int(z["responses"].shape[1])
    return {"search": search, "calibration": calibration, "drift": drift * full_items, "final": final,
            "total": search + calibration + drift * full_items + final}


def test_mean(run_dir: Path) -> float:
    test = json.loads((run_dir / "test_results.json").read_text())
    return float(np.mean(list(test["best"].values())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="experiments/demo.yaml")
    ap.add_argument("--kind", default="gpirt")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--calibration-models", type=int, default=40)
    ap.add_argument("--drift-every", type=int, default=0)
    ap.add_argument("--final-top-k", type=int, help="estimator.final_top_k (default: the experiment's, 5; "
                                                   "0 = export the best estimate unconfirmed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--reuse-calibration", action="store_true",
                    help="for every seed after the first, also run the IRT search with the first seed's "
                         "calibration file (a calibration is made once per benchmark, then reused)")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    exp_path = Path(args.experiment).resolve()
    rows = []
    irt = {"kind": args.kind, "budget": args.budget, "calibration_models": args.calibration_models,
           "drift_every": args.drift_every}
    if args.final_top_k is not None:
        irt["final_top_k"] = args.final_top_k
    first_calibration = None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs = [("full", "full", {"kind": "full"}), (f"{args.kind} {args.budget:g}", "irt", irt)]
            if args.reuse_calibration and first_calibration is not None:
                runs.append((f"{args.kind} {args.budget:g}, calibration of seed {args.seeds[0]} reused", "reuse",
                             {**irt, "calibration": str(first_calibration)}))
            for label, tag, estimator in runs:
                data = yaml.safe_load(exp_path.read_text())
                data["seed"] = seed
                data["fitness"]["estimator"] = estimator
                path = Path(tmp) / f"exp-{seed}-{tag}.yaml"
                path.write_text(yaml.safe_dump(data))
                t = time.perf_counter()
                run_dir = start(path, Path(tmp) / f"run-{seed}-{tag}")
                if tag == "irt" and first_calibration is None:
                    first_calibration = run_dir / "calibration" / "initial"
                spent = items_spent(run_dir)
                rows.append({"seed": seed, "estimator": label, "test_mean": test_mean(run_dir),
                             "items": spent["total"], "search_items": spent["search"],
                             "calibration_items": spent["calibration"], "drift_items": spent["drift"],
                             "final_items": spent["final"],
                             "seconds": time.perf_counter() - t})
                print(rows[-1], flush=True)
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             "| seed | estimator | held-out test mean | items evaluated (search + calibration + drift + final) "
             "| ratio | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ref = next(x for x in rows if x["seed"] == r["seed"] and x["estimator"] == "full")
        lines.append(f"| {r['seed']} | {r['estimator']} | {r['test_mean']:.3f} | {r['items']:,} "
                     f"({r['search_items']:,} + {r['calibration_items']:,} + {r['drift_items']:,} "
                     f"+ {r['final_items']:,}) | "
                     f"{ref['items'] / r['items']:.1f}x | {r['seconds']:.0f} |")
    lines += ["", "| estimator | seeds | mean held-out test | mean gap to full | worst gap | fewer items |",
              "|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["estimator"] for r in rows):
        mine = [r for r in rows if r["estimator"] == label]
        full = {r["seed"]: r for r in rows if r["estimator"] == "full"}
        gaps = [full[r["seed"]]["test_mean"] - r["test_mean"] for r in mine]
        ratio = sum(full[r["seed"]]["items"] for r in mine) / sum(r["items"] for r in mine)
        lines.append(f"| {label} | {len(mine)} | {np.mean([r['test_mean'] for r in mine]):.3f} | "
                     f"{np.mean(gaps):+.3f} | {max(gaps):+.3f} | {ratio:.1f}x |")
    lines.append("\nGap = full search's held-out mean minus this one's (positive: the IRT search is worse).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
