"""The merge methods of mergekit 0.1.5 beyond the task-arithmetic family: pure tensor functions.

nuslerp, multislerp, karcher (spherical means), sce, ram, ramplus_tl (task-vector selections),
nearswap, arcee_fusion (base-anchored swaps) and passthrough. Each follows mergekit 0.1.5's
``merge_methods/<name>.py`` (semantics, parameter names, defaults, edge cases), written anew. They
are registered in ``methods.METHODS``; the calling convention is the same as there:
``fn(base, stack, model_params, global_params, generator)`` with validated parameters in the compute
dtype. ``stack`` holds task vectors (``x_i - base``) when the method works on deltas and a base is
given, the models' tensors otherwise (see ``MergeMethod.inputs``).

None of them draws random numbers. The one place mergekit does (arcee_fusion estimates its
quantiles from 1M entries drawn with replacement when a tensor is larger) is computed exactly here:
identical below 1M entries, the exact quantile the sample estimates above.
"""

from __future__ import annotations

import math
from typing import Any

import torch

Tensor = torch.Tensor
PerModel = dict[str, list[float]]
Globals = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Spherical interpolation and means


def nuslerp_pair(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    """Slerp from v0 to v1 at t along the last axis (rows with ``row_wise``: the first axis; the
    whole tensor with ``flatten``). Norms floored at 1e-7; pairs with 1 - cos^2 <= eps^2 lerp."""
    shape = v0.shape
    dim = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def _gram(stack: Tensor) -> Tensor:
    """Pairwise dot products of the stacked tensors (k x k, float64): one BLAS pass over the stack."""
    flat = stack.reshape(stack.shape[0], -1)
    return (flat @ flat.T).double()


def _combine(base: Tensor | None, stack: Tensor, coefs: Tensor) -> Tensor:
    """``base + sum_i coefs[i] * stack[i]`` (no base: just the sum), in the stack's dtype."""
    out = torch.tensordot(coefs.to(stack.dtype), stack, dims=1)
    return out if base is None else out.add_(base)


def nuslerp(base: Tensor | None, stack: Tensor, model_params: PerModel, global_params: Globals,
            generator: Any = None) -> Tensor:
    """NuSLERP: exactly two models, t = w_1 / (w_0 + w_1) (0.5 when the weights sum to ~0); with a
    base, slerp of the two task vectors added to the base; without, slerp of the tensors.

    Flattened (the default), slerp is c0 v0 + c1 v1 with two scalars that depend only on the norms
    and the dot product, so it is computed from the 2 x 2 Gram matrix and one weighted sum instead
    of full-size unit vectors (mergekit's arithmetic, reordered: equal up to float rounding)."""
    if stack.shape[0] != 2:
        raise ValueError(f"nuslerp merges exactly two models besides the base; got {stack.shape[0]}")
    w = model_params["weight"]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    row_wise, flatten = bool(global_params["nuslerp_row_wise"]), bool(global_params["nuslerp_flatten"])
    if not flatten:
        merged = nuslerp_pair(t, stack[0], stack[1], row_wise, flatten)
        return merged if base is None else base + merged
    g = _gram(stack)
    n0, n1 = g[0, 0].sqrt().clamp(min=1e-7), g[1, 1].sqrt().clamp(min=1e-7)
    cos = (g[0, 1] / (n0 * n1)).clamp(-1, 1)
    if float(1 - cos * cos) <= 1e-16:
        coefs = torch.tensor([1 - t, t], dtype=torch.float64)
    else:
        theta = torch.acos(cos)
        coefs = torch.stack([torch.sin((1 - t) * theta), torch.sin(t * theta)]) / torch.sin(theta)
    return _combine(base, stack, coefs)


def multislerp(base: Tensor | None, stack: Tensor, model_params: PerModel, global_params: Globals,
               generator: Any = None) -> Tensor:
    """Multi-SLERP: barycentric interpolation on the hypersphere. Unit vectors (norm + eps) are
    averaged with the weights (normalised to sum 1 by default), projected on the tangent space at
    that mean, combined there, mapped back by the exponential map and scaled by the weighted mean
    norm. One model: that model. A zero mean: lerp for two models, an error for more.

    Every step is a linear combination of the inputs with scalar coefficients that depend only on
    their Gram matrix, so the coefficients are computed in float64 from the k x k Gram matrix and
    the result is one weighted sum (mergekit builds full-size unit and tangent vectors: the same
    arithmetic, equal up to float rounding)."""
    eps = float(global_params["eps"])
    k = stack.shape[0]
    if k == 1:
        return stack[0].clone() if base is None else base + stack[0]
    weights = torch.tensor(model_params["weight"], dtype=torch.float64)
    if global_params["normalize_weights"]:
        weights = weights / weights.sum()
    g = _gram(stack)
    norms = g.diagonal().clamp(min=0).sqrt()
    a = weights / (norms + eps)  # mean_raw = sum a_i x_i
    mean_norm = float((a @ g @ a).clamp(min=0).sqrt())
    if mean_norm < eps:
        if k == 2:
            return _combine(base, stack, weights)
        raise ValueError("multislerp: the weighted sum of the inputs is zero (antipodal inputs whose weights "
                         "balance exactly); change the weights")
    mean = a / mean_norm  # coefficients of the unit mean
    dots = (g @ mean) / (norms + eps)  # u_i . mean
    tangent = a - (weights * dots).sum() * mean  # sum w_i (u_i - dots_i mean)
    tangent_norm = float((tangent @ g @ tangent).clamp(min=0).sqrt()) + eps
    coefs = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return _combine(base, stack, coefs * (norms * weights).sum())


def karcher(base: Tensor | None, stack: Tensor, model_params: PerModel, global_params: Globals,
            generator: Any = None) -> Tensor:
    """Karcher (Riemannian) mean of all inputs, equal weights, on the unit sphere: start from the
    normalised weighted mean of the unit vectors, take up to ``max_iter`` exponential-map steps
    along the mean log-map, stop when the step is below ``tol``; scale by the mean input norm.
    Inputs with norm <= tol are left out of the direction (not of the scale).

    Every iterate is a combination of the unit inputs, so the iteration runs on its k coefficients
    with the inputs' Gram matrix (float64), and the result is one weighted sum: mergekit's steps
    and stopping rules, without its k full-size vectors per step (equal up to float rounding)."""
    n = stack.shape[0]
    if n == 1:
        return stack[0].clone()
    max_iter, tol = int(global_params["max_iter"]), float(global_params["tol"])
    alphas = torch.full((n,), 1.0 / n, dtype=torch.float64)
    g = _gram(stack)
    norms = g.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(stack[0])
    v = torch.tensor(valid)
    gu = g[v][:, v] / (norms[v, None] * norms[None, v])  # Gram matrix of the valid unit vectors
    a = alphas[v] / alphas[v].sum()

    def sq(c: Tensor) -> float:  # the norm of sum_i c_i u_i
        return float((c @ gu @ c).clamp(min=0).sqrt())

    mean_norm = sq(a)
    c = torch.eye(len(valid), dtype=torch.float64)[0] if mean_norm < tol else a / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(c)
        dots = (gu @ c).clamp(-1.0, 1.0)  # mean . u_i
        for j in range(len(valid)):
            theta = math.acos(float(dots[j]))
            if theta < tol:
                continue
            step = torch.zeros_like(c)
            step[j] = 1.0
            tangent += float(a[j]) * (theta / math.sin(theta)) * (step - dots[j] * c)
        tangent_norm = sq(tangent)
        if tangent_norm < tol:
            break
        c = math.cos(tangent_norm) * c + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = sq(c)
        if unit_norm > tol:
            c = c / unit_norm
    scale = float((alphas * norms).sum())
    coefs = torch.zeros(n, dtype=torch.float64)
    coefs[v] = scale * c / norms[v]
    return _combine(None, stack, coefs)


# --------------------------------------------------------------------------------------------
# Task-vector selection: SCE, RAM, RAM+


def _majority_mask(deltas: Tensor, mask_dtype: torch.dtype) -> Tensor:
    """TIES' sign election by sum: entries whose sign equals sign(sum), a zero sum counting as +."""
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def sce_mask(deltas: Tensor, select_topk: float, mask_dtype: torch.dtype) -> Tensor:
    """Keep the ``int(nonzero * select_topk)`` entries of largest variance across the models."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=mask_dtype)
    if select_topk >= 1:
        return torch.ones_like(deltas[0], dtype=mask_dtype)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    if k == 0:
        return mask
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)  # mergekit's call: the same ties
    mask.view(-1)[indices] = 1
    return mask


def sce(base: Tensor, deltas: Tensor, model_params: PerModel, global_params: Globals,
        generator: Any = None) -> Tensor:
    """SCE (FuseChat): Select the top ``select_topk`` entries by variance across models, Calculate
    each model's weight as its mean squared task vector (normalised; equal when all ~0), Erase the
    minority signs; base + sum(w m d) / max(sum(w m), 1e-6)."""
    if deltas.shape[0] == 0:
        return base.clone()
    mask_dtype = torch.int8 if global_params["int8_mask"] else base.dtype
    tv = deltas
    if float(global_params["select_topk"]) < 1:
        tv = tv * sce_mask(tv, float(global_params["select_topk"]), mask_dtype).unsqueeze(0)
    erase = _majority_mask(tv, mask_dtype)
    weights = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = float(weights.sum())
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    weights = weights.view(-1, *([1] * (tv.dim() - 1)))
    erased = weights * erase
    return base + (tv * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


def _ram_parts(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    flat = deltas.reshape(deltas.shape[0], -1)
    nonzero = flat.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return flat, nonzero, counts, counts > 1, counts == 1


def ram(base: Tensor, deltas: Tensor, model_params: PerModel, global_params: Globals,
        generator: Any = None) -> Tensor:
    """RAM: an entry that only one model changes (|d| > epsilon) takes that change whole; an entry
    several change takes their mean; entries no model changes stay at the base."""
    if deltas.shape[0] == 0:
        return base.clone()
    flat, nonzero, counts, overlap, unique = _ram_parts(deltas, float(global_params["epsilon"]))
    z = flat * nonzero
    merged = (z * unique + z * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(base: Tensor, deltas: Tensor, model_params: PerModel, global_params: Globals,
               generator: Any = None) -> Tensor:
    """RAM+ (tensor-local): RAM, with each model's unique entries amplified by
    1 + r * clamp(shared_i / unique_i, 0, alpha), shared_i / unique_i counting that model's
    changed entries that others also change / that only it changes."""
    if deltas.shape[0] == 0:
        return base.clone()
    eps = float(global_params["epsilon"])
    flat, nonzero, counts, overlap, unique = _ram_parts(deltas, eps)
    shared_n = (nonzero & overlap).sum(dim=1)
    unique_n = (nonzero & unique).sum(dim=1)
    rho = shared_n / unique_n.clamp(min=eps)
    lam = 1 + float(global_params["r"]) * rho.clamp(min=0, max=float(global_params["alpha"]))
    z = flat * nonzero
    merged = (z * unique * lam.unsqueeze(-1) + z * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


# --------------------------------------------------------------------------------------------
# Base-anchored swaps and passthrough


def nearswap(base: Tensor, deltas: Tensor, model_params: PerModel, global_params: Globals,
             generator: Any = None) -> Tensor:
    """NearSwap: take the other model's value where it is within ``t`` of the base, interpolate
    with weight t / |a - b| (clamped to [0, 1]) elsewhere."""
    if deltas.shape[0] != 1:
        raise ValueError(f"nearswap merges the base with exactly one other model; got {deltas.shape[0]}")
    a, b = base, base + deltas[0]
    weight = (float(global_params["t"]) / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def _quantile_threshold(scores: Tensor) -> Tensor:
    """median + 1.5 IQR of ``scores``, quantiles read by index ``int(q * (n - 1))`` of the sorted
    values (mergekit's ``approximate_quantiles``, exact here at every size). Three O(n) selections
    (``kthvalue``) give the same order statistics as mergekit's full sort."""
    flat = scores.reshape(-1)
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in idx)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: Tensor, deltas: Tensor, model_params: PerModel, global_params: Globals,
                 generator: Any = None) -> Tensor:
    """Arcee Fusion: importance = |b - a| * KL(softmax(b) || softmax(a)) per row (last axis,
    softmax + 1e-8); take the other model's change where importance >= median + 1.5 IQR."""
    if deltas.shape[0] != 1:
        raise ValueError(f"arcee_fusion merges the base with exactly one other model; got {deltas.shape[0]}")
    a, b = base, base + deltas[0]
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (b - a).abs() * kl
    mask = (importance >= _quantile_threshold(importance)).to(a.dtype)
    return a + (b - a) * mask


def passthrough(base: Tensor | None, tensors: Tensor, model_params: PerModel, global_params: Globals,
                generator: Any = None) -> Tensor:
    """The one input, times its ``scale`` (1 when unset): what frankenmerges and DFS exports use."""
    if tensors.shape[0] != 1:
        raise ValueError(f"passthrough takes exactly one model per tensor; got {tensors.shape[0]} "
                         "(use slices: to take layers from several models)")
    return tensors[0] * float(model_params["scale"][0])
