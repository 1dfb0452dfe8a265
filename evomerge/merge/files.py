"""``evomerge merge config.yaml -o OUT``: a merge from checkpoints on disk to a checkpoint on disk.

Streams tensor by tensor: each output tensor is merged from the inputs' copies of that tensor alone
and written into the current shard, so peak memory is about one shard plus one tensor per model,
not the model size times the number of models (mergekit #549).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator

import torch

from evomerge.checkpoint import TensorReader, copy_tokenizer, dtype_bytes, resolve_model_path, write_sharded
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import as_dtype, tensor_seed
from evomerge.merge.methods import FastRng, merge_tensor
from evomerge.merge.plan import Sources, check_config, job_params
from evomerge.merge.slices import output_config, output_reference, plan_jobs
from evomerge.merge.tokenizer import VOCAB_NAMES, build_tokenizer, output_vocab_size, vocab_rows
from evomerge.outdir import check_space, io_errors


def merge_to_disk(config: MergeConfig, out: str | Path, *, allow_pickle: bool = False,
                  device: str = "cpu", max_shard_size: str | int = "5GB",
                  on_tensor: Callable[[str], None] | None = None) -> Path:
    """Validate ``config`` against the checkpoints' headers, then merge and write ``out``."""
    out = Path(out)
    sources = Sources.inspect(config.model_names(), allow_pickle)
    method, _ = check_config(config, sources)
    num_layers = {m: sources.num_layers(m) for m in config.model_names()}
    jobs = plan_jobs(config, {m: list(sources.index[m]) for m in config.model_names()}, num_layers)
    readers = {n: TensorReader(sources.paths[n], allow_pickle) for n in config.model_names()}
    tok_source, tok_tokens, pad_to = config.tokenizer_settings()
    tok_info = None
    if tok_source is not None:
        names = config.model_names()
        src = "base" if tok_source == "base" else "union" if tok_source == "union" else tok_source
        paths = dict(sources.paths)
        if src not in ("base", "union") and src not in paths:
            paths[src] = resolve_model_path(src)
        tok_info = build_tokenizer(config.base_model or names[0], names, src, paths,
                                   {m: sources.configs[m].get("vocab_size") for m in names}, list(tok_tokens))
    work_dtype = as_dtype(config.dtype)
    out_dtype = as_dtype(config.out_dtype or config.dtype)
    need = sum(math.prod(sources.index[j.order[0]][j.sources[j.order[0]]].shape)
               * (out_dtype.itemsize if out_dtype is not None else dtype_bytes(
                   sources.index[j.order[0]][j.sources[j.order[0]]].dtype)) for j in jobs)
    check_space(out, need)  # a full disk is said now, not after minutes of merging

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for job in jobs:
            raw = {m: readers[m].get(job.sources[m], device) for m in job.order}
            first = raw[job.order[0]]
            if not first.is_floating_point():  # integer buffers: the first source's, as mergekit copies them
                yield job.name, first.cpu()
                continue
            if work_dtype is not None:
                raw = {n: t.to(work_dtype) for n, t in raw.items()}
            if tok_info is not None and any(v in job.name for v in VOCAB_NAMES):
                raw = vocab_rows(tok_info, raw, job.base, tok_tokens, pad_to)
            deltas_in = method.takes_deltas(job.base is not None)
            inputs = job.inputs(deltas_in)
            per_model, glob = job_params(method, job, inputs)
            base = raw[job.base] if job.base is not None and job.base in raw else None
            if deltas_in:
                assert base is not None  # takes_deltas is true only with a base
                stack = torch.stack([raw[m].float() - base.float() for m in inputs]).to(base.dtype)
            else:
                stack = torch.stack([raw[m] for m in inputs])
            gen = None
            if method.randomized:
                gen = FastRng(tensor_seed(config.evomerge.seed, job.name), device)
            merged = merge_tensor(method, base, stack, per_model, glob, gen)
            if out_dtype is not None:
                merged = merged.to(out_dtype)
            if on_tensor:
                on_tensor(job.name)
            yield job.name, merged.cpu()

    with io_errors(out, need):
        write_sharded(tensors(), out, max_shard_size)
    ref = output_reference(config)
    cfg = output_config(config, sources.configs[ref], sources.configs, num_layers)
    dtype_name = config.out_dtype or config.dtype or cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype_name:
        cfg["dtype"] = dtype_name
        cfg.pop("torch_dtype", None)
    if tok_info is not None:
        cfg["vocab_size"] = output_vocab_size(tok_info, pad_to)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tok_info is not None:
        tok_info.tokenizer.save_pretrained(str(out))
    else:
        copy_tokenizer(sources.paths[ref], out)
    (out / "mergekit_config.yml").write_text(config.to_yaml())
    return out
