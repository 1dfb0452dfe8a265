"""Hand recipes seed the search: recipe -> genome (``genome_of``), starting genomes in every searcher,
and a real search whose first generation holds the best hand recipe the space contains."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_search import experiment

from evomerge.config import DFSSpace, PSSpace
from evomerge.recipe import LayerPlan, Recipe, hand_recipe
from evomerge.run import start
from evomerge.runstore import RunStore
from evomerge.searchers import Searcher, make_searcher
from evomerge.spaces import DFSGenome, PSGenome
from evomerge.spaces.seeding import genome_of, same_recipe

SOURCES = ["rev", "sort", "tr"]
TENSORS = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{t}.weight" for i in range(4)
    for t in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm")]


def ps(method: str = "task_arithmetic", genes=None, **kw) -> PSGenome:
    space = PSSpace(method=method, genes=genes or {"weight": {"low": 0.0, "high": 1.2, "init": 0.33}}, **kw)
    return PSGenome(space, "base", SOURCES, TENSORS, 4)


@pytest.mark.parametrize("kw", [dict(filters=["other"]), dict(filters=["other", "attn", "mlp"]), dict(),
                                dict(granularity="block:3"), dict(granularity="global"), dict(smooth=3)])
@pytest.mark.parametrize("weight", [None, 1.0])
def test_a_contained_hand_recipe_round_trips(kw, weight):
    g = ps(**kw)
    recipe = hand_recipe("task_arithmetic", "base", SOURCES, weight)
    x = genome_of(g, recipe)
    assert x is not None and x.shape == (g.dim,)
    assert np.all(x == (1 / 3 if weight is None else weight))
    assert same_recipe(g.decode(x), recipe)
    assert genome_of(g, g.decode(x)) is not None and np.array_equal(genome_of(g, g.decode(x)), x)


def test_per_model_and_global_genes_and_fixed_values():
    g = ps("ties", {"weight": {"low": 0, "high": 1}, "density": {"low": 0.1, "high": 1}}, filters=["attn"])
    recipe = hand_recipe("ties", "base", SOURCES, 1.0, 0.5)
    x = genome_of(g, recipe)
    assert x is not None and same_recipe(g.decode(x), recipe)
    fixed = PSGenome(PSSpace(method="ties", genes={"weight": {"low": 0, "high": 1}}, fixed={"density": 0.5}),
                     "base", SOURCES, TENSORS, 4)
    x = genome_of(fixed, recipe)  # density per model in the recipe, fixed globally by the space: the same
    assert x is not None and same_recipe(fixed.decode(x), recipe)
    assert genome_of(fixed, hand_recipe("ties", "base", SOURCES, 1.0, 0.7)) is None  # fixed value differs
    lam = ps("task_arithmetic", {"weight": {"low": 0, "high": 1}, "lambda": {"low": 0.5, "high": 1.5}})
    x = genome_of(lam, hand_recipe("task_arithmetic", "base", SOURCES, 0.5))  # lambda: the method's default
    assert x is not None and same_recipe(lam.decode(x), hand_recipe("task_arithmetic", "base", SOURCES, 0.5,
                                                                    parameters={"lambda": 1.0}))


def test_recipes_the_space_does_not_contain():
    g = ps()
    assert genome_of(g, hand_recipe("ties", "base", SOURCES, 1.0, 0.5)) is None  # another method
    assert genome_of(g, hand_recipe("task_arithmetic", "base", SOURCES, 1.5)) is None  # outside the bounds
    assert genome_of(g, hand_recipe("task_arithmetic", "base", SOURCES[:2], 0.5)) is None  # a source missing
    assert genome_of(g, hand_recipe("task_arithmetic", "rev", ["base", "sort", "tr"])) is None  # another base
    assert genome_of(g, hand_recipe("task_arithmetic", "base", SOURCES, parameters={"lambda": 0.5})) is None
    x = np.linspace(0.1, 1.1, g.dim)  # genes that differ per layer: a hand recipe is one number per setting
    assert genome_of(g, g.decode(x)) is None
    dfs = DFSGenome(DFSSpace(repeats=2), [("base", 4), ("rev", 4)])
    assert genome_of(dfs, hand_recipe("task_arithmetic", "base", SOURCES)) is None


def test_dfs_layer_plans_round_trip():
    for mode in ("hop", "matrix"):
        g = DFSGenome(DFSSpace(repeats=2, scale_mode=mode, max_layers=6), [("base", 4), ("rev", 4)])
        rng = np.random.default_rng(0)
        for _ in range(20):
            recipe = g.decode(rng.uniform(g.lower, g.upper))
            x = genome_of(g, recipe)
            assert x is not None and same_recipe(g.decode(x), recipe)
        assert genome_of(g, Recipe(plan=LayerPlan("base", [("rev", 3), ("base", 0)]))) is not None
        assert genome_of(g, Recipe(plan=LayerPlan("rev", [("rev", 3)]))) is None  # another host
        assert genome_of(g, Recipe(plan=LayerPlan("base", [("base", 0)] * 3))) is None  # 3 repeats > 2


LOWER, UPPER = np.zeros(4), np.array([1.0, 1.0, 2.0, 2.0])
SEED = np.array([1 / 3, 0.7, 1.2, 0.1])


def first(s: Searcher) -> list[np.ndarray]:
    return s.ask(4) if s.steady_state else s.ask()


@pytest.mark.parametrize("name,opts", [("cmaes", {"popsize": 6}), ("nsga2", {"pop_size": 6}), ("random", {}),
                                       ("nevergrad:TwoPointsDE", {"budget": 20}), ("nevergrad:CMA", {"budget": 20})])
def test_the_seed_is_the_start_and_the_first_genome_asked(name, opts):
    s = make_searcher(name, LOWER, UPPER, x0=SEED, starts=[SEED], seed=0, **opts)
    got = first(s)
    assert got[0].tobytes() == SEED.tobytes()  # exactly, once
    assert sum(g.tobytes() == SEED.tobytes() for g in got) == 1
    again = Searcher.from_state(make_searcher(name, LOWER, UPPER, x0=SEED, starts=[SEED], seed=0,
                                              **opts).state_dict())
    assert [g.tobytes() for g in first(again)] == [g.tobytes() for g in got]


def test_cmaes_starts_at_the_seed_and_its_rng_stream_is_unchanged():
    seeded = make_searcher("cmaes", LOWER, UPPER, x0=SEED, starts=[SEED], seed=0, popsize=6)
    plain = make_searcher("cmaes", LOWER, UPPER, x0=SEED, seed=0, popsize=6)
    np.testing.assert_array_equal(seeded._cma.mean, (SEED - LOWER) / (UPPER - LOWER))
    a, b = seeded.ask(), plain.ask()
    assert [g.tobytes() for g in a[1:]] == [g.tobytes() for g in b[1:]]  # only the first sample replaced
    seeded.tell(a, np.arange(6.0))
    assert not np.array_equal(seeded.ask()[0], SEED)  # later generations are CMA's own


def test_population_searchers_take_several_seeds():
    seeds = [SEED, LOWER.copy(), UPPER.copy()]
    for name, opts in [("nsga2", {"pop_size": 6}), ("random", {}), ("nevergrad:TwoPointsDE", {"budget": 20})]:
        s = make_searcher(name, LOWER, UPPER, x0=SEED, starts=seeds, seed=0, n_obj=2, **opts)
        got = [g.tobytes() for g in first(s)][:3]
        assert got == [x.tobytes() for x in seeds], name


def store_genomes(run_dir) -> list[np.ndarray]:
    with RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True) as store:
        return [np.array(e.genome) for e in store.evaluations()]


def test_a_search_starts_from_the_best_contained_hand_recipe(zoo, tmp_path, capsys):
    """The tiny zoo: the hand recipes are scored, the best of those the space holds (task arithmetic,
    weight 1/3 or 1) is the first candidate of the first generation, in the run store like any other."""
    experiment(zoo, tmp_path, budget={"evaluations": 4}, searcher={"name": "cmaes", "options": {"popsize": 4}})
    run_dir = start(tmp_path / "exp.yaml", tmp_path / "run")
    hand = json.loads((run_dir / "hand_recipes.json").read_text())
    contained = {n: hand[n]["fitness"] for n in ("uniform merge", "task arithmetic (w=1)")}
    best = max(contained, key=lambda n: contained[n])
    genomes = store_genomes(run_dir)
    assert np.all(genomes[0] == (1 / 3 if best == "uniform merge" else 1.0))
    with RunStore(run_dir / "phase0-ps" / "run.sqlite", readonly=True) as store:
        assert store.evaluations()[0].fitness == pytest.approx(contained[best])
    assert f"the search starts from '{best}'" in capsys.readouterr().err

    experiment(zoo, tmp_path, budget={"evaluations": 4},
               searcher={"name": "cmaes", "options": {"popsize": 4}, "seed_from_hand_recipes": False})
    off = store_genomes(start(tmp_path / "exp.yaml", tmp_path / "off"))
    assert len(off) == 4 and not any(np.all(g == g[0]) for g in off)


def test_job_picks_the_best_contained_recipe_and_says_when_none_is_contained():
    """``Job.hand_seeds`` from RUN/hand_recipes.json alone: best contained first (TIES scores higher
    but is not in a task-arithmetic space), every contained one for several objectives, none in DFS."""
    from types import SimpleNamespace

    from rich.console import Console

    from evomerge.config import DEFAULT_REFERENCES
    from evomerge.run import Job

    console = Console(record=True, width=200)
    refs = {r.name: r for r in DEFAULT_REFERENCES}
    fake = SimpleNamespace(
        exp=SimpleNamespace(searcher=SimpleNamespace(seed_from_hand_recipes=True)),
        hand={"uniform merge": {"fitness": 0.55}, "task arithmetic (w=1)": {"fitness": 0.6},
              "TIES (d=0.5, w=1)": {"fitness": 0.7}, "DARE-TIES (d=0.5, w=1)": {"fitness": None}},
        objectives=SimpleNamespace(n_obj=1), console=console,
        hand_recipe=lambda n: hand_recipe(refs[n].method, "base", SOURCES, refs[n].weight, refs[n].density))
    g = ps()
    seeds = Job.hand_seeds(fake, 0, g.space, g)  # type: ignore[arg-type]
    assert [n for n, _ in seeds] == ["task arithmetic (w=1)"] and np.all(seeds[0][1] == 1.0)
    fake.objectives.n_obj = 2
    assert [n for n, _ in Job.hand_seeds(fake, 0, g.space, g)] == ["task arithmetic (w=1)", "uniform merge"]
    dfs = DFSGenome(DFSSpace(repeats=2), [("base", 4), ("rev", 4)])
    assert Job.hand_seeds(fake, 1, dfs.space, dfs) == []
    assert "no hand recipe lies in phase 1's space (dfs, layer plan)" in console.export_text()
    fake.exp.searcher.seed_from_hand_recipes = False
    assert Job.hand_seeds(fake, 0, g.space, g) == []
