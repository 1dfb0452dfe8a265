"""Merge methods: one small pure tensor function per method, behind a registry.

Each method reproduces mergekit 0.1.5 (``merge_methods/*.py`` and ``sparsify.py``) so that a
mergekit YAML gives the same weights here. The functions never touch the global RNG, never modify
their inputs (the engine keeps task vectors resident and reuses them for every candidate) and work
in float32 (float64 when given float64), returning the input dtype.

Calling convention: ``merge_tensor(method, base, stack, model_params, global_params, generator)``
where ``stack`` holds, for ``inputs="deltas"``, the task vectors ``x_i - base`` of the non-base
models, and for ``inputs="tensors"`` (linear) the models' tensors themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from evomerge.merge import more_methods as mm
from evomerge.merge.sort_prefix import sorted_prefix_mask, sorted_range_mask

Tensor = torch.Tensor


class FastRng:
    """Seeded draws for the random sparsifiers, much faster than ``torch.bernoulli`` on a CPU.

    The CPU torch generator (Mersenne Twister) makes DARE's masks the most expensive part of a
    candidate (24 ms for 2M entries here); numpy's PCG64 fills the same mask from raw 16-bit draws
    in under 2 ms. Keep probabilities are quantized to 1/65536, far below anything a merge can feel.
    On CUDA the draws come from a torch (Philox) generator on the device. The engine makes one
    ``FastRng`` per (candidate seed, tensor), so a recipe always gives the same weights on a given
    device type. A plain ``torch.Generator`` is still accepted everywhere and then draws exactly as
    mergekit does (``torch.bernoulli``), which the tests use to compare masks with mergekit.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cpu":
            self._np = np.random.Generator(np.random.PCG64(seed))
        else:
            self._torch = torch.Generator(device=self.device).manual_seed(seed)

    def bernoulli(self, probs: Tensor | float, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A 0/1 mask shaped like ``like`` (in ``dtype``, default ``like``'s; ``torch.bool`` skips a
        conversion pass), entry j kept with probability ``probs[j]``."""
        dtype = like.dtype if dtype is None else dtype
        if self.device.type != "cpu":
            u = torch.rand(like.shape, generator=self._torch, device=self.device, dtype=torch.float32)
            return (u < probs).to(dtype)
        raw = np.frombuffer(self._np.bytes(2 * like.numel()), dtype=np.uint16).reshape(like.shape)
        if isinstance(probs, Tensor):
            u = torch.from_numpy(raw.astype(np.float32)).add_(0.5).div_(65536.0)
            return (u < probs.cpu()).to(dtype)
        return torch.from_numpy(raw < min(65536, round(probs * 65536))).to(dtype)


Gen = torch.Generator | FastRng | None


def _bernoulli_mask(probs: Tensor | float, like: Tensor, generator: Gen, dtype: torch.dtype | None = None) -> Tensor:
    """A mask shaped like ``like``: bool from a ``FastRng``; from a ``torch.Generator`` mergekit's
    ``torch.bernoulli`` over probabilities in ``dtype`` (default ``like``'s)."""
    if isinstance(generator, FastRng):
        return generator.bernoulli(probs, like, torch.bool)  # a bool mask multiplies as 0 / 1
    full = probs if isinstance(probs, Tensor) else torch.full_like(like, probs, dtype=dtype)
    return torch.bernoulli(full, generator=generator)


def _magnitudes(delta: Tensor) -> Tensor:
    """``|delta|`` flattened, in the dtype mergekit ranks it in: float32 on CPU (so float64 and
    bf16 deltas are ranked on their float32 magnitudes, ties included), the tensor's own dtype on
    an accelerator."""
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def top_k_mask(delta: Tensor, k: int) -> Tensor:
    """A flat bool mask of the ``k`` entries mergekit 0.1.5's ``magnitude`` keeps, ties included.

    mergekit keeps ``torch.argsort(|delta|, descending=True)[:k]``, on float32 magnitudes on a CPU.
    That sort is not stable: among entries tied at the k-th magnitude (common with AdamW deltas,
    which come in multiples of one step) it keeps those its ``std::sort`` (an introsort) places
    first, which is not a function of the index. On a CPU that choice is reproduced in O(n) by a
    selection that follows the sort's own partitions to the cut
    (:func:`evomerge.merge.sort_prefix.sorted_prefix_mask`, which states the rule); torch's sort
    runs only where that reproduction cannot decide, so the kept set equals mergekit's exactly.
    On CUDA the same ``torch.argsort`` runs on the device in the tensor's dtype, as in mergekit,
    so it equals mergekit run on that device with the same delta values; the choice among ties
    then follows torch's CUDA sort and may differ from the CPU's. In every case exactly ``k``
    entries are kept and every entry strictly above the k-th magnitude is among them.
    """
    w = _magnitudes(delta)
    if w.device.type == "cpu":
        return sorted_prefix_mask(w, k, descending=True)
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.argsort(w, descending=True)[:k]] = True
    return mask


PerModel = dict[str, list[float]]  # per-model parameter -> one value per row of the stack
Globals = dict[str, Any]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method. ``None`` as a parameter default means the parameter is required."""

    name: str
    fn: Callable[..., Tensor]  # fn(base, stack, model_params, global_params, generator), validated
    # what the stack holds: task vectors ("deltas"), the models' tensors ("tensors"), or task
    # vectors when a base is given and tensors when not ("optional": nuslerp, multislerp)
    inputs: Literal["deltas", "tensors", "optional"]
    needs_base: bool
    model_params: Mapping[str, float | None]
    global_params: Mapping[str, Any]
    randomized: bool
    blockwise: bool = False  # fn takes inputs in their storage dtype and computes block by block
    stack_size: tuple[int, int | None] = (0, None)  # (min, max) rows of the stack; None: no maximum

    def accepts(self, n: int) -> bool:
        """Whether ``n`` models (besides the base where it takes task vectors) are allowed."""
        lo, hi = self.stack_size
        return n >= lo and (hi is None or n <= hi)

    def count_phrase(self) -> str:
        """How many models it merges, in words, for error messages."""
        lo, hi = self.stack_size
        lo = max(lo, 1)
        num = "one" if lo == 1 else str(lo)
        want = f"exactly {num}" if lo == hi else f"at least {num}" if hi is None else f"{lo} to {hi}"
        noun = "model" if lo == 1 else "models"
        if self.inputs == "tensors":
            return f"{want} {noun}"
        return f"the base with {want} other {noun}" if self.needs_base else f"{want} {noun} besides any base"

    def takes_deltas(self, has_base: bool) -> bool:
        """Whether the stack holds task vectors (x_i - base) for a merge with / without a base."""
        return self.inputs == "deltas" or (self.inputs == "optional" and has_base)


# --------------------------------------------------------------------------------------------
# Sparsifiers (mergekit/sparsify.py). Each takes one delta and returns a new tensor, or writes the
# result into ``out`` (a tensor like ``delta``, which may be ``delta`` itself) and returns it: the
# task-arithmetic family prunes straight into its stack, with no temporary per delta.


def _rescaled(delta: Tensor, mask: Tensor, rescale: bool, eps: float = 1e-7, out: Tensor | None = None) -> Tensor:
    """Apply ``mask`` (0 / 1 or bool); with ``rescale`` match the original L1 norm, as mergekit does
    (its ``rescaled_masked_tensor`` with ``RescaleNorm.l1``), not DARE's 1/p. Like mergekit, skip
    the rescale when either norm is below 1e-7. Written with ``torch.where`` to avoid a device sync."""
    before = delta.abs().sum() if rescale else None  # before ``out`` (maybe ``delta``) is written
    masked = torch.mul(delta, mask, out=out) if out is not None else delta * mask
    if before is None:
        return masked
    after = masked.abs().sum()
    tiny = (before < eps) | (after < eps)
    return masked.mul_(torch.where(tiny, torch.ones_like(before), before / after))


def _unpruned(delta: Tensor, out: Tensor | None) -> Tensor:
    return delta if out is None or out.data_ptr() == delta.data_ptr() else out.copy_(delta)


def magnitude(delta: Tensor, density: float, rescale: bool, generator: Gen = None,
              out: Tensor | None = None) -> Tensor:
    """TIES pruning: keep the ``max(1, int(density * numel))`` largest ``|delta|`` of the tensor,
    choosing among tied magnitudes exactly as mergekit does (see ``top_k_mask``)."""
    if density >= 1 or delta.numel() == 0:
        return _unpruned(delta, out)
    k = max(1, int(density * delta.numel()))
    return _rescaled(delta, top_k_mask(delta, k).view_as(delta), rescale, out=out)


def bernoulli(delta: Tensor, density: float, rescale: bool, generator: Gen = None,
              out: Tensor | None = None) -> Tensor:
    """DARE: keep each entry with probability ``density`` (with a ``torch.Generator`` one
    ``torch.bernoulli`` over a full probability tensor, as mergekit draws it, so a seeded generator
    reproduces its CPU masks; with a ``FastRng`` the same law, drawn faster)."""
    if density >= 1:
        return _unpruned(delta, out)
    return _rescaled(delta, _bernoulli_mask(density, delta, generator), rescale, out=out)


def magnitude_outliers(
    delta: Tensor, density: float, rescale: bool, generator: Gen = None, gamma: float = 0.01,
    out: Tensor | None = None,
) -> Tensor:
    """Breadcrumbs: drop the top ``int(gamma * n)`` magnitudes (outliers) and enough of the smallest
    to keep exactly ``int(density * n)`` entries (no max(1, .) here). When ``density + gamma`` > 1
    mergekit drops fewer outliers rather than fewer small ones; at density 1 nothing is dropped."""
    if density >= 1:
        return _unpruned(delta, out)
    return _rescaled(delta, _outliers_mask(delta, density, gamma).view_as(delta), rescale, out=out)


def _outliers_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs' flat mask (density < 1): positions [bottom, bottom + keep) of mergekit's ascending
    sort of the float32 magnitudes (on a CPU without sorting, ties as that sort places them)."""
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    w = _magnitudes(delta)
    if w.device.type == "cpu":
        return sorted_range_mask(w, bottom, bottom + keep, descending=False)
    order = torch.argsort(w)  # mergekit's (unstable) sort: the same ties kept
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[bottom : bottom + keep]] = 1
    return mask


