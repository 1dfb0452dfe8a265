"""Fitness estimators compared on whole searches: items scored (every part counted) against the
held-out test mean of the exported model, for the same experiment and seeds.

    python scripts/bench_estimators.py                                   # the demo, seed 0
    python scripts/bench_estimators.py --seeds 0 1 2 3 4 --kinds full adaptive gpirt random
    python scripts/bench_estimators.py --experiment experiments/nsga2_rev_sort.yaml --markdown out.md
    python scripts/bench_estimators.py --split fitness_large --out runs/bench-large \
        --kinds racing@item_sample=1000 random_total successive_halving@item_sample=1000   # 5,000 items a skill

``random`` is run at the racing (else the adaptive) run's mean search items per candidate, so they
compare at equal search items, ``random_total`` at its items in all (its calibration spread over the
candidates); ``gpirt`` at 10% of the items. Items are every item scored (calibration,
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

from evomerge.run import resume, start

SETTINGS = {
    "full": {"kind": "full"},
    "gpirt": {"kind": "gpirt", "budget": 0.1},
    "adaptive": {"kind": "adaptive", "tolerance": 0.02, "max_items": 0.25, "calibration_models": 2, "refit_every": 3,
                 "final_top_k": 2, "report_checks": 2},
    "racing": {"kind": "adaptive", "tolerance": 0.02, "max_items": 0.25, "calibration_models": 2, "refit_every": 3,
               "racing": True, "final_top_k": 2, "report_checks": 2},
    # start_items 16 per benchmark, halving up to 25%; successive_halving@8 starts on 8 (on the demo's
    # 12-candidate generations, ~80 items a candidate: the racing run's count)
    "successive_halving": {"kind": "successive_halving", "start_items": 16, "max_items": 0.25,
                           "final_top_k": 2, "report_checks": 2},
}
EQUAL_ITEMS = ("racing", "adaptive")  # random subsampling runs at the items of the last of these that ran


def hypervolume(points: list[list[float]]) -> float:
    """The area two objectives (maximized, in [0, 1]) dominate above the reference point (0, 0)."""
    area, best_y = 0.0, 0.0
    for x, y in sorted(((p[0], p[1]) for p in points), reverse=True):  # sweep from the largest x
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


def estimator_for(kind: str, done: dict[str, dict]) -> dict:
    """The estimator settings of a benchmark kind: a name of SETTINGS, ``random`` (at the equal-items
    run's count), or ``NAME@VALUE``: ``random@0.05`` a budget, ``adaptive@0.03`` / ``racing@0.03`` a
    tolerance, ``successive_halving@8`` the start items (for the curve of gap against items), or
    ``NAME@KEY=VALUE,...`` any estimator settings."""
    base, _, value = kind.partition("@")
    if base in ("random", "random_total"):
        # the last racing or adaptive run of this seed (racing@item_sample=1000 when it ran after racing)
        ref_kind = next((k for k in reversed(done) if k.partition("@")[0] in EQUAL_ITEMS), None)
        ref = done[ref_kind] if ref_kind else None
        # random: the racing run's search items a candidate; random_total: its items in all, the
        # calibration included (less the final confirmation, which random pays alike: on the same item
        # sample when the racing run had one)
        sample = estimator_for(ref_kind, {}).get("item_sample") if ref_kind else None
        spent = (ref["search_items"] if base == "random" else ref["items"] - ref["parts"]["final"]) if ref else 0
        budget = float(value) if value else (spent / ref["candidates"] / ref["sample_items"] if ref else 0.1)
        return {"kind": "random", "budget": round(budget, 4), "final_top_k": 2, "report_checks": 2,
                **({"item_sample": sample} if sample else {})}
    estimator = dict(SETTINGS.get(base, {"kind": base}))
    if "=" in value:  # racing@tolerance=0.03,batch=32: any settings
        estimator.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in value.split(","))})
    elif value:
        estimator["start_items" if base == "successive_halving" else "tolerance"] = (
            int(value) if base == "successive_halving" else float(value))
    return estimator


def run_one(exp_path: Path, out: Path, kind: str, seed: int, estimator: dict, split: str = "fitness") -> dict:
    run_dir = out / f"{kind}-s{seed}"
    if not (run_dir / "summary.json").exists():
        data = yaml.safe_load(exp_path.read_text())
        data["seed"] = seed
        data["fitness"]["estimator"] = estimator
        for o in data["fitness"]["objectives"]:  # the large-benchmark variant: zoo:<skill>/fitness_large
            o["benchmark"]["path"] = o["benchmark"]["path"].replace("/fitness", f"/{split}")
        data["name"] = f"{data['name']}-{kind}-s{seed}"
        path = out / f"{kind}-s{seed}.yaml"
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**data, "output_dir": str(run_dir)}, sort_keys=False))
        if (run_dir / "experiment.yaml").exists():  # a benchmark killed mid-run: go on (its wall time is lost)
            resume(run_dir)
        else:
            t0 = time.perf_counter()
            start(path, run_dir)
            (run_dir / "wall_s.json").write_text(json.dumps(time.perf_counter() - t0))
    summary = json.loads((run_dir / "summary.json").read_text())
    models = {m: {k: v for k, v in t.items() if k != "error"} for m, t in summary["test"].items()
              if m == "best" or m.startswith("pareto-")}
    with open(run_dir / "phase0-ps" / "history.csv") as f:
        candidates = sum(1 for _ in f) - 1
    items = summary["items_scored"]
    return {"kind": kind, "seed": seed, "items": items["total"] - items.get("references", 0),
            "parts": {k: items.get(k, 0) for k in ("calibration", "search", "final", "report", "drift")},
            "references": items.get("references", 0),
            "search_items": summary["items_scored"]["search"], "candidates": candidates,
            "full_evaluation": summary["items_scored"]["full_evaluation"],
            "sample_items": items.get("item_sample", items["full_evaluation"]),
            "test_mean": float(np.mean([np.mean(list(t.values())) for t in models.values()])) if models else np.nan,
            "test_hv": hypervolume([list(t.values()) for t in models.values()]) if "best" not in models else None,
            # the exported front's hypervolume on the fitness split, as the run scored it (estimates
            # for a reduced estimator, exact for full)
            "fitness_hv": (hypervolume([list(c["objectives"].values()) for c in summary["chosen"].values()])
                           if "best" not in models else None),
            "wall_s": json.loads((run_dir / "wall_s.json").read_text()) if (run_dir / "wall_s.json").exists() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", type=Path, default=Path("experiments/demo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--kinds", nargs="+", default=["full", "adaptive", "random", "gpirt"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-estimators"))
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--split", default="fitness", help="the zoo's fitness split the objectives use: fitness "
                    "(600 items per skill) or fitness_large (5,000, the large-benchmark variant)")
    ap.add_argument("--no-run", action="store_true", help="only tabulate the runs already in --out")
    ap.add_argument("--plot", type=Path, help="a PNG of the gap to full against items scored, every run")
    ap.add_argument("--gap-against", type=Path, help="take the full runs the gaps are measured against from "
                    "this --out of another benchmark (a proxy: the large variant's full run is too dear here)")
    args = ap.parse_args()
    rows = []
    order = sorted(args.kinds, key=lambda k: (k.startswith("random"), k))  # random last: it takes another's items
    if args.no_run and "full" not in order:  # a finished full run is always the reference of the table
        order.insert(0, "full")
    for seed in args.seeds:
        done: dict[str, dict] = {}
        for kind in order:
            if args.no_run and not (args.out / f"{kind}-s{seed}" / "summary.json").exists():
                continue
            estimator = estimator_for(kind, done)
            done[kind] = run_one(args.experiment, args.out, kind, seed, estimator, args.split)
            rows.append(done[kind])
            print(json.dumps(done[kind]), flush=True)
    reference = None
    if args.gap_against:
        reference = [run_one(args.experiment, args.gap_against, "full", seed, SETTINGS["full"])
                     for seed in args.seeds if (args.gap_against / f"full-s{seed}" / "summary.json").exists()]
    text = table(rows, order, reference)
    print(text)
    if args.plot:
        plot(rows, order, reference, args.plot)
    if args.markdown:
        args.markdown.write_text(text + "\n")


def gap_basis(rows: list[dict], reference: list[dict] | None) -> tuple[bool, str, dict[int, dict]]:
    """Whether the runs are Pareto searches, the row key gaps are measured on (held-out hypervolume or
    test mean), and the full run of each seed (this benchmark's, else ``reference``'s)."""
    pareto = any(r["test_hv"] is not None for r in rows)
    full = {r["seed"]: r for r in (reference or []) + rows if r["kind"] == "full"}
    return pareto, "test_hv" if pareto else "test_mean", full


def table(rows: list[dict], order: list[str], reference: list[dict] | None = None) -> str:
    """Per estimator, means over seeds; gaps are full's value minus the estimator's at the same seed
    (positive: worse than full), on the held-out test mean (single objective) or on the hypervolume
    of the exported models' held-out scores (Pareto). Without a full run, items compare with what full
    would score by count (candidates x items of one full evaluation, marked "by count"); ``reference``
    (another benchmark's full runs) gives proxy gaps, marked "proxy"."""
    pareto, key, full = gap_basis(rows, reference)
    lines = ["| estimator | seeds | items scored (mean) | calibration / search / final / report | items vs full | "
             "held-out test mean | " + ("held-out hypervolume | fitness-split hypervolume | " if pareto else "")
             + "gap to full (mean / worst) | wall s (mean) |",
             "|---|---|---|---|---|---|" + ("---|---|" if pareto else "") + "---|---|"]
    counted = not any(r["kind"] == "full" for r in rows)
    for kind in order:
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        gaps = [full[r["seed"]][key] - r[key] for r in rs if r["seed"] in full]
        full_items = (np.mean([r["candidates"] * r["full_evaluation"] for r in rs]) if counted
                      else np.mean([r["items"] for r in full.values()]))
        ratio = full_items / np.mean([r["items"] for r in rs])
        gap_text = (f"{np.mean(gaps):+.4f} / {max(gaps):+.4f}" + (" (proxy)" if reference else "")) if gaps else "-"
        hv = (f"{np.mean([r['test_hv'] for r in rs]):.4f} | {np.mean([r['fitness_hv'] for r in rs]):.4f} | "
              if pareto else "")
        walls = [r["wall_s"] for r in rs if r["wall_s"] is not None]
        parts = " / ".join(f"{np.mean([r['parts'][p] for r in rs]):,.0f}"
                           for p in ("calibration", "search", "final", "report"))
        lines.append(f"| {kind} | {len(rs)} | {np.mean([r['items'] for r in rs]):,.0f} | {parts} | "
                     f"{ratio:.1f}x fewer{' (by count)' if counted else ''} | "
                     f"{np.mean([r['test_mean'] for r in rs]):.4f} | {hv}{gap_text} | "
                     f"{np.mean(walls) if walls else float('nan'):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], order: list[str], reference: list[dict] | None, path: Path) -> None:
    """Gap to full (same seed) against items scored, log scale: one dot per run, a cross per kind's
    mean; the curve a reader wants when a target of items and gap is missed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pareto, key, full = gap_basis(rows, reference)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, kind in enumerate(k for k in order if k != "full"):
        rs = [r for r in rows if r["kind"] == kind and r["seed"] in full]
        if not rs:
            continue
        xs, ys = [r["items"] for r in rs], [full[r["seed"]][key] - r[key] for r in rs]
        color = f"C{i}"
        ax.scatter(xs, ys, color=color, alpha=0.45, s=18)
        ax.scatter([np.mean(xs)], [np.mean(ys)], color=color, marker="X", s=90, label=f"{kind} ({len(rs)} seeds)")
    full_items = np.mean([r["items"] for r in full.values()]) if full else None
    if full_items:
        ax.axvline(full_items, color="k", lw=0.8, ls=":")
        ax.text(full_items, ax.get_ylim()[1], " full", va="top", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("fitness items scored in the whole run (log)")
    ax.set_ylabel(("held-out hypervolume" if pareto else "held-out test mean") + " gap to full (+: worse)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
