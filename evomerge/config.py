"""The experiment file: everything a search needs, validated in full before any model is loaded.

An error names the bad key and what is allowed (pydantic's messages carry the key path; the
validators below add what to change). Model references may be local folders, hub ids, or
``zoo:<name>`` for the built-in tiny zoo; item files may be ``zoo:<skill>/<split>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Gene(Strict):
    """Bounds and starting value of one searched parameter."""

    low: float
    high: float
    init: Optional[float] = None  # default: the middle of [low, high]

    @model_validator(mode="after")
    def _order(self) -> "Gene":
        if not self.low < self.high:
            raise ValueError(f"gene bounds must satisfy low < high; got low={self.low}, high={self.high}")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} is outside [{self.low}, {self.high}]")
        return self

    @property
    def start(self) -> float:
        return self.init if self.init is not None else (self.low + self.high) / 2


GROUPS = ("attn", "mlp", "other")


class PSSpace(Strict):
    """Parameter space: per-layer (or per-block, or smooth) merge coefficients for each source."""

    kind: Literal["ps"] = "ps"
    method: str
    genes: dict[str, Gene]  # per-model parameters searched, e.g. weight, density
    fixed: dict[str, Any] = Field(default_factory=dict)  # global (or per-model) parameters held fixed
    granularity: str = "layer"  # "layer" | "block:K" | "global"
    filters: list[Literal["attn", "mlp", "other"]] = Field(default_factory=list)
    smooth: Optional[int] = None  # genes are this many anchor values of a gradient across layers

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        if v in ("layer", "global") or (v.startswith("block:") and v[6:].isdigit() and int(v[6:]) > 0):
            return v
        raise ValueError(f"granularity '{v}' is not one of 'layer', 'global', 'block:K' (K a positive integer)")

    @field_validator("smooth")
    @classmethod
    def _smooth(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 2:
            raise ValueError(f"smooth must be >= 2 anchors (a gradient); got {v}")
        return v

    @model_validator(mode="after")
    def _method(self) -> "PSSpace":
        from evomerge.merge.methods import get_method

        method = get_method(self.method)  # ValueError lists the known methods
        numeric = {p for p, d in method.global_params.items() if d is None or type(d) in (int, float)}
        for p in self.genes:
            if p not in method.model_params and p not in numeric:
                raise ValueError(f"genes.{p}: '{self.method}' has no numeric parameter '{p}'; "
                                 f"searchable: {sorted(set(method.model_params) | numeric)}")
        if not self.genes:
            raise ValueError("genes is empty: name at least one parameter to search (e.g. weight)")
        for p in self.fixed:
            if p not in method.model_params and p not in method.global_params:
                raise ValueError(f"fixed.{p}: '{self.method}' has no parameter '{p}'")
        if "density" in self.genes and not (0 < self.genes["density"].low and self.genes["density"].high <= 1):
            raise ValueError("genes.density bounds must lie in (0, 1]")
        if len(set(self.filters)) != len(self.filters):
            raise ValueError(f"filters {self.filters} repeat a group")
        return self


class DFSSpace(Strict):
    """Data-flow space (EvoMerge): which layers of the pool run, in which order, with which scales."""

    kind: Literal["dfs"] = "dfs"
    pool: Optional[list[str]] = None  # pool members in layout order (default: base then the others)
    repeats: int = Field(2, ge=1, le=8)
    scale_mode: Literal["matrix", "hop"] = "hop"
    scale: Gene = Field(default_factory=lambda: Gene(low=0.5, high=1.5, init=1.0))
    max_layers: Optional[int] = None  # default: 2 x the host's depth
    min_layers: int = Field(1, ge=1)


class Phase(Strict):
    """One phase of a multi-phase search (PS+DFS: the best PS merge joins the DFS pool as 'ps')."""

    space: Union[str, PSSpace, DFSSpace]
    budget: int = Field(..., gt=0)


class Objective(Strict):
    name: str
    benchmark: dict[str, Any]  # an evaluator spec, see evomerge.evaluate.registry
    weight: float = 1.0
    # For a custom function that returns several named values (a dict, or several ItemResponses):
    # their names; each becomes an objective of its own with this entry's weight.
    outputs: Optional[list[str]] = None

    @property
    def names(self) -> list[str]:
        return list(self.outputs) if self.outputs else [self.name]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"objective name '{v}' may contain letters, digits, '_' and '-' only")
        return v

    @model_validator(mode="after")
    def _benchmark(self) -> "Objective":
        """The benchmark takes the objective's name unless it has its own; the spec is checked now."""
        from evomerge.evaluate.registry import parse_spec

        if self.benchmark.get("type") in ("items", "lm_eval", "custom") and "name" not in self.benchmark:
            self.benchmark = {**self.benchmark, "name": self.name}
        parse_spec(self.benchmark)
        return self


class EstimatorSpec(Strict):
    kind: Literal["full", "random", "stratified", "irt", "pirt", "gpirt", "mpirt", "gmpirt"] = "full"
    budget: float = Field(1.0, gt=0)  # fraction of items (<= 1) or a count (> 1)
    calibration: Optional[str] = None  # file; default: calibrate at the start of the run
    calibration_models: int = Field(60, ge=0)  # random merges evaluated on every item to calibrate
    drift_every: int = Field(0, ge=0)  # every K generations score the best on all items (0: never)
    drift_threshold: float = Field(0.03, gt=0)
    final_top_k: int = Field(5, ge=0)  # the k best estimates are scored on every item; the best of them wins


