"""A search job from start to end: validate, freeze the experiment, run the phases, write the outputs.

``start`` (``evomerge search``) checks everything that can be checked before a model loads, freezes
the experiment into the run folder and runs it; ``resume`` runs a frozen experiment again in its
folder, which continues exactly where it stopped (see ``evomerge.loop``). A ``Job`` owns the pieces
of one run (resolved model folders, objectives, the pool of workers, the estimator) and hands each
step plain values: the loop gets a searcher, a run store, a pool and a decode function; the
estimator gets item ids and a callable that scores recipes on every item; the outputs get results.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from rich.console import Console

from evomerge import outputs
from evomerge.config import DFSSpace, Experiment, PSSpace, experiment_from_data, read_experiment_yaml
from evomerge.estimators import (
    EstimatorInputs,
    FitnessEstimator,
    PhaseView,
    ScoreRequest,
    make_fitness_estimator,
    sampled_items,
)
from evomerge.evaluate.vllm_engine import resolve_backend
from evomerge.fingerprint import changes, fingerprint
from evomerge.loop import open_searcher, run_request, search
from evomerge.objectives import Objectives
from evomerge.outputs import PhaseResult
from evomerge.precheck import check_before_weights
from evomerge.progress import phase_progress
from evomerge.recipe import Recipe, hand_recipe, single_model, with_paths
from evomerge.refs import resolve_model_ref
from evomerge.run_folder import GENES, RunFolder
from evomerge.runstore import Evaluation, RunStore, write_atomic
from evomerge.searchers import Searcher, make_searcher, searcher_class
from evomerge.spaces import Genome, PSGenome, build_space, genome_seed
from evomerge.spaces.seeding import genome_of
from evomerge.tracking import Tracker, open_tracker
from evomerge.workers import Pool, Task, open_pool, run_tasks

# where the work runs may change on resume (a requeued job gets new nodes), and how the engine holds
# its inputs; not delta_dtype, which changes the candidates
RESUMABLE_OVERRIDES = frozenset({"address", "workers", "gpus_per_worker", "memory", "memory_budget", "delta_cache"})


class RunExists(ValueError):
    """The output folder already holds a run."""


def objectives_of(exp: Experiment) -> Objectives:
    """The experiment's objectives; a Pareto searcher is told each of them, others the weighted fitness."""
    names = [n for o in exp.fitness.objectives for n in o.names]
    weights = [o.weight for o in exp.fitness.objectives for _ in o.names]
    several = searcher_class(exp.searcher.name).several_objectives(exp.searcher.name, exp.searcher.options)
    return Objectives(tuple(names), tuple(weights), len(names) if several else 1, exp.export.top_k)


def dfs_slots(spaces: list[PSSpace | DFSSpace]) -> int | None:
    """Layer slots a vLLM engine needs for the DFS phases (their largest max_layers; None: the default)."""
    return max((s.max_layers for s in spaces if isinstance(s, DFSSpace) and s.max_layers), default=None)


def resolve_models(exp: Experiment, exp_dir: Path) -> dict[str, Path]:
    """Every model's folder (the zoo is built on first use); an error names the model's key."""
    paths = {}
    for name, ref in exp.models.items():
        try:
            paths[name] = resolve_model_ref(ref, exp_dir)
        except ValueError as err:
            raise ValueError(f"models.{name}: {err}") from None
    return paths


