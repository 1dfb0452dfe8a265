"""The experiment file: everything a search needs, validated in full before any model is loaded.

An error names the bad key and what is allowed (pydantic's messages carry the key path; the
validators below add what to change). Model references may be local folders, hub ids, or
``zoo:<name>`` for the built-in tiny zoo; item files may be ``zoo:<skill>/<split>``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from evomerge.estimator_kinds import check_kind


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


def _space_kind(value: Any) -> str:
    """Which member of the space union a value is meant as, so an error speaks of that one only."""
    if isinstance(value, str):
        return "preset"
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return "dfs" if kind == "dfs" else "ps"


SpaceRef = Annotated[Union[Annotated[str, Tag("preset")], Annotated[PSSpace, Tag("ps")],
                           Annotated[DFSSpace, Tag("dfs")]], Discriminator(_space_kind)]


class Phase(Strict):
    """One phase of a multi-phase search (PS+DFS: the best PS merge joins the DFS pool as 'ps')."""

    space: SpaceRef
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
    kind: str = "full"  # one of evomerge.estimator_kinds.SEARCH_KINDS
    budget: float = Field(1.0, gt=0)  # fraction of items (<= 1) or a count (> 1)
    calibration: Optional[str] = None  # file; default: calibrate at the start of the run
    calibration_models: Optional[int] = Field(None, ge=0)  # random merges scored on every item to calibrate
    #                                                       (default 60 for the IRT kinds, 8 for adaptive)
    drift_every: int = Field(0, ge=0)  # every K generations score the best on all items (0: never)
    drift_threshold: float = Field(0.03, gt=0)
    final_top_k: int = Field(5, ge=0)  # the k best estimates are scored on every item; the best of them wins
    # the report's error check: this many search candidates scored on every item (the final top k count
    # toward it, so report_checks <= final_top_k costs nothing more)
    report_checks: int = Field(8, ge=1)
    # adaptive: stop a candidate when the standard error of what the searcher is told (one objective: the
    # weighted fitness; several: each benchmark) is below tolerance, or at max_items per benchmark (a
    # fraction or a count); start_items, then batch items a round
    tolerance: float = Field(0.02, gt=0)
    max_items: float = Field(0.25, gt=0)
    start_items: int = Field(16, ge=1)
    batch: int = Field(16, ge=1)
    refit_every: int = Field(5, ge=0)  # generations between refits on the search's own answers (0: never)
    # adaptive: stop a candidate once its fitness interval (several objectives: its box) is clear of the
    # searcher's selection cut (CMA-ES: the mu best; NSGA-II: its population size over the population and
    # the offspring), so that the same candidates are kept as with full scores w.p. >= 1 - delta
    racing: bool = False
    delta: float = Field(0.05, gt=0, lt=1)
    # items per benchmark the estimator works with (a fraction, or a count: a benchmark with fewer items
    # keeps them all), drawn once from the run's seed: calibration, search, final confirmation and the
    # report's check all use this sample, so their cost stops growing with the benchmark (default: every item)
    item_sample: Optional[float] = Field(None, gt=0)

    @property
    def models_to_calibrate(self) -> int:
        if self.calibration_models is not None:
            return self.calibration_models
        return 8 if self.kind == "adaptive" else 60

    @model_validator(mode="after")
    def _item_sample(self) -> "EstimatorSpec":
        if self.item_sample is not None and self.kind == "full":
            raise ValueError("item_sample samples the items an estimator works with, and kind 'full' scores every "
                             "item by definition; use kind: random (budget) for one fixed subset, or an IRT "
                             "kind or adaptive with item_sample")
        if self.item_sample is not None and self.item_sample > 1 and not float(self.item_sample).is_integer():
            raise ValueError(f"item_sample {self.item_sample} is neither a fraction in (0, 1] nor a whole count of "
                             f"items; give e.g. 0.2 or 1000")
        if self.item_sample is not None and self.calibration is not None:
            raise ValueError("item_sample draws the items a run calibrates on, and a reused calibration "
                             f"({self.calibration}) already fixes them; drop one of the two")
        return self

    @model_validator(mode="after")
    def _racing(self) -> "EstimatorSpec":
        if self.racing and self.kind != "adaptive":
            raise ValueError(f"racing needs confidence intervals, which estimator kind '{self.kind}' does not "
                             f"give; use kind: adaptive (successive_halving races by rank on its own)")
        return self

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return check_kind(v).name


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


class SearcherConfig(Strict):
    name: str = "cmaes"  # cmaes | nsga2 | random | pymoo:<Algorithm> | nevergrad:<Optimizer>
    options: dict[str, Any] = Field(default_factory=dict)  # e.g. popsize, sigma
    # The first population holds a genome per model (base and sources) that reproduces it exactly,
    # so a Pareto front starts from the experts' corners (PS spaces whose method can express it).
    start_from_sources: bool = False
    # The best hand recipe (``references``, scored on the fitness split before the search) that the
    # phase's space contains exactly is the searcher's start (CMA-ES's mean, x0) and a member of its
    # first generation, evaluated like any candidate; a Pareto searcher gets every contained one. On
    # by default: it costs one evaluation of the budget and the search starts where a person would stop.
    seed_from_hand_recipes: bool = True

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from evomerge.searchers.names import searcher_class

        searcher_class(v)  # ValueError lists the choices
        return v

    @model_validator(mode="after")
    def _population_based(self) -> "SearcherConfig":
        if self.start_from_sources and not (self.name == "nsga2" or self.name.startswith("pymoo:")):
            raise ValueError(f"searcher.start_from_sources needs a population the sources can join: nsga2 or "
                             f"pymoo:<Algorithm>, not '{self.name}' (CMA-ES starts from one point, x0)")
        return self


class Budget(Strict):
    evaluations: int = Field(..., gt=0)  # candidates the searcher may propose (per phase: see phases)


class Export(Strict):
    top_k: int = Field(1, ge=1)  # for several objectives: at most this many Pareto models
    dtype: Optional[str] = None
    figures: Literal["png", "svg"] = "png"  # the report's plots (svg: for papers)


class Reference(Strict):
    """A hand recipe people actually use, reported beside the search: every non-base model merged by
    one method with the same parameters. It is scored on the fitness split too, and a search never
    exports a model that scores below one of them there."""

    name: str
    method: str
    weight: Optional[float] = None  # None: 1/k for k models (the uniform merge)
    density: Optional[float] = Field(None, gt=0, le=1)
    parameters: dict[str, Any] = Field(default_factory=dict)  # the method's global parameters (lambda, ...)

    @model_validator(mode="after")
    def _method(self) -> "Reference":
        from evomerge.merge.methods import get_method

        method = get_method(self.method)  # ValueError lists the known methods
        if self.density is not None and "density" not in method.model_params:
            raise ValueError(f"'{self.method}' takes no density; drop it or choose a method that prunes")
        return self


class WandbTracking(Strict):
    project: str
    mode: Literal["online", "offline", "disabled"] = "online"
    entity: Optional[str] = None


class MlflowTracking(Strict):
    tracking_uri: str  # e.g. file:./mlruns, http://host:5000
    experiment: Optional[str] = None  # default: the experiment's name


class Tracking(Strict):
    """Experiment tracking, off by default: scalars per generation (see evomerge.tracking)."""

    tensorboard: Optional[str] = None  # log folder (relative: inside the run folder)
    wandb: Optional[WandbTracking] = None
    mlflow: Optional[MlflowTracking] = None

    @model_validator(mode="after")
    def _installed(self) -> "Tracking":
        import importlib.util

        needs = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                 "mlflow": ("mlflow", "mlflow")}
        for key, (module, extra) in needs.items():
            if getattr(self, key) is not None and importlib.util.find_spec(module) is None:
                raise ValueError(f"tracking.{key} needs the '{module}' package: pip install 'evomerge[{extra}]', "
                                 f"or drop tracking.{key}")
        return self


DEFAULT_REFERENCES = (
    Reference(name="uniform merge", method="task_arithmetic"),
    Reference(name="task arithmetic (w=1)", method="task_arithmetic", weight=1.0),
    Reference(name="TIES (d=0.5, w=1)", method="ties", weight=1.0, density=0.5),
    Reference(name="DARE-TIES (d=0.5, w=1)", method="dare_ties", weight=1.0, density=0.5),
)


class VllmOptions(Strict):
    """The vLLM engine each worker starts (``evaluation.vllm``); see :mod:`evomerge.evaluate.vllm_engine`."""

    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None  # None: the merge's dtype
    max_model_len: Optional[int] = Field(None, ge=8)  # longest prompt + answer; None: the model's, at most 2048
    max_num_seqs: int = Field(64, ge=1)  # sequences scored at once
    kv_cache: Optional[Union[int, str]] = None  # bytes or a size ("1GB"); None: from the model and max_num_seqs
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs per engine (a model larger than one GPU)
    enforce_eager: bool = True  # no graph compilation: starts in seconds (compiled: a minute, no faster on CPU)
    # CPU only: VLLM_CPU_OMP_THREADS_BIND for each engine ("0-7", "nobind"); None: vLLM's own binding for one
    # worker, none for Ray workers (each uses its OMP_NUM_THREADS CPUs, as the merge does)
    cpu_threads_bind: Optional[str] = None
    extra: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM argument, passed as given

    @field_validator("kv_cache")
    @classmethod
    def _size(cls, v: Optional[Union[int, str]]) -> Optional[Union[int, str]]:
        if v is not None:
            kv_cache_bytes(v)
        return v

    def settings(self) -> dict[str, Any]:
        """What a worker's engine receives (plain data: it crosses to Ray actors)."""
        out = self.model_dump(exclude={"kv_cache"})
        out["kv_cache_bytes"] = kv_cache_bytes(self.kv_cache) if self.kv_cache is not None else None
        return out


