"""Merge methods and parameter resolution.

Each method is checked against an independent reference written here (numpy / plain loops over
small tensors, float64 so that comparisons are tight), then, where mergekit is importable, against
mergekit's own functions on the same inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.merge.methods import METHODS, get_method, linear_from_deltas, merge_tensor
from evomerge.merge.params import evaluate_setting, layer_index, layer_t, resolve_parameter

TA_FAMILY = [
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear",
]


def _inputs(k: int = 3, shape: tuple[int, ...] = (6, 10), seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    deltas = torch.randn((k, *shape), generator=g, dtype=dtype)
    return base, deltas


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _merge(name, base, stack, gen=None, glob=None, **model_params):
    return merge_tensor(get_method(name), base, stack, model_params, glob or {}, gen)


# ---------------------------------------------------------------------------- references (numpy)


def np_topk_mask(d: np.ndarray, density: float) -> np.ndarray:
    flat = np.abs(d).ravel()
    k = flat.size if density >= 1 else max(1, int(density * flat.size))
    mask = np.zeros(flat.size)
    mask[np.argsort(-flat, kind="stable")[:k]] = 1
    return mask.reshape(d.shape)


def np_generalized(base, deltas, weights, masks, sign, normalize, lam=1.0):
    """Per-element loop: weight each (already sparsified) delta, elect a sign, combine."""
    out = base.copy()
    for idx in np.ndindex(base.shape):
        vals = [w * m[idx] * d[idx] for w, m, d in zip(weights, masks, deltas)]
        if sign:
            majority = 1.0 if sum(vals) >= 0 else -1.0
            agree = [np.sign(v) == majority for v in vals]
            num = sum(v for v, a in zip(vals, agree) if a)
            den = sum(w for w, a in zip(weights, agree) if a)
            den = den if den != 0 else 1.0
        else:
            num = sum(vals)
            den = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out[idx] += lam * (num / den if normalize else num)
    return out


# ---------------------------------------------------------------------------- registry and errors


def test_registry_lists_all_methods_with_mergekit_defaults():
    expected = {  # name: (normalize, rescale, randomized)
        "task_arithmetic": (False, False, False), "ties": (True, False, False),
        "dare_ties": (False, True, True), "dare_linear": (False, True, True),
        "breadcrumbs": (False, False, False), "breadcrumbs_ties": (False, False, False),
        "della": (True, True, True), "della_linear": (False, True, True),
    }
    assert set(expected) | {"linear", "slerp", "model_stock"} <= set(METHODS)
    for name, (normalize, rescale, randomized) in expected.items():
        m = get_method(name)
        assert (m.global_params["normalize"], m.global_params["rescale"], m.randomized) == expected[name]
        assert m.global_params["lambda"] == 1.0 and m.global_params["int8_mask"] is False
        assert m.model_params["weight"] is None and m.model_params["density"] == 1.0
        assert m.inputs == "deltas" and m.needs_base
    assert get_method("breadcrumbs").model_params["gamma"] == 0.01
    assert get_method("della").model_params["epsilon"] == 0.15
    linear = get_method("linear")
    assert linear.inputs == "tensors" and linear.global_params["normalize"] is True and not linear.needs_base


def test_errors_where_bad_input_enters():
    base, deltas = _inputs()
    with pytest.raises(ValueError, match="unknown merge method 'tiez'; known: .*ties"):
        get_method("tiez")
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            _merge("ties", base, deltas, weight=[1, 1, 1], density=[0.5, density, 0.5])
    with pytest.raises(ValueError, match="'weight' is required"):
        _merge("ties", base, deltas, density=[0.5] * 3)
    with pytest.raises(ValueError, match="needs a base"):
        _merge("ties", None, deltas, weight=[1, 1, 1])
    with pytest.raises(ValueError, match="shape"):
        _merge("task_arithmetic", base[:, :5], deltas, weight=[1, 1, 1])
    with pytest.raises(ValueError, match="3 models"):
        _merge("task_arithmetic", base, deltas, weight=[1, 1])
    with pytest.raises(ValueError, match="unknown global parameter.*allowed: normalize, rescale, lambda"):
        _merge("ties", base, deltas, glob={"lamda": 0.5}, weight=[1, 1, 1])
    with pytest.raises(ValueError, match="unknown per-model parameter"):
        _merge("ties", base, deltas, weight=[1, 1, 1], gamma=[0.1] * 3)
    with pytest.raises(ValueError, match="must be true or false"):
        _merge("ties", base, deltas, glob={"normalize": "yes"}, weight=[1, 1, 1])
    as_int = _merge("ties", base, deltas, glob={"normalize": 0}, weight=[1, 1, 1])  # YAML 0 / 1
    as_bool = _merge("ties", base, deltas, glob={"normalize": False}, weight=[1, 1, 1])
    torch.testing.assert_close(as_int, as_bool)
    with pytest.raises(ValueError, match="exactly one other model"):
        _merge("slerp", base, deltas, glob={"t": 0.5})
    with pytest.raises(ValueError, match="'t' is required"):
        _merge("slerp", base, deltas[:1])
    with pytest.raises(ValueError, match="at least 2 other models"):
        _merge("model_stock", base, deltas[:1])
    with pytest.raises(ValueError, match="torch.Generator"):
        _merge("dare_ties", base, deltas, weight=[1, 1, 1], density=[0.5] * 3)
    with pytest.raises(ValueError, match="epsilon"):
        _merge("della", base, deltas, _gen(0), weight=[1, 1, 1], density=[0.9] * 3, epsilon=[0.15] * 3)
    with pytest.raises(TypeError, match="floating-point"):
        _merge("linear", None, torch.ones(2, 3, dtype=torch.int64), weight=[1, 1])


def test_inputs_are_not_modified_and_dtype_is_kept():
    base, deltas = _inputs(dtype=torch.float32)
    b0, d0 = base.clone(), deltas.clone()
    for name in TA_FAMILY:
        out = _merge(name, base, deltas, _gen(1), weight=[1.0, 0.5, 0.2], density=[0.5, 0.6, 1.0])
        assert out.dtype == torch.float32 and out.shape == base.shape
    _merge("slerp", base, deltas[:1], glob={"t": 0.3})
    _merge("model_stock", base, deltas)
    assert torch.equal(base, b0) and torch.equal(deltas, d0)
    half = _merge("ties", base.bfloat16(), deltas.bfloat16(), weight=[1, 1, 1], density=[0.5] * 3)
    assert half.dtype == torch.bfloat16
    no_models = _merge("ties", base, deltas[:0], weight=[])
    assert torch.equal(no_models, base)


# ---------------------------------------------------------------------------- task arithmetic family


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_task_arithmetic(normalize, lam):
    base, deltas = _inputs()
    w = [0.7, -0.2, 1.1]
    out = _merge("task_arithmetic", base, deltas, glob={"normalize": normalize, "lambda": lam}, weight=w)
    d = deltas.numpy()
    mixed = sum(wi * di for wi, di in zip(w, d))
    expected = base.numpy() + lam * (mixed / sum(w) if normalize else mixed)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_zero_weight_sum_is_not_divided():
    base, deltas = _inputs(k=2)
    out = _merge("task_arithmetic", base, deltas, glob={"normalize": True}, weight=[1.0, -1.0])
    np.testing.assert_allclose(out.numpy(), (base + deltas[0] - deltas[1]).numpy(), atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_against_explicit_sign_election(normalize):
    base, deltas = _inputs(k=3, shape=(5, 7), seed=3)
    w, dens = [1.0, 0.6, 0.3], [0.5, 0.3, 1.0]
    out = _merge("ties", base, deltas, glob={"normalize": normalize}, weight=w, density=dens)
    d = deltas.numpy()
    masks = [np_topk_mask(di, p) for di, p in zip(d, dens)]
    expected = np_generalized(base.numpy(), d, w, masks, sign=True, normalize=normalize)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_sign_election_counts_a_zero_sum_as_positive_and_disjoint_mean():
    base = torch.zeros(3, dtype=torch.float64)
    deltas = torch.tensor([[1.0, 2.0, -1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    out = _merge("ties", base, deltas, weight=[1.0, 1.0])
    # entry 0: sum 0 -> +, only model 0 agrees: 1/1; entry 1: + wins, 2/1; entry 2: both -, -2/2
    assert out.tolist() == [1.0, 2.0, -1.0]


def test_magnitude_keeps_exactly_the_largest():
    base, deltas = _inputs(k=1, shape=(7, 11), seed=4)
    n = deltas[0].numel()
    for density in (0.3, 0.5, 0.99, 1e-4):
        pruned = _merge("ties", base, deltas, weight=[1.0], density=[density]) - base
        k = max(1, int(density * n))
        kept = pruned != 0
        assert int(kept.sum()) == k
        mags = deltas[0].abs()
        assert mags[kept].min() >= mags[~kept].max()
        assert torch.allclose(pruned[kept], deltas[0][kept])


def test_lambda_and_int8_mask():
    base, deltas = _inputs(seed=5)
    kw = dict(weight=[1.0, 0.5, 0.8], density=[0.4, 0.6, 0.5])
    full = _merge("ties", base, deltas, **kw)
    half = _merge("ties", base, deltas, glob={"lambda": 0.5}, **kw)
    torch.testing.assert_close(half - base, 0.5 * (full - base))
    int8 = _merge("ties", base, deltas, glob={"int8_mask": True}, **kw)
    assert torch.equal(int8, full)


def test_dare_keeps_density_is_reproducible_and_matches_l1():
    base, deltas = _inputs(k=1, shape=(100, 200), seed=6)
    kw = dict(weight=[1.0], density=[0.3])
    state = torch.get_rng_state()
    a = _merge("dare_linear", base, deltas, _gen(11), **kw) - base
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be used"
    b = _merge("dare_linear", base, deltas, _gen(11), **kw) - base
    c = _merge("dare_linear", base, deltas, _gen(12), **kw) - base
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(a.abs().sum(), deltas[0].abs().sum())  # mergekit's L1 rescale
    scale = deltas[0].abs().sum() / deltas[0][kept].abs().sum()
    torch.testing.assert_close(a[kept], deltas[0][kept] * scale)
    plain = _merge("dare_linear", base, deltas, _gen(11), glob={"rescale": False}, **kw) - base
    assert torch.equal(plain != 0, kept)
    torch.testing.assert_close(plain[kept], deltas[0][kept], rtol=1e-12, atol=1e-12)


def test_rescale_is_skipped_when_a_norm_is_tiny():
    base = torch.ones(4, dtype=torch.float64)
    zero = torch.zeros(1, 4, dtype=torch.float64)  # ||d||_1 = 0: nothing to rescale, no 0/0
    assert torch.equal(_merge("dare_linear", base, zero, _gen(0), weight=[1.0], density=[0.5]), base)
    small = torch.full((1, 4), 1e-9, dtype=torch.float64)  # ||d||_1 < 1e-7: masked, not rescaled
    out = _merge("dare_linear", base, small, _gen(0), weight=[1.0], density=[0.5]) - base
    torch.testing.assert_close(out[out != 0], small[0][out != 0], rtol=1e-6, atol=0)

    def drops_all(seed: int) -> bool:
        probs = torch.full((4,), 0.05, dtype=torch.float64)
        return not torch.bernoulli(probs, generator=_gen(seed)).any()

    seed = next(s for s in range(1000) if drops_all(s))  # masked norm 0: zeros, not NaN
    ones = torch.ones(1, 4, dtype=torch.float64)
    out = _merge("dare_linear", base, ones, _gen(seed), weight=[1.0], density=[0.05])
    assert torch.equal(out, base)


def test_dare_ties_is_ties_consensus_over_the_same_random_masks():
    base, deltas = _inputs(k=3, shape=(4, 6), seed=7)
    w, dens = [1.0, 0.7, 0.4], [0.5, 0.5, 1.0]
    out = _merge("dare_ties", base, deltas, _gen(3), glob={"rescale": False}, weight=w, density=dens)
    g = _gen(3)  # same draws in the same order; a density-1 model draws nothing
    masks = [torch.bernoulli(torch.full_like(d, p), generator=g).numpy() if p < 1 else np.ones(d.shape)
             for d, p in zip(deltas, dens)]
    expected = np_generalized(base.numpy(), deltas.numpy(), w, masks, sign=True, normalize=False)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def np_breadcrumbs_mask(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = d.size
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    ranks_ascending = np.argsort(np.abs(d).ravel(), kind="stable")
    mask = np.zeros(n)
    mask[ranks_ascending[bottom:bottom + keep]] = 1
    return mask.reshape(d.shape)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (1.0, 0.2)])
def test_breadcrumbs_mask(density, gamma):
    base, deltas = _inputs(k=1, shape=(10, 10), seed=8)
    pruned = (_merge("breadcrumbs", base, deltas, weight=[1.0], density=[density], gamma=[gamma]) - base)
    d = deltas[0].numpy()
    n = d.size
    kept = pruned.numpy() != 0
    if density >= 1:  # mergekit: density 1 returns the delta untouched, outliers included
        assert kept.all()
        return
    assert kept.sum() == int(density * n)
    order = np.argsort(-np.abs(d).ravel())
    n_top = min(int(gamma * n), n - int(density * n))  # fewer outliers dropped when needed
    assert not kept.ravel()[order[:n_top]].any()
    np.testing.assert_array_equal(kept, np_breadcrumbs_mask(d, density, gamma) == 1)


def test_breadcrumbs_ties_against_reference():
    base, deltas = _inputs(k=3, shape=(8, 9), seed=9)
    w, dens, gam = [1.0, 0.5, 0.9], [0.6, 0.5, 0.7], [0.05, 0.1, 0.0]
    masks = [np_breadcrumbs_mask(d, p, g) for d, p, g in zip(deltas.numpy(), dens, gam)]
    for name, sign in (("breadcrumbs_ties", True), ("breadcrumbs", False)):
        out = _merge(name, base, deltas, weight=w, density=dens, gamma=gam)
        expected = np_generalized(base.numpy(), deltas.numpy(), w, masks, sign=sign, normalize=False)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def np_della_probs(d: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    rows = d if d.ndim >= 2 else d[None]
    probs = np.empty(rows.shape)
    for r in range(rows.shape[0]):
        order = np.argsort(np.abs(rows[r]), kind="stable")
        for rank, j in enumerate(order):
            probs[r, j] = density - epsilon + 2 * epsilon * rank / (rows.shape[1] - 1)
    return probs


@pytest.mark.parametrize("shape", [(6, 9), (40,)])
def test_della_against_reimplementation(shape):
    base, deltas = _inputs(k=2, shape=shape, seed=10)
    w, dens, eps = [1.0, 0.6], [0.5, 0.4], [0.15, 0.3]
    out = _merge("della", base, deltas, _gen(5), weight=w, density=dens, epsilon=eps)
    g = _gen(5)
    masks, sparse = [], []
    for d, p, e in zip(deltas.numpy(), dens, eps):
        m = torch.bernoulli(torch.from_numpy(np_della_probs(d, p, e)), generator=g).numpy().reshape(d.shape)
        kept = d * m
        kept = kept * (np.abs(d).sum() / np.abs(kept).sum())  # della's L1 rescale (default on)
        masks.append(np.ones(d.shape))
        sparse.append(kept)
    expected = np_generalized(base.numpy(), np.stack(sparse), w, masks, sign=True, normalize=True)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_della_keep_probability_grows_with_magnitude():
    base, deltas = _inputs(k=1, shape=(1, 20000), seed=11)
    pruned = _merge("della_linear", base, deltas, _gen(0), glob={"rescale": False},
                    weight=[1.0], density=[0.5], epsilon=[0.2]) - base
    order = deltas[0, 0].abs().argsort()
    kept = (pruned[0, order] != 0).double()
    assert abs(kept[:2000].mean().item() - 0.32) < 0.03  # ranks near 0: p ~ density - eps
    assert abs(kept[-2000:].mean().item() - 0.68) < 0.03  # ranks near n: p ~ density + eps
    assert abs(kept.mean().item() - 0.5) < 0.02


# ---------------------------------------------------------------------------- linear, slerp, model stock


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_and_linear_from_deltas(normalize):
    base, deltas = _inputs(seed=12)
    tensors = torch.cat([base[None], base + deltas])
    w = [0.5, 0.2, 0.9, 0.4]
    out = _merge("linear", None, tensors, glob={"normalize": normalize}, weight=w)
    total = sum(wi * ti for wi, ti in zip(w, tensors.numpy()))
    expected = total / sum(w) if normalize else total
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    fast = linear_from_deltas(base, deltas, w[0], w[1:], normalize)
    torch.testing.assert_close(fast, out, rtol=1e-12, atol=1e-12)
    without_base = _merge("linear", None, tensors[1:], glob={"normalize": normalize}, weight=w[1:])
    torch.testing.assert_close(linear_from_deltas(base, deltas, 0.0, w[1:], normalize), without_base)


def test_linear_of_the_base_alone_needs_no_deltas():
    """A recipe that picks only the base (a source evaluated as a candidate) has an empty stack."""
    base, deltas = _inputs(seed=13)
    out = linear_from_deltas(base, deltas[:0], 1.0, [])
    torch.testing.assert_close(out, base, rtol=0, atol=0)


def test_slerp_closed_form_and_colinear_lerp():
    deg60 = math.pi / 3
    v0 = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    v1 = 3 * torch.tensor([math.cos(deg60), math.sin(deg60), 0.0], dtype=torch.float64)
    for t in (0.0, 0.25, 0.5, 1.0):
        out = _merge("slerp", v0, (v1 - v0)[None], glob={"t": t})
        c0 = math.sin((1 - t) * deg60) / math.sin(deg60)
        c1 = math.sin(t * deg60) / math.sin(deg60)
        torch.testing.assert_close(out, c0 * v0 + c1 * v1, rtol=1e-12, atol=1e-12)
    colinear = 2.5 * v0
    out = _merge("slerp", v0, (colinear - v0)[None], glob={"t": 0.3})
    torch.testing.assert_close(out, 0.7 * v0 + 0.3 * colinear)
    # a 2-D tensor is one flattened vector (not per row)
    base, deltas = _inputs(k=1, shape=(3, 4), seed=13)
    a, b = base.numpy().ravel(), (base + deltas[0]).numpy().ravel()
    theta = math.acos(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
    t = 0.4
    expected = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    out = _merge("slerp", base, deltas, glob={"t": t})
    np.testing.assert_allclose(out.numpy().ravel(), expected, rtol=1e-10)


def np_model_stock(base: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    n = len(deltas)
    flat = [d.ravel() for d in deltas]
    pairs = [(a, b) for i, a in enumerate(flat) for b in flat[i + 1:]]
    cos = [np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in pairs]
    c = float(np.mean(cos))
    t = n * c / (1 + (n - 1) * c)
    models = [base + d for d in deltas]
    return t * sum(models) / n + (1 - t) * base


def test_model_stock_formula_and_filter_wise():
    base, deltas = _inputs(k=3, shape=(5, 8), seed=14)
    deltas = deltas + 1.0  # correlated task vectors, so t is well inside (0, 1)
    out = _merge("model_stock", base, deltas)
    np.testing.assert_allclose(out.numpy(), np_model_stock(base.numpy(), deltas.numpy()), rtol=1e-10)
    rows = _merge("model_stock", base, deltas, glob={"filter_wise": True})
    expected = np.stack([np_model_stock(base.numpy()[r], deltas.numpy()[:, r]) for r in range(base.shape[0])])
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-10)
    vec = _merge("model_stock", base[0], deltas[:, 0], glob={"filter_wise": True})  # 1-D: one row
    np.testing.assert_allclose(vec.numpy(), np_model_stock(base[0].numpy(), deltas[:, 0].numpy()), rtol=1e-10)
    opposite = torch.stack([deltas[0], -deltas[0]])  # cos = -1, N = 2: 1 + (N-1)cos = 0 -> keep base
    torch.testing.assert_close(_merge("model_stock", base, opposite), base)


# ---------------------------------------------------------------------------- mergekit as the oracle


def _mergekit_merge(name, base, deltas, params):
    merge_methods = pytest.importorskip("mergekit.merge_methods")
    tensors = [base] + [base + d for d in deltas]
    return merge_methods.merge_tensors(tensors, name, parameters=params, base_index=0)


@pytest.mark.parametrize("name", TA_FAMILY)
@pytest.mark.parametrize("extra", [{}, {"normalize": True, "lambda": 0.7},
                                   {"rescale": True, "int8_mask": True}])
def test_matches_mergekit_task_arithmetic_family(name, extra):
    base, deltas = _inputs(k=3, shape=(12, 16), seed=15, dtype=torch.float32)
    stack = torch.stack([(base + d) - base for d in deltas])  # the deltas mergekit computes
    model_params = {"weight": [1.0, 0.45, -0.3], "density": [0.5, 0.35, 1.0]}
    if name.startswith("breadcrumbs"):
        model_params["gamma"] = [0.05, 0.01, 0.01]
    with torch.random.fork_rng():
        torch.manual_seed(21)  # mergekit draws from the global RNG; ours from an equally seeded generator
        expected = _mergekit_merge(name, base, deltas, {**model_params, **extra})
    out = merge_tensor(get_method(name), base, stack, model_params, extra, _gen(21))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_matches_mergekit_linear_slerp_model_stock():
    base, deltas = _inputs(k=3, shape=(12, 16), seed=16, dtype=torch.float32)
    stack = torch.stack([(base + d) - base for d in deltas])
    tensors = [base] + [base + d for d in deltas]
    merge_methods = pytest.importorskip("mergekit.merge_methods")
    for normalize in (True, False):
        w = [0.3, 0.5, 0.1, 0.6]
        ref = merge_methods.merge_tensors(tensors, "linear", parameters={"weight": w, "normalize": normalize})
        out = _merge("linear", None, torch.stack(tensors), glob={"normalize": normalize}, weight=w)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(linear_from_deltas(base, stack, w[0], w[1:], normalize), ref)
    for t in (0.0, 0.3, 1.0):
        ref = merge_methods.merge_tensors(tensors[:2], "slerp", parameters={"t": t}, base_index=0)
        torch.testing.assert_close(_merge("slerp", base, stack[:1], glob={"t": t}), ref)
    for filter_wise in (False, True):
        for b, s in ((base, stack + 0.5), (base[0], stack[:, 0] + 0.5)):
            ref = merge_methods.merge_tensors([b] + [b + d for d in s], "model_stock",
                                              parameters={"filter_wise": filter_wise}, base_index=0)
            torch.testing.assert_close(_merge("model_stock", b, s, glob={"filter_wise": filter_wise}), ref)


# ---------------------------------------------------------------------------- parameter resolution


def test_scalars_and_gradients():
    assert evaluate_setting(0.3, "model.layers.0.mlp.up_proj.weight", 0.7) == 0.3
    assert evaluate_setting(True, "x", 0.5) is True
    grad = [0.0, 1.0, 0.5]
    assert evaluate_setting(grad, "x", 0.0) == 0.0
    assert evaluate_setting(grad, "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(grad, "x", 0.5) == 1.0
    assert evaluate_setting(grad, "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting(grad, "x", 1.0) == 0.5
    assert evaluate_setting(["a", "b", "c"], "x", 0.9) == "b"  # non-numeric: index int(t * (len - 1))
    assert evaluate_setting([True, False], "x", 0.99) is True
    assert evaluate_setting([], "x", 0.5) is None
    # a gradient over a 5-layer model read at each layer's t
    ts = [layer_t(f"model.layers.{i}.self_attn.q_proj.weight", 5) for i in range(5)]
    assert ts == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [evaluate_setting([0.0, 1.0], "", t) for t in ts] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_filters_and_precedence():
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.2.self_attn.o_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.layers.2.mlp.down_proj.weight", 0.5) == 0.3
    assert evaluate_setting(setting, "model.embed_tokens.weight", 0.0) == 0.9
    star = [{"filter": "mlp", "value": 1}, {"filter": "*", "value": 2}]
    assert evaluate_setting(star, "lm_head.weight", 0) == 2
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "lm_head.weight", 0) is None
    assert evaluate_setting({"filter": "mlp", "value": 1}, "model.layers.0.mlp.x", 0) == 1
    first_wins = [{"filter": "mlp", "value": 1}, {"filter": "mlp.up", "value": 2}]
    assert evaluate_setting(first_wins, "a.mlp.up", 0) == 1
    source = {"weight": [{"filter": "mlp", "value": 0.1}]}
    slice_ = {"weight": 0.2, "density": [0.2, 0.4]}
    globals_ = {"weight": 0.3, "density": 0.9, "lambda": 0.5}
    scopes = [source, slice_, globals_]
    assert resolve_parameter("weight", scopes, "model.layers.1.mlp.up_proj.weight", 0.0) == 0.1
    assert resolve_parameter("weight", scopes, "model.layers.1.self_attn.q_proj.weight", 0.0) == 0.2
    assert resolve_parameter("density", scopes, "x", 0.5) == pytest.approx(0.3)
    assert resolve_parameter("lambda", scopes, "x", 0.5) == 0.5
    assert resolve_parameter("gamma", [None, {}], "x", 0.5, default=0.01) == 0.01
    with pytest.raises(ValueError, match="'gamma' is required"):
        resolve_parameter("gamma", scopes, "x", 0.5)


def test_layer_names_and_t():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("transformer.h.12.attn.c_attn.weight") == 12
    assert layer_index("model.decoder.layers.7.fc1.weight") == 7
    assert layer_index("gpt_neox.layers.0.attention.dense.weight") == 0
    assert layer_index("blocks.5.ln1.weight") == 5
    outside = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "transformer.wte.weight")
    for name in outside:
        assert layer_index(name) is None
        assert layer_t(name, 4) == 0.0
    assert layer_t("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    assert layer_t("model.layers.2.mlp.up_proj.weight", 3) == 1.0
    with pytest.raises(ValueError, match="layer 4"):
        layer_t("model.layers.4.mlp.up_proj.weight", 4)


def test_setting_errors():
    with pytest.raises(ValueError, match="filter entry"):
        evaluate_setting([{"filter": "mlp", "val": 1}], "x", 0)
    with pytest.raises(ValueError, match="scalar or a gradient"):
        evaluate_setting([{"filter": "mlp", "value": [{"value": 1}]}], "x", 0)
    with pytest.raises(ValueError, match="filter list holds only"):
        evaluate_setting([0.5, {"value": 1}], "x", 0)
    with pytest.raises(ValueError, match="t must be in"):
        evaluate_setting([0.0, 1.0], "x", 1.5)
    with pytest.raises(ValueError, match="parameter setting"):
        evaluate_setting(None, "x", 0)


def test_evaluate_setting_matches_mergekit():
    config = pytest.importorskip("mergekit.config")
    settings = [0.4, [0.1, 0.9, 0.3, 0.6], ["x", "y", "z"],
                [{"filter": "mlp", "value": [0.2, 0.8]}, {"filter": "attn", "value": 0.5}, {"value": 0.7}],
                [{"filter": "q_proj", "value": 1.0}]]
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    for setting in settings:
        theirs = ([config.ConditionalParameter(**s) for s in setting]
                  if isinstance(setting, list) and setting and isinstance(setting[0], dict) else setting)
        for name in names:
            for t in (0.0, 0.2, 1 / 3, 0.5, 0.9, 1.0):
                expected = config.evaluate_setting(name, theirs, t, validate=lambda v: v)
                assert evaluate_setting(setting, name, t) == expected


def test_fast_rng_masks_follow_the_law_and_the_seed():
    from evomerge.merge.methods import FastRng, bernoulli, della_magprune

    d = torch.randn(400, 500)
    a = bernoulli(d, 0.3, rescale=False, generator=FastRng(5))
    b = bernoulli(d, 0.3, rescale=False, generator=FastRng(5))
    c = bernoulli(d, 0.3, rescale=False, generator=FastRng(6))
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01  # 200k Bernoulli(0.3) draws: sd 0.001
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[a != 0], d[a != 0])  # kept entries untouched without rescale
    r = bernoulli(d, 0.3, rescale=True, generator=FastRng(5))
    torch.testing.assert_close(r.abs().sum(), d.abs().sum())
    # DELLA through the same sampler: larger magnitudes are kept more often
    m = della_magprune(d, 0.5, rescale=False, generator=FastRng(1), epsilon=0.3)
    big = d.abs() > d.abs().median()
    assert (m[big] != 0).float().mean() > (m[~big] != 0).float().mean() + 0.1


def _quantized_deltas(k: int, shape: tuple[int, ...], seed: int, step: float = 2e-4) -> torch.Tensor:
    """Deltas in whole multiples of one step, as AdamW's early updates make them: most entries tie
    with thousands of others, so which tied entries pruning keeps decides the result."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (k, *shape), generator=g).float() * step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8,), (64, 48), (300, 700)])
