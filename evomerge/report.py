"""Plots and the run report: what a person looks at after a search.

Pure functions of plain data (lists of dicts, arrays) so that a report can be rebuilt from the run
store at any time, also while a search is still running.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from evomerge.objectives import pareto_mask  # noqa: E402


def write_history_csv(rows: Sequence[dict], path: Path) -> Path:
    """One row per evaluation: generation, genome hash, fitness, each objective, seconds, status."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def plot_fitness(rows: Sequence[dict], path: Path, title: str = "fitness by generation",
                 references: Mapping[str, float] | None = None, sources: Sequence[str] = ()) -> Path:
    """Best-so-far, generation best and generation median of the scalar fitness; each reference (a
    source model, dotted grey, or a hand recipe, dashed: its fitness on the same split) as a
    horizontal line labelled on the right."""
    gens = sorted({r["generation"] for r in rows if r.get("generation") is not None})
    best_gen, median, best_so_far, running = [], [], [], -math.inf
    for g in gens:
        vals = [r["fitness"] for r in rows if r["generation"] == g and _finite(r.get("fitness"))]
        best_gen.append(max(vals) if vals else np.nan)
        median.append(float(np.median(vals)) if vals else np.nan)
        running = max(running, best_gen[-1]) if vals else running
        best_so_far.append(running if math.isfinite(running) else np.nan)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    ax.plot(gens, best_so_far, label="best so far", lw=2.2, color="C0", marker="o", ms=3)
    ax.plot(gens, best_gen, label="generation best", alpha=0.8, color="C1", lw=1)
    ax.plot(gens, median, label="generation median", alpha=0.8, color="C2", lw=1)
    refs = {k: v for k, v in (references or {}).items() if _finite(v)}
    _reference_lines(ax, refs, set(sources or ()), [v for v in best_so_far + median if _finite(v)])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if gens:
        ax.set_xlim(min(gens) - 0.3, max(gens) + 0.3)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (mean accuracy, fitness split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _reference_lines(ax: plt.Axes, refs: Mapping[str, float], sources: set[str], curve: Sequence[float]) -> None:
    """Horizontal lines with their labels at the right edge, pushed apart so that none overlap."""
    if not refs:
        return
    values = [*refs.values(), *curve]
    lo, hi = min(values), max(values)
    pad = 0.05 * max(hi - lo, 1e-3)
    ax.set_ylim(lo - pad, hi + pad)
    gap = 0.045 * (hi - lo + 2 * pad)
    order = sorted(refs.items(), key=lambda kv: -kv[1])
    ys: list[float] = []
    for _, v in order:  # from the top down: each label at most at its line, at least `gap` below the last
        ys.append(min(v, ys[-1] - gap) if ys else v)
    hand = 0
    for (label, value), y in zip(order, ys):
        if label in sources:
            color, style = "0.45", ":"
        else:
            color, style, hand = f"C{(hand + 3) % 10}", "--", hand + 1
        ax.axhline(value, color=color, ls=style, lw=1.1, alpha=0.9)
        ax.annotate(f"{label} {value:.3f}", xy=(1.0, value), xycoords=("axes fraction", "data"),
                    xytext=(1.02, y), textcoords=("axes fraction", "data"), va="center", fontsize=7, color=color,
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.5, shrinkA=0, shrinkB=0))


