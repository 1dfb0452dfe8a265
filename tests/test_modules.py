"""The package's module graph: no import cycles (imports inside functions included), and every module
imports on its own, in any order, in a fresh interpreter."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from check_imports import cycles, imports_of, modules  # noqa: E402


def test_no_module_imports_one_that_imports_it_back():
    mods = modules(ROOT)
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    assert {"evomerge.loop", "evomerge.run", "evomerge.estimators.irt", "evomerge.workers.ray_pool"} <= set(mods)
    assert "evomerge.objectives" in graph["evomerge.loop"]  # the graph is read, not empty
    assert cycles(graph) == []


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "evomerge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from evomerge.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from evomerge import a\n    return a\n")
    mods = modules(tmp_path)
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    assert cycles(graph) == [["evomerge.a", "evomerge.b"]]


def test_every_module_imports_in_any_order():
    names = sorted(modules(ROOT))
    for seed in (0, 1):
        order = names[:]
        random.Random(seed).shuffle(order)
        code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % order
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_checker_finds_a_cycle_through_a_package_init(tmp_path):
    # searchers/base.py read `from evomerge.searchers import state` while searchers/__init__ imports base
    pkg = tmp_path / "evomerge" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "evomerge" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from evomerge.sub.base import B\n")
    (pkg / "state.py").write_text("X = 1\n")
    (pkg / "base.py").write_text("from evomerge.sub import state\nB = state.X\n")
    mods = modules(tmp_path)
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    assert cycles(graph) == [["evomerge.sub", "evomerge.sub.base"]]
    (pkg / "base.py").write_text("from evomerge.sub.state import X\nB = X\n")  # the submodule itself: no cycle
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    assert cycles(graph) == []
