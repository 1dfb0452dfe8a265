"""`evomerge merge` and `mergekit-yaml` read the same YAML and write the same tensors.

mergekit is the reference users know; it is installed by `make test` (extra `test`) so these
comparisons really run in CI, and skipped cleanly where it is absent. Randomized methods draw
different masks in the two tools, so they are compared at density 1 (no drop), where they are
deterministic and still exercise sign election and rescaling.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from evomerge.cli import app
from merge_configs import CONFIGS, with_paths

mergekit = pytest.importorskip("mergekit")
MERGEKIT_YAML = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_tensors_as_mergekit(zoo_models, tmp_path, name):
    cfg = with_paths(CONFIGS[name], zoo_models)
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    ours, theirs = tmp_path / "evomerge", tmp_path / "mergekit"
    result = CliRunner().invoke(app, ["merge", str(path), "-o", str(ours)])
    assert result.exit_code == 0, result.output
    proc = subprocess.run([MERGEKIT_YAML, str(path), str(theirs), "--quiet", "--no-write-model-card"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_dir(ours), load_dir(theirs)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
