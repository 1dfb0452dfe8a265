"""The search driver: ask, evaluate on workers, tell, checkpoint; then export and report.

The driver alone owns the ask/tell loop and the run store. Every finished evaluation is committed as
it arrives; after each tell the searcher's state (RNG included) is committed in the same transaction
as the generation's record. A killed run therefore resumes by restoring the last state and asking
again: the searcher proposes the same genomes, those already evaluated are looked up, and only the
ones in flight at the kill are evaluated again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from evomerge.config import DFSSpace, Experiment, PSSpace, load_experiment
from evomerge.estimation import FitnessEstimator
from evomerge.genome import DFSGenome, PSGenome, genome_seed
from evomerge.pool import LocalPool, Pool, Task
from evomerge.recipe import Recipe
from evomerge.runstore import Evaluation, RunStore
from evomerge.searchers import Searcher, make_searcher
from evomerge.searchers.loop import open_searcher

MULTI_OBJECTIVE = {"nsga2", "pymoo:NSGA2", "pymoo:NSGA3", "pymoo:MOEAD", "pymoo:SMSEMOA", "pymoo:AGEMOEA",
                   "pymoo:AGEMOEA2", "pymoo:RNSGA2", "pymoo:SPEA2", "pymoo:CTAEA", "pymoo:UNSGA3"}


class RunExists(ValueError):
    pass


def resolve_models(exp: Experiment, root: Path) -> dict[str, Path]:
    """Model references -> folders: ``zoo:<name>`` from the built-in zoo (built on first use),
    relative paths from the experiment's folder, anything else as given (a hub id is fetched later)."""
    out = {}
    zoo = None
    for name, ref in exp.models.items():
        if ref.startswith("zoo:smol/"):
            from evomerge.zoo.smol import resolve_smol_model

            out[name] = resolve_smol_model(ref)
        elif ref.startswith("zoo:"):
            from evomerge.zoo import ensure_zoo

            zoo = zoo or ensure_zoo()
            member = ref[4:]
            path = zoo.base if member == "base" else zoo.root / member
            if not path.is_dir():
                raise ValueError(f"models.{name}: the zoo has no model '{member}'; it has base, "
                                 f"{', '.join(zoo.skills)}")
            out[name] = path
        elif (root / ref).is_dir():
            out[name] = (root / ref).resolve()
        else:
            from evomerge.checkpoint import resolve_model_path

            out[name] = resolve_model_path(ref)
    return out


def n_objectives(exp: Experiment) -> int:
    multi = exp.searcher.name in MULTI_OBJECTIVE or exp.searcher.options.get("multi_objective", False)
    return sum(len(o.names) for o in exp.fitness.objectives) if multi else 1


@dataclass
class PhaseResult:
    index: int
    kind: str
    best: list[Evaluation]  # one for a single objective; the chosen Pareto models otherwise
    recipes: list[Recipe] = field(default_factory=list)
    genome: Any = None  # the PSGenome / DFSGenome of the phase
    store_path: Optional[Path] = None


