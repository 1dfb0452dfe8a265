"""``evomerge status RUN_DIR``: where a search stands, read from its folder while it runs.

Everything comes from the run folder: the frozen ``experiment.yaml`` (phases and budgets), the
phases' run stores opened read-only (SQLite in WAL mode: a reader sees a consistent snapshot and
never blocks the writer), ``hand_recipes.json`` and ``summary.json``. Nothing here talks to the
process that runs the search, so it works from another terminal, another machine that mounts the
folder, or after the run was killed.

Rates are taken over the last evaluations (a window), not over the whole run, so a run that was
stopped for a day and resumed reports its current speed, and the estimate of time left follows it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from evomerge.progress import duration
from evomerge.run_folder import RunFolder
from evomerge.runstore import RunStore

#: evaluations over which throughput (and so the time left) is measured
RATE_WINDOW = 30




def phase_status(store: RunStore, index: int, kind: str, budget: int, now: float,
                 items_seen: Optional[dict[int, int]] = None) -> dict[str, Any]:
    """One phase: candidates, generations, best so far, items, rates, workers, failures, timing.

    ``items_seen`` (rowid -> items scored) is filled and reused across calls (``--watch``), so a
    refresh decodes only the responses recorded since the last one."""
    evs = store.evaluations(responses=False)
    seen = {} if items_seen is None else items_seen
    seen.update(store.item_counts(max(seen, default=0)))
    gens = store.generations()
    ok = [e for e in evs if e.ok]
    failed = [e for e in evs if not e.ok]
    best = max(ok, key=lambda e: (e.fitness if e.fitness is not None else float("-inf"), -(e.rowid or 0)),
               default=None)
    items = [seen.get(e.rowid or 0, 0) for e in evs]
    started = min([g.asked_at for g in gens] + [e.created_at - (e.seconds or 0.0) for e in evs], default=None)
    last = max([e.created_at for e in evs] + [g.told_at or g.asked_at for g in gens], default=None)
    window = evs[-RATE_WINDOW:]
    span = (window[-1].created_at - window[0].created_at) if len(window) > 1 else 0.0
    rate = (len(window) - 1) / span if span > 0 else None  # candidates per second
    items_rate = sum(items[-len(window):][1:]) / span if span > 0 else None
    busy: dict[str, float] = {}
    for e in evs:
        if e.worker:
            busy[e.worker] = busy.get(e.worker, 0.0) + (e.seconds or 0.0)
    wall = (last - started) if started is not None and last is not None else 0.0
    left = max(budget - len(evs), 0)
    return {
        "index": index, "kind": kind, "budget": budget, "done": len(evs), "ok": len(ok), "failed": len(failed),
        "generations": sum(g.told for g in gens),
        "best": None if best is None else {
            "fitness": best.fitness, "objectives": best.objectives if isinstance(best.objectives, dict)
            else [float(v) for v in best.objectives or []], "hash": best.genome_hash, "generation": best.generation},
        "items_scored": sum(items),
        "candidates_per_min": None if rate is None else rate * 60.0,
        "items_per_s": items_rate,
        "workers": {w: {"busy_s": s, "share": s / wall if wall > 0 else None} for w, s in sorted(busy.items())},
        "last_error": next((e.error.strip().splitlines()[-1] for e in reversed(failed) if e.error), None),
        "started_at": started, "last_activity_at": last,
        "elapsed_s": (now - started) if started is not None else 0.0,
        "left_s": (left / rate) if rate else (0.0 if left == 0 else None),
    }


def run_status(run_dir: str | Path, now: Optional[float] = None,
               cache: Optional[dict[str, dict[int, int]]] = None) -> dict[str, Any]:
    """The whole run as plain values (what ``--json`` prints); ``cache`` (kept by the caller between
    refreshes) holds each store's items per evaluation."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    now = time.time() if now is None else now
    budgets = folder.budgets()
    phases = []
    for index, kind, path in folder.phase_stores():
        with RunStore(path, readonly=True) as store:
            seen = None if cache is None else cache.setdefault(str(path), {})
            phases.append(phase_status(store, index, kind, budgets[index] if index < len(budgets) else 0, now, seen))
    hand = folder.read_json(folder.hand_recipes, {})
    pid = folder.holder()  # the process working in the folder (the lock's holder), None when none is
    if folder.summary.exists():
        state = "done"
    elif pid is None:
        state = ("stopped before its search began" if not phases else
                 "stopped after its search (final choice, export, held-out test left)"
                 if len(phases) == len(budgets) and phases[-1]["done"] >= phases[-1]["budget"] else
                 f"stopped in phase {phases[-1]['index']} ({phases[-1]['kind']})")
    elif not phases:
        state = "starting (models, benchmark checks, hand recipes)" if not hand else "starting the search"
    elif len(phases) == len(budgets) and phases[-1]["done"] >= phases[-1]["budget"]:
        state = "finishing (final choice, export, held-out test)"
    else:
        state = f"searching phase {phases[-1]['index']} ({phases[-1]['kind']})"
    current = phases[-1] if phases else None
    later = sum(budgets[current["index"] + 1:]) if current else sum(budgets)
    rate = current["candidates_per_min"] if current else None
    left = None
    if current and current["left_s"] is not None:
        left = current["left_s"] + (later / rate * 60.0 if later and rate else 0.0)
    last = max((p["last_activity_at"] for p in phases if p["last_activity_at"]), default=None)
    # since the experiment was frozen into the folder (``evomerge search``), resumes and pauses included
    started = min([folder.experiment.stat().st_mtime]
                  + [p["started_at"] for p in phases if p["started_at"]])
    return {
        "run_dir": str(run_dir), "state": state, "pid": pid, "phases_total": len(budgets), "phases": phases,
        "hand_recipes": {n: h.get("fitness") for n, h in hand.items()},
        "elapsed_s": (now - started) if started else 0.0,
        "left_s": None if state == "done" else left,
        "idle_s": (now - last) if last else None,
        "now": now,
    }



