"""``evomerge fuse EXPERIMENT.yaml``: precompute the sources' distributions, train the target, export.

The run folder holds the frozen experiment (``fuse.yaml``), the precomputed distributions
(``distributions.pt``, reused when the same run continues), trainer checkpoints, the fused model
(``model/``: a plain Hugging Face checkpoint with the target's tokenizer), ``report.json``
(accuracy of the sources and of the target before and after, loss history) and, for heterogeneous
skills the run used, copies of their item files (``items/<skill>/<split>.jsonl``) so that a merge
search can score the new skill. Running the same command again on a stopped run continues it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.generation import accuracy
from evomerge.fuse.config import FuseExperiment, load_fuse_experiment
from evomerge.fuse.data import encode_pair, load_pairs, pad_batch, pad_id
from evomerge.fuse.distributions import SourceDistributions, source_distributions
from evomerge.fuse.train import FuseData, StepLog, latest_checkpoint, train_fused
from evomerge.refs import resolve_items_ref, resolve_model_ref


class FuseRunConflict(ValueError):
    """The output folder holds a run of a different experiment."""


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _freeze(exp_data: dict, run_dir: Path, exp_root: Path) -> None:
    """Write the experiment into the run folder, or check that the run there is the same experiment."""
    frozen = {**exp_data, "_experiment_dir": str(exp_root)}
    path = run_dir / "fuse.yaml"
    if path.exists():
        old = yaml.safe_load(path.read_text())
        if old != frozen:
            raise FuseRunConflict(f"{run_dir} holds a run of a different fusion experiment (see {path}); "
                                  "choose another output_dir, or delete that folder to start over")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(frozen, sort_keys=False))


def _dist_key(exp: FuseExperiment, paths: dict[str, Path], target: Path, data_paths: list[Path]) -> str:
    blob = json.dumps({"sources": {k: str(v) for k, v in paths.items()}, "target_tokenizer": str(target),
                       "data": [d.model_dump() for d in exp.data], "files": [str(p) for p in data_paths],
                       "top_k": exp.fusion.top_k, "seed": exp.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def set_accuracy(model, tok, eval_sets: dict[str, list[dict]]) -> dict[str, float]:
    return {name: accuracy(model, tok, items) for name, items in eval_sets.items()}


def run_fuse(exp_path: str | Path, console: Console | None = None, output_dir: str | Path | None = None,
             on_step: StepLog | None = None) -> Path:
    """Run (or continue) a fusion experiment; returns the run folder. See the module docstring."""
    console = console or Console(stderr=True)
    exp_path = Path(exp_path).resolve()
    exp = load_fuse_experiment(exp_path)
    root = exp_path.parent
    run_dir = Path(output_dir or exp.output_dir or Path("runs") / exp.name)
    _freeze(yaml.safe_load(exp_path.read_text()), run_dir, root)
    if exp.threads:
        torch.set_num_threads(exp.threads)
    t0 = time.time()

    paths = {name: resolve_model_ref(ref, root) for name, ref in exp.sources.items()}
    target_path = paths.get(exp.target) or resolve_model_ref(exp.target, root)
    target_tok = AutoTokenizer.from_pretrained(target_path)
    data_paths = [resolve_items_ref(d.path, root) for d in exp.data]
    pairs = [pr for d, p in zip(exp.data, data_paths)
             for pr in load_pairs(p, d.limit, exp.seed, d.prompt_key, d.answer_key)]
    enc = [encode_pair(target_tok, *pr) for pr in pairs]
    ids, mask, labels = pad_batch([e[0] for e in enc], [e[1] for e in enc], pad_id(target_tok))
    console.print(f"fuse [bold]{exp.name}[/bold]: {len(pairs)} pairs, target {target_path}, "
                  f"sources {', '.join(paths)}, lambda {exp.train.lam}, {exp.fusion.strategy}")

    sources: dict[str, SourceDistributions] = {}
    coverage: dict[str, float] = {}
    if exp.train.lam < 1.0:
        sources = _distributions(exp, paths, target_path, target_tok, pairs, enc, ids.shape[1], data_paths,
                                 run_dir, console)
        coverage = {k: round(v.coverage, 4) for k, v in sources.items()}
        console.print("aligned coverage of answer tokens (rest: reference one-hot): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in coverage.items()))
    data = FuseData(ids, mask, labels, sources)

    eval_sets = {ref: _eval_items(ref, root) for ref in exp.eval}
    # transformers wraps .to with functools.wraps(Module.to), so mypy reads it unbound (self = the device)
    model = AutoModelForCausalLM.from_pretrained(target_path).to(exp.device)  # type: ignore[arg-type]
    before = set_accuracy(model, target_tok, eval_sets) if eval_sets else {}
    ckpt_dir = run_dir / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    start = int(last.name.split("-")[1]) if last else 0
    if start:
        console.print(f"resuming from {last}")
    with _progress(console) as progress:
        task = progress.add_task("fuse (train)", total=exp.train.steps, completed=start, info="")

        def step_log(step: int, row: dict) -> None:
            kl = f" kl {row['kl']:.3f}" if row["kl"] is not None else ""
            progress.update(task, completed=step, info=f"loss {row['loss']:.3f} ce {row['ce']:.3f}{kl}")
            if on_step is not None:
                on_step(step, row)

        history = train_fused(model, data, exp.train, exp.fusion, exp.seed, ckpt_dir, exp.device, step_log)

    out = run_dir / "model"
    tmp = run_dir / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    target_tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _copy_hetero_items([d.path for d in exp.data] + list(exp.eval), run_dir)

    after = set_accuracy(model, target_tok, eval_sets) if eval_sets else {}
    source_acc: dict[str, dict[str, float]] = {}
    for name, p in paths.items():
        if eval_sets:  # the target, when it is a source, was scored already: `before`
            source_acc[name] = before if p == target_path else set_accuracy(
                AutoModelForCausalLM.from_pretrained(p).to(exp.device),  # type: ignore[arg-type]  # as above
                AutoTokenizer.from_pretrained(p), eval_sets)
    acc = {**{f"source {k}": v for k, v in source_acc.items()}, "target before": before, "target after": after}
    report = {"name": exp.name, "target": str(target_path), "pairs": len(pairs), "lambda": exp.train.lam,
              "strategy": exp.fusion.strategy, "steps": exp.train.steps, "coverage": coverage, "accuracy": acc,
              "final_loss": _tail_mean(history), "seconds": round(time.time() - t0, 1), "history": history}
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    if eval_sets:
        print_accuracy(acc, list(eval_sets), console)
    console.print(f"[green]wrote[/green] {out}")
    return run_dir


def _tail_mean(history: list[dict], n: int = 50) -> dict[str, float]:
    tail = history[-n:]
    out = {}
    for key in ("loss", "ce", "kl"):
        vals = [h[key] for h in tail if h[key] is not None]
        if vals:
            out[key] = round(sum(vals) / len(vals), 4)
    return out


def _eval_items(ref: str, root: Path) -> list[dict]:
    from evomerge.evaluate.builtin import read_items_file

    return read_items_file(resolve_items_ref(ref, root))


def _copy_hetero_items(refs: list[str], run_dir: Path) -> None:
    """Copy every split of each heterogeneous skill used, for searches that score the new skill."""
    for skill in sorted({r[len("hetero:"):].partition("/")[0] for r in refs if r.startswith("hetero:")}):
        src = resolve_items_ref(f"hetero:{skill}/train").parent
        dst = run_dir / "items" / skill
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.jsonl"):
            shutil.copyfile(f, dst / f.name)


def _advance(progress: Progress, task: TaskID, n: int) -> None:
    progress.update(task, advance=n)


def _distributions(exp: FuseExperiment, paths: dict[str, Path], target_path: Path, target_tok,
                   pairs, enc, width: int, data_paths: list[Path], run_dir: Path,
                   console: Console) -> dict[str, SourceDistributions]:
    """Each source's aligned top-k distributions, computed once per run folder and reused on resume."""
    key = _dist_key(exp, paths, target_path, data_paths)
    cache = run_dir / "distributions.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            return {k: SourceDistributions.from_dict(v) for k, v in saved["sources"].items()}
    out = {}
    with _progress(console) as progress:
        for name, path in paths.items():
            task = progress.add_task(f"distributions {name}", total=len(pairs), info="")
            model = AutoModelForCausalLM.from_pretrained(path).to(exp.device)  # type: ignore[arg-type]  # see run
            tok = AutoTokenizer.from_pretrained(path)
            out[name] = source_distributions(
                model, tok, target_tok, pairs, [e[0] for e in enc], [e[1] for e in enc], width,
                exp.fusion.top_k, exp.distill_batch_size, exp.device,
                on_batch=partial(_advance, progress, task))
            del model
    tmp = cache.with_suffix(".tmp")
    torch.save({"key": key, "sources": {k: v.to_dict() for k, v in out.items()}}, tmp)
    os.replace(tmp, cache)
    return out


def print_accuracy(acc: dict[str, dict[str, float]], sets: list[str], console: Console) -> None:
    table = Table(title="exact-match accuracy")
    table.add_column("model")
    for s in sets:
        table.add_column(s, justify="right")
    for name, row in acc.items():
        table.add_row(name, *[f"{row[s]:.3f}" if s in row else "-" for s in sets])
    console.print(table)