def kv_cache_bytes(value: Union[int, str]) -> int:
    """A KV cache size in bytes from a number of bytes or a size string; errors name evaluation.vllm.kv_cache."""
    from evomerge.checkpoint import parse_size

    try:
        n = int(value) if isinstance(value, int) and not isinstance(value, bool) else int(parse_size(str(value)))
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"evaluation.vllm.kv_cache: {value!r} is not a size; give bytes or e.g. '1GB', '512MiB'")
    return n


class Evaluation(Strict):
    """How candidates are scored: on the transformers model (``hf``) or a resident vLLM engine per
    worker (``vllm``); ``auto`` takes vLLM where it is installed."""

    backend: Literal["hf", "vllm", "auto"] = "hf"
    vllm: VllmOptions = Field(default_factory=VllmOptions)

    @model_validator(mode="after")
    def _installed(self) -> "Evaluation":
        if self.backend == "vllm":
            from evomerge.evaluate.vllm_engine import INSTALL_HINT, vllm_installed

            if not vllm_installed():
                raise ValueError(f"evaluation.backend: vllm, but vLLM is not installed; {INSTALL_HINT}")
        return self

    def settings(self) -> dict[str, Any]:
        return {"backend": self.backend, "vllm": self.vllm.settings()}


class Experiment(Strict):
    name: str
    seed: int = 0
    models: dict[str, str]  # name -> folder, hub id or zoo:<name>
    base_model: str
    search_space: Optional[SpaceRef] = None
    phases: Optional[list[Phase]] = None  # instead of search_space + budget: e.g. PS then DFS
    fitness: Fitness
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    budget: Optional[Budget] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Optional[str] = None
    output_dir: Optional[str] = None  # default runs/<name>
    export: Export = Field(default_factory=Export)
    allow_pickle: bool = False
    workers: int = Field(1, ge=1)
    address: Optional[str] = None  # Ray cluster address; None: embedded local Ray (or in-process for 1 worker)
    gpus_per_worker: float = Field(0, ge=0)
    # hand recipes reported beside the search (default: the uniform merge, task arithmetic at weight 1,
    # TIES and DARE-TIES at density 0.5 and weight 1); [] for none
    references: list[Reference] = Field(default_factory=lambda: list(DEFAULT_REFERENCES))
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
    evaluation: Evaluation = Field(default_factory=Evaluation)
    tracking: Optional[Tracking] = None  # TensorBoard / W&B / MLflow scalars per generation; off by default

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
        est, searcher = self.fitness.estimator, self.searcher.name
        if est.racing and searcher not in ("cmaes", "nsga2", "pymoo:NSGA2"):
            raise ValueError(f"fitness.estimator.racing races against a selection cut (CMA-ES's mu best, NSGA-II's "
                             f"population), which searcher '{searcher}' does not have; use searcher cmaes or "
                             f"nsga2, or racing: false")
        tp = self.evaluation.vllm.tensor_parallel_size
        if self.evaluation.backend != "hf" and tp > 1 and self.gpus_per_worker < tp:
            raise ValueError(f"evaluation.vllm.tensor_parallel_size {tp} shards each worker's engine over {tp} GPUs; "
                             f"set gpus_per_worker: {tp} (now {self.gpus_per_worker:g})")
        if est.kind == "successive_halving" and (searcher == "random" or searcher.startswith("nevergrad:")):
            raise ValueError(f"successive_halving ranks a whole generation at once; searcher '{searcher}' is "
                             f"steady-state: use cmaes, nsga2 or pymoo:<Algorithm>")
        return self

    def load_spaces(self, root: Path) -> list[Union[PSSpace, DFSSpace]]:
        """Each phase's space, reading preset files (relative to the experiment file or the repo)."""
        return [load_space(p.space, root) for p in self.phases or []]


