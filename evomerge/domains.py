"""The domain of every value an experiment file may hold that pydantic's types alone do not pin down.

Why a module of its own: a value that passes a type check and lies outside its domain (a fixed
density of 1.5, a NaN option, ``device: tpu9``, ``nevergrad:Bogus``) used to pass validation and then
fail every candidate, or end in a traceback after the models had loaded. Each check here raises a
ValueError of one line naming the key, the bad value and what is allowed; the experiment's validators
(``evomerge.config``) call them, so pydantic prefixes the key path.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

# parameters that are probabilities wherever they appear (genes, fixed values, hand recipes):
# name -> (low, high, low included, high included)
PROBABILITIES: dict[str, tuple[float, float, bool, bool]] = {
    "density": (0.0, 1.0, False, True),
    "gamma": (0.0, 1.0, True, True),
    "t": (0.0, 1.0, True, True),
    "epsilon": (0.0, 1.0, True, False),
}

_SIMPLE_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _interval(low: float, high: float, low_in: bool, high_in: bool) -> str:
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def numbers_in(value: Any) -> Iterable[float]:
    """Every number inside a value (a number, or a list / mapping of them, as a gradient is)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from numbers_in(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from numbers_in(v)


def check_finite(key: str, value: Any) -> None:
    """NaN and inf are refused in any number of ``value`` (they pass every bound check)."""
    for x in numbers_in(value):
        if not math.isfinite(x):
            raise ValueError(f"{key}: {value!r} is not a finite number; give a finite number")


def check_in_domain(key: str, param: str, values: Iterable[float], bounds: bool = False) -> None:
    """Values of a probability parameter (density, gamma, t, epsilon) inside its interval; ``bounds``:
    the values are a gene's low and high (the message then says so)."""
    if param not in PROBABILITIES:
        return
    low, high, low_in, high_in = PROBABILITIES[param]
    for x in values:
        inside = (low <= x if low_in else low < x) and (x <= high if high_in else x < high)
        if not inside:
            what = "bound" if bounds else "value"
            raise ValueError(f"{key}: {what} {x:g} is outside {_interval(low, high, low_in, high_in)}, "
                             f"the range of {param}")


def check_fixed(method: Any, fixed: Mapping[str, Any], key: str = "fixed", model_params: bool = True) -> None:
    """Values held fixed for a merge method (a PS space's ``fixed``, a hand recipe's ``parameters``):
    known to the method (``model_params``: its per-model ones too), finite, of the right kind, inside
    the domain of a probability; a boolean switch given as true / false."""
    for p, v in fixed.items():
        where = f"{key}.{p}"
        if p in method.global_params:
            default = method.global_params[p]
            if isinstance(default, bool):
                if not (isinstance(v, bool) or v in (0, 1)):
                    raise ValueError(f"{where}: {v!r} is not a switch; give true or false")
                continue
            if isinstance(default, (int, float)) or default is None:
                if isinstance(v, bool) or not list(numbers_in(v)):
                    raise ValueError(f"{where}: {v!r} is not a number")
        elif p in method.model_params and model_params:
            if isinstance(v, bool) or not list(numbers_in(v)):
                raise ValueError(f"{where}: {v!r} is not a number (or a gradient of numbers)")
        elif p not in method.model_params or not model_params:
            allowed = sorted(method.global_params) + (sorted(method.model_params) if model_params else [])
            raise ValueError(f"{where}: '{method.name}' has no parameter '{p}'; allowed: {', '.join(allowed)}")
        check_finite(where, v)
        check_in_domain(where, p, numbers_in(v))


def check_device(value: str) -> str:
    """A device torch can parse (``auto`` picks CUDA where there is one); torch is imported only for
    a name that is not one of the usual ones."""
    if _SIMPLE_DEVICE.match(value):
        return value
    try:
        import torch

        torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"device '{value}' is not a device torch knows; give auto, cpu, cuda, cuda:N "
                         f"or mps") from None
    return value


def check_searcher(name: str, options: Mapping[str, Any]) -> None:
    """The searcher's name and options, checked by the searcher class itself (``check_spec``: an
    unknown optimizer is named as such, with close names, before any option is looked at)."""
    from evomerge.searchers.names import searcher_class

    for k, v in options.items():
        check_finite(f"options.{k}", v)
    cls = searcher_class(name)
    cls.check_spec(name, {k: v for k, v in options.items() if k != "multi_objective"})