class Driver:
    """Runs an experiment in ``run_dir``; ``run()`` is the whole job, resumable at any point."""

    def __init__(self, exp: Experiment, run_dir: Path, exp_dir: Path, console: Console | None = None,
                 pool: Pool | None = None):
        self.exp = exp
        self.run_dir = run_dir
        self.exp_dir = exp_dir
        self.console = console or Console(stderr=True)
        self.spaces = exp.load_spaces(exp_dir)
        self.paths = resolve_models(exp, exp_dir)
        self.others = [m for m in exp.models if m != exp.base_model]
        self.n_obj = n_objectives(exp)
        self.names = [n for o in exp.fitness.objectives for n in o.names]
        self.weights = np.array([o.weight for o in exp.fitness.objectives for _ in o.names], dtype=float)
        self._pool = pool

    # -- workers --------------------------------------------------------------------------------
    @property
    def pool(self) -> Pool:
        if self._pool is None:
            kwargs = dict(models=self.paths, base=self.exp.base_model, base_dir=self.exp_dir,
                          benchmarks={"fitness": {o.name: o.benchmark for o in self.exp.fitness.objectives},
                                      "test": {o.name: o.benchmark for o in self.exp.fitness.test}},
                          device=self.exp.device, dtype=self.exp.dtype, allow_pickle=self.exp.allow_pickle)
            if self.exp.workers > 1 or self.exp.address:
                from evomerge.distributed import RayPool

                self._pool = RayPool(kwargs, workers=self.exp.workers, address=self.exp.address,
                                     gpus_per_worker=self.exp.gpus_per_worker)
            else:
                self._pool = LocalPool(kwargs)
        return self._pool

    def info(self) -> dict[str, Any]:
        if not hasattr(self, "_info"):
            self._info = self.pool.broadcast("info")[0]
        return self._info

    # -- the job --------------------------------------------------------------------------------
    def run(self) -> list[PhaseResult]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        results: list[PhaseResult] = []
        try:
            self.estimator = FitnessEstimator.prepare(self, self.run_dir)
            for k, (space, phase) in enumerate(zip(self.spaces, self.exp.phases or [])):
                results.append(self.run_phase(k, space, phase.budget, results))
            from evomerge.outputs import finish_run

            finish_run(self, results)
        except KeyboardInterrupt:
            self.console.print(f"\n[yellow]stopped; every finished evaluation is saved.[/yellow] "
                               f"Resume with:\n  evomerge resume {self.run_dir}", soft_wrap=True)
            raise
        finally:
            if self._pool is not None:  # an embedded Ray goes down with the run, also on errors
                self._pool.close()
        return results

    def genome_space(self, k: int, space: PSSpace | DFSSpace, earlier: list[PhaseResult]):
        info = self.info()
        if isinstance(space, PSSpace):
            sources = self.others if space.method != "slerp" else self.others[:1]
            return PSGenome(space, self.exp.base_model, sources, info["tensors"], info["num_layers"])
        pool_names = list(space.pool or [self.exp.base_model] + self.others)
        members: dict[str, Any] = {n: str(self.paths[n]) for n in self.paths}
        ps = next((r for r in reversed(earlier) if r.kind == "ps"), None)
        if ps is not None:  # PS+DFS: the best PS merge joins the pool, first, as its host
            merge = ps.recipes[0].merge
            self.pool.broadcast("set_pool_member", "ps", merge)
            members["ps"] = _with_paths(merge, self.paths)
            if "ps" not in pool_names:
                pool_names = ["ps"] + pool_names
        for n in pool_names:
            if n not in members:
                raise ValueError(f"DFS pool member '{n}' is not a model of the experiment ({sorted(members)})")
        return DFSGenome(space, [(n, info["num_layers"]) for n in pool_names], members)

    def run_phase(self, k: int, space: PSSpace | DFSSpace, budget: int, earlier: list[PhaseResult]) -> PhaseResult:
        phase_dir = self.run_dir / f"phase{k}-{space.kind}"
        phase_dir.mkdir(exist_ok=True)
        genome = self.genome_space(k, space, earlier)
        store = RunStore(phase_dir / "run.sqlite")
        store.set_meta("genes", genome.names)

        def fresh() -> Searcher:
            opts = dict(self.exp.searcher.options)
            opts.pop("multi_objective", None)
            starts = {}
            if self.exp.searcher.start_from_sources:
                starts = genome.source_genomes() if isinstance(genome, PSGenome) else {}
                if not starts:
                    self.console.print(f"[yellow]start_from_sources: phase {k}'s space ({space.kind}, "
                                       f"{getattr(space, 'method', 'layer plan')}) cannot express a source "
                                       f"exactly; starting from a random population[/yellow]")
            return make_searcher(self.exp.searcher.name, genome.lower, genome.upper, x0=genome.x0,
                                 n_obj=self.n_obj, seed=self.exp.seed + k, starts=list(starts.values()), **opts)

        searcher, gen = open_searcher(store, fresh)  # restored from the last committed tell, if any
        self.estimator.sync(self, k, gen)
        columns = [TextColumn(f"phase {k} ({space.kind})"), BarColumn(), TextColumn("{task.completed}/{task.total} evals"),
                   TextColumn("gen {task.fields[gen]}"), TextColumn("best {task.fields[best]}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            done = store.count()
            task = progress.add_task("search", total=budget, completed=min(done, budget), gen=gen,
                                     best=self._best_text(store))
            if searcher.steady_state and hasattr(self.pool, "submit"):
                gen = self._steady(store, genome, searcher, k, budget, gen, progress, task)
            while store.count() < budget:
                genomes = searcher.ask()
                store.begin_generation(gen, genomes)
                self._evaluate(store, genome, genomes, gen, progress, task)
                self.estimator.check_drift(self, store, genome, k, gen)
                values = np.array([self.search_values(store.lookup(g)) for g in genomes])
                searcher.tell(genomes, values)
                store.commit_tell(gen, searcher.state_dict())
                gen += 1
                progress.update(task, completed=min(store.count(), budget), gen=gen, best=self._best_text(store))
        best = self.choose_final(store, genome)
        result = PhaseResult(k, space.kind, best, [genome.decode(np.array(e.genome), e.seed) for e in best],
                             genome, store.path)
        store.close()
        return result

    def _evaluate(self, store: RunStore, genome, genomes: list[np.ndarray], gen: int, progress, task) -> None:
        todo: dict[str, tuple[np.ndarray, Recipe, int]] = {}
        for g in genomes:
            if store.lookup(g) is None:
                seed = genome_seed(g, self.exp.seed)
                todo.setdefault(RunStore.genome_hash(g), (g, genome.decode(g, seed), seed))
        items = list(todo.values())
        tasks = [Task(r, self.estimator.selection(), "fitness", s) for _, r, s in items]
        for i, result in self.pool.run(tasks):
            self._record(store, *items[i], result, gen)
            progress.update(task, completed=store.count(), best=self._best_text(store))

    def _record(self, store: RunStore, g: np.ndarray, recipe: Recipe, seed: int, result, gen: int) -> None:
        objectives = self.estimator.estimate(result) if result.ok else {}
        missing = [n for n in self.names if n not in objectives]
        if result.ok and missing:
            result.error = (f"the fitness returned {sorted(objectives)} but the experiment's objectives are "
                            f"{self.names}: name a custom function's values with `outputs:`")
        store.record(Evaluation.of(
            genome=g, recipe=_recipe_text(recipe), objectives=objectives,
            fitness=self.fitness(objectives), responses=[r.to_json() for r in result.responses],
            seconds=result.merge_seconds + result.eval_seconds, worker=result.worker, error=result.error,
            generation=gen, seed=seed))

    def _steady(self, store: RunStore, genome, searcher: Searcher, k: int, budget: int, gen: int, progress,
                task) -> int:
        """Steady state (nevergrad, random) on a pool with ``submit`` (RayPool): ask one genome the
        moment a worker has room and tell each result as it arrives, so no worker waits for the
        slowest candidate of a generation. Each tell is committed as a one-genome generation: after a
        kill the searcher comes back with the genomes that were in flight and ``ask`` hands them out
        first; those finished before the kill are found in the store and told at once."""
        pool = self.pool
        flying: dict[int, tuple[np.ndarray, Recipe, int]] = {}
        while True:
            while pool.free_slots() > 0 and store.count() + len(flying) < budget:
                g = searcher.ask(1)[0]
                if store.lookup(g) is not None:
                    gen = self._tell_one(store, genome, searcher, g, k, gen)
                    continue
                seed = genome_seed(g, self.exp.seed)
                recipe = genome.decode(g, seed)
                flying[pool.submit(Task(recipe, self.estimator.selection(), "fitness", seed))] = (g, recipe, seed)
            if not flying:
                return gen
            ticket, result = pool.next_done()
            g, recipe, seed = flying.pop(ticket)
            self._record(store, g, recipe, seed, result, gen)
            gen = self._tell_one(store, genome, searcher, g, k, gen)
            progress.update(task, completed=min(store.count(), budget), gen=gen, best=self._best_text(store))

    def _tell_one(self, store: RunStore, genome, searcher: Searcher, g: np.ndarray, k: int, gen: int) -> int:
        store.begin_generation(gen, [g])
        self.estimator.check_drift(self, store, genome, k, gen)
        searcher.tell([g], np.array([self.search_values(store.lookup(g))]))
        store.commit_tell(gen, searcher.state_dict())
        return gen + 1

    def estimator_report(self, store: RunStore, genome, chosen: Evaluation) -> str:
        if self.exp.fitness.estimator.kind == "full":
            return ""
        from evomerge.irt_search import final_check

        return final_check(self, store, genome, chosen)

    # -- objectives -----------------------------------------------------------------------------
    def fitness(self, objectives: dict[str, float]) -> float:
        if not objectives or any(not math.isfinite(objectives.get(n, math.nan)) for n in self.names):
            return math.nan
        return float(np.dot(self.weights, [objectives[n] for n in self.names]) / self.weights.sum())

    def search_values(self, ev: Evaluation) -> list[float]:
        if ev.status != "ok":
            return [math.nan] * self.n_obj
        if self.n_obj == 1:
            return [ev.fitness]
        return [ev.objectives.get(n, math.nan) for n in self.names]

    @staticmethod
    def scored(store: RunStore) -> list[Evaluation]:
        """The successful evaluations (those with a fitness), in the order recorded."""
        return [e for e in store.evaluations("ok") if e.fitness is not None]

    def choose(self, store: RunStore) -> list[Evaluation]:
        """The best evaluation (earliest among equals), or up to ``export.top_k`` of the Pareto set
        spread along the first objective."""
        ok = self.scored(store)
        if not ok:
            raise RuntimeError(f"no candidate of {store.path} was evaluated successfully; see the errors there")
        if self.n_obj == 1:
            return [max(ok, key=lambda e: (e.fitness, -e.rowid))]
        from evomerge.report import pareto_mask

        pts = np.array([[e.objectives[n] for n in self.names] for e in ok])
        front = [ok[i] for i in np.flatnonzero(pareto_mask(pts))]
        front.sort(key=lambda e: e.objectives[self.names[0]])
        k = min(self.exp.export.top_k, len(front))
        picks = sorted({int(round(i)) for i in np.linspace(0, len(front) - 1, k)})
        return [front[i] for i in picks]

    def choose_final(self, store: RunStore, genome) -> list[Evaluation]:
        """What a phase returns: ``choose``, except that with a reduced-fitness estimator and one
        objective the best is confirmed on every item among the ``final_top_k`` best estimates."""
        spec = self.exp.fitness.estimator
        if spec.kind == "full" or self.n_obj != 1 or not spec.final_top_k:
            return self.choose(store)
        from evomerge.irt_search import confirm_best

        return confirm_best(self, store, genome)

    def _best_text(self, store: RunStore) -> str:
        best = store.best_fitness()
        return "-" if best is None else f"{best:.3f}"


def _recipe_text(recipe: Recipe) -> str:
    parts = {}
    if recipe.merge is not None:
        parts["merge"] = yaml.safe_load(recipe.merge.to_yaml())
    if recipe.plan is not None:
        parts["layer_plan"] = recipe.plan.to_dict()
    return yaml.safe_dump(parts, sort_keys=False)


def _with_paths(merge, paths: dict[str, Path]) -> dict:
    """A merge config over model names, as a dict over folders (for export and replay)."""
    data = yaml.safe_load(merge.to_yaml())
    data["models"] = [{**m, "model": str(paths[m["model"]])} for m in data["models"]]
    if data.get("base_model"):
        data["base_model"] = str(paths[data["base_model"]])
    return data


def start(exp_path: str | Path, output_dir: str | Path | None = None, console: Console | None = None,
          overrides: dict[str, Any] | None = None) -> Path:
    """``evomerge search``: validate everything, freeze the experiment into the run folder, run."""
    exp_path = Path(exp_path).resolve()
    data = yaml.safe_load(exp_path.read_text())
    data.update(overrides or {})
    exp = Experiment.model_validate(data)
    exp.load_spaces(exp_path.parent)
    run_dir = Path(output_dir or exp.output_dir or Path("runs") / exp.name)
    if (run_dir / "experiment.yaml").exists():
        raise RunExists(f"{run_dir} already holds a run; continue it with `evomerge resume {run_dir}`, "
                        "or choose another --output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    frozen = {**data, "_experiment_dir": str(exp_path.parent)}
    (run_dir / "experiment.yaml").write_text(yaml.safe_dump(frozen, sort_keys=False))
    Driver(exp, run_dir, exp_path.parent, console).run()
    return run_dir


def resume(run_dir: str | Path, console: Console | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """``evomerge resume``: the frozen experiment, the same run folder, the same trajectory.

    ``overrides`` may change where the work runs (address, workers, gpus_per_worker: a requeued
    cluster job gets new nodes), never what is searched."""
    run_dir = Path(run_dir)
    frozen = run_dir / "experiment.yaml"
    if not frozen.exists():
        raise ValueError(f"{run_dir} holds no run (no experiment.yaml); start one with `evomerge search`")
    data = yaml.safe_load(frozen.read_text())
    allowed = {"address", "workers", "gpus_per_worker"}
    bad = set(overrides or {}) - allowed
    if bad:
        raise ValueError(f"resume can change only {sorted(allowed)}, not {sorted(bad)}")
    data.update(overrides or {})
    exp_dir = Path(data.pop("_experiment_dir", run_dir))
    exp = Experiment.model_validate(data)
    Driver(exp, run_dir, exp_dir, console).run()
    return run_dir
