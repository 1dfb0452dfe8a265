"""Models that share tensors instead of copying them (DFS pool members).

A DFS candidate runs layers of several pool members; each member used to be a full model loaded
(or deep-copied) per worker. ``share_model`` builds a model of a template's class and structure
whose parameters *are* given tensors (the engine's held base, a memory-mapped checkpoint): only the
buffers (rotary tables, a few KB) are copied.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def share_model(template: M, tensors: Mapping[str, torch.Tensor]) -> M:
    """A copy of ``template`` whose parameter at each state key is ``tensors[key]`` (same storage).

    ``copy.deepcopy`` consults its memo before copying any object: entering every parameter there
    maps it to a new Parameter over the given tensor, so the deep copy copies modules, config and
    buffers but no weight. Tied parameters (one Parameter under two names) stay tied.
    """
    memo: dict[int, object] = {}
    for key, param in template.named_parameters(remove_duplicate=False):
        if id(param) in memo:
            continue
        if key not in tensors:
            raise KeyError(f"no tensor for parameter {key} of {type(template).__name__}")
        t = tensors[key]
        if t.shape != param.shape:
            raise ValueError(f"{key}: tensor of shape {tuple(t.shape)} for a parameter of shape {tuple(param.shape)}")
        memo[id(param)] = nn.Parameter(t, requires_grad=False)
    return copy.deepcopy(template, memo)