def plot_pareto(rows: Sequence[dict], names: Sequence[str], path: Path,
                references: Mapping[str, Mapping[str, float]] | None = None,
                exported: Mapping[str, Mapping[str, float]] | None = None, sources: Sequence[str] = ()) -> Path:
    """All candidates on the first two objectives, the front highlighted; the source models as
    labelled stars, the hand recipes as diamonds, the exported models circled."""
    pts = np.array([[r[n] for n in names[:2]] for r in rows if all(_finite(r.get(n)) for n in names[:2])])
    plain = [n.removeprefix("obj_") for n in names[:2]]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    if len(pts):
        front = pts[pareto_mask(pts)]
        front = front[np.argsort(front[:, 0])]
        ax.scatter(pts[:, 0], pts[:, 1], s=12, alpha=0.35, color="C0", label="candidates")
        ax.plot(front[:, 0], front[:, 1], "o-", color="C3", ms=4, label="Pareto front")
    for label, acc in (references or {}).items():
        if all(_finite(acc.get(n)) for n in plain):
            source = label in sources
            ax.scatter([acc[plain[0]]], [acc[plain[1]]], marker="*" if source else "D", s=110 if source else 40,
                       color="k" if source else "C4", zorder=3)
            ax.annotate(label, (acc[plain[0]], acc[plain[1]]), xytext=(5, 3), textcoords="offset points", fontsize=7)
    first = True
    for label, acc in (exported or {}).items():
        if all(_finite(acc.get(n)) for n in plain):
            ax.scatter([acc[plain[0]]], [acc[plain[1]]], s=160, facecolors="none", edgecolors="C3", lw=2, zorder=4,
                       label="exported" if first else None)
            ax.annotate(label, (acc[plain[0]], acc[plain[1]]), xytext=(6, -10), textcoords="offset points",
                        fontsize=7, color="C3")
            first = False
    if references:
        ax.scatter([], [], marker="*", s=110, color="k", label="source models")
        ax.scatter([], [], marker="D", s=40, color="C4", label="hand recipes")
    ax.set_xlabel(plain[0])
    ax.set_ylabel(plain[1])
    ax.set_title("objectives of every candidate (fitness split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(table: dict[tuple[str, str, str], list[float]], path: Path, title: str) -> Path:
    """Searched coefficients: one row per (model, parameter, tensor group), one column per layer;
    rows grouped by model (a line between models), columns labelled by layer."""
    keys = sorted(table, key=lambda k: (k[0], k[1], k[2]))
    width = max(len(v) for v in table.values())
    grid = np.full((len(keys), width), np.nan)
    single = set()  # rows of one value ('other' tensors): drawn across the row, written once
    for i, k in enumerate(keys):
        row = table[k]
        if len(row) == 1 and width > 1:
            grid[i, :] = row[0]
            single.add(i)
        else:
            grid[i, : len(row)] = row
    fig, ax = plt.subplots(figsize=(max(5.5, 3.2 + 0.65 * width), 1.5 + 0.34 * len(keys)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(keys)), [f"{m}: {p} ({g})" for m, p, g in keys], fontsize=8)
    ax.set_xticks(range(width), [f"L{i}" for i in range(width)] if width > 1 else ["all layers"])
    for i in range(1, len(keys)):
        if keys[i][0] != keys[i - 1][0]:
            ax.axhline(i - 0.5, color="w", lw=2.5)
    ax.set_xlabel("layer  ('other' rows: one value for embeddings, final norm and head)", fontsize=8)
    ax.set_ylabel("source model: parameter (tensors)", fontsize=8)
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]) and (i not in single or j == (width - 1) // 2):
                dark = (grid[i, j] - lo) / (hi - lo) < 0.6 if hi > lo else True
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    fig.colorbar(im, ax=ax, label="value")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_plan(layers: Sequence[tuple[str, int]], scales: Sequence[float], path: Path, title: str) -> Path:
    """A DFS plan: which member's layer runs at each depth, and the scale of each hop."""
    members = sorted({m for m, _ in layers})
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(layers) + 1.5), 2.6))
    for d, ((m, i), s) in enumerate(zip(layers, scales)):
        y = members.index(m)
        ax.add_patch(plt.Rectangle((d - 0.4, y - 0.35), 0.8, 0.7, color=f"C{y}", alpha=0.75))
        ax.text(d, y, f"{i}\n×{s:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylim(-0.6, len(members) - 0.4)
    ax.set_yticks(range(len(members)), members)
    ax.set_xlabel("depth (layer index inside its model, × scale of the hop)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(rows: dict[str, dict[str, float]], columns: Sequence[str],
                   mean_of: Sequence[str] | None = None) -> str:
    cols = list(columns) + (["mean"] if mean_of else [])
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, acc in rows.items():
        vals = [acc.get(c, float("nan")) for c in columns]
        if mean_of:
            vals.append(float(np.mean([acc[c] for c in mean_of if c in acc])))
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
