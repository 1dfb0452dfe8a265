"""Damaged inputs and outputs that cannot be written: each refused in one line that names the file,
before any weight is read where the input allows it; outputs written whole or not at all.

Real files throughout: copies of the tiny zoo's models, damaged as a bad download or a full disk
leaves them; no mocks of the file system. ``EVOMERGE_WEIGHTS_LOG`` (see
``evomerge.checkpoint.note_weights_loading``) tells a refusal before the weights from one after.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import evomerge.checkpoint as checkpoint
from evomerge.checkpoint import CheckpointError, TensorReader
from evomerge.cli import app
from evomerge.outdir import OutputError, atomic_dir, check_space, io_errors
from evomerge.precheck import check_model_folder
from evomerge.zoo.skills import write_jsonl


@pytest.fixture
def weights_log(tmp_path, monkeypatch) -> Path:
    log = tmp_path / "weights.log"
    monkeypatch.setenv(checkpoint.WEIGHTS_LOG_ENV, str(log))
    monkeypatch.setattr(checkpoint, "_weights_noted", False)
    return log


def _copy(zoo_models, name: str, dst: Path) -> Path:
    return Path(shutil.copytree(zoo_models[name], dst / name))


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def _experiment(tmp: Path, zoo, models: dict[str, str]) -> Path:
    write_jsonl(tmp / "rev.jsonl", zoo.items("rev", "fitness")[:8])
    exp = {"name": "faults", "models": models, "base_model": "base", "search_space": "ps_task_arithmetic_layers",
           "budget": {"evaluations": 2}, "searcher": {"name": "cmaes", "options": {"popsize": 2}},
           "fitness": {"objectives": [{"name": "rev", "benchmark": {"type": "items", "path": "rev.jsonl"}}]},
           "device": "cpu", "references": []}
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
    return tmp / "exp.yaml"


# -- pre-checks of model folders ---------------------------------------------------------------------
def test_truncated_safetensors_is_named(zoo_models, tmp_path):
    rev = _copy(zoo_models, "rev", tmp_path)
    data = (rev / "model.safetensors").read_bytes()
    (rev / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or damaged safetensors file"):
        check_model_folder(rev)
    (rev / "model.safetensors").write_bytes(data[:5])  # not even the header's length
    with pytest.raises(CheckpointError, match="header is incomplete"):
        check_model_folder(rev)


def test_config_json_that_is_not_json_is_named(zoo_models, tmp_path):
    rev = _copy(zoo_models, "rev", tmp_path)
    (rev / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"rev/config\.json: config\.json is not valid JSON \(line 1"):
        check_model_folder(rev)


def test_base_without_tokenizer_says_the_file_is_missing(zoo_models, tmp_path):
    base = _copy(zoo_models, "base", tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink()
    check_model_folder(base)  # as a source it needs no tokenizer
    with pytest.raises(CheckpointError, match="has no tokenizer") as err:
        check_model_folder(base, tokenizer=True)
    assert "sentencepiece" not in str(err.value)


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", "rev/model.safetensors: truncated or damaged"),
    ("config", "rev/config.json: config.json is not valid JSON"),
])
def test_search_refuses_a_damaged_model_before_any_weight(zoo, zoo_models, tmp_path, monkeypatch, weights_log,
                                                          damage, fragment):
    monkeypatch.chdir(tmp_path)
    rev = _copy(zoo_models, "rev", tmp_path)
    if damage == "truncate":
        data = (rev / "model.safetensors").read_bytes()
        (rev / "model.safetensors").write_bytes(data[:-100])
    else:
        (rev / "config.json").write_text("not json")
    exp = _experiment(tmp_path, zoo, {"base": "zoo:base", "rev": str(rev)})
    text = _one_line(CliRunner().invoke(app, ["search", str(exp), "-o", "run"]))
    assert "models.rev:" in text and fragment in text
    assert not weights_log.exists()


def test_search_refuses_a_base_without_tokenizer_before_any_weight(zoo, zoo_models, tmp_path, monkeypatch,
                                                                   weights_log):
    monkeypatch.chdir(tmp_path)
    base = _copy(zoo_models, "base", tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink()
    exp = _experiment(tmp_path, zoo, {"base": str(base), "rev": "zoo:rev"})
    text = _one_line(CliRunner().invoke(app, ["search", str(exp), "-o", "run"]))
    assert "models.base:" in text and "has no tokenizer" in text and "sentencepiece" not in text
    assert not weights_log.exists()


# -- evomerge merge: atomic, no stale files ----------------------------------------------------------
def _merge_config(tmp: Path, zoo_models) -> Path:
    cfg = {"merge_method": "task_arithmetic", "base_model": str(zoo_models["base"]),
           "models": [{"model": str(zoo_models[m]), "parameters": {"weight": 0.5}} for m in ("rev", "sort")]}
    (tmp / "merge.yml").write_text(yaml.safe_dump(cfg))
    return tmp / "merge.yml"


def _stale_sharded(out: Path, zoo_models) -> None:
    """An older sharded checkpoint: two shards and an index; the second shard holds a wrong lm_head."""
    from safetensors.torch import save_file

    out.mkdir()
    head = TensorReader(zoo_models["base"]).get("lm_head.weight")
    save_file({"model.norm.weight": torch.zeros(3)}, out / "model-00001-of-00002.safetensors")
    save_file({"lm_head.weight": torch.full_like(head, 7.0)}, out / "model-00002-of-00002.safetensors")
    (out / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors", '
        '"lm_head.weight": "model-00002-of-00002.safetensors"}}')


def test_merge_into_a_stale_sharded_checkpoint(zoo_models, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    cfg = _merge_config(tmp_path, zoo_models)
    out = tmp_path / "out"
    _stale_sharded(out, zoo_models)
    before = sorted(p.name for p in out.iterdir())
    text = _one_line(CliRunner().invoke(app, ["merge", str(cfg), "-o", str(out)]))
    assert "is not empty" in text and "--overwrite" in text
    assert sorted(p.name for p in out.iterdir()) == before  # refused: untouched

    result = CliRunner().invoke(app, ["merge", str(cfg), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not any(n.startswith("model-0000") or "index" in n for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left
    ours = TensorReader(out).get("lm_head.weight")
    theirs = AutoModelForCausalLM.from_pretrained(out).lm_head.weight.detach()
    assert torch.equal(ours, theirs) and not torch.all(ours == 7.0)


def test_failed_merge_leaves_nothing(zoo_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rev = _copy(zoo_models, "rev", tmp_path)
    data = (rev / "model.safetensors").read_bytes()
    (rev / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = {"merge_method": "task_arithmetic", "base_model": str(zoo_models["base"]),
           "models": [{"model": str(rev), "parameters": {"weight": 0.5}}]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    text = _one_line(CliRunner().invoke(app, ["merge", "merge.yml", "-o", "out"]))
    assert "rev/model.safetensors: truncated" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml", "rev"]


def test_merge_onto_a_file_is_refused(zoo_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _merge_config(tmp_path, zoo_models)
    (tmp_path / "out").write_text("mine")
    assert "is a file, not a folder" in _one_line(CliRunner().invoke(app, ["merge", str(cfg), "-o", "out"]))
    assert (tmp_path / "out").read_text() == "mine"


def test_atomic_dir_keeps_the_old_contents_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("the merge failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").read_text() == "old"


def test_overwrite_refuses_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "x").write_text("precious")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="working directory"):
        with atomic_dir(Path("."), overwrite=True):
            pass
    assert (tmp_path / "x").exists()


# -- disk full, read-only, permission -----------------------------------------------------------------
def test_disk_full_is_one_line_naming_the_file():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with pytest.raises(OutputError, match=r"cannot write /dev/full: no space left on device; the output needs "
                                          r"about 10 bytes"):
        with io_errors(Path("/dev/full"), need=10):
            with open("/dev/full", "w") as f:
                f.write("x" * 10)
                f.flush()


def test_not_enough_space_is_refused_before_writing(tmp_path):
    with pytest.raises(OutputError, match=r"not enough disk space: the output needs about 1,000,000,000,000,000,000"):
        check_space(tmp_path, 10**18)


def test_read_only_target_is_one_line(zoo_models, tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder: permissions do not bite")
    monkeypatch.chdir(tmp_path)
    cfg = _merge_config(tmp_path, zoo_models)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        text = _one_line(CliRunner().invoke(app, ["merge", str(cfg), "-o", str(ro / "out")]))
    finally:
        ro.chmod(0o755)
    assert f"cannot write {ro}" in text and "permission denied" in text


def test_unwritable_place_is_one_line_as_root(zoo_models, tmp_path, monkeypatch):
    """sysfs refuses new folders even to root: the same one line."""
    try:
        os.mkdir("/sys/evomerge-test-probe")
        os.rmdir("/sys/evomerge-test-probe")
        pytest.skip("/sys takes new folders here")
    except OSError:
        pass
    monkeypatch.chdir(tmp_path)
    cfg = _merge_config(tmp_path, zoo_models)
    text = _one_line(CliRunner().invoke(app, ["merge", str(cfg), "-o", "/sys/evomerge-test-out"]))
    assert "cannot write /sys/" in text and ("not permitted" in text or "permission denied" in text
                                             or "read-only" in text)


def test_anchors_when_kmeans_leaves_clusters_empty():
    """Items that repeat (few calibration models, few items) used to end in 'argmin of an empty sequence'."""
    import warnings

    import numpy as np

    from evomerge.irt.anchors import select_anchors

    features = np.repeat([[0.0, 0.0], [1.0, 1.0]], 5, axis=0)  # 10 items, 2 distinct
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning about the duplicates
        anchors = select_anchors(features, 4)
    assert len(set(anchors.index.tolist())) == 4 and abs(anchors.weight.sum() - 1) < 1e-12


def test_a_device_this_machine_lacks_is_refused_before_weights(zoo, tmp_path, monkeypatch, weights_log):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    exp = _experiment(tmp_path, zoo, {"base": "zoo:base", "rev": "zoo:rev"})
    data = yaml.safe_load(exp.read_text())
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({**data, "device": "cuda:1"}))
    text = _one_line(CliRunner().invoke(app, ["search", "exp.yaml", "-o", "run"]))
    assert "device: 'cuda:1'" in text and "no CUDA GPU" in text
    assert not weights_log.exists()