def test_magnitude_keeps_the_tied_entries_mergekit_keeps(dtype, shape):
    from evomerge.merge.methods import magnitude, magnitude_outliers

    sparsify = pytest.importorskip("mergekit.sparsify")
    d = _quantized_deltas(1, shape, seed=sum(shape))[0].to(dtype)
    for density in (0.05, 0.4, 0.6, 0.93):
        ours = magnitude(d, density, rescale=False)
        theirs = sparsify.magnitude(d, density)
        assert int((ours != 0).sum()) == int((theirs != 0).sum()) <= max(1, int(density * d.numel()))
        assert torch.equal(ours, theirs), f"density {density}"
        ours = magnitude_outliers(d, density, rescale=False, gamma=0.02)
        assert torch.equal(ours, sparsify.magnitude_outliers(d, density, gamma=0.02)), f"breadcrumbs {density}"


def test_ties_with_tied_deltas_matches_mergekit():
    base = torch.randn(256, 320, generator=_gen(3))
    deltas = _quantized_deltas(2, (256, 320), seed=4)
    params = {"weight": [0.7, 0.5], "density": [0.6, 0.4]}
    expected = _mergekit_merge("ties", base, list(deltas), {**params, "normalize": True})
    stack = torch.stack([(base + d) - base for d in deltas])
    out = merge_tensor(get_method("ties"), base, stack, params, {"normalize": True})
    assert torch.equal(out, expected)


