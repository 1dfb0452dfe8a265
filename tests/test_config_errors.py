"""Bad input, as a new user writes it: each is refused before any model loads, in one or a few lines
that name the file and key, the bad value and what is allowed; never a traceback or pydantic's links."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.zoo.skills import write_jsonl

BASE: dict[str, Any] = {
    "name": "bad", "seed": 0,
    "models": {"base": "zoo:base", "rev": "zoo:rev"},
    "base_model": "base",
    "search_space": "ps_task_arithmetic_layers",
    "budget": {"evaluations": 4},
    "searcher": {"name": "cmaes", "options": {"popsize": 4}},
    "fitness": {"objectives": [{"name": "rev", "benchmark": {"type": "items", "path": "rev.jsonl"}}]},
    "device": "cpu",
}


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def apply(exp: dict) -> None:
        *parents, last = path.split(".")
        node = exp
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return apply


_DELETE = object()
LOCAL_TASK = {"task": "zoo_rev_local", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "rev.jsonl"}},
              "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
              "doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}]}

CASES = [
    ("typo'd searcher", _set("searcher.name", "cmaez"), ["unknown searcher 'cmaez'", "cmaes"]),
    ("typo'd key", _set("fitnes", {}), ["fitnes: unknown key (did you mean 'fitness'?)", "allowed here:"]),
    ("typo'd nested key", _set("searcher.optoins", {}), ["searcher.optoins: unknown key (did you mean 'options'?)"]),
    ("missing model folder", _set("models.rev", "./no/such/model"), ["models.rev:", "no/such/model", "does not exist"]),
    ("inverted gene bounds", _set("search_space", {"method": "task_arithmetic",
                                                   "genes": {"weight": {"low": 1.0, "high": 0.0}}}),
     ["search_space.genes.weight", "low < high", "low=1.0, high=0.0"]),
    ("density above 1", _set("search_space", {"method": "dare_ties", "genes": {"weight": {"low": 0, "high": 1},
                                                                               "density": {"low": 0.1, "high": 1.5}}}),
     ["genes.density", "bound 1.5 is outside (0, 1]"]),
    ("unknown preset", _set("search_space", "ps_no_such"), ["search space 'ps_no_such' not found",
                                                            "ps_task_arithmetic_layers"]),
    ("missing item file", _set("fitness.objectives.0.benchmark.path", "nope.jsonl"),
     ["fitness.objectives[0] (rev):", "nope.jsonl", "does not exist"]),
    ("broken item file", _set("fitness.objectives.0.benchmark.path", "broken.jsonl"),
     ["fitness.objectives[0] (rev):", "broken.jsonl:2", "not valid JSON"]),
    ("stratified estimator", _set("fitness.estimator", {"kind": "stratified"}),
     ["fitness.estimator.kind", "'stratified' needs a group label per item"]),
    ("unknown estimator", _set("fitness.estimator", {"kind": "irtt"}),
     ["fitness.estimator.kind", "unknown estimator kind 'irtt'", "did you mean 'irt'", "'gpirt'", "'adaptive'",
      "'successive_halving'"]),
    ("item_sample with full", _set("fitness.estimator", {"kind": "full", "item_sample": 1000}),
     ["kind 'full' scores every item", "kind: random"]),
    ("item_sample neither a fraction nor a count", _set("fitness.estimator", {"kind": "adaptive", "item_sample": 2.5}),
     ["item_sample 2.5", "0.2 or 1000"]),
    ("item_sample with a reused calibration",
     _set("fitness.estimator", {"kind": "gpirt", "item_sample": 0.2, "calibration": "c"}),
     ["reused calibration", "drop one"]),
    ("racing without intervals", _set("fitness.estimator", {"kind": "random", "racing": True}),
     ["racing needs confidence intervals", "kind: adaptive"]),
    ("racing without a selection cut", lambda e: (_set("fitness.estimator", {"kind": "adaptive", "racing": True})(e),
                                                  _set("searcher", {"name": "random"})(e)),
     ["races against a selection cut", "use searcher cmaes or nsga2"]),
    ("halving with a steady-state searcher", lambda e: (_set("fitness.estimator", {"kind": "successive_halving"})(e),
                                                        _set("searcher", {"name": "random"})(e)),
     ["successive_halving ranks a whole generation", "use cmaes, nsga2"]),
    ("budget of zero", _set("budget", {"evaluations": 0}), ["budget.evaluations", "greater than 0", "got 0"]),
    ("missing key", _set("base_model", _DELETE), ["base_model: missing"]),
    # values that used to pass validation and then fail every candidate, or fail after the models loaded
    ("objective weight NaN", _set("fitness.objectives.0.weight", float("nan")),
     ["fitness.objectives.0.weight", "finite number", "nan"]),
    ("objective weight inf", _set("fitness.objectives.0.weight", float("inf")), ["fitness.objectives.0.weight", "inf"]),
    ("fixed density 1.5", _set("search_space", {"method": "ties", "genes": {"weight": {"low": 0, "high": 1}},
                                                "fixed": {"density": 1.5}}),
     ["search_space", "fixed.density", "value 1.5 is outside (0, 1]"]),
    ("fixed switch not a boolean", _set("search_space", {"method": "ties", "genes": {"weight": {"low": 0, "high": 1}},
                                                         "fixed": {"normalize": "yes"}}),
     ["fixed.normalize", "'yes'", "true or false"]),
    ("gene bound NaN", _set("search_space", {"method": "task_arithmetic", "genes": {"weight": {"low": 0,
                                                                                              "high": float("nan")}}}),
     ["search_space.genes.weight.high", "finite"]),
    ("device tpu9", _set("device", "tpu9"), ["device 'tpu9'", "cuda:N"]),
    ("unknown nevergrad optimizer", _set("searcher", {"name": "nevergrad:Bogus"}),
     ["nevergrad has no optimizer 'Bogus'", "nevergrad:NGOpt"]),
    ("nevergrad optimizer typo", _set("searcher", {"name": "nevergrad:TwoPointDE", "options": {"budget": 4}}),
     ["Did you mean nevergrad:TwoPointsDE"]),
    ("unknown pymoo algorithm", _set("searcher", {"name": "pymoo:NSGA9"}), ["pymoo has no algorithm 'NSGA9'"]),
    ("sigma a word", _set("searcher", {"name": "cmaes", "options": {"sigma": "big"}}), ["cmaes: sigma", "'big'"]),
    ("sigma NaN", _set("searcher", {"name": "cmaes", "options": {"sigma": float("nan")}}), ["options.sigma", "finite"]),
    ("item budget above the items", _set("fitness.estimator", {"kind": "random", "budget": 5000}),
     ["fitness.estimator.budget", "5000 items", "'rev' has 8 items"]),
    ("item budget neither fraction nor count", _set("fitness.estimator", {"kind": "random", "budget": 12.5}),
     ["budget 12.5", "whole count"]),
    ("too few calibration models", _set("fitness.estimator", {"kind": "gpirt", "calibration_models": 2}),
     ["calibration_models 2", "at least 5"]),
    ("hand recipe slerp t=2", _set("references", [{"name": "x", "method": "slerp", "parameters": {"t": 2}}]),
     ["references.0", "parameters.t", "[0, 1]"]),
    ("hand recipe unknown parameter", _set("references", [{"name": "x", "method": "ties", "parameters": {"lamda": 1}}]),
     ["parameters.lamda", "no parameter 'lamda'"]),
    ("DFS scale not positive", _set("search_space", {"kind": "dfs", "scale": {"low": 0, "high": 1.5}}),
     ["scale.low 0", "positive"]),
    ("lm-eval task name lm-eval cannot find",
     _set("fitness.objectives.0.benchmark", {"type": "lm_eval", "task": "zoo_rev_lcoal", "include_path": "tasks"}),
     ["fitness.objectives[0] (rev):", "no task ['zoo_rev_lcoal']"]),
]


def _check(result, fragments: list[str]) -> None:
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and "errors.pydantic.dev" not in out and "For further information" not in out, out
    text = " ".join(out.split())  # rich wraps long lines
    for f in fragments:
        assert f in text, f"{f!r} not in:\n{out}"
    assert len(out.strip().splitlines()) <= 8, out


@pytest.fixture
def workdir(zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # every refusal here comes before any weight is read: the marker file must stay absent
    import evomerge.checkpoint as checkpoint

    monkeypatch.setenv(checkpoint.WEIGHTS_LOG_ENV, str(tmp_path / "weights.log"))
    monkeypatch.setattr(checkpoint, "_weights_noted", False)
    write_jsonl(tmp_path / "rev.jsonl", zoo.items("rev", "fitness")[:8])
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "prompt": "x", "answer": "y"}\n{"id": "b", "prompt": \n')
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "zoo_rev_local.yaml").write_text(yaml.safe_dump(LOCAL_TASK))
    return tmp_path


@pytest.mark.parametrize("what, change, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_experiment_is_one_clear_error_before_any_model_loads(workdir: Path, what, change, fragments):
    exp = copy.deepcopy(BASE)
    change(exp)
    (workdir / "exp.yaml").write_text(yaml.safe_dump(exp))
    result = CliRunner().invoke(app, ["search", "exp.yaml", "-o", "run"])
    _check(result, fragments)
    assert not (workdir / "run" / "phase0-ps").exists()  # no search began
    assert not (workdir / "weights.log").exists()  # and no weight was read


def test_malformed_yaml_names_file_and_line(workdir: Path):
    (workdir / "exp.yaml").write_text("name: bad\nmodels: {base: zoo:base\nbase_model: base\n")
    _check(CliRunner().invoke(app, ["search", "exp.yaml"]), ["exp.yaml: not valid YAML (line"])
    (workdir / "merge.yml").write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    _check(CliRunner().invoke(app, ["merge", "merge.yml", "-o", "out"]), ["merge.yml: not valid YAML (line"])


def test_merge_config_errors_are_short(workdir: Path):
    (workdir / "merge.yml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a"}],
                                                       "paramters": {"normalize": True}}))
    _check(CliRunner().invoke(app, ["merge", "merge.yml", "-o", "out"]),
           ["merge.yml: paramters: unknown key (did you mean 'parameters'?)"])
    (workdir / "merge.yml").write_text(yaml.safe_dump({"merge_method": "linear", "modles": []}))
    _check(CliRunner().invoke(app, ["merge", "merge.yml", "-o", "out"]), ["merge.yml:", "'models:'"])


def test_resume_of_a_missing_run(workdir: Path):
    (workdir / "empty").mkdir()
    _check(CliRunner().invoke(app, ["resume", "empty"]), ["holds no run", "evomerge search"])
