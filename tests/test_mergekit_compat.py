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
from merge_configs import CONFIGS, with_paths
from safetensors.torch import load_file
from typer.testing import CliRunner

from evomerge.cli import app

mergekit = pytest.importorskip("mergekit")
MERGEKIT_YAML = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def mergekit_yaml(path: Path, out: Path, in_process: bool = True) -> None:
    """What `mergekit-yaml PATH OUT` does: in this process (its ``run_merge`` on the parsed YAML,
    the call the command makes, without a second interpreter's start-up) or as the command."""
    if not in_process:
        proc = subprocess.run([MERGEKIT_YAML, str(path), str(out), "--quiet", "--no-write-model-card"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    run_merge(config, str(out), MergeOptions(quiet=True, write_model_card=False))


def run_both(cfg: dict, tmp_path: Path, tag: str, in_process: bool = True
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Write ``cfg``, merge it with `evomerge merge` and mergekit, return both tensor sets."""
    path = tmp_path / f"{tag}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ours, theirs = tmp_path / f"{tag}-evomerge", tmp_path / f"{tag}-mergekit"
    result = CliRunner().invoke(app, ["merge", str(path), "-o", str(ours)])
    assert result.exit_code == 0, result.output
    mergekit_yaml(path, theirs, in_process)
    return load_dir(ours), load_dir(theirs)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], name: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_tensors_as_mergekit(zoo_models, tmp_path, name):
    assert_same(*run_both(with_paths(CONFIGS[name], zoo_models), tmp_path, name), name)


def test_same_tensors_as_the_mergekit_yaml_command(zoo_models, tmp_path):
    """Once through the real command line, so the in-process shortcut stands for it."""
    assert_same(*run_both(with_paths(CONFIGS["ties"], zoo_models), tmp_path, "ties", in_process=False), "ties")


def quantized_expert(base: Path, out: Path, seed: int, step: float = 2e-4) -> Path:
    """``base`` plus deltas in whole multiples of one step (AdamW's early updates look like this):
    in every tensor thousands of deltas tie in magnitude, so TIES' choice among ties shows."""
    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (v + torch.randint(-3, 4, v.shape, generator=g).to(v.dtype) * step).contiguous()
               for k, v in load_file(base / "model.safetensors").items()}
    from safetensors.torch import save_file
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory):
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("tied")
    base = make_tiny("llama", root / "base", seed=0, hidden_size=64, intermediate_size=160)
    return {"base": base, "a": quantized_expert(base, root / "a", 1), "b": quantized_expert(base, root / "b", 2)}


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_pruning_with_tied_deltas_keeps_what_mergekit_keeps(tied_models, tmp_path, method):
    """The defect seen on AdamW fine-tunes of SmolLM2: tied magnitudes at the top-k cut."""
    cfg = {"merge_method": method, "base_model": str(tied_models["base"]), "parameters": {"normalize": True},
           "models": [{"model": str(tied_models["a"]), "parameters": {"weight": 0.7, "density": 0.6}},
                      {"model": str(tied_models["b"]), "parameters": {"weight": 0.5, "density": 0.4}}]}
    ours, theirs = run_both(cfg, tmp_path, method)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def perturbed(base: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """A stand-in fine-tune: ``base`` plus a Gaussian task vector."""
    from safetensors.torch import save_file

    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (v + scale * torch.randn(v.shape, generator=g)).contiguous()
               for k, v in load_file(base / "model.safetensors").items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def qwen_models(tmp_path_factory):
    """A second architecture (Qwen2: attention biases, per-layer layer_types in its config)."""
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("qwen2")
    base = make_tiny("qwen2", root / "base", seed=0)
    return {"base": base, **{n: perturbed(base, root / n, i + 1) for i, n in enumerate(("rev", "sort", "tr"))}}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_tensors_as_mergekit_on_qwen2(qwen_models, tmp_path, name):
    assert_same(*run_both(with_paths(CONFIGS[name], qwen_models), tmp_path, name), f"qwen2 {name}")