def load_space(space: Union[str, PSSpace, DFSSpace], root: Path) -> Union[PSSpace, DFSSpace]:
    """A phase's space: given inline, a YAML file (relative to the experiment's folder, or as given),
    or the name of a preset shipped with evomerge (``search_spaces/``)."""
    if not isinstance(space, str):
        return space
    from evomerge.resources import presets

    shipped = presets()
    for c in (root / space, Path(space)):
        if c.is_file():
            return _space_from_yaml(c.read_text(), str(c))
    if space in shipped:
        return _space_from_yaml(shipped[space].read_text(), f"preset '{space}'")
    raise ValueError(f"search space '{space}' not found: no file {root / space} and no preset of that name; "
                     f"give a path to a YAML file or one of the presets {sorted(shipped)}")


def _space_from_yaml(text: str, where: str) -> Union[PSSpace, DFSSpace]:
    data = parse_yaml(text, where)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a search space is a mapping (kind, method, genes, ...)")
    model: type[BaseModel] = DFSSpace if data.get("kind") == "dfs" else PSSpace
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as err:
        raise ValueError(format_errors(err, where, model)) from None


def parse_yaml(text: str, where: str) -> Any:
    """YAML text, or a one-line error naming the file, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML{at}: {problem}") from None


def format_errors(err: ValidationError, where: str, model: type[BaseModel], limit: int = 4) -> str:
    """A pydantic report as a few lines a person reads: the file, the key path, what is wrong, the bad
    value, and for an unknown key the allowed keys there (the closest first)."""
    lines = []
    for e in err.errors()[:limit]:
        loc = [p for p in e["loc"] if p not in ("preset", "ps", "dfs")]
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "") + \
                (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "missing: this key is required"
        elif "input" in e and not isinstance(e["input"], (dict, list)) and e["type"] not in ("value_error",):
            msg += f" (got {e['input']!r})"
        lines.append(f"{where}: {key}: {msg}")
    if len(err.errors()) > limit:
        lines.append(f"{where}: ... and {len(err.errors()) - limit} more")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The keys a mapping at ``loc`` inside ``model`` may have ([] where that is not a model)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = _model_in(fields[part].annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as Optional[list[Objective]] (None if there is none)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def experiment_from_data(data: dict[str, Any], where: str | Path, root: Path | None = None) -> Experiment:
    """An Experiment from a parsed file ``where``, every space loaded (relative to ``root``, default the
    file's folder); errors in a few readable lines."""
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as err:
        raise ValueError(format_errors(err, str(where), Experiment)) from None
    exp.load_spaces(root or Path(where).parent)  # fail now, not after loading models
    return exp


def read_experiment_yaml(path: Path, keys: str) -> dict:
    """The top-level mapping of an experiment file; ``keys`` names what it should hold, for the error."""
    if not path.is_file():
        raise ValueError(f"experiment file {path} does not exist")
    data = parse_yaml(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping ({keys}, ...)")
    return data


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    return experiment_from_data(read_experiment_yaml(path, "name, models, base_model, search_space, fitness"), path)
