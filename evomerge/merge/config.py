"""A mergekit-style merge configuration (the ``models:`` form), validated on entry.

The same YAML that ``mergekit-yaml`` reads gives the same weights here. The optional ``evomerge``
block (ignored by mergekit) carries what evomerge adds: the seed of randomized methods (DARE, DELLA),
so that a recipe replays to the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ParamSetting = Union[float, int, bool, str, list[Any], dict[str, Any]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)


class EvomergeExtras(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0


class MergeConfig(BaseModel):
    """``models``, ``base_model``, ``merge_method``, ``parameters``, ``dtype``, ``tokenizer_source``."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry]
    base_model: Optional[str] = None
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    evomerge: EvomergeExtras = Field(default_factory=EvomergeExtras)

    @model_validator(mode="before")
    @classmethod
    def _no_slices(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("slices", "modules", "tokenizer"):
                if key in data:
                    raise ValueError(
                        f"'{key}:' is not supported by evomerge merge; write the merge with 'models:' "
                        "(and a layer plan for layer stacking, see search_spaces/dfs*.yaml)")
        return data

    @field_validator("models")
    @classmethod
    def _some_models(cls, v: list[ModelEntry]) -> list[ModelEntry]:
        if not v:
            raise ValueError("'models:' is empty; list at least one model to merge")
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype '{v}' is not one of {sorted(DTYPES)}")
        return v

    def model_names(self) -> list[str]:
        """Every referenced model, base first, without repeats."""
        names = [self.base_model] if self.base_model else []
        return names + [m.model for m in self.models if m.model not in names]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MergeConfig":
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with merge_method, models, ...")
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["merge_method"] = self.merge_method
        data["models"] = [m.model_dump(mode="json", exclude_defaults=True) for m in self.models]
        if self.evomerge.seed:
            data["evomerge"] = {"seed": self.evomerge.seed}
        return yaml.dump(data, Dumper=_FlowListDumper, sort_keys=False)


DTYPES = {"float32", "float16", "bfloat16", "float64"}


class _FlowListDumper(yaml.SafeDumper):
    """Lists of numbers on one line, as mergekit writes gradients."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)