def della_magprune(
    delta: Tensor, density: float, rescale: bool, generator: Gen = None, epsilon: float = 0.15,
    out: Tensor | None = None,
) -> Tensor:
    """DELLA: per row (dim 1; a 1-D tensor is one row) keep entry j with probability
    ``density - eps + 2 eps * rank_j / (n - 1)``, rank 0 the smallest ``|delta|``; the L1 rescale is
    over the whole tensor. A row of one entry gets ``density`` (mergekit divides 0 by 0 there)."""
    if density >= 1:
        return _unpruned(delta, out)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1)  # mergekit's sort, so tied magnitudes get its ranks
    # mergekit ranks by argsort(order): the inverse permutation, here by a scatter instead of a second sort
    positions = torch.arange(n, device=rows.device).view(1, n, *([1] * (rows.dim() - 2))).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(rows.dtype)
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = _bernoulli_mask(probs, rows, generator)
    return _rescaled(rows, mask, rescale, out=None if out is None else out.view_as(rows)).reshape(delta.shape)


Sparsifier = Callable[..., Tensor]

CHUNK = 1 << 20  # elements per block: a 4 MB float32 accumulator stays in cache


def weighted_sum(base: Tensor | None, base_coef: float, stack: Tensor, coefs: Sequence[float],
                 compute: torch.dtype, out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``base_coef * base + sum_i coefs[i] * stack[i]``, accumulated in ``compute`` block by block.

    The plain sums (linear, task arithmetic, the sum-consensus methods) are memory-bound. Upcasting
    whole bf16 stacks and combining them op by op makes several full passes over memory; one
    cache-sized float32 accumulator per block reads every input once and writes the output once:
    measured 1.2 GB/s whole-tensor vs 15-19 GB/s in 1M-element blocks, bf16, 2 cores. When the
    output is in the compute dtype it is its own accumulator, and the base's copy is fused with the
    first term (``torch.add(out=, alpha=)``, the kernel ``add_`` runs): 2 fewer passes per block, the
    same bits.
    """
    shape = stack.shape[1:]
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=stack.device)
    flat_out = out.view(-1)
    flat_stack = stack.reshape(stack.shape[0], out.numel())  # -1 is ambiguous with no deltas
    flat_base = base.reshape(-1) if base is not None else None
    terms = [(i, float(c)) for i, c in enumerate(coefs) if float(c) != 0.0]
    n = flat_out.numel()
    # accumulate in the output itself when it is in the compute dtype (no accumulator, no final copy),
    # and fuse the base's copy with the first term when no conversion is involved
    direct = out.dtype == compute
    fuse = (flat_base is not None and base_coef == 1.0 and bool(terms) and flat_base.dtype == compute
            and stack.dtype == compute)
    acc_buf = None if direct else torch.empty(min(n, CHUNK), dtype=compute, device=stack.device)
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        acc = flat_out[start:end] if acc_buf is None else acc_buf[: end - start]
        rest = terms
        if fuse:
            assert flat_base is not None
            i, c = terms[0]
            torch.add(flat_base[start:end], flat_stack[i, start:end], alpha=c, out=acc)  # the same kernel as add_
            rest = terms[1:]
        elif flat_base is not None and base_coef != 0.0:
            acc.copy_(flat_base[start:end])
            if base_coef != 1.0:
                acc.mul_(base_coef)
        else:
            acc.zero_()
        for i, c in rest:
            acc.add_(flat_stack[i, start:end], alpha=c)
        if acc_buf is not None:
            flat_out[start:end].copy_(acc)
    return out


# --------------------------------------------------------------------------------------------
# Method functions. They receive validated inputs in the compute dtype.


def _task_arithmetic_family(
    base: Tensor,
    deltas: Tensor,
    model_params: PerModel,
    global_params: Globals,
    generator: Gen,
    *,
    sparsifier: Sparsifier | None,
    sign_consensus: bool,
    out: Tensor | None = None,
) -> Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge: sparsify each delta, weight it, combine (plain sum,
    or TIES sign election + disjoint sum), divide by the weight sum only when ``normalize``, scale
    by ``lambda``, add to the base. Plain task arithmetic is one tensordot, no per-model copies."""
    k = deltas.shape[0]
    compute = _compute_dtype(base, deltas)
    if k == 0:
        return weighted_sum(base, 1.0, deltas, [], compute, base.dtype, out)
    blocks: Callable[[int, int], Tensor] | None = None
    if sparsifier in (magnitude, bernoulli, magnitude_outliers) and deltas.device.type == "cpu":
        blocks = _pruned_blocks(deltas, model_params, bool(global_params["rescale"]), generator, sparsifier, compute)
    elif sparsifier is not None:
        pruned = torch.empty(deltas.shape, dtype=compute, device=deltas.device)
        extra = [p for p in ("gamma", "epsilon") if p in model_params]
        for i in range(k):
            kwargs = {p: model_params[p][i] for p in extra}
            density = model_params["density"][i]
            slot = pruned[i]
            delta = slot.copy_(deltas[i]) if deltas.dtype != compute else deltas[i]  # upcast in place
            sparsifier(delta, density, global_params["rescale"], generator, out=slot, **kwargs)
        deltas = pruned
    weights = [float(w) for w in model_params["weight"]]
    lam = float(global_params["lambda"])
    if not sign_consensus:
        total = sum(weights)
        divisor = 1.0 if abs(total) < 1e-8 or not global_params["normalize"] else total
        coefs = [w * lam / divisor for w in weights]
        if blocks is not None:
            return _blockwise_sum(base, blocks, coefs, compute, out)
        return weighted_sum(base, 1.0, deltas, coefs, compute, base.dtype, out)
    return _sign_consensus(base, deltas, weights, bool(global_params["normalize"]), lam,
                           bool(global_params["int8_mask"]), compute, out, blocks)


def _pruned_blocks(deltas: Tensor, model_params: PerModel, rescale: bool, generator: Gen,
                   sparsifier: Sparsifier, compute: torch.dtype) -> Callable[[int, int], Tensor]:
    """The sparsified task vectors, produced block by block for the combination that follows.

    Per delta, what needs the whole tensor is computed once: its keep mask (bool: the top-k of
    ``magnitude``, breadcrumbs' band, DARE's draw) and, with ``rescale``, its L1 factor
    ``sum|d| / sum|d m|`` (summed block by block; mergekit's skip below 1e-7 kept). A block is then
    ``d * m * factor`` in the compute dtype, in one reused (k, CHUNK) buffer: no float32 copy of the
    stack, no full-size temporary per delta. The same products as the whole-tensor sparsifiers; the
    L1 sums differ from a whole-tensor sum only in summation order."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    masks: list[Tensor | None] = []
    factors: list[Tensor | None] = []
    buf = torch.empty((k, min(n, CHUNK)), dtype=compute, device=deltas.device)
    # a mask block as 0. / 1. in a reused buffer: multiplying by a bool block would convert it into
    # a fresh float tensor every time (type promotion); the product is the same
    mbuf = torch.empty(min(n, CHUNK), dtype=compute, device=deltas.device)
    for i in range(k):
        density = model_params["density"][i]
        if density >= 1 or n == 0:
            masks.append(None)
            factors.append(None)
            continue
        if sparsifier is magnitude:
            mask = top_k_mask(deltas[i], max(1, int(density * n)))
        elif sparsifier is magnitude_outliers:
            mask = _outliers_mask(deltas[i], density, model_params["gamma"][i])
        else:
            mask = _bernoulli_mask(density, deltas[i], generator, compute).reshape(-1)
        masks.append(mask)
        if not rescale:
            factors.append(None)
            continue
        before = torch.zeros((), dtype=compute, device=deltas.device)
        after = torch.zeros((), dtype=compute, device=deltas.device)
        scratch = buf[0]
        for start in range(0, n, CHUNK):
            end = min(n, start + CHUNK)
            b = scratch[: end - start].copy_(flat[i, start:end]).abs_()
            before += b.sum()
            after += b.mul_(mbuf[: end - start].copy_(mask[start:end])).sum()
        tiny = (before < 1e-7) | (after < 1e-7)
        factors.append(torch.where(tiny, torch.ones_like(before), before / after))

    def block(start: int, end: int) -> Tensor:
        out = buf[:, : end - start]
        out.copy_(flat[:, start:end])
        for i in range(k):
            mask, factor = masks[i], factors[i]
            if mask is not None:
                out[i].mul_(mbuf[: end - start].copy_(mask[start:end]))
            if factor is not None:
                out[i].mul_(factor)
        return out

    return block


def _blockwise_sum(base: Tensor, blocks: Callable[[int, int], Tensor], coefs: list[float], compute: torch.dtype,
                   out: Tensor | None) -> Tensor:
    """``base + sum_i coefs[i] * block_i``, block by block, as :func:`weighted_sum` does."""
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    n = flat_out.numel()
    acc_buf = torch.empty(min(n, CHUNK), dtype=compute, device=base.device)
    terms = [(i, float(c)) for i, c in enumerate(coefs) if float(c) != 0.0]
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        blk = blocks(start, end)
        acc = acc_buf[: end - start].copy_(flat_base[start:end])
        for i, c in terms:
            acc.add_(blk[i], alpha=c)
        flat_out[start:end].copy_(acc)
    return out


def _sign_consensus(base: Tensor, deltas: Tensor, weights: list[float], normalize: bool, lam: float,
                    int8_mask: bool, compute: torch.dtype, out: Tensor | None = None,
                    blocks: Callable[[int, int], Tensor] | None = None) -> Tensor:
    """TIES' combination, block by block (each output entry depends only on its own column, so
    blocks give exactly the whole-tensor result, with the temporaries kept in cache).

    Majority sign = sign of the weighted sum, zero counting as +; an entry survives when its
    weighted sign equals it (zeros never do); the disjoint mean divides by the surviving weights
    only when ``normalize`` (a zero divisor becomes 1). int8_mask only changes the sign dtype."""
    k = deltas.shape[0]
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat = deltas.reshape(k, -1)
    w = torch.tensor(weights, dtype=compute, device=deltas.device).view(k, 1)
    sign_dtype = torch.int8 if int8_mask else compute
    for start in range(0, flat_out.numel(), CHUNK):
        end = min(flat_out.numel(), start + CHUNK)
        weighted = (flat[:, start:end].to(compute) if blocks is None else blocks(start, end)) * w
        majority = (weighted.sum(dim=0) >= 0).to(sign_dtype) * 2 - 1
        mask = weighted.sign().to(sign_dtype) == majority
        mixed = weighted.mul_(mask).sum(dim=0)
        if normalize:
            divisor = (w * mask).sum(dim=0)
            mixed.div_(divisor.masked_fill_(divisor == 0, 1))
        if lam != 1:
            mixed.mul_(lam)
        flat_out[start:end].copy_(mixed.add_(flat_base[start:end]))
    return out


def _linear(
    base: Tensor | None, tensors: Tensor, model_params: PerModel, global_params: Globals, generator: Gen,
    out: Tensor | None = None,
) -> Tensor:
    """sum(w_i x_i), divided by sum(w_i) when ``normalize``. mergekit does not guard a zero sum."""
    weights = [float(w) for w in model_params["weight"]]
    total = sum(weights) if global_params["normalize"] else 1.0
    coefs = [w / total if total != 0 else w * math.inf for w in weights]
    return weighted_sum(None, 0.0, tensors, coefs, _compute_dtype(tensors), tensors.dtype, out)


def _slerp(
    base: Tensor, deltas: Tensor, model_params: PerModel, global_params: Globals, generator: Gen
) -> Tensor:
    """mergekit's slerp over the whole flattened tensor: the angle comes from copies normalised
    with norms floored at 1e-8 (a norm <= eps is replaced by 1); |cos| > 0.9995 falls back to lerp;
    the coefficients multiply the unnormalised tensors. t = 0 gives the base."""
    if deltas.shape[0] != 1:
        raise ValueError(f"slerp merges the base with exactly one other model; got {deltas.shape[0]} others")
    eps, threshold = 1e-8, 0.9995
    v0 = base.reshape(-1)
    v1 = (base + deltas[0]).reshape(-1)
    t = torch.tensor(global_params["t"], dtype=v0.dtype, device=v0.device)
    if v0.numel() == 0:
        return base.clone()
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    n0 = torch.where(n0 > eps, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > eps, n1, torch.ones_like(n1))
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1)
    linear = dot.abs() > threshold
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (c0 * v0 + c1 * v1).reshape(base.shape)


def _model_stock(
    base: Tensor, deltas: Tensor, model_params: PerModel, global_params: Globals, generator: Gen
) -> Tensor:
    """Model Stock: t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors
    (norm product floored at 1e-6, each cosine clamped to [-1, 1]); result t * mean(models) +
    (1 - t) * base = base + t * mean(deltas). mergekit requires N >= 2 (min_inputs=3 with the base),
    keeps the base (t = 0) where |1 + (N - 1) cos| < 1e-6, and with ``filter_wise`` computes t per
    row (last axis), a 1-D tensor being one row."""
    n = deltas.shape[0]
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base; got {n}")
    if global_params["filter_wise"]:
        d = deltas.reshape(n, 1, -1) if base.dim() <= 1 else deltas
    else:
        d = deltas.reshape(n, -1)
    norms = torch.linalg.vector_norm(d, dim=-1)
    cosines = [
        ((d[i] * d[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(cos), denominator)
    t = torch.where(singular, torch.zeros_like(cos), n * cos / safe)
    return base + (t * (d.sum(dim=0) / n)).reshape(base.shape)


# --------------------------------------------------------------------------------------------
# Registry


def _ta_method(
    name: str, sparsifier: Sparsifier | None, sign: bool, normalize: bool, rescale: bool, **extra: float
) -> MergeMethod:
    return MergeMethod(
        name=name,
        fn=partial(_task_arithmetic_family, sparsifier=sparsifier, sign_consensus=sign),
        inputs="deltas",
        needs_base=True,
        model_params=MappingProxyType({"weight": None, "density": 1.0, **extra}),
        global_params=MappingProxyType(
            {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
        ),
        randomized=sparsifier in (bernoulli, della_magprune),
        blockwise=True,
    )


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", _linear, "tensors", False, MappingProxyType({"weight": None}),
                    MappingProxyType({"normalize": True}), False, blockwise=True, stack_size=(1, None)),
        _ta_method("task_arithmetic", None, sign=False, normalize=False, rescale=False),
        _ta_method("ties", magnitude, sign=True, normalize=True, rescale=False),
        _ta_method("dare_ties", bernoulli, sign=True, normalize=False, rescale=True),
        _ta_method("dare_linear", bernoulli, sign=False, normalize=False, rescale=True),
        _ta_method("breadcrumbs", magnitude_outliers, sign=False, normalize=False, rescale=False, gamma=0.01),
        _ta_method("breadcrumbs_ties", magnitude_outliers, sign=True, normalize=False, rescale=False,
                   gamma=0.01),
        _ta_method("della", della_magprune, sign=True, normalize=True, rescale=True, epsilon=0.15),
        _ta_method("della_linear", della_magprune, sign=False, normalize=False, rescale=True, epsilon=0.15),
        MergeMethod("slerp", _slerp, "deltas", True, MappingProxyType({}),
                    MappingProxyType({"t": None}), False, stack_size=(1, 1)),
        MergeMethod("model_stock", _model_stock, "deltas", True, MappingProxyType({}),
                    MappingProxyType({"filter_wise": False}), False, stack_size=(2, None)),
        # mergekit 0.1.5's newer methods (evomerge/merge/more_methods.py)
        MergeMethod("nuslerp", mm.nuslerp, "optional", False, MappingProxyType({"weight": None}),
                    MappingProxyType({"nuslerp_row_wise": False, "nuslerp_flatten": True}), False,
                    stack_size=(2, 2)),
        MergeMethod("multislerp", mm.multislerp, "optional", False, MappingProxyType({"weight": None}),
                    MappingProxyType({"normalize_weights": True, "eps": 1e-8}), False, stack_size=(1, None)),
        MergeMethod("karcher", mm.karcher, "tensors", False, MappingProxyType({}),
                    MappingProxyType({"max_iter": 10, "tol": 1e-5}), False, stack_size=(1, None)),
        MergeMethod("sce", mm.sce, "deltas", True, MappingProxyType({}),
                    MappingProxyType({"int8_mask": False, "select_topk": 1.0}), False),
        MergeMethod("ram", mm.ram, "deltas", True, MappingProxyType({}),
                    MappingProxyType({"epsilon": 1e-5}), False),
        MergeMethod("ramplus_tl", mm.ramplus_tl, "deltas", True, MappingProxyType({}),
                    MappingProxyType({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}), False),
        MergeMethod("nearswap", mm.nearswap, "deltas", True, MappingProxyType({}),
                    MappingProxyType({"t": None}), False, stack_size=(1, 1)),
        MergeMethod("arcee_fusion", mm.arcee_fusion, "deltas", True, MappingProxyType({}),
                    MappingProxyType({}), False, stack_size=(1, 1)),
        MergeMethod("passthrough", mm.passthrough, "tensors", False, MappingProxyType({"scale": 1.0}),
                    MappingProxyType({}), False, stack_size=(1, 1)),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


# --------------------------------------------------------------------------------------------
# Validation and the public entry points


def _check_model_params(method: MergeMethod, params: Mapping[str, Sequence[float]], k: int) -> PerModel:
    unknown = set(params) - set(method.model_params)
    if unknown:
        allowed = ", ".join(method.model_params) or "none"
        raise ValueError(
            f"{method.name}: unknown per-model parameter(s) {sorted(unknown)}; allowed: {allowed}"
        )
    out: dict[str, list[float]] = {}
    for name, default in method.model_params.items():
        if name not in params:
            if default is None:
                raise ValueError(
                    f"{method.name}: per-model parameter {name!r} is required (one value per model)"
                )
            out[name] = [float(default)] * k
            continue
        values = [float(v) for v in params[name]]
        if len(values) != k:
            raise ValueError(f"{method.name}: {name!r} has {len(values)} values for {k} models")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{method.name}: {name!r} must be finite; got {values}")
        out[name] = values
    if "density" in out and not all(0 < d <= 1 for d in out["density"]):
        raise ValueError(f"{method.name}: density must be in (0, 1]; got {out['density']}")
    if "gamma" in out and not all(0 <= g <= 1 for g in out["gamma"]):
        raise ValueError(f"{method.name}: gamma must be in [0, 1]; got {out['gamma']}")
    if "epsilon" in out:
        for d, e in zip(out["density"], out["epsilon"]):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise ValueError(
                    f"{method.name}: density +/- epsilon must lie in (0, 1) (mergekit's rule); "
                    f"got density {d}, epsilon {e}"
                )
    return out


def _check_global_params(method: MergeMethod, params: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(method.global_params)
    if unknown:
        allowed = ", ".join(method.global_params) or "none"
        raise ValueError(f"{method.name}: unknown global parameter(s) {sorted(unknown)}; allowed: {allowed}")
    out = dict(method.global_params)
    out.update(params)
    for name, default in method.global_params.items():
        value = out[name]
        if value is None:
            raise ValueError(f"{method.name}: global parameter {name!r} is required")
        if isinstance(default, bool):
            if not isinstance(value, (bool, int)) or value not in (0, 1):  # YAML may say 0 / 1
                raise ValueError(f"{method.name}: {name!r} must be true or false; got {value!r}")
            out[name] = bool(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{method.name}: {name!r} must be a number; got {value!r}")
    return out


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    for x in tensors:
        if x is not None and not x.is_floating_point():
            raise TypeError(f"merging needs floating-point tensors; got {x.dtype}")
    wide = any(x is not None and x.dtype == torch.float64 for x in tensors)
    return torch.float64 if wide else torch.float32


def merge_tensor(
    method: MergeMethod,
    base: Tensor | None,
    stack: Tensor,
    model_params: Mapping[str, Sequence[float]],
    global_params: Mapping[str, Any],
    generator: Gen = None,
    out: Tensor | None = None,
) -> Tensor:
    """Merge one tensor. ``stack`` is (k, *shape); ``model_params[name]`` holds k values aligned
    with it. Returns the base's dtype (the stack's when there is no base). With ``out`` (a tensor of
    that shape and dtype, e.g. the model's own parameter) the result is written there and returned:
    the engine merges straight into its resident model, with no temporary and no extra copy."""
    if method.needs_base and base is None:
        raise ValueError(f"{method.name} needs a base model; set base_model")
    if stack.dim() < 1:
        raise ValueError("stack must have a leading model axis: shape (k, *tensor_shape)")
    k = stack.shape[0]
    if base is not None and base.shape != stack.shape[1:]:
        raise ValueError(
            f"{method.name}: base has shape {tuple(base.shape)} but the stack holds {tuple(stack.shape[1:])}"
        )
    if not method.accepts(k):
        raise ValueError(f"{method.name} merges {method.count_phrase()}; got {k}")
    mp = _check_model_params(method, model_params, k)
    gp = _check_global_params(method, global_params)
    if method.randomized:
        if generator is None:
            raise ValueError(
                f"{method.name} is randomized: pass a FastRng (or torch.Generator) seeded per candidate and tensor"
            )
        if generator.device.type != stack.device.type:
            raise ValueError(f"generator is on {generator.device} but the tensors are on {stack.device}")
    dtype = _compute_dtype(base, stack)
    out_dtype = base.dtype if base is not None else stack.dtype
    if out is not None and (out.shape != stack.shape[1:] or out.dtype != out_dtype):
        raise ValueError(f"out has shape {tuple(out.shape)} / {out.dtype}, "
                         f"the result {tuple(stack.shape[1:])} / {out_dtype}")
    if method.blockwise:  # upcasts block by block: no whole float32 copy of a bf16 stack
        return method.fn(base, stack, mp, gp, generator, out=out)
    base_c = base.to(dtype) if base is not None else None
    result = method.fn(base_c, stack.to(dtype), mp, gp, generator).to(out_dtype)
    return out.copy_(result) if out is not None else result


def linear_from_deltas(
    base: Tensor, deltas: Tensor, base_weight: float, weights: Sequence[float], normalize: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """``linear`` over the tensors [base] + [base + d_i] with weights [base_weight] + weights,
    computed from resident deltas: base + sum(w d) / W when normalising (W = total weight), else
    W * base + sum(w d). ``base_weight = 0`` means the base is not one of the merged models."""
    if base.shape != deltas.shape[1:]:
        raise ValueError(
            f"linear: base has shape {tuple(base.shape)} but the deltas hold {tuple(deltas.shape[1:])}"
        )
    if len(weights) != deltas.shape[0]:
        raise ValueError(f"linear: {len(weights)} weights for {deltas.shape[0]} deltas")
    w = [float(x) for x in weights]
    total = sum(w) + float(base_weight)
    if normalize:
        return weighted_sum(base, 1.0, deltas, [x / total for x in w], _compute_dtype(base, deltas), base.dtype, out)
    return weighted_sum(base, total, deltas, w, _compute_dtype(base, deltas), base.dtype, out)
