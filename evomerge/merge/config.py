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

from evomerge.merge.tokenizer import TokenizerBlock

ParamSetting = Union[float, int, bool, str, list[Any], dict[str, Any]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One model's layers ``[start, end)`` feeding an output slice (mergekit's InputSliceDefinition)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] <= v[1]:  # an empty range is allowed, as in mergekit: its slice adds no
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start <= end")  # layer
        return v


class OutputSlice(BaseModel):
    """A run of output layers merged from equally long layer ranges of its sources. ``base_model``
    overrides the top-level one for this slice; ``residual_weight`` is accepted and, as in mergekit
    0.1.5, unused."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_lengths(self) -> "OutputSlice":
        if not self.sources:
            raise ValueError("a slice needs at least one source: sources: [{model, layer_range}]")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers; got layer_ranges "
                             f"{[list(s.layer_range) for s in self.sources]}")
        names = [s.model for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"a model appears twice among one slice's sources ({names}); use two slices")
        return self

    @property
    def num_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


class EvomergeExtras(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0


class MergeConfig(BaseModel):
    """``models`` or ``slices``, ``base_model``, ``merge_method``, ``parameters``, ``dtype``,
    ``tokenizer_source``."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry] = Field(default_factory=list)
    slices: Optional[list[OutputSlice]] = None
    base_model: Optional[str] = None
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerBlock] = None
    chat_template: Optional[str] = None
    evomerge: EvomergeExtras = Field(default_factory=EvomergeExtras)

    @model_validator(mode="before")
    @classmethod
    def _no_slices(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("modules",):
                if key in data:
                    raise ValueError(
                        f"'{key}:' is not supported by evomerge merge; write the merge with 'models:' or "
                        "'slices:'")
            if data.get("tokenizer") is not None and data.get("tokenizer_source") is not None:
                raise ValueError("give either tokenizer_source: or a tokenizer: block, not both (mergekit's rule)")
            if bool(data.get("models")) == bool(data.get("slices")):
                raise ValueError("give exactly one of 'models:' (whole models) or 'slices:' (layer ranges); "
                                 "at least one model to merge")
        return data

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype '{v}' is not one of {sorted(DTYPES)}")
        return v

    def tokenizer_settings(self) -> tuple[str | None, dict, int | None]:
        """(source, tokens, pad_to_multiple_of) from tokenizer_source or the tokenizer: block;
        source None means the base's tokenizer files are copied and vocabularies must agree."""
        if self.tokenizer is not None:
            return self.tokenizer.source, dict(self.tokenizer.tokens or {}), self.tokenizer.pad_to_multiple_of
        return self.tokenizer_source, {}, None

    def model_names(self) -> list[str]:
        """Every referenced model, base first, without repeats."""
        names = [self.base_model] if self.base_model else []
        listed = [m.model for m in self.models]
        for sl in self.slices or []:
            listed += ([sl.base_model] if sl.base_model else []) + [s.model for s in sl.sources]
        return names + [m for i, m in enumerate(listed) if m not in names and m not in listed[:i]]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MergeConfig":
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with merge_method, models, ...")
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["merge_method"] = self.merge_method
        if self.slices:
            data.pop("models", None)
            data["slices"] = [sl.model_dump(mode="json", exclude_defaults=True) for sl in self.slices]
            for sl in data["slices"]:
                for src in sl["sources"]:
                    src["layer_range"] = list(src["layer_range"])
        else:
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