def test_magnitude_keeps_exactly_k_with_ties():
    from evomerge.merge.methods import magnitude, top_k_mask

    d = torch.tensor([3.0, -1.0, 1.0, 1.0, 0.5, -1.0, 2.0, 0.0])
    out = magnitude(d, 0.5, rescale=False)  # k = 4: 3, 2 and two of the four tied 1s
    assert int((out != 0).sum()) == 4 and out[0] == 3 and out[6] == 2
    assert torch.equal(top_k_mask(d, 6), d.abs() >= 1)  # all ties kept: no choice to make


# ------------------------------------------------- the sort's choice among ties, reproduced without sorting


def _tied_keys(n: int, levels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, levels, n).astype(np.float32) * np.float32(2e-4)


def test_sort_emulation_is_verified_on_this_torch_build():
    from evomerge.merge.sort_prefix import emulation_matches_torch

    assert emulation_matches_torch()  # else every tie falls back to torch's sort (still exact, slower)


@pytest.mark.parametrize("descending", [True, False])
def test_std_sort_prefix_equals_torch_argsort_prefix(descending):
    """The entries torch's CPU argsort puts in its first k positions, on tensors built to tie (a few
    levels to many, small ranges to several partitions deep), at many cuts."""
    from evomerge.merge.sort_prefix import sorted_prefix_mask, std_sort_prefix

    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(1, 40000))
        levels = int(rng.choice([1, 2, 9, 50, 4000]))
        keys = _tied_keys(n, levels, seed=trial)
        w = torch.from_numpy(keys)
        order = torch.argsort(w, descending=descending).numpy()
        for k in {0, 1, n // 2, int(rng.integers(0, n + 1)), n}:
            got = std_sort_prefix(keys if descending else -keys, k)
            assert got is not None
            assert np.array_equal(np.sort(got), np.sort(order[:k])), (trial, n, levels, k)
            expected = np.zeros(n, dtype=bool)
            expected[order[:k]] = True
            assert np.array_equal(sorted_prefix_mask(w, k, descending).numpy(), expected)


def test_std_sort_prefix_declines_nan():
    from evomerge.merge.sort_prefix import sorted_prefix_mask, std_sort_prefix

    keys = _tied_keys(1000, 3, seed=1)
    keys[17] = np.nan
    assert std_sort_prefix(keys, 400) is None
    w = torch.from_numpy(keys)
    expected = np.zeros(1000, dtype=bool)
    expected[torch.argsort(w, descending=True)[:400].numpy()] = True
    assert np.array_equal(sorted_prefix_mask(w, 400).numpy(), expected)  # torch's sort decides


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_sparsifier_keeps_what_mergekit_keeps_on_tied_deltas(dtype):
    """Each of mergekit's four sparsifiers against ours on AdamW-like deltas (thousands of ties at
    every cut); the random ones with the same torch seed, so their masks must be equal too."""
    from evomerge.merge.methods import bernoulli, della_magprune, magnitude, magnitude_outliers

    sparsify = pytest.importorskip("mergekit.sparsify")
    for shape in [(8,), (96, 40), (400, 700)]:
        d = _quantized_deltas(1, shape, seed=len(shape) + shape[0])[0].to(dtype)
        for density in (0.15, 0.5, 0.77):
            for rescale in (False, True):
                norm = sparsify.RescaleNorm.l1 if rescale else None
                assert torch.equal(magnitude(d, density, rescale), sparsify.magnitude(d, density, norm))
                for gamma in (0.0, 0.01, 0.3):
                    assert torch.equal(magnitude_outliers(d, density, rescale, gamma=gamma),
                                       sparsify.magnitude_outliers(d, density, norm, gamma=gamma))
                if dtype != torch.float32:
                    continue  # mergekit draws in bf16 for bf16 and in float32 for float64 (evomerge: float32 / 64)
                with torch.random.fork_rng():
                    torch.manual_seed(5)
                    theirs = sparsify.della_magprune(d, density, 0.1, norm)
                    torch.manual_seed(5)
                    theirs_dare = sparsify.bernoulli(d, density, norm)
                ours = della_magprune(d, density, rescale, _gen(5), epsilon=0.1)
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
                assert torch.equal(ours != 0, theirs != 0)
                ours_dare = bernoulli(d, density, rescale, _gen(5))
                assert torch.equal(ours_dare != 0, theirs_dare != 0)


@pytest.mark.parametrize("name", [*TA_FAMILY, "sce"])
def test_every_sparsifying_method_matches_mergekit_on_tied_deltas(name):
    """Whole merges on tied deltas (three experts in multiples of one step) against mergekit's
    ``merge_tensors``: which tied entries each method keeps decides the result."""
    base = torch.randn(300, 256, generator=_gen(8))
    deltas = _quantized_deltas(3, (300, 256), seed=9)
    stack = torch.stack([(base + d) - base for d in deltas])
    if name == "sce":
        model_params, glob = {}, {"select_topk": 0.4}
    else:
        model_params = {"weight": [0.7, 0.5, 0.3], "density": [0.6, 0.4, 0.5]}
        glob = {"rescale": True} if name.startswith("della") or name.startswith("dare") else {}
        if name.startswith("breadcrumbs"):
            model_params["gamma"] = [0.02, 0.01, 0.05]
        if name.startswith("della"):
            model_params["epsilon"] = [0.1, 0.1, 0.2]
    with torch.random.fork_rng():
        torch.manual_seed(13)
        expected = _mergekit_merge(name, base, list(deltas), {**model_params, **glob})
    out = merge_tensor(get_method(name), base, stack, model_params, glob, _gen(13))
    # sums in another order round differently (1e-7); one tied entry kept instead of another moves
    # an output by a weighted step (>= 6e-5 here)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("descending", [True, False])
def test_std_sort_range_equals_torch_sort_positions(descending):
    """Breadcrumbs' two cuts in one traversal: positions [start, stop) of torch's CPU sort."""
    from evomerge.merge.sort_prefix import sorted_range_mask, std_sort_range

    rng = np.random.default_rng(11)
    for trial in range(40):
        n = int(rng.integers(1, 30000))
        keys = _tied_keys(n, int(rng.choice([1, 3, 9, 300])), seed=100 + trial)
        w = torch.from_numpy(keys)
        order = torch.sort(w, descending=descending).indices.numpy()
        for start, stop in {(0, n), (n // 3, n // 2), (5, n - 5), tuple(sorted(rng.integers(0, n + 1, 2)))}:
            got = std_sort_range(keys if descending else -keys, int(start), int(stop))
            assert got is not None
            assert np.array_equal(np.sort(got), np.sort(order[start:stop])), (trial, n, start, stop)
            expected = np.zeros(n, dtype=bool)
            expected[order[start:stop]] = True
            assert np.array_equal(sorted_range_mask(w, int(start), int(stop), descending).numpy(), expected)
