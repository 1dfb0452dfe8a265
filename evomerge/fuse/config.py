"""The fusion experiment file, validated in full before any model is loaded or any zoo is built.

Model references: ``zoo:<name>`` (the tiny zoo's base and experts), ``hetero:<skill>`` (the
heterogeneous GPT-2 expert), or a folder (relative to the experiment file, or absolute). Data:
``zoo:<skill>/<split>``, ``hetero:<skill>/<split>`` or a JSONL path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import read_experiment_yaml
from ..refs import check_items_ref, check_model_ref


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DataSpec(Strict):
    """One source of prompt/response pairs; several are mixed (a new skill plus replay of old ones)."""

    path: str
    limit: Optional[int] = Field(None, gt=0)  # a seeded random sample of this many pairs
    prompt_key: str = "prompt"
    answer_key: str = "answer"


class FusionSpec(Strict):
    strategy: Literal["mince", "weighted"] = "mince"
    top_k: int = Field(10, ge=1)
    # weighted only: fixed per-source weights, or "ce" for softmax(-CE / temperature) per pair (AvgCE)
    weights: Union[Literal["ce"], dict[str, float]] = "ce"
    temperature: float = Field(1.0, gt=0)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v):
        if isinstance(v, dict) and (any(w < 0 for w in v.values()) or sum(v.values()) <= 0):
            raise ValueError(f"fusion.weights {v} must be non-negative with a positive sum")
        return v


class TrainSpec(Strict):
    steps: int = Field(..., gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # loss = lambda * CE(reference tokens) + (1 - lambda) * KL(fused || model); 1.0 is plain fine-tuning
    lam: float = Field(0.5, alias="lambda")
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, ge=1)

    @field_validator("lam")
    @classmethod
    def _lam(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"lambda {v} is outside [0, 1]: it weighs the reference-token cross-entropy "
                             "against the KL to the fused distribution (1.0 = plain fine-tuning, 0.0 = pure fusion)")
        return v


class FuseExperiment(Strict):
    name: str
    seed: int = 0
    sources: dict[str, str]  # name -> zoo:<name> | hetero:<skill> | folder
    target: str  # a source name, or a model reference (e.g. the folder of a homogeneous merge)
    data: list[DataSpec]
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    train: TrainSpec
    eval: list[str] = Field(default_factory=list)  # item files scored before and after (e.g. zoo:rev/test)
    device: str = "cpu"
    threads: Optional[int] = Field(None, gt=0)  # torch threads; 1 is kind to a shared machine
    output_dir: Optional[str] = None  # default runs/<name>
    distill_batch_size: int = Field(128, gt=0)  # sources' forward passes while precomputing

    @model_validator(mode="after")
    def _consistent(self) -> "FuseExperiment":
        if not self.sources:
            raise ValueError("sources is empty: name at least one model whose distributions to fuse")
        if not self.data:
            raise ValueError("data is empty: give at least one item file or JSONL of prompt/response pairs")
        if isinstance(self.fusion.weights, dict) and self.fusion.strategy == "weighted":
            unknown = sorted(set(self.fusion.weights) - set(self.sources))
            if unknown:
                raise ValueError(f"fusion.weights names unknown sources {unknown}; sources are {sorted(self.sources)}")
        return self

    def check_refs(self, root: Path) -> None:
        """Every model reference resolves (checked before anything is loaded); ``root``: the file's folder."""
        for name, ref in self.sources.items():
            check_model_ref(f"sources.{name}", ref, root, allow_hub=False)
        if self.target not in self.sources:
            try:
                check_model_ref("target", self.target, root, allow_hub=False)
            except ValueError:
                raise ValueError(f"target '{self.target}' is neither a source ({', '.join(sorted(self.sources))}) "
                                 "nor a model folder, 'zoo:<name>' or 'hetero:<skill>'; name one of the sources "
                                 "or give the path of a checkpoint") from None

        for where, ref in [*((f"data[{i}].path", d.path) for i, d in enumerate(self.data)),
                           *((f"eval[{i}]", r) for i, r in enumerate(self.eval))]:
            check_items_ref(where, ref, root)

    @property
    def target_ref(self) -> str:
        return self.sources.get(self.target, self.target)


def load_fuse_experiment(path: str | Path) -> FuseExperiment:
    """Read and validate a fusion experiment file; errors name the bad key and what to change."""
    path = Path(path)
    data = read_experiment_yaml(path, "name, sources, target, data, train")
    try:
        exp = FuseExperiment.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{path}: {err}") from None
    exp.check_refs(path.parent.resolve())
    return exp
