"""The package as a user gets it from `pip install evomerge`: a wheel built from this repository,
installed in a fresh virtual environment with no source tree on the path, runs a search by preset
name on the zoo (presets and lm-eval task files are package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import yaml

from evomerge.zoo.skills import write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_the_presets_and_runs_a_search_from_a_fresh_venv(zoo, tmp_path):
    wheels = tmp_path / "wheels"
    # built from a copy of the source tree, so that no build/ folder is left in (or reused from) it
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", ".cache", ".mypy_cache", ".ruff_cache",
                                  "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, src, ignore=skip)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("evomerge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "evomerge/presets/ps_task_arithmetic_layers.yaml" in names
    assert "evomerge/lm_eval_tasks/zoo_rev.yaml" in names and "evomerge/py.typed" in names

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies (torch, transformers, ...) from this environment, appended after the venv's own
    # site-packages; its .pth files (the editable install of the source tree) are not processed there
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "-q", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import evomerge; print(evomerge.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env)
    assert where.returncode == 0 and where.stdout.startswith(str(venv)), where.stdout + where.stderr

    objectives = []
    for skill in ("rev", "tr"):
        write_jsonl(work / f"{skill}.jsonl", zoo.items(skill, "fitness")[:24])
        objectives.append({"name": skill, "benchmark": {"type": "items", "path": f"{skill}.jsonl"}})
    exp = {"name": "wheel", "models": {"base": "zoo:base", "rev": "zoo:rev", "tr": "zoo:tr"}, "base_model": "base",
           "search_space": "ps_task_arithmetic_layers", "budget": {"evaluations": 4},
           "searcher": {"name": "cmaes", "options": {"popsize": 4}}, "fitness": {"objectives": objectives},
           "device": "cpu"}
    (work / "exp.yaml").write_text(yaml.safe_dump(exp))
    run = subprocess.run([str(venv / "bin" / "evomerge"), "search", "exp.yaml", "-o", "run"], capture_output=True,
                         text=True, cwd=work, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (work / "run" / "best" / "config.json").exists() and (work / "run" / "best.mergekit.yml").exists()