class Fitness(Strict):
    objectives: list[Objective]
    test: list[Objective] = Field(default_factory=list)  # held-out benchmarks for the final report
    estimator: EstimatorSpec = Field(default_factory=EstimatorSpec)

    @model_validator(mode="after")
    def _names(self) -> "Fitness":
        names = [n for o in self.objectives for n in o.names]
        if not names:
            raise ValueError("fitness.objectives is empty; give at least one benchmark to score candidates on")
        if len(set(names)) != len(names):
            raise ValueError(f"objective names repeat: {names}")
        if sum(o.weight for o in self.objectives) <= 0:
            raise ValueError("objective weights must sum to a positive number")
        return self


class SearcherSpec(Strict):
    name: str = "cmaes"  # cmaes | nsga2 | random | pymoo:<Algorithm> | nevergrad:<Optimizer>
    options: dict[str, Any] = Field(default_factory=dict)  # e.g. popsize, sigma
    # The first population holds a genome per model (base and sources) that reproduces it exactly,
    # so a Pareto front starts from the experts' corners (PS spaces whose method can express it).
    start_from_sources: bool = False

    @model_validator(mode="after")
    def _population_based(self) -> "SearcherSpec":
        if self.start_from_sources and not (self.name == "nsga2" or self.name.startswith("pymoo:")):
            raise ValueError(f"searcher.start_from_sources needs a population the sources can join: nsga2 or "
                             f"pymoo:<Algorithm>, not '{self.name}' (CMA-ES starts from one point, x0)")
        return self


class Budget(Strict):
    evaluations: int = Field(..., gt=0)  # candidates the searcher may propose (per phase: see phases)


class Export(Strict):
    top_k: int = Field(1, ge=1)  # for several objectives: at most this many Pareto models
    dtype: Optional[str] = None


class Experiment(Strict):
    name: str
    seed: int = 0
    models: dict[str, str]  # name -> folder, hub id or zoo:<name>
    base_model: str
    search_space: Union[str, PSSpace, DFSSpace, None] = None
    phases: Optional[list[Phase]] = None  # instead of search_space + budget: e.g. PS then DFS
    fitness: Fitness
    searcher: SearcherSpec = Field(default_factory=SearcherSpec)
    budget: Optional[Budget] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Optional[str] = None
    output_dir: Optional[str] = None  # default runs/<name>
    export: Export = Field(default_factory=Export)
    allow_pickle: bool = False
    workers: int = Field(1, ge=1)
    address: Optional[str] = None  # Ray cluster address; None: embedded local Ray (or in-process for 1 worker)
    gpus_per_worker: float = Field(0, ge=0)
    # Where each worker's merge engine holds the base and task vectors (evomerge.merge.residency):
    # auto | device | host | disk; the budget is a fraction of the device's memory (<= 1) or a size
    # ("20GB"); task vectors may be held in a lower precision than the arithmetic (delta_dtype);
    # delta_cache is the local folder of the disk policy's shared cache (default ~/.cache/evomerge/deltas).
    memory: Literal["auto", "device", "host", "disk"] = "auto"
    memory_budget: Union[float, str] = 0.75
    delta_dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    delta_cache: Optional[str] = None

    @field_validator("memory_budget")
    @classmethod
    def _memory_budget(cls, v: Union[float, str]) -> Union[float, str]:
        from evomerge.merge.residency import budget_fraction_or_bytes

        budget_fraction_or_bytes(v)  # MemorySettingError (a ValueError) names memory_budget
        return v

    def memory_settings(self) -> dict[str, Any]:
        """What the workers' engines receive (plain data: it crosses to Ray actors)."""
        return {"policy": self.memory, "budget": self.memory_budget, "delta_dtype": self.delta_dtype,
                "cache_dir": self.delta_cache}

    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        if self.base_model not in self.models:
            raise ValueError(f"base_model '{self.base_model}' is not a key of models {sorted(self.models)}")
        if len(self.models) < 2:
            raise ValueError("models needs the base and at least one other model")
        if self.phases is None:
            if self.search_space is None or self.budget is None:
                raise ValueError("give search_space and budget (or phases: a list of {space, budget})")
            self.phases = [Phase(space=self.search_space, budget=self.budget.evaluations)]
        elif self.search_space is not None:
            raise ValueError("give either search_space + budget or phases, not both")
        return self

    def load_spaces(self, root: Path) -> list[Union[PSSpace, DFSSpace]]:
        """Each phase's space, reading preset files (relative to the experiment file or the repo)."""
        return [load_space(p.space, root) for p in self.phases or []]


def load_space(space: Union[str, PSSpace, DFSSpace], root: Path) -> Union[PSSpace, DFSSpace]:
    if not isinstance(space, str):
        return space
    candidates = [Path(space), root / space, Path(__file__).resolve().parent.parent / space,
                  Path(__file__).resolve().parent.parent / "search_spaces" / f"{space}.yaml"]
    for c in candidates:
        if c.is_file():
            data = yaml.safe_load(c.read_text())
            try:
                return DFSSpace.model_validate(data) if data.get("kind") == "dfs" else PSSpace.model_validate(data)
            except ValidationError as err:
                raise ValueError(f"search space {c}: {err}") from None
    raise ValueError(f"search space '{space}' not found (looked in {[str(c) for c in candidates]}); "
                     "give a path to a YAML file or the name of a preset in search_spaces/")


def read_experiment_yaml(path: Path, keys: str) -> dict:
    """The top-level mapping of an experiment file; ``keys`` names what it should hold, for the error."""
    if not path.is_file():
        raise ValueError(f"experiment file {path} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping ({keys}, ...)")
    return data


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    data = read_experiment_yaml(path, "name, models, base_model, search_space, fitness")
    exp = Experiment.model_validate(data)
    exp.load_spaces(path.parent)  # fail now, not after loading models
    return exp