class Job:
    """One run of ``exp`` in ``run_dir``; ``run()`` is the whole job, resumable at any point."""

    def __init__(self, exp: Experiment, run_dir: Path, exp_dir: Path, console: Console | None = None,
                 pool: Pool | None = None):
        self.exp = exp
        self.run_dir = run_dir
        self.folder = RunFolder(run_dir)
        self.exp_dir = exp_dir
        self.console = console or Console(stderr=True)
        self.spaces = exp.load_spaces(exp_dir)
        self.backend = resolve_backend(exp.evaluation.backend)
        self.paths = resolve_models(exp, exp_dir)
        self.others = [m for m in exp.models if m != exp.base_model]
        self.objectives = objectives_of(exp)
        self._pool = pool
        self._info: dict[str, Any] | None = None
        self.hand: dict[str, dict[str, Any]] = {}  # RUN/hand_recipes.json, once scored
        self.tracker = Tracker({}, run_dir)  # the experiment's trackers, opened by run()

    # -- workers --------------------------------------------------------------------------------
    @property
    def pool(self) -> Pool:
        if self._pool is None:
            exp = self.exp
            kwargs = dict(models=self.paths, base=exp.base_model, base_dir=self.exp_dir,
                          benchmarks={"fitness": {o.name: o.benchmark for o in exp.fitness.objectives},
                                      "test": {o.name: o.benchmark for o in exp.fitness.test}},
                          device=exp.device, dtype=exp.dtype, allow_pickle=exp.allow_pickle,
                          memory=exp.memory_settings(),
                          evaluation={**exp.evaluation.settings(), "backend": self.backend,
                                      "dfs_slots": dfs_slots(self.spaces)})
            self._pool = open_pool(kwargs, workers=exp.workers, address=exp.address,
                                   gpus_per_worker=exp.gpus_per_worker)
        return self._pool

    def info(self) -> dict[str, Any]:
        """What a worker knows of the models: tensor names, layer count, resident bytes."""
        if self._info is None:
            self._info = self.pool.broadcast("info")[0]
        return self._info

    def score_all(self, recipes: Mapping[str, Recipe],
                  items: Mapping[str, list[str]] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Every fitness item of every item benchmark for each recipe (or only ``items``, an estimator's
        item sample, in that order): {name: {benchmark: scores}}."""
        return run_request(self.pool, ScoreRequest(dict(recipes), items))

    def item_ids(self, which: str) -> dict[str, Optional[list[str]]]:
        """Every item of each benchmark of the set (None for custom functions, which choose their own)."""
        ids: dict[str, Optional[list[str]]] = self.pool.broadcast("item_ids", which)[0]
        return ids

    def estimator_item_ids(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Every fitness item of each item benchmark, and those the estimator works with (its item sample)."""
        every = {n: v for n, v in self.item_ids("fitness").items() if v is not None}
        return every, sampled_items(every, self.exp.fitness.estimator.item_sample, self.exp.seed)

    def estimator_inputs(self) -> EstimatorInputs:
        spec = self.exp.fitness.estimator
        every, item_ids = self.estimator_item_ids()
        if spec.item_sample is not None:
            self.console.print("the estimator's item sample (seeded): " + ", ".join(
                f"{b} {len(v):,} of {len(every[b]):,} items" for b, v in item_ids.items()))
        return EstimatorInputs(spec, self.exp.seed, item_ids, self.objectives,
                               partial(self.score_all, items=item_ids if spec.item_sample is not None else None),
                               self.run_dir, self.exp_dir, self.calibration_recipes,
                               say=lambda text: self.console.print(text, soft_wrap=True))

    def calibration_recipes(self, n_models: int) -> dict[str, Recipe]:
        """The sources, then ``n_models`` random genomes of the first phase's space."""
        recipes = {f"source:{m}": single_model(m) for m in [self.exp.base_model, *self.others]}
        genome = self.space(self.spaces[0], [])
        rng = np.random.default_rng(self.exp.seed + 7919)
        for j in range(n_models):
            recipes[f"random:{j}"] = genome.decode(rng.uniform(genome.lower, genome.upper), j)
        return recipes

    # -- the job --------------------------------------------------------------------------------
    def run(self) -> list[PhaseResult]:
        check_before_weights(self.exp, self.paths, self.exp_dir)  # files, items, budgets: before any weight loads
        self.run_dir.mkdir(parents=True, exist_ok=True)
        results: list[PhaseResult] = []
        try:
            self.check_benchmarks()
            estimator = make_fitness_estimator(self.estimator_inputs())
            hand = self.hand = self.score_hand_recipes()
            self.score_sources()
            self.tracker = open_tracker(self.exp.tracking, self.run_dir, self.exp.name)
            for k, (space, phase) in enumerate(zip(self.spaces, self.exp.phases or [])):
                results.append(self.run_phase(k, space, phase.budget, results, estimator))
            self.finish(results, hand)
        finally:
            self.tracker.close()
            if self._pool is not None:  # an embedded Ray goes down with the run, also on errors
                self._pool.close()
        return results

    def check_benchmarks(self) -> None:
        """Score the base model on a few items of every benchmark (fitness and test) before the search,
        so a benchmark that cannot run at all stops the run with its first error, in one line, instead
        of failing every candidate."""
        for which in ("fitness", "test"):
            ids = self.item_ids(which)
            if not ids:
                continue
            few = {n: (v[:4] if v is not None else None) for n, v in ids.items()}
            for _, result in run_tasks(self.pool, [Task(single_model(self.exp.base_model), few, which, 0)]):
                first = (result.error or "").strip().splitlines()[0] if not result.ok else None
                missing = [n for n in self.objectives.names if n not in result.objectives]
                if first is None and which == "fitness" and missing:
                    first = (f"the fitness returned {sorted(result.objectives)} but the experiment's objectives "
                             f"are {list(self.objectives.names)}: name a custom function's values with `outputs:`")
                if first is not None:
                    raise ValueError(f"the {which} benchmarks cannot score the base model "
                                     f"'{self.exp.base_model}': {first}")

    def space(self, space: PSSpace | DFSSpace, earlier: list[PhaseResult]) -> Genome:
        """The genome of a phase. PS+DFS: the best PS merge of an earlier phase joins the DFS pool,
        first, as its host (every worker builds it once)."""
        info = self.info()
        if isinstance(space, PSSpace):
            return build_space(space, self.exp.base_model, self.others, info["tensors"], info["num_layers"], {})
        members: dict[str, Any] = {n: str(p) for n, p in self.paths.items()}
        pool_names = list(space.pool or [self.exp.base_model, *self.others])
        ps = next((r for r in reversed(earlier) if r.kind == "ps"), None)
        if ps is not None and ps.recipes[0].merge is not None:
            merge = ps.recipes[0].merge
            self.pool.broadcast("set_pool_member", "ps", merge)
            members["ps"] = with_paths(merge, self.paths)
            if "ps" not in pool_names:
                pool_names = ["ps", *pool_names]
        return build_space(space, self.exp.base_model, self.others, info["tensors"], info["num_layers"], members,
                           pool_names)

    def new_searcher(self, k: int, space: PSSpace | DFSSpace, genome: Genome) -> Searcher:
        spec = self.exp.searcher
        opts = {o: v for o, v in spec.options.items() if o != "multi_objective"}
        starts: dict[str, np.ndarray] = {}
        if spec.start_from_sources:
            starts = genome.source_genomes() if isinstance(genome, PSGenome) else {}
            if not starts:
                self.console.print(f"[yellow]start_from_sources: phase {k}'s space ({space.kind}, "
                                   f"{getattr(space, 'method', 'layer plan')}) cannot express a source "
                                   f"exactly; starting from a random population[/yellow]")
        seeds = self.hand_seeds(k, space, genome)
        x0 = seeds[0][1] if seeds else genome.x0
        return make_searcher(spec.name, genome.lower, genome.upper, x0=x0, n_obj=self.objectives.n_obj,
                             seed=self.exp.seed + k, starts=[x for _, x in seeds] + list(starts.values()), **opts)

    def hand_seeds(self, k: int, space: PSSpace | DFSSpace, genome: Genome) -> list[tuple[str, np.ndarray]]:
        """The hand recipes that seed phase ``k`` (``searcher.seed_from_hand_recipes``): those its space
        contains exactly (``genome_of``), best first by their fitness in ``RUN/hand_recipes.json``
        (written before the search, so a resume decides the same; ties keep the references' order);
        one searched objective: the best only, several: every one."""
        if not self.exp.searcher.seed_from_hand_recipes or not self.hand:
            return []
        scored = [(n, float(h["fitness"])) for n, h in self.hand.items() if h.get("fitness") is not None]
        seeds = [(n, f, x) for n, f in sorted(scored, key=lambda t: -t[1])
                 if (x := genome_of(genome, self.hand_recipe(n))) is not None]
        if self.objectives.n_obj == 1:
            seeds = seeds[:1]
        what = f"phase {k}'s space ({space.kind}, {getattr(space, 'method', 'layer plan')})"
        if seeds:
            self.console.print(f"{what} contains the hand recipe(s) " + ", ".join(
                f"'{n}' ({f:.4f})" for n, f, _ in seeds) + f": the search starts from '{seeds[0][0]}', "
                f"evaluated in its first generation", soft_wrap=True)
        else:
            self.console.print(f"no hand recipe lies in {what}; starting from the space's own start point "
                               f"(x0)", soft_wrap=True)
        return [(n, x) for n, _, x in seeds]

    def run_phase(self, k: int, space: PSSpace | DFSSpace, budget: int, earlier: list[PhaseResult],
                  estimator: FitnessEstimator) -> PhaseResult:
        phase_dir = self.folder.phase_dir(k, space.kind)
        phase_dir.mkdir(exist_ok=True)
        genome = self.space(space, earlier)
        store = RunStore(phase_dir / "run.sqlite")
        genes = store.get_meta(GENES)
        if genes is not None and genes != genome.names:  # refused before anything is written
            store.close()
            raise ValueError(f"{store.path}: the run's phase {k} has {len(genes)} genes, this search space "
                             f"{len(genome.names)} ({_first_difference(genes, genome.names)}): the search space "
                             f"changed; resume only the same experiment")
        if genes is None:
            store.set_meta(GENES, genome.names)
        searcher, gen = open_searcher(store, lambda: self.new_searcher(k, space, genome))

        def decode(g: np.ndarray) -> tuple[Recipe, int]:
            seed = genome_seed(g, self.exp.seed)
            return genome.decode(g, seed), seed

        def recipe_of(ev: Evaluation) -> Recipe:
            return genome.decode(ev.genome, ev.seed or 0)

        view = PhaseView(k, store, recipe_of)
        estimator.begin_phase(view, gen)
        with phase_progress(self.console, f"phase {k} ({space.kind})", budget, min(store.count(), budget), gen,
                            _best_text(store)) as progress:

            def show(generation: int) -> None:
                progress.update(min(store.count(), budget), generation, _best_text(store))
                self.tracker.on_progress(k, store, generation)

            search(searcher, store, self.pool, decode, estimator, view, self.objectives, budget, gen, show)
        best = estimator.final_choice(view)
        result = PhaseResult(k, space.kind, best, [recipe_of(e) for e in best], genome, store.path,
                             estimator.report(view, best[0]), estimator.full_fitness(view, best[0]))
        store.close()
        return result

    def hand_recipe(self, name: str) -> Recipe:
        r = next(r for r in self.exp.references if r.name == name)
        return hand_recipe(r.method, self.exp.base_model, self.others, r.weight, r.density, r.parameters)

    def score_on_fitness(self, path: Path, recipes: Mapping[str, Recipe]) -> dict[str, dict[str, Any]]:
        """Each recipe on every fitness item, kept in ``path`` (a resume scores none again)."""
        known: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
        todo = [n for n in recipes if n not in known]
        for i, result in run_tasks(self.pool, [Task(recipes[n], None, "fitness", 0) for n in todo]):
            obj = dict(result.objectives) if result.ok else {}
            fit = self.objectives.fitness(obj)
            known[todo[i]] = {"objectives": obj, "fitness": fit if math.isfinite(fit) else None, "error": result.error}
        if todo:
            write_atomic(path, json.dumps(known, indent=1).encode())
        return known

    def score_hand_recipes(self) -> dict[str, dict[str, Any]]:
        """The hand recipes on the fitness split (``RUN/hand_recipes.json``): what the search must beat,
        and what it is compared with in the report."""
        path = self.folder.hand_recipes
        if self.exp.references and not path.exists():
            self.console.print(f"scoring {len(self.exp.references)} hand recipe(s) on the fitness split: "
                               + ", ".join(r.name for r in self.exp.references))
        return self.score_on_fitness(path, {r.name: self.hand_recipe(r.name) for r in self.exp.references})

    def score_sources(self) -> dict[str, dict[str, Any]]:
        """Each source model on the fitness split (``RUN/sources.json``): the reference lines and points
        of the report's plots."""
        return self.score_on_fitness(self.folder.sources, {m: single_model(m) for m in self.exp.models})

    def finish(self, phases: list[PhaseResult], hand: Mapping[str, Mapping[str, Any]]) -> None:
        """Export the chosen models (a hand recipe instead, where one scores higher on the fitness
        split), evaluate them and the references on the held-out split, write the report."""
        exp = self.exp
        final = phases[-1]
        scored = {n: h["fitness"] for n, h in hand.items() if h.get("fitness") is not None}
        exported = final.recipes
        top = max(scored, key=lambda n: scored[n], default=None)
        if self.objectives.n_obj == 1 and top is not None and scored[top] > final.full_fitness:
            self.console.print(f"[yellow]the hand recipe '{top}' scores {scored[top]:.4f} on the fitness split, "
                               f"above the search's best ({final.full_fitness:.4f}): it is exported as best[/yellow]",
                               soft_wrap=True)
            exported = [self.hand_recipe(top)]  # the phase keeps its own recipes: its report section
            final.exported_hand_recipe = top     # draws the search's best (a DFS layer plan, say)
        chosen: dict[str, Recipe] = {}
        for j, recipe in enumerate(exported):
            name = "best" if len(final.best) == 1 else f"pareto-{j + 1}"
            outputs.export_recipe(recipe, self.run_dir / name, self.paths, exp.allow_pickle, exp.export.dtype,
                                  overwrite=True)  # the run's own folder: a resume exports again
            chosen[name] = recipe
        earlier = {f"phase {ph.index} best ({ph.kind})": ph.recipes[0] for ph in phases[:-1]}
        test: dict[str, dict[str, Any]] = {}
        if exp.fitness.test:
            self.console.print("evaluating the chosen model(s) and the references on the held-out test split...")
            recipes = {**chosen, **earlier, **outputs.reference_recipes(exp.base_model, self.others, exp.references)}
            test = self.score_test(recipes)
        every, sample = self.estimator_item_ids()
        full_items = sum(len(v) for v in every.values())
        checked = sum(min(4, len(v)) for which in ("fitness", "test") for v in self.item_ids(which).values()
                      if v is not None)
        items = outputs.items_scored(self.run_dir, phases, full_items, len(hand) + len(exp.models), checked,
                                     sum(len(v) for v in sample.values()))
        memory = [info.get("memory", {}) | {"worker": info.get("name", "")} for info in self.pool.broadcast("info")]
        outputs.write_outputs(self.run_dir, exp, phases, self.objectives, chosen, test, self.pool.utilization(),
                              self.console, hand, items, memory)

    def score_test(self, recipes: Mapping[str, Recipe]) -> dict[str, dict[str, Any]]:
        """Full evaluation on the held-out test benchmarks, which the search never saw."""
        names = list(recipes)
        out: dict[str, dict[str, Any]] = {}
        for i, result in run_tasks(self.pool, [Task(recipes[n], None, "test", 0) for n in names]):
            out[names[i]] = result.objectives if result.ok else {"error": result.error}
        return {n: out[n] for n in names}


def _first_difference(a: list[str], b: list[str]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"gene {i}: {a[i] if i < len(a) else 'none'} -> {b[i] if i < len(b) else 'none'}"


def _best_text(store: RunStore) -> str:
    best = store.best_fitness()
    return "-" if best is None else f"{best:.3f}"


def run_fingerprint(exp: Experiment, exp_dir: Path) -> dict[str, str]:
    """Every check that needs no weights (search spaces, model folders, benchmark files), and the
    fingerprint of what the run's results depend on (``evomerge.fingerprint``)."""
    spaces = exp.load_spaces(exp_dir)
    paths = resolve_models(exp, exp_dir)
    check_before_weights(exp, paths, exp_dir)  # device, model files, tokenizer, items, budgets
    return fingerprint(exp, exp_dir, spaces, paths)


def _refuse_a_run(folder: RunFolder, restart: bool) -> None:
    """A folder whose search began is a run: ``search`` does not write over it unless told to."""
    if not restart and folder.began():
        raise RunExists(f"{folder.root} already holds a run; continue it with `evomerge resume {folder.root}`, "
                        f"start it over with `evomerge search ... --restart` (deletes its results), or choose "
                        f"another --output-dir")


def start(exp_path: str | Path, output_dir: str | Path | None = None, console: Console | None = None,
          overrides: Optional[dict[str, Any]] = None, restart: bool = False) -> Path:
    """``evomerge search``: validate everything, freeze the experiment into the run folder, run.

    Nothing is written before the checks that need no weights have passed. What a start that never
    reached the search left behind (an error while loading the models, in the benchmark check, in
    the searcher's options) does not block this one: the same experiment continues it (a
    calibration already made is kept), a changed one clears it first. ``restart`` also clears a run
    whose search began."""
    console = console or Console(stderr=True)
    exp_path = Path(exp_path).resolve()
    data = read_experiment_yaml(exp_path, "name, models, base_model, search_space, fitness")
    data.update(overrides or {})
    exp = experiment_from_data(data, exp_path)
    folder = RunFolder(Path(output_dir or exp.output_dir or Path("runs") / exp.name))
    if folder.lock_file.exists():  # in use by another process, or a run: said before the checks
        with folder.lock():
            _refuse_a_run(folder, restart)
    prints = run_fingerprint(exp, exp_path.parent)  # a new folder is made only once these pass
    with folder.lock():
        _refuse_a_run(folder, restart)  # again: another process may have begun one meanwhile
        ours = folder.experiment.exists() or folder.fingerprint.exists()  # a folder we did not make: untouched
        if ours and (restart or folder.recorded_fingerprint() != prints):
            gone = folder.clear()
            why = "--restart" if restart else "an earlier start never reached the search"
            console.print(f"[yellow]{why}: removed {len(gone)} file(s) and folder(s) it left in "
                          f"{folder.root}[/yellow]", soft_wrap=True)
        elif ours:
            console.print(f"continuing the start in {folder.root} (the same experiment; its search had not "
                          f"begun; what it scored is kept)", soft_wrap=True)
        folder.freeze({**data, "_experiment_dir": str(exp_path.parent)}, prints)
        _run_job(exp, folder.root, exp_path.parent, console)
    return folder.root


def resume(run_dir: str | Path, console: Console | None = None, overrides: Optional[dict[str, Any]] = None) -> Path:
    """``evomerge resume``: the frozen experiment, the same run folder, the same trajectory.

    ``overrides`` may change where the work runs (address, workers, gpus_per_worker: a requeued
    cluster job gets new nodes), never what is searched. The experiment is checked against the
    fingerprint the run recorded, and every run store is opened, before anything is written: a
    changed experiment or a damaged store is refused in one line."""
    folder = RunFolder(Path(run_dir))
    bad = set(overrides or {}) - RESUMABLE_OVERRIDES
    if bad:
        raise ValueError(f"resume can change only {sorted(RESUMABLE_OVERRIDES)}, not {sorted(bad)}")
    folder.frozen()  # a folder that holds no run is refused before the lock file is made
    with folder.lock():
        data, exp_dir = folder.frozen()
        data.update(overrides or {})
        exp = experiment_from_data(data, folder.experiment, exp_dir)
        folder.began()  # opens every run store: a damaged one is refused here, naming its file
        now = run_fingerprint(exp, exp_dir)
        recorded = folder.recorded_fingerprint()
        changed = changes(recorded, now) if recorded is not None else []
        extended = [c for c in changed if c.startswith("budget (")]  # more (or fewer) candidates: same results so far
        changed = [c for c in changed if c not in extended]
        if changed:
            raise ValueError(f"{folder.root}: the experiment changed since the run started ({'; '.join(changed)}); "
                             f"resume continues only the same experiment: undo the change, or start a new run "
                             f"(`evomerge search EXPERIMENT -o OTHER_FOLDER`)")
        for c in extended:
            (console or Console(stderr=True)).print(f"the budget changed since the run started: {c}; continuing "
                                                    f"with the new budget", soft_wrap=True)
        if recorded is None or extended:  # a run older than fingerprints: from now on, it has one
            folder.record_fingerprint(now)
        _run_job(exp, folder.root, exp_dir, console)
    return folder.root


def _run_job(exp: Experiment, run_dir: Path, exp_dir: Path, console: Console | None) -> None:
    """Run the job; on Ctrl-C (anywhere: loading the models, searching, exporting) say how to resume."""
    console = console or Console(stderr=True)
    try:
        Job(exp, run_dir, exp_dir, console).run()
    except KeyboardInterrupt:
        console.print(f"\n[yellow]stopped; every finished evaluation is saved.[/yellow] "
                      f"Resume with:\n  evomerge resume {run_dir}", soft_wrap=True)
        raise


def calibrate(exp_path: str | Path, out: Path, n_models: Optional[int] = None,
              console: Console | None = None) -> Path:
    """``evomerge irt calibrate``: the experiment's calibration population scored on every fitness item,
    an IRT model fitted per benchmark, saved in ``out`` for ``estimator.calibration`` to reuse."""
    from evomerge.estimators.irt import calibrate_population

    exp_path = Path(exp_path).resolve()
    exp = experiment_from_data(read_experiment_yaml(exp_path, "name, models, base_model, search_space, fitness"),
                               exp_path)
    job = Job(exp, out, exp_path.parent, console)
    check_before_weights(exp, job.paths, exp_path.parent)
    try:
        calibrate_population(job.estimator_inputs(), out, n_models)
    finally:
        job.pool.close()
    return out

