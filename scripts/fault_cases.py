"""Run bad inputs and faults through the ``evomerge`` command line and print what became of each.

    python scripts/fault_cases.py                 # every case, a markdown table on stdout
    python scripts/fault_cases.py -k merge -v     # the cases whose name contains 'merge', with output

Each case builds its inputs in a temporary folder (experiments derived from ``experiments/demo.yaml``
with a tiny budget, copies of the tiny zoo's models, damaged where the case says), runs one command
in a subprocess and classifies the outcome:

- refused before weights: exit 2 without a traceback, and no process read a weight (the file named
  by $EVOMERGE_WEIGHTS_LOG, which ``evomerge.checkpoint.note_weights_loading`` appends to the
  moment a process starts reading weights, stays empty);
- refused after weights: the same, but some weights had been read first;
- handled: the command did what it should (a case that must succeed, and its check passed);
- traceback: a Python traceback reached the user;
- silently accepted: a case that must be refused exited 0 (or one that must succeed left a wrong result);
- unclear message: refused, but the message lacks what it must name (the key, the file);
- wrongly refused: a case that must succeed (a corrected command, ``--overwrite``) was refused;
- skipped: the fault cannot be made here (permissions do not bite as root; no tmpfs without root).

The run-folder cases (a failed start, resume after an edit, a damaged run store, a second process)
first run a small search (budget 2, one worker). Nothing here times anything: outcomes only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "demo.yaml"
TIMEOUT = 600
ITEMS = 12  # items per benchmark in the small item files (fast candidates)

OUTCOMES = ("refused before weights", "refused after weights", "handled", "traceback", "silently accepted",
            "unclear message", "wrongly refused", "timeout", "skipped")


class Skip(Exception):
    """The fault cannot be made on this machine."""


@dataclass
class Case:
    name: str
    klass: str
    expect: str  # "refuse" or "succeed"
    build: Callable[["Ctx"], list[str]]  # the command under test (after the case's own setup)
    needle: tuple[str, ...] = ()  # what a refusal must name
    verify: Optional[Callable[["Ctx", "subprocess.CompletedProcess[str]"], Optional[str]]] = None
    timeout: int = TIMEOUT  # seconds; a command that should be refused at once and runs on is stopped


@dataclass
class Ctx:
    """One case's temporary folder and the helpers that build its inputs."""

    tmp: Path
    zoo: Path
    shared: "Shared"
    background: list[subprocess.Popen] = field(default_factory=list)

    @property
    def weights_log(self) -> Path:
        return self.tmp / "weights.log"

    def experiment(self, change: Callable[[dict], Any] | None = None, name: str = "exp.yaml") -> str:
        exp = base_experiment(self.tmp)
        if change is not None:
            change(exp)
        (self.tmp / name).write_text(yaml.safe_dump(exp, sort_keys=False))
        return name

    def model_copy(self, member: str) -> Path:
        dst = self.tmp / "models" / member
        if not dst.exists():
            shutil.copytree(self.zoo / member, dst)
        return dst

    def run_copy(self) -> Path:
        """A finished small run, copied (its experiment's relative paths point into the shared folder)."""
        dst = self.tmp / "run"
        shutil.copytree(self.shared.finished_run(), dst)
        return dst


class Shared:
    """Inputs several cases use, made once: a finished small run."""

    def __init__(self, root: Path, zoo: Path):
        self.root, self.zoo = root, zoo
        self._run: Optional[Path] = None

    def finished_run(self) -> Path:
        if self._run is None:
            work = self.root / "finished"
            work.mkdir()
            ctx = Ctx(work, self.zoo, self)
            ctx.experiment()
            proc = cli(["search", "exp.yaml", "-o", "run"], work, log=None)
            if proc.returncode != 0:
                raise RuntimeError(f"the shared small run failed:\n{proc.stdout}\n{proc.stderr}")
            self._run = work / "run"
        return self._run


