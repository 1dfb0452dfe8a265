"""A fixed-depth model for layer plans: ``depth`` layer slots, a plan in the first, identity layers after.

A vLLM engine has a fixed number of layers, and restarting it per candidate costs seconds. In a pre-norm
model a layer whose residual writes (attention output and MLP down projection) are zero adds nothing
to the stream: it is an exact identity. So one engine of ``depth`` slots runs any plan of up to
``depth`` hops: the plan's layers (in the folded form of :mod:`evomerge.merge.dfs_export`, the form
that is exported) fill the first slots, identity layers the rest. A parameter-space merge is the
plan "every layer of the merge, in order" and runs in the same engine.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping

import torch

from evomerge.merge.dfs_model import PER_LAYER_CONFIG_KEYS, RESIDUAL_WRITES
from evomerge.recipe import DFSError

_LAYER = re.compile(r"^(?P<prefix>.*?\.)(?P<index>\d+)\.(?P<rest>.+)$")


def layer_prefix(tensor_names: list[str]) -> str:
    """The prefix of the decoder layers' tensors (``model.layers.``): the one with the most indices."""
    seen: dict[str, set[int]] = {}
    for name in tensor_names:
        m = _LAYER.match(name)
        if m:
            seen.setdefault(m["prefix"], set()).add(int(m["index"]))
    if not seen:
        raise DFSError("no numbered decoder layers among the checkpoint's tensors")
    return max(seen, key=lambda p: len(seen[p]))


def identity_layer(layer0: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer (tensor suffix -> tensor) that adds nothing to the stream: layer 0 with its residual
    writes (weights and biases) zero."""
    suffixes = list(layer0)
    for writes in RESIDUAL_WRITES:
        if all(any(s.startswith(w + ".") for s in suffixes) for w in writes):
            return {s: torch.zeros_like(t) if s.startswith(tuple(w + "." for w in writes)) else t.clone()
                    for s, t in layer0.items()}
    raise DFSError(f"cannot find the residual writes among the layer's tensors {suffixes[:6]}...; known: "
                   f"{RESIDUAL_WRITES}")


def padded(tensors: Iterator[tuple[str, torch.Tensor]], used: int, depth: int, prefix: str,
           identity: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` (a model of ``used`` layers), then identity layers in slots ``used .. depth - 1``."""
    if used > depth:
        raise DFSError(f"a plan of {used} layers does not fit the engine's {depth} slots")
    yield from tensors
    for k in range(used, depth):
        for suffix, t in identity.items():
            yield f"{prefix}{k}.{suffix}", t


def slot_folder(host: str | Path, depth: int, out: str | Path) -> Path:
    """A model folder for an engine of ``depth`` slots: the host's config at that depth, its tokenizer
    and generation config, no weights (the engine starts with dummy weights; candidates are pushed)."""
    host, out = Path(host), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((host / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    n = int(text.get("num_hidden_layers") or text.get("n_layer"))
    for key in PER_LAYER_CONFIG_KEYS:
        values = text.get(key)
        if isinstance(values, list):
            common = Counter(values).most_common()
            if len(common) > 1:
                raise DFSError(f"the host's config has per-layer '{key}' {values}: an engine of fixed slots cannot "
                               f"move such layers; run this DFS search with evaluation.backend: hf")
            text[key] = values[:1] * depth
    text["num_hidden_layers" if "num_hidden_layers" in text else "n_layer"] = depth
    if n > depth:
        raise DFSError(f"an engine of {depth} slots is shallower than the host's {n} layers")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in host.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in (
                "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "chat_template.jinja", "added_tokens.json")):
            shutil.copy2(f, out / f.name)
    return out
