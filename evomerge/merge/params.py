"""Resolve mergekit parameter settings (scalars, gradients, filters) for one tensor.

Semantics follow mergekit 0.1.5: ``config.evaluate_setting`` for one setting,
``parameter_resolver.resolve_parameter`` for precedence, and ``plan.py`` for the ``t`` at which a
gradient is read (``idx / (n - 1)`` over the layers of a slice, 1.0 for a one-layer slice, and 0 for
tensors outside the layers: embeddings, final norm, lm_head).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence, Union

Scalar = Union[float, int, bool, str]
ParamSetting = Union[Scalar, list[Scalar], dict[str, Any], list[dict[str, Any]]]

_REQUIRED = object()
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (float, int, bool, str))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_filter_entry(entry: Any) -> None:
    """mergekit's ConditionalParameter: {"value": scalar or gradient, "filter": str or None}."""
    if not isinstance(entry, dict):
        raise ValueError(f"a filter list holds only {{filter, value}} entries; got {entry!r}")
    extra = set(entry) - {"filter", "value"}
    if extra or "value" not in entry:
        raise ValueError(f"a filter entry has keys 'value' and optional 'filter'; got {sorted(entry)}")
    if entry.get("filter") is not None and not isinstance(entry["filter"], str):
        raise ValueError(f"a filter must be a string (part of a tensor name); got {entry['filter']!r}")
    value = entry["value"]
    if not (_is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value))):
        raise ValueError(f"a filter entry's value must be a scalar or a gradient list; got {value!r}")


def evaluate_setting(setting: ParamSetting, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for ``tensor_name`` at layer position ``t`` in [0, 1], or None.

    - scalar: itself.
    - gradient (list of scalars): all numbers -> read at ``scaled = t * (len - 1)``, interpolating
      linearly between the two neighbours; otherwise (bools, strings) pick ``int(t * (len - 1))``.
      An empty list gives None, as in mergekit.
    - filter list (a {filter, value} dict or a list of them): the first entry whose filter is None,
      "*" or a substring of the tensor name wins, its value evaluated as above; no match gives None
      (so a lower-precedence scope or the default applies).
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1]; got {t}")
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not isinstance(setting, list):
        raise ValueError(f"a parameter setting is a scalar, a gradient or a filter list; got {setting!r}")
    # a list of scalars (a gradient) or of filter entries: which one is checked element by element below
    items: list[Any] = setting
    if not items:
        return None
    if all(_is_scalar(v) for v in items):
        if not all(_is_number(v) for v in items):
            return items[int(t * (len(items) - 1))]
        scaled = t * (len(items) - 1)
        i0 = int(scaled)
        i1 = min(len(items) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * items[i0] + frac * items[i1]
    for entry in items:
        _check_filter_entry(entry)
    for entry in items:
        pattern = entry.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(entry["value"], tensor_name, t)
    return None


def resolve_parameter(
    name: str,
    scopes: Sequence[Mapping[str, ParamSetting] | None],
    tensor_name: str,
    t: float,
    default: Any = _REQUIRED,
) -> Any:
    """The first scope (highest precedence first: slice source > slice > global in mergekit) whose
    setting for ``name`` evaluates to a value wins; a filter list with no matching entry falls
    through. Then the default; a required parameter with no value raises."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    if default is _REQUIRED:
        raise ValueError(f"parameter {name!r} is required but not set for tensor {tensor_name!r}")
    return default


def layer_index(tensor_name: str) -> int | None:
    """Decoder layer index from names like ``model.layers.3.mlp...``, ``transformer.h.3.attn...``,
    ``model.decoder.layers.3...``, ``gpt_neox.layers.3...`` or ``blocks.3...``; None outside layers."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_t(tensor_name: str, num_layers: int) -> float:
    """Where a gradient is read for this tensor: ``idx / (n - 1)``; 1.0 when n == 1 (mergekit's
    plan_slice); 0.0 for embeddings, final norm and lm_head (planned with t = 0)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1; got {num_layers}")
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    if idx >= num_layers:
        raise ValueError(f"{tensor_name!r} is layer {idx} but the model has {num_layers} layers")
    return 1.0 if num_layers == 1 else idx / (num_layers - 1)
