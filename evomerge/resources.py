"""Data that ships inside the package: search-space presets and the zoo's lm-eval task YAMLs.

They live at the top of the repository (``search_spaces/``, ``fitness/lm_eval/``) and are installed
as the packages ``evomerge.presets`` and ``evomerge.lm_eval_tasks`` (see pyproject.toml), so they are
found the same way from a source checkout, an editable install and a wheel.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable


def presets() -> dict[str, Traversable]:
    """Search-space presets by name (``ps_task_arithmetic_layers`` -> its YAML)."""
    root = resources.files("evomerge.presets")
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def lm_eval_tasks() -> Traversable:
    """The folder of the zoo's lm-eval task YAMLs (an ``include_path`` for lm-eval)."""
    return resources.files("evomerge.lm_eval_tasks")