def render(status: dict[str, Any]) -> Any:
    """A rich renderable of ``run_status``: one header, one table per phase, the workers."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    lines: list[Any] = [Text(f"{status['run_dir']}: {status['state']}", style="bold"),
             Text(f"elapsed {duration(status['elapsed_s'])}, left ~{duration(status['left_s'])}"
                  if status["state"] != "done" else f"elapsed {duration(status['elapsed_s'])}")]
    idle = status.get("idle_s")
    if status["state"].startswith("stopped"):
        lines.append(Text(f"no process is running it: continue it with `evomerge resume {status['run_dir']}`",
                          style="yellow"))
    elif status["state"] != "done" and idle is not None and idle > 600:
        lines.append(Text(f"no activity for {duration(idle)}: stopped or killed? continue it with "
                          f"`evomerge resume {status['run_dir']}`", style="yellow"))
    if status["hand_recipes"]:
        lines.append(Text("hand recipes (fitness split): " + "; ".join(
            f"{n} {v:.4f}" if v is not None else f"{n} failed" for n, v in status["hand_recipes"].items())))
    for p in status["phases"]:
        t = Table(title=f"phase {p['index']} of {status['phases_total']} ({p['kind']})", show_header=False,
                  title_justify="left")
        t.add_column(style="dim")
        t.add_column()
        t.add_row("candidates", f"{p['done']} / {p['budget']} ({p['failed']} failed)")
        t.add_row("generation", f"{p['generations']} ({p['generations']} told)")
        if p["best"]:
            b = p["best"]
            obj = b["objectives"]
            text = ", ".join(f"{k} {v:.3f}" for k, v in obj.items()) if isinstance(obj, dict) else \
                ", ".join(f"{v:.3f}" for v in obj)
            t.add_row("best so far", f"{b['fitness']:.4f} ({text}), generation {b['generation']}, {b['hash'][:12]}")
        t.add_row("items scored", f"{p['items_scored']:,}")
        cpm, ips = p["candidates_per_min"], p["items_per_s"]
        t.add_row("throughput", "-" if cpm is None else f"{cpm:.1f} candidates/min, {ips:.0f} items/s")
        for w, u in p["workers"].items():
            share = "-" if u["share"] is None else f"{100 * u['share']:.0f}% busy"
            t.add_row(f"worker {w}", f"{share} ({u['busy_s']:.0f} s)")
        if p["last_error"]:
            t.add_row("last failure", p["last_error"][:160])
        t.add_row("phase time", f"{duration(p['elapsed_s'])} elapsed, ~{duration(p['left_s'])} left")
        lines.append(t)
    return Group(*lines)