def base_experiment(tmp: Path) -> dict[str, Any]:
    """experiments/demo.yaml made small: two experts, small local item files, budget 2, one worker."""
    exp = yaml.safe_load(DEMO.read_text())
    items = tmp / "items"
    if not items.exists():
        items.mkdir()
        zoo_items = zoo_root() / "items"
        for skill in ("rev", "sort"):
            for split in ("fitness", "test"):
                lines = (zoo_items / skill / f"{split}.jsonl").read_text().splitlines()
                lines = lines[:: max(1, len(lines) // ITEMS)][:ITEMS]  # every length, easy to hard
                (items / f"{skill}_{split}.jsonl").write_text("\n".join(lines) + "\n")
    exp.update(name="fault", models={"base": "zoo:base", "rev": "zoo:rev", "sort": "zoo:sort"},
               budget={"evaluations": 2}, workers=1, references=[],
               searcher={"name": "cmaes", "options": {"popsize": 2, "sigma": 0.25}})
    exp["fitness"] = {
        "objectives": [{"name": s, "benchmark": {"type": "items", "path": f"items/{s}_fitness.jsonl"}}
                       for s in ("rev", "sort")],
        "test": [{"name": s, "benchmark": {"type": "items", "path": f"items/{s}_test.jsonl"}} for s in ("rev", "sort")]}
    return exp


_ZOO: Optional[Path] = None


def zoo_root() -> Path:
    global _ZOO
    if _ZOO is None:
        out = subprocess.run([sys.executable, "-c", "from evomerge.zoo import ensure_zoo; print(ensure_zoo().root)"],
                             capture_output=True, text=True, env=_env(None), check=True)
        _ZOO = Path(out.stdout.strip().splitlines()[-1])
    return _ZOO


def _env(log: Optional[Path]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false",
               COLUMNS="200", NO_COLOR="1")
    env.pop("EVOMERGE_WEIGHTS_LOG", None)
    if log is not None:
        env["EVOMERGE_WEIGHTS_LOG"] = str(log)
    return env


def cli(args: list[str], cwd: Path, log: Optional[Path], timeout: int = TIMEOUT) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=_env(log), timeout=timeout)


def cli_background(ctx: Ctx, args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], cwd=ctx.tmp, env=_env(ctx.tmp / "bg.log"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ctx.background.append(proc)
    return proc


# -- edits of an experiment -----------------------------------------------------------------------
def at(path: str, value: Any) -> Callable[[dict], None]:
    def apply(exp: dict) -> None:
        *parents, last = path.split(".")
        node = exp
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[last] = value
    return apply


def config_case(name: str, path: str, value: Any, *needle: str) -> Case:
    return Case(name, "config", "refuse", lambda c: ["search", c.experiment(at(path, value)), "-o", "run"], needle)


def space(method: str, genes: dict, fixed: dict | None = None) -> dict:
    return {"kind": "ps", "method": method, "genes": genes, "fixed": fixed or {}}


W = {"weight": {"low": 0.0, "high": 1.0}}

CONFIG_CASES = [
    config_case("objective weight NaN", "fitness.objectives.0.weight", float("nan"), "weight"),
    config_case("objective weight inf", "fitness.objectives.0.weight", float("inf"), "weight"),
    config_case("fixed density 1.5", "search_space", space("ties", W, {"density": 1.5}), "density", "1.5"),
    config_case("gene density above 1", "search_space",
                space("dare_ties", {**W, "density": {"low": 0.1, "high": 1.5}}), "density"),
    config_case("gene bound NaN", "search_space",
                space("task_arithmetic", {"weight": {"low": 0, "high": float("nan")}}), "genes.weight.high"),
    config_case("fixed switch not a boolean", "search_space", space("ties", W, {"normalize": "yes"}), "normalize"),
    config_case("device tpu9", "device", "tpu9", "device", "tpu9"),
    config_case("nevergrad:Bogus", "searcher", {"name": "nevergrad:Bogus"}, "no optimizer 'Bogus'"),
    config_case("nevergrad name typo", "searcher", {"name": "nevergrad:TwoPointDE", "options": {"budget": 2}},
                "TwoPointsDE"),
    config_case("pymoo:NSGA9", "searcher", {"name": "pymoo:NSGA9"}, "NSGA9"),
    config_case("sigma: big", "searcher.options.sigma", "big", "sigma"),
    config_case("sigma NaN", "searcher.options.sigma", float("nan"), "sigma"),
    config_case("unknown searcher option", "searcher.options.sgima", 0.2, "sgima"),
    config_case("item budget 5000", "fitness.estimator", {"kind": "random", "budget": 5000},
                "fitness.estimator.budget"),
    config_case("item budget 12.5", "fitness.estimator", {"kind": "random", "budget": 12.5}, "budget"),
    config_case("IRT with 2 calibration models", "fitness.estimator", {"kind": "irt", "calibration_models": 2},
                "calibration_models"),
    config_case("estimator delta 1.5", "fitness.estimator", {"kind": "adaptive", "delta": 1.5}, "delta"),
    config_case("hand recipe density 1.5", "references", [{"name": "x", "method": "ties", "density": 1.5}], "density"),
    config_case("hand recipe slerp t=2", "references", [{"name": "x", "method": "slerp", "parameters": {"t": 2}}], "t"),
    config_case("unknown top-level key", "seeed", 3, "seeed"),
    config_case("base_model not a model", "base_model", "nope", "base_model"),
    config_case("missing model folder", "models.rev", "./no/such/model", "models.rev"),
    config_case("unknown search space preset", "search_space", "ps_no_such", "ps_no_such"),
    config_case("missing item file", "fitness.objectives.0.benchmark.path", "items/none.jsonl", "none.jsonl"),
    config_case("objective name with a space", "fitness.objectives.0.name", "re v", "name"),
    config_case("workers 0", "workers", 0, "workers"),
    config_case("memory_budget lots", "memory_budget", "lots", "memory_budget"),
    config_case("budget of 0 evaluations", "budget.evaluations", 0, "evaluations"),
    config_case("DFS scale below 0", "search_space", {"kind": "dfs", "scale": {"low": -1, "high": 1}}, "scale"),
]


def _yaml_error(c: Ctx) -> list[str]:
    (c.tmp / "exp.yaml").write_text("name: bad\nmodels: {base: zoo:base\nbase_model: base\n")
    return ["search", "exp.yaml"]


def _list_file(c: Ctx) -> list[str]:
    (c.tmp / "exp.yaml").write_text("- name: bad\n")
    return ["search", "exp.yaml"]


def _garbage_items(c: Ctx) -> list[str]:
    name = c.experiment(at("fitness.objectives.1.benchmark.path", "items/bad.jsonl"))
    (c.tmp / "items" / "bad.jsonl").write_text('{"id": "a", "prompt": "x", "answer": "y"}\nnot json at all\n')
    return ["search", name, "-o", "run"]


CONFIG_CASES += [
    Case("YAML syntax error", "config", "refuse", _yaml_error, ("line",)),
    Case("experiment file is a list", "config", "refuse", _list_file, ("mapping",)),
    Case("item file that does not parse", "config", "refuse", _garbage_items, ("bad.jsonl",)),
]


# -- damaged model folders ------------------------------------------------------------------------
def damaged(member: str, damage: Callable[[Path], None], key: str = "") -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        folder = c.model_copy(member)
        damage(folder)
        return ["search", c.experiment(at(f"models.{member}", str(folder))), "-o", "run"]
    return build


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _chmod_000(folder: Path) -> None:
    if os.geteuid() == 0:
        raise Skip("root reads any folder")
    folder.chmod(0)


def _shard_index(folder: Path) -> None:
    index = {"weight_map": {"x": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


FILE_CASES = [
    Case("truncated .safetensors", "files", "refuse", damaged("rev", lambda d: _truncate(d / "model.safetensors")),
         ("model.safetensors", "truncated")),
    Case("safetensors header garbage", "files", "refuse",
         damaged("rev", lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64)), ("model.safetensors",)),
    Case("config.json not JSON", "files", "refuse", damaged("rev", lambda d: (d / "config.json").write_text("{oops")),
         ("config.json",)),
    Case("base without a tokenizer", "files", "refuse",
         damaged("base", lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")]),
         ("models.base", "tokenizer")),
    Case("model folder without weights", "files", "refuse",
         damaged("sort", lambda d: (d / "model.safetensors").unlink()), ("models.sort", "safetensors")),
    Case("unreadable model folder", "files", "refuse", damaged("sort", _chmod_000), ("models.sort", "permission")),
    Case("shard index naming a missing shard", "files", "refuse", damaged("sort", _shard_index),
         ("model.safetensors.index.json",)),
]


# -- evomerge merge --------------------------------------------------------------------------------
def merge_yaml(c: Ctx, models: dict[str, Path] | None = None, **extra: Any) -> str:
    m = models or {"base": c.zoo / "base", "rev": c.zoo / "rev", "sort": c.zoo / "sort"}
    cfg = {"merge_method": "ties", "base_model": str(m["base"]),
           "models": [{"model": str(m[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("rev", "sort")],
           **extra}
    (c.tmp / "merge.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return "merge.yml"


def stale_folder(c: Ctx) -> Path:
    """An older sharded checkpoint: an index and two shards, as a bigger model left them."""
    out = c.tmp / "out"
    out.mkdir()
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    for i in (1, 2):
        (out / f"model-0000{i}-of-00002.safetensors").write_bytes(b"stale")
    return out


def _stale_untouched(c: Ctx, proc: Any) -> Optional[str]:
    return None if (c.tmp / "out" / "model-00002-of-00002.safetensors").read_bytes() == b"stale" else \
        "the stale folder was changed by a refused merge"


def _fresh_checkpoint(c: Ctx, proc: Any) -> Optional[str]:
    out = c.tmp / "out"
    names = sorted(p.name for p in out.iterdir())
    if any(n.startswith("model-0000") or n.endswith(".index.json") for n in names):
        return f"stale files left: {names}"
    code = ("import sys, pathlib; from transformers import AutoModelForCausalLM; "
            "from evomerge.checkpoint import TensorReader; r = TensorReader(pathlib.Path(sys.argv[1])); "
            "[r.get(n) for n in r.index]; AutoModelForCausalLM.from_pretrained(sys.argv[1])")
    check = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=_env(None))
    return None if check.returncode == 0 else f"the new checkpoint does not load: {check.stderr[-300:]}"


def _merge_truncated(c: Ctx) -> list[str]:
    rev = c.model_copy("rev")
    _truncate(rev / "model.safetensors")
    return ["merge", merge_yaml(c, {"base": c.zoo / "base", "rev": rev, "sort": c.zoo / "sort"}), "-o", "out"]


def _merge_onto_file(c: Ctx) -> list[str]:
    (c.tmp / "out").write_text("a file")
    return ["merge", merge_yaml(c), "-o", "out"]


def _merge_bad_density(c: Ctx) -> list[str]:
    name = merge_yaml(c)
    cfg = yaml.safe_load((c.tmp / name).read_text())
    cfg["models"][0]["parameters"]["density"] = 1.5
    (c.tmp / name).write_text(yaml.safe_dump(cfg))
    return ["merge", name, "-o", "out"]


def _read_only_target(c: Ctx) -> list[str]:
    if os.geteuid() == 0:
        return ["merge", merge_yaml(c), "-o", "/sys/evomerge-fault-out"]  # sysfs: root cannot create there either
    ro = c.tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ["merge", merge_yaml(c), "-o", str(ro / "out")]


MERGE_CASES = [
    Case("merge into a folder with a stale sharded checkpoint", "merge", "refuse",
         lambda c: (stale_folder(c), ["merge", merge_yaml(c), "-o", "out"])[1], ("--overwrite",), _stale_untouched),
    Case("merge --overwrite over a stale sharded checkpoint", "merge", "succeed",
         lambda c: (stale_folder(c), ["merge", merge_yaml(c), "-o", "out", "--overwrite"])[1], (), _fresh_checkpoint),
    Case("merge from a truncated .safetensors", "merge", "refuse", _merge_truncated, ("model.safetensors",)),
    Case("merge density 1.5", "merge", "refuse", _merge_bad_density, ("density",)),
    Case("merge unknown method", "merge", "refuse",
         lambda c: ["merge", merge_yaml(c, merge_method="tiez"), "-o", "out"], ("tiez",)),
    Case("merge onto an existing file", "merge", "refuse", _merge_onto_file, ("file",)),
    Case("merge into a read-only place", "merge", "refuse", _read_only_target, ("evomerge-fault-out",)),
]


# -- full disk (a small tmpfs; root only) -----------------------------------------------------------
def tmpfs(c: Ctx, size: str) -> Path:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        raise Skip("a small file system needs root (mount -t tmpfs)")
    mnt = c.tmp / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode:
        raise Skip("mount -t tmpfs failed here")
    return mnt


def _no_partial(mnt_name: str) -> Callable[[Ctx, Any], Optional[str]]:
    def verify(c: Ctx, proc: Any) -> Optional[str]:
        left = sorted(p.name for p in (c.tmp / mnt_name).iterdir())
        return f"partial files left: {left}" if left else None
    return verify


def _export_full(c: Ctx) -> list[str]:
    run = c.run_copy()
    mnt = tmpfs(c, "1m")
    return ["export", str(run), "--rank", "1", "-o", str(mnt / "best")]


DISK_CASES = [
    Case("merge onto a full disk", "disk", "refuse",
         lambda c: ["merge", merge_yaml(c), "-o", str(tmpfs(c, "1m") / "out")], ("space",), _no_partial("small")),
    Case("export onto a full disk", "disk", "refuse", _export_full, ("space",), _no_partial("small")),
]


# -- export ------------------------------------------------------------------------------------------
def _export_nonempty(c: Ctx) -> list[str]:
    run = c.run_copy()
    (c.tmp / "out").mkdir()
    (c.tmp / "out" / "old.txt").write_text("keep")
    return ["export", str(run), "--rank", "1", "-o", "out"]


def _export_overwrite(c: Ctx) -> list[str]:
    run = c.run_copy()
    stale_folder(c)
    return ["export", str(run), "--rank", "1", "-o", "out", "--overwrite"]


def _export_recipe_ok(c: Ctx, proc: Any) -> Optional[str]:
    problem = _fresh_checkpoint(c, proc)
    recipe = c.tmp / "out.mergekit.yml"
    return problem or (None if recipe.exists() and recipe.stat().st_size > 0 else "no recipe beside the export")


EXPORT_CASES = [
    Case("export --rank 99", "export", "refuse",
         lambda c: ["export", str(c.run_copy()), "--rank", "99", "-o", "out"], ("--rank 99",)),
    Case("export into a non-empty folder", "export", "refuse", _export_nonempty, ("--overwrite",)),
    Case("export --overwrite over a stale checkpoint", "export", "succeed", _export_overwrite, (), _export_recipe_ok),
    Case("export from a folder that holds no run", "export", "refuse",
         lambda c: ((c.tmp / "empty").mkdir(), ["export", "empty", "--rank", "1", "-o", "out"])[1], ("no run",)),
]


# -- run folders (start, resume, the run store, one process per run) -------------------------------
def _failed_start_then_fix(c: Ctx) -> list[str]:
    bad = c.experiment(at("models.rev", "./no/such/model"))
    cli(["search", bad, "-o", "run"], c.tmp, log=None)
    return ["search", c.experiment(), "-o", "run"]


def _run_done(c: Ctx, proc: Any) -> Optional[str]:
    return None if (c.tmp / "run" / "report.md").exists() else "the corrected run left no report"


def _edit_frozen(key: str, value: Any) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        run = c.run_copy()
        data = yaml.safe_load((run / "experiment.yaml").read_text())
        at(key, value)(data)
        (run / "experiment.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return ["resume", str(run)]
    return build


def _edit_item_file(c: Ctx) -> list[str]:
    run = c.run_copy()
    data = yaml.safe_load((run / "experiment.yaml").read_text())
    items = Path(data["_experiment_dir"]) / "items"
    edited = c.tmp / "items_edited"
    shutil.copytree(items, edited)
    data["fitness"]["objectives"][0]["benchmark"]["path"] = str(edited / "sort_fitness.jsonl")
    (run / "experiment.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return ["resume", str(run)]


def _damage_store(how: str, command: str) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        run = c.run_copy()
        store = next(run.glob("phase*/run.sqlite"))
        for side in store.parent.glob("run.sqlite-*"):
            side.unlink()
        if how == "empty":
            store.write_bytes(b"")
        else:
            data = store.read_bytes()
            store.write_bytes(data[: len(data) // 2])
        return [command, str(run)] if command != "export" else ["export", str(run), "--rank", "1", "-o", "out"]
    return build


def _store_kept(c: Ctx, proc: Any) -> Optional[str]:
    store = next((c.tmp / "run").glob("phase*/run.sqlite"))
    return "the emptied store was rewritten as a new one" if store.stat().st_size > 0 else None


def _second_process(c: Ctx) -> list[str]:
    name = c.experiment(at("budget.evaluations", 100_000))  # still running when the second process starts
    bg = cli_background(c, ["search", name, "-o", "run"])
    deadline = time.time() + 300
    while time.time() < deadline and bg.poll() is None:
        if (c.tmp / "bg.log").exists() and (c.tmp / "run" / "phase0-ps").exists():
            break
        time.sleep(1)
    if bg.poll() is not None:
        raise RuntimeError("the first search ended before the second process could be tried")
    return ["resume", "run"]


def _dfs_hand_recipe(c: Ctx) -> list[str]:
    hand = [{"name": "uniform", "method": "task_arithmetic", "weight": 0.5}]
    name = c.experiment(lambda e: e.update(search_space={"kind": "dfs", "repeats": 1}, references=hand))
    return ["search", name, "-o", "run"]


RUN_CASES = [
    Case("search again after a failed start (corrected command)", "run folder", "succeed", _failed_start_then_fix,
         (), _run_done),
    Case("search into a folder that holds a finished run", "run folder", "refuse",
         lambda c: (c.run_copy(), ["search", c.experiment(), "-o", "run"])[1], ("resume",)),
    Case("resume after the frozen seed was edited", "run folder", "refuse", _edit_frozen("seed", 7), ("seed",)),
    Case("resume after the frozen item file was changed", "run folder", "refuse", _edit_item_file, ("item",)),
    Case("resume with an emptied run.sqlite", "run folder", "refuse", _damage_store("empty", "resume"),
         ("run.sqlite",), _store_kept),
    Case("resume with a truncated run.sqlite", "run folder", "refuse", _damage_store("truncate", "resume"),
         ("run.sqlite",)),
    Case("status with a truncated run.sqlite", "run folder", "refuse", _damage_store("truncate", "status"),
         ("run.sqlite",)),
    Case("export with an emptied run.sqlite", "run folder", "refuse", _damage_store("empty", "export"),
         ("run.sqlite",)),
    Case("resume while the search runs", "lock", "refuse", _second_process, ("run",), timeout=180),
    Case("status of a folder that holds no run", "run folder", "refuse",
         lambda c: ((c.tmp / "empty").mkdir(), ["status", "empty"])[1], ("no run",)),
    Case("DFS search beaten by a hand recipe (report)", "end of run", "succeed", _dfs_hand_recipe, (), _run_done),
]

CASES = CONFIG_CASES + FILE_CASES + MERGE_CASES + DISK_CASES + EXPORT_CASES + RUN_CASES


# -- running and classifying -----------------------------------------------------------------------
def classify(case: Case, ctx: Ctx, proc: "subprocess.CompletedProcess[str]") -> tuple[str, str]:
    out = proc.stdout + proc.stderr
    message = _message(out)
    weights = ctx.weights_log.exists() and ctx.weights_log.read_text().strip() != ""
    if "Traceback (most recent call last)" in out:
        return "traceback", _last_line(out)
    problem = case.verify(ctx, proc) if case.verify is not None else None
    if proc.returncode == 0:
        if case.expect == "refuse":
            return "silently accepted", _last_line(proc.stdout) or "(exit 0)"
        return ("silently accepted", problem) if problem else ("handled", _last_line(proc.stdout))
    if case.expect == "succeed":
        return "wrongly refused", message
    text = " ".join(out.split())
    missing = [n for n in case.needle if n not in text]
    if missing or problem:
        return "unclear message", (problem or f"lacks {missing}") + f": {message}"
    return ("refused after weights" if weights else "refused before weights"), message


def _message(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("error:"):
            return " ".join(lines[i:i + 3])[:300]
    return (lines[-1] if lines else "")[:300]


def _last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]


def run_case(case: Case, root: Path, zoo: Path, shared: Shared, verbose: bool) -> tuple[str, str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    ctx = Ctx(tmp, zoo, shared)
    t0 = time.time()
    try:
        try:
            args = case.build(ctx)
        except Skip as why:
            return "skipped", str(why), time.time() - t0
        if ctx.weights_log.exists():
            ctx.weights_log.unlink()
        try:
            proc = cli(args, tmp, ctx.weights_log, case.timeout)
        except subprocess.TimeoutExpired:
            return "timeout", f"still running after {case.timeout} s", time.time() - t0
        if verbose:
            print(f"--- {case.name}: evomerge {' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}",
                  file=sys.stderr)
        outcome, note = classify(case, ctx, proc)
        return outcome, note.replace(str(tmp), "TMP").replace(str(root), "ROOT"), time.time() - t0
    finally:
        for bg in ctx.background:
            if bg.poll() is None:
                os.killpg(bg.pid, signal.SIGKILL)
                bg.wait()
        for mnt in tmp.glob("**/small"):
            subprocess.run(["umount", str(mnt)], capture_output=True)
        for p in tmp.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                try:
                    p.chmod(0o755)
                except OSError:
                    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only the cases whose name or class contains this (several: a,b)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each command's output")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = ap.parse_args()
    keys = args.k.lower().split(",")
    cases = [c for c in CASES if any(k in c.name.lower() or k in c.klass for k in keys)]
    zoo = zoo_root()
    root = Path(tempfile.mkdtemp(prefix="evomerge-faults-"))
    shared = Shared(root, zoo)
    rows = []
    try:
        for i, case in enumerate(cases, 1):
            outcome, note, seconds = run_case(case, root, zoo, shared, args.verbose)
            rows.append((case, outcome, note))
            print(f"[{i}/{len(cases)}] {outcome:24s} {case.name} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("| # | class | case | expected | outcome | message / note |")
    print("|---|---|---|---|---|---|")
    for i, (case, outcome, note) in enumerate(rows, 1):
        note = note.replace("|", "\\|").replace("\n", " ")
        print(f"| {i} | {case.klass} | {case.name} | {case.expect} | {outcome} | {note} |")
    counts = {o: sum(1 for _, out, _ in rows if out == o) for o in OUTCOMES}
    print()
    print("Counts: " + ", ".join(f"{o}: {n}" for o, n in counts.items() if n))
    bad = sum(counts[o] for o in ("traceback", "silently accepted", "unclear message", "wrongly refused", "timeout"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
