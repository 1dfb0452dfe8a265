"""The methods mergekit 0.1.5 added beyond the task-arithmetic family, tensor by tensor.

mergekit's own ``merge_tensors`` is the oracle (it is installed with the test extra); each method
is also checked on a law it must obey, independently of mergekit.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.methods import METHODS, get_method, merge_tensor

merge_methods = pytest.importorskip("mergekit.merge_methods")

NEW = ["nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl"]


def _models(k: int, shape=(24, 40), seed: int = 0, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(k)]


def ours(name, base, models, model_params=None, glob=None):
    """evomerge's call: task vectors when the method takes them, the tensors otherwise."""
    method = get_method(name)
    if method.takes_deltas(base is not None):
        stack = torch.stack([m - base for m in models])
    else:
        stack = torch.stack(models + ([base] if base is not None and method.inputs == "tensors" else []))
    return merge_tensor(method, base, stack, model_params or {}, glob or {})


def theirs(name, base, models, params=None):
    tensors = models + ([base] if base is not None else [])
    return merge_methods.merge_tensors(tensors, name, parameters=params or {},
                                       base_index=len(models) if base is not None else None)


def test_registry_has_every_mergekit_method_with_its_defaults():
    names = sorted(m.spec.name for m in merge_methods.registered_methods())
    assert sorted(METHODS) == names
    for name in NEW:
        spec = merge_methods.get(name).spec
        mine = get_method(name)
        for p in spec.parameters:
            scope = mine.model_params if p.scope.value != "shared" else mine.global_params
            assert p.name in scope, (name, p.name)
            default = None if p.required else p.default
            if name == "passthrough":  # unset scale means x 1
                assert default is None and scope[p.name] == 1.0
            else:
                assert scope[p.name] == default, (name, p.name)
        assert mine.needs_base == (spec.contract.base.value == "required"), name


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("glob", [{}, {"nuslerp_row_wise": True, "nuslerp_flatten": False},
                                  {"nuslerp_flatten": False}])
def test_nuslerp(with_base, glob):
    base, models = _models(2, seed=1)
    b = base if with_base else None
    for w in ([0.3, 0.7], [1.0, 1.0], [0.5, -0.5]):
        expected = theirs("nuslerp", b, models, {"weight": w, **glob})
        torch.testing.assert_close(ours("nuslerp", b, models, {"weight": w}, glob), expected)
    # t = 0 gives the first model, t = 1 the second
    torch.testing.assert_close(ours("nuslerp", b, models, {"weight": [1.0, 0.0]}, glob), models[0])
    torch.testing.assert_close(ours("nuslerp", b, models, {"weight": [0.0, 1.0]}, glob), models[1])


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_multislerp(with_base, k):
    base, models = _models(k, seed=2)
    b = base if with_base else None
    w = [0.5, 0.2, 0.9][:k]
    for glob in ({}, {"normalize_weights": False}, {"eps": 1e-4}):
        expected = theirs("multislerp", b, models, {"weight": w, **glob})
        torch.testing.assert_close(ours("multislerp", b, models, {"weight": w}, glob), expected)
    # same direction, different norms: the result keeps the direction and takes the mean norm
    same = [models[0], 3 * models[0]] if not with_base else [base + (models[0] - base), base + 3 * (models[0] - base)]
    out = ours("multislerp", b, same, {"weight": [0.5, 0.5]})
    ref = 2 * models[0] if not with_base else base + 2 * (models[0] - base)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_karcher_includes_the_base_and_matches_mergekit():
    base, models = _models(3, seed=3, scale=0.5)
    for glob in ({}, {"max_iter": 2}, {"tol": 1e-2}):
        expected = merge_methods.merge_tensors(models + [base], "karcher", parameters=glob)
        torch.testing.assert_close(ours("karcher", base, models, glob=glob), expected)
    # the mean of one direction at several norms is that direction at the mean norm
    v = models[0]
    torch.testing.assert_close(ours("karcher", None, [v, 2 * v, 3 * v]), 2 * v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("glob", [{}, {"select_topk": 0.3}, {"select_topk": 0.5, "int8_mask": True}])
def test_sce(glob):
    base, models = _models(3, seed=4)
    torch.testing.assert_close(ours("sce", base, models, glob=glob), theirs("sce", base, models, glob))
    one = ours("sce", base, models[:1])  # a single model is its own consensus: the model itself
    torch.testing.assert_close(one, models[0])


def test_ram_and_ramplus():
    base, models = _models(3, seed=5)
    # sparse task vectors, so entries changed by one model and by several both occur
    g = torch.Generator().manual_seed(9)
    models = [base + (m - base) * (torch.rand(base.shape, generator=g) < 0.4) for m in models]
    torch.testing.assert_close(ours("ram", base, models), theirs("ram", base, models))
    for glob in ({}, {"r": 0.5, "alpha": 0.6}, {"epsilon": 0.02}):
        torch.testing.assert_close(ours("ramplus_tl", base, models, glob=glob),
                                   theirs("ramplus_tl", base, models, glob))
    # RAM law: an entry only model 0 changes takes model 0's value
    only0 = ((models[0] - base).abs() > 1e-5) & ((models[1] - base).abs() <= 1e-5) & ((models[2] - base).abs() <= 1e-5)
    assert only0.any()
    torch.testing.assert_close(ours("ram", base, models)[only0], models[0][only0])


def test_nearswap_and_arcee_fusion():
    base, models = _models(1, seed=6)
    for t in (0.0, 0.01, 0.05, 10.0):
        torch.testing.assert_close(ours("nearswap", base, models, glob={"t": t}),
                                   theirs("nearswap", base, models, {"t": t}))
    torch.testing.assert_close(ours("nearswap", base, models, glob={"t": 10.0}), models[0])  # all within t: swapped
    for shape in ((24, 40), (40,)):
        base, models = _models(1, shape=shape, seed=7)
        out = ours("arcee_fusion", base, models)
        torch.testing.assert_close(out, theirs("arcee_fusion", base, models))
        changed = out != base
        assert 0 < int(changed.sum()) < out.numel()  # a selection, not all or nothing
        torch.testing.assert_close(out[changed], models[0][changed])


def test_passthrough_scale():
    x = torch.randn(5, 7)
    torch.testing.assert_close(ours("passthrough", None, [x]), x)
    torch.testing.assert_close(ours("passthrough", None, [x], {"scale": [0.25]}),
                               merge_methods.merge_tensors([x], "passthrough", parameters={"scale": 0.25}))


def test_counts_are_checked_like_mergekit():
    base, models = _models(3, seed=8)
    with pytest.raises(ValueError, match="nuslerp merges exactly 2 models"):
        ours("nuslerp", base, models, {"weight": [1, 1, 1]})
    with pytest.raises(ValueError, match="nearswap merges the base with exactly one other model"):
        ours("nearswap", base, models[:2], glob={"t": 0.1})
    with pytest.raises(ValueError, match="'t' is required"):
        ours("nearswap", base, models[:1])
    with pytest.raises(ValueError, match="passthrough merges exactly one model"):
        ours("passthrough", None, models[:2])
    with pytest.raises(ValueError, match="needs a base"):
        merge_tensor(get_method("sce"), None, torch.stack(models), {}, {})
