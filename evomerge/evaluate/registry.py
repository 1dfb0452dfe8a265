"""Evaluators from config dicts: ``make_evaluator({"type": "items", ...})``.

The experiment file embeds one such dict per objective, so each spec is a pydantic model that
rejects unknown keys: a typo (``max_new_token``) fails when the config is read, not an hour into a
search. Three types:

- ``items``: the built-in evaluator over a JSONL file or ``zoo:<skill>/<split>``;
- ``lm_eval``: any lm-evaluation-harness task, run in-process on the candidate;
- ``custom``: a user function ``path/to/file.py:fn`` or ``module:fn`` (imported and checked here).

Relative paths (item files, ``include_path``, fitness files) are taken from ``base_dir``: the folder
of the experiment file, so a config means the same thing from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.evaluate.base import EvalContext, Evaluator
from evomerge.evaluate.builtin import ItemsBenchmark
from evomerge.evaluate.custom import CustomFitness, FitnessResult
from evomerge.evaluate.lm_eval_adapter import LmEvalBenchmark


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemsSpec(_Spec):
    """The built-in evaluator (see :class:`evomerge.evaluate.builtin.ItemsBenchmark`)."""

    type: Literal["items"]
    name: str
    path: Optional[str] = None  # JSONL file or zoo:<skill>/<split>
    items: Optional[list[dict[str, Any]]] = None  # or the items inline
    scorer: Literal["exact_match", "regex", "multiple_choice"] = "exact_match"
    answer_regex: Optional[str] = None
    max_new_tokens: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    choices_key: str = "choices"
    id_key: str = "id"
    length_normalize: bool = False
    stop: list[str] = Field(default_factory=list)
    chat_template: bool = False  # each prompt is a user turn of the tokenizer's chat template
    system_prompt: Optional[str] = None  # a system turn before it (chat_template only)

    @model_validator(mode="after")
    def _one_source(self) -> "ItemsSpec":
        if (self.path is None) == (self.items is None):
            raise ValueError("give exactly one of 'path' (a JSONL file or zoo:<skill>/<split>) and 'items' (a list)")
        return self


class LmEvalSpec(_Spec):
    """An lm-eval task (see :class:`evomerge.evaluate.lm_eval_adapter.LmEvalBenchmark`)."""

    type: Literal["lm_eval"]
    task: Union[str, list[str]]
    include_path: Union[str, list[str], None] = None
    name: Optional[str] = None
    metric: Optional[str] = None
    filter: Optional[str] = None
    num_fewshot: Optional[int] = Field(None, ge=0)
    gen_kwargs: Union[dict[str, Any], str, None] = None
    apply_chat_template: Union[bool, str] = False
    fewshot_as_multiturn: bool = False
    system_instruction: Optional[str] = None
    batch_size: Union[int, str] = 64
    id_field: Optional[str] = "id"
    fewshot_seed: int = 1234
    task_overrides: dict[str, Any] = Field(default_factory=dict)
    hflm_kwargs: dict[str, Any] = Field(default_factory=dict)
    verbose: bool = False


class CustomSpec(_Spec):
    """A user fitness function (see :mod:`evomerge.evaluate.custom`)."""

    type: Literal["custom"]
    fn: str
    name: Optional[str] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


SPECS: dict[str, type[_Spec]] = {"items": ItemsSpec, "lm_eval": LmEvalSpec, "custom": CustomSpec}
EvaluatorSpec = Union[ItemsSpec, LmEvalSpec, CustomSpec]
AnyEvaluator = Union[ItemsBenchmark, LmEvalBenchmark, CustomFitness]


def parse_spec(spec: dict[str, Any] | EvaluatorSpec) -> EvaluatorSpec:
    """Validate a spec dict; errors name the bad key and list the allowed types or keys."""
    if isinstance(spec, (ItemsSpec, LmEvalSpec, CustomSpec)):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"an evaluator spec must be a mapping with a 'type' key, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in SPECS:
        got = "no 'type' key" if "type" not in spec else f"type {kind!r}"
        raise ValueError(f"evaluator spec has {got}; 'type' must be one of {sorted(SPECS)}")
    model = SPECS[kind]
    try:
        return model.model_validate(spec)  # type: ignore[return-value]  # SPECS[kind] is that kind's spec
    except ValidationError as e:
        problems, about_keys = [], False
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("extra_forbidden", "missing"):
                about_keys = True
                problems.append(f"{'unknown' if err['type'] == 'extra_forbidden' else 'missing'} key '{key}'")
            else:
                problems.append(f"{key}: {msg}" if key else msg)
        hint = f"; allowed keys: {sorted(model.model_fields)}" if about_keys else ""
        raise ValueError(f"evaluator spec of type '{kind}': {'; '.join(problems)}{hint}") from None


def _path(value: str | None, base_dir: Path | None) -> str | None:
    """A relative path taken from ``base_dir``; ``zoo:`` references and absolute paths unchanged."""
    if value is None or value.startswith("zoo:") or base_dir is None or Path(value).expanduser().is_absolute():
        return value
    return str(base_dir / value)


def make_evaluator(spec: dict[str, Any] | EvaluatorSpec, base_dir: str | Path | None = None) -> AnyEvaluator:
    """The evaluator a spec describes. ``items`` and ``lm_eval`` follow the Evaluator protocol
    (``evaluate -> ItemResponses``); ``custom`` returns a :class:`CustomFitness`. Use
    :func:`run_fitness` to score a candidate with either kind."""
    s = parse_spec(spec)
    base = Path(base_dir) if base_dir is not None else None
    if isinstance(s, ItemsSpec):
        return ItemsBenchmark(
            s.name, s.items if s.items is not None else str(_path(s.path, base)), scorer=s.scorer,
            answer_regex=s.answer_regex, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
            prompt_key=s.prompt_key, answer_key=s.answer_key, choices_key=s.choices_key, id_key=s.id_key,
            length_normalize=s.length_normalize, stop=s.stop, chat_template=s.chat_template,
            system_prompt=s.system_prompt)
    if isinstance(s, LmEvalSpec):
        include = s.include_path
        include = [str(_path(p, base)) for p in include] if isinstance(include, list) else _path(include, base)
        return LmEvalBenchmark(
            s.task, include_path=include, name=s.name, metric=s.metric, filter=s.filter,
            num_fewshot=s.num_fewshot, gen_kwargs=s.gen_kwargs, apply_chat_template=s.apply_chat_template,
            fewshot_as_multiturn=s.fewshot_as_multiturn, system_instruction=s.system_instruction,
            batch_size=s.batch_size, id_field=s.id_field, fewshot_seed=s.fewshot_seed,
            task_overrides=s.task_overrides, hflm_kwargs=s.hflm_kwargs, verbose=s.verbose)
    return CustomFitness(s.fn, name=s.name, base_dir=base, kwargs=s.kwargs)


def run_fitness(evaluator: AnyEvaluator | Evaluator, model: Any, tokenizer: Any, ctx: EvalContext) -> FitnessResult:
    """Score one candidate with any evaluator, as a :class:`FitnessResult`.

    A benchmark gives one objective (its mean, named after it) and its item responses; a custom
    function gives what it returns. Only a custom function's failures become failed results: an
    exception from a built-in evaluator is a bug or a config error and propagates.
    """
    if isinstance(evaluator, CustomFitness):
        return evaluator.run(model, tokenizer, ctx)
    responses = evaluator.evaluate(model, tokenizer, ctx)
    return FitnessResult({evaluator.name: responses.mean()}, [responses])
